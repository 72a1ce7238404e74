// strata/io/swap_file.h — one preallocated swap file per engine, rank and tier.
//
// The file is created under a directory with a unique name
// ("strata-<tag>-<pid>-<seq>.swap", O_NOFOLLOW, mode 0600), locked with
// flock, preallocated with fallocate after a statvfs space check, and removed
// when the SwapFile is destroyed. Stale files of dead processes are removed at
// creation. Extents are 4 KiB-aligned sub-ranges handed out by a first-fit
// allocator with coalescing. With checksums on, each extent carries the XXH3
// of its last written contents, verified after every read.
//
// Naming, locking, stale files: the file is created under a hidden temporary
// name, locked (flock LOCK_EX), then renamed to its final name, so a
// "strata-*.swap" file whose flock can be taken has no living owner: the
// scan at creation removes exactly those (and reports how many on stderr and
// in SwapFileStats::stale_removed). Files of other users that cannot be
// opened are left alone and counted in stale_skipped.
// O_DIRECT: tried first; when the file system refuses it (open or a first
// aligned write fails with EINVAL) the file is used buffered and a warning is
// printed once per directory; direct() tells which.
//
// Ownership: SwapFile owns the fd and the file; it borrows the IoEngine,
//   which must outlive it. The destructor drains the engine, unregisters the
//   file, unlinks it (still holding the lock) and closes it.
// Alignment: extents are 4 KiB aligned in offset and length; buffers passed
//   to the I/O calls must be 4 KiB aligned when direct().
// Units: bytes.
// Thread-safety: allocate/free are internally locked; reads and writes of
//   distinct extents may run concurrently; one extent is not read and written
//   at the same time (the caller's pipeline guarantees it).
// Checksums: the XXH3-64 of each 1 MiB chunk of the extent (io/checksum.h:
//   chunk_checksum; the chunks hash in parallel through
//   SwapFileOptions::parallel_for), recorded when a write is submitted,
//   checked by verify(). A caller that hashes the buffer itself (the engine,
//   chunk by chunk while it updates the record, so the record crosses the
//   memory bus once) passes its chunk checksums to submit_write and checks a
//   read with verify_chunks. An extent never written since it was allocated
//   has no checksum and verifies trivially. A mismatch is Corruption naming
//   path, extent id, offset and the chunk's bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <strata/io/io_engine.h>
#include <strata/status.h>

namespace strata::io {

struct Extent {
  uint64_t offset = 0;  // bytes, multiple of 4096
  uint64_t length = 0;  // bytes, multiple of 4096
  uint32_t id = 0;      // index for checksums and messages
};

struct SwapFileOptions {
  std::string dir;          // nvme_path
  std::string tag = "opt";  // e.g. "rank0-nvme"
  uint64_t size = 0;        // bytes to preallocate (rounded up to 4096)
  bool direct = true;       // try O_DIRECT; falls back to buffered with a warning
  bool checksums = true;    // strata.verify_checksums
  // Runs fn(0) .. fn(tasks - 1), possibly on several threads, and returns when
  // all are done (e.g. the engine's kernel thread pool). Checksums hash 1 MiB
  // chunks through it; empty: on the calling thread. The checksum is the same
  // either way.
  std::function<void(size_t tasks, const std::function<void(size_t)>& fn)> parallel_for;
};

// Invariants (bytes): capacity == used_bytes + free_bytes;
//   largest_free <= free_bytes; fragments == number of free ranges.
struct SwapFileStats {
  uint64_t capacity = 0;
  uint64_t used_bytes = 0;
  uint64_t free_bytes = 0;
  uint64_t largest_free = 0;
  uint64_t live_extents = 0;
  uint64_t fragments = 0;
  uint64_t checksums_verified = 0;
  uint64_t checksum_mismatches = 0;
  uint64_t stale_removed = 0;  // stale swap files of dead processes removed at creation
  uint64_t stale_skipped = 0;  // candidates that could not be examined (other owner, EACCES)
};

class SwapFile {
 public:
  static Result<std::unique_ptr<SwapFile>> create(const SwapFileOptions& options, IoEngine* engine);
  ~SwapFile();
  SwapFile(const SwapFile&) = delete;
  SwapFile& operator=(const SwapFile&) = delete;

  const std::string& path() const;
  bool direct() const;  // false when the file system refused O_DIRECT
  uint64_t size() const;
  int file_handle() const;  // IoEngine handle

  // First fit; `bytes` is rounded up to 4096. NoSpace when no free range is
  // large enough (the message gives free bytes and fragments).
  Result<Extent> allocate(uint64_t bytes);
  // Returns the extent and coalesces it with free neighbours. An extent that
  // is not live in this file (double free, foreign extent) is reported on
  // stderr and ignored.
  void free(const Extent& extent);

  // Async whole-extent I/O. `buf` holds extent.length bytes (4 KiB aligned).
  // write records the checksum of buf; after a read completes, call
  // verify(extent, buf) (the pipeline does it when the ticket is waited).
  Result<Ticket> submit_write(const Extent& extent, const void* buf);
  Result<Ticket> submit_read(const Extent& extent, void* buf);
  Status verify(const Extent& extent, const void* buf) const;
  // The same write with the checksums of buf's chunks computed by the caller
  // (chunk_checksum(buf, extent.length, i) for every chunk i; with checksums
  // off they are ignored). A wrong count is InvalidArgument and writes
  // nothing; a wrong value is found by the next read's verification.
  Result<Ticket> submit_write(const Extent& extent, const void* buf,
                              std::vector<uint64_t> chunk_sums);
  // Compares chunks [first, first + chunk_sums.size()) of the extent's last
  // written contents with checksums the caller computed over its read
  // buffer. checksums_verified counts the calls that start at chunk 0.
  Status verify_chunks(const Extent& extent, size_t first,
                       std::span<const uint64_t> chunk_sums) const;
  bool checksums() const;  // SwapFileOptions::checksums

  // Synchronous: submit + wait (+ verify for reads).
  Status write(const Extent& extent, const void* buf);
  Status read(const Extent& extent, void* buf);

  IoEngine* engine() const;
  SwapFileStats stats() const;

 private:
  struct Impl;
  explicit SwapFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::io
