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
// Ownership: SwapFile owns the fd and the file; it borrows the IoEngine,
//   which must outlive it.
// Thread-safety: allocate/free are internally locked; reads and writes of
//   distinct extents may run concurrently; one extent is not read and written
//   at the same time (the caller's pipeline guarantees it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

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

  Result<Extent> allocate(uint64_t bytes);
  void free(const Extent& extent);

  // Async whole-extent I/O. `buf` holds extent.length bytes (4 KiB aligned).
  // write records the checksum of buf; after a read completes, call
  // verify(extent, buf) (the pipeline does it when the ticket is waited).
  Result<Ticket> submit_write(const Extent& extent, const void* buf);
  Result<Ticket> submit_read(const Extent& extent, void* buf);
  Status verify(const Extent& extent, const void* buf) const;

  // Synchronous: submit + wait (+ verify for reads).
  Status write(const Extent& extent, const void* buf);
  Status read(const Extent& extent, void* buf);

  IoEngine* engine() const;

 private:
  struct Impl;
  explicit SwapFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::io
