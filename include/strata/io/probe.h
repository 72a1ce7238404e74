// strata/io/probe.h — what the I/O layer can use on this machine and path.
//
// probe_uring() creates (and destroys) a small ring and checks the opcodes
// the engine needs; it reports why io_uring is unusable (not compiled in,
// ENOSYS on an old kernel, EPERM under a seccomp profile or with
// kernel.io_uring_disabled). probe_direct_io() tells whether a directory's
// file system accepts O_DIRECT (tmpfs refused it before Linux 6.6).
//
// Ownership: nothing is kept; probe_direct_io() removes its temp file.
// Thread-safety: all functions may be called concurrently.
#pragma once

#include <memory>
#include <string>

#include <strata/io/io_engine.h>
#include <strata/status.h>

namespace strata::io {

struct UringProbe {
  bool compiled = false;   // built with liburing (STRATA_HAVE_URING)
  bool available = false;  // a ring could be created and has the needed opcodes
  std::string reason;      // why not (empty when available), or what it found
};

UringProbe probe_uring();

// Creates a temp file with O_DIRECT in `dir` and tries one aligned 4 KiB
// write. true: O_DIRECT works; false: the file system refuses it (EINVAL);
// an error for anything else (dir missing, read-only, no space).
Result<bool> probe_direct_io(const std::string& dir);

// make_io_engine() with the io_uring probe given instead of run: the seam the
// tests use to exercise the fallback on machines where io_uring works. With
// kAuto and probe.available == false, returns the thread pool with a note
// naming probe.reason.
Result<std::unique_ptr<IoEngine>> make_io_engine_with_probe(const IoOptions& options,
                                                            const UringProbe& probe);

}  // namespace strata::io
