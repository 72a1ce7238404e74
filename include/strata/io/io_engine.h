// strata/io/io_engine.h — asynchronous block I/O between host buffers and files.
//
// Two backends behind one interface: UringEngine (io_uring via liburing:
// registered files and buffers, batched submits) and ThreadPoolEngine
// (pread/pwrite on worker threads), chosen by make_io_engine(), which probes
// io_uring and falls back, recording why in IoEngine::backend_note().
//
// Ownership: the caller owns every buffer and fd and keeps them valid until
//   the ticket that uses them completes (wait() returned).
// Alignment: with O_DIRECT files, buf, offset and len must be multiples of
//   kDirectAlignment (4096); the engine checks and returns InvalidArgument.
// Units: bytes.
// Thread-safety: submit()/wait()/poll() may be called from several threads;
//   a given ticket is waited on by one thread only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <strata/status.h>

namespace strata::io {

inline constexpr size_t kDirectAlignment = 4096;

enum class IoOp : uint8_t { kRead, kWrite };

struct IoRequest {
  IoOp op = IoOp::kRead;
  int file = -1;        // handle from IoEngine::register_file()
  void* buf = nullptr;  // host memory, see Alignment above
  size_t len = 0;       // bytes; split into block_size requests internally
  uint64_t offset = 0;  // bytes into the file
};

// Identifies one submitted batch. 0 is never a valid ticket.
using Ticket = uint64_t;

struct IoOptions {
  enum class Backend { kAuto, kUring, kThreadPool };
  Backend backend = Backend::kAuto;
  unsigned queue_depth = 32;          // aio.queue_depth: requests in flight per ring
  size_t block_size = 1u << 20;       // aio.block_size: bytes per request
  unsigned intra_op_parallelism = 1;  // aio.intra_op_parallelism: rings / worker threads
  bool single_submit = false;         // aio.single_submit: one io_uring_submit per SQE
  bool overlap_events = true;         // aio.overlap_events: reap while submitting
};

struct IoStats {
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t read_ops = 0;   // block-sized requests completed
  uint64_t write_ops = 0;
  uint64_t retries = 0;    // -EINTR/-EAGAIN resubmits and short-transfer continuations
};

class IoEngine {
 public:
  virtual ~IoEngine() = default;

  // "io_uring" or "threadpool".
  virtual const char* backend_name() const = 0;
  // Why this backend was chosen ("io_uring refused: Operation not permitted").
  virtual const std::string& backend_note() const = 0;

  // Registers an open fd (owned by the caller) for use in requests; `path` is
  // used in error messages. Returns the handle for IoRequest::file.
  virtual Result<int> register_file(int fd, std::string path, bool direct) = 0;
  virtual Status unregister_file(int file) = 0;

  // Optional: register host memory for fixed-buffer I/O (io_uring). A region
  // larger than 1 GiB is registered in pieces. Default: no-op.
  virtual Status register_buffer(void* base, size_t len) { return Status::Ok(); }

  // Submits a batch. All requests of the batch complete before wait() on the
  // returned ticket returns; the first error (with op, path, offset, len and
  // errno text) is returned by wait().
  virtual Result<Ticket> submit(std::span<const IoRequest> batch) = 0;
  // Blocks until the batch completes.
  virtual Status wait(Ticket ticket) = 0;
  // Non-blocking: true when complete (then wait() returns at once).
  virtual Result<bool> poll(Ticket ticket) = 0;

  // Drains every outstanding batch (used by close() and on errors).
  virtual void drain() = 0;

  virtual IoStats stats() const = 0;

  // Synchronous conveniences.
  Status read(int file, void* buf, size_t len, uint64_t offset);
  Status write(int file, const void* buf, size_t len, uint64_t offset);
};

// Probes io_uring (unless options.backend says otherwise) and falls back to
// the thread pool when it is missing or refused.
Result<std::unique_ptr<IoEngine>> make_io_engine(const IoOptions& options);

}  // namespace strata::io
