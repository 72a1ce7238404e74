// strata/io/io_engine.h — asynchronous block I/O between host buffers and files.
//
// Two backends behind one interface: UringEngine (io_uring via liburing:
// registered files and buffers, batched submits) and ThreadPoolEngine
// (pread/pwrite on worker threads), chosen by make_io_engine(), which probes
// io_uring and falls back, recording why in IoEngine::backend_note().
//
// Ownership: the caller owns every buffer and fd and keeps them valid until
//   the ticket that uses them completes (wait() returned, or poll() returned
//   true). The engine owns its rings and threads; destroying it drains every
//   outstanding batch first.
// Alignment: with O_DIRECT files, buf, offset and len must be multiples of
//   kDirectAlignment (4096); the engine checks and returns InvalidArgument
//   from submit() without submitting any request of the batch.
// Units: bytes, nanoseconds.
// Thread-safety: every method may be called from several threads; a given
//   ticket is waited on by one thread only. Requests of one batch, and of
//   distinct batches, may complete in any order: the caller does not submit
//   overlapping writes (or a read overlapping a write) at the same time.
// Semantics: a batch succeeds only when every byte of every request moved.
//   -EINTR/-EAGAIN are resubmitted, short transfers are continued from where
//   they stopped, a transfer larger than asked or a read of 0 bytes (end of
//   file) is an error. After the first error of a batch, its requests not
//   yet started are skipped; wait() reports that first error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <strata/engine_config.h>
#include <strata/status.h>

namespace strata::io {

inline constexpr size_t kDirectAlignment = 4096;
// Largest block_size accepted (one io_uring SQE carries a 32-bit length).
inline constexpr size_t kMaxBlockSize = size_t(1) << 30;
// A registered (fixed) buffer covers at most this many bytes; larger regions
// are registered as several pieces.
inline constexpr size_t kMaxRegisteredPiece = size_t(1) << 30;

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

// The aio.* fields default to the schema's (default_engine_config().aio):
// one default per key, in the schema.
struct IoOptions {
  enum class Backend { kAuto, kUring, kThreadPool };
  Backend backend = Backend::kAuto;
  // aio.queue_depth: block requests in flight per ring (io_uring). The thread
  // pool has one request in flight per worker thread.
  unsigned queue_depth = unsigned(default_engine_config().aio.queue_depth);
  // aio.block_size: bytes per request; a multiple of 4096, at most kMaxBlockSize.
  size_t block_size = size_t(default_engine_config().aio.block_size);
  // aio.intra_op_parallelism (old name aio.thread_count): io_uring rings, each
  // driven by its own thread; block requests of a batch are spread over them.
  // The thread pool starts max(intra_op_parallelism, min(queue_depth, 8))
  // workers, so its default keeps several requests in flight like a ring does.
  unsigned intra_op_parallelism = unsigned(default_engine_config().aio.intra_op_parallelism);
  // aio.single_submit: one io_uring_submit per SQE.
  bool single_submit = default_engine_config().aio.single_submit;
  // aio.overlap_events: refill the queue as completions arrive; false waits
  // for the whole window of queue_depth requests before submitting more.
  bool overlap_events = default_engine_config().aio.overlap_events;
  // Record the service time of every block request (submit to completion);
  // read back with IoEngine::take_latencies_ns(). For benchmarks.
  bool record_latency = false;
};

// IoOptions from the typed aio.* fields (backend kAuto, no latency record).
IoOptions io_options_from(const AioConfig& aio);

// Counters since the engine was created. Invariants: read_ops + write_ops
// counts block requests that completed successfully; bytes_* counts their
// bytes; errors counts block requests that failed.
struct IoStats {
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t read_ops = 0;  // block-sized requests completed
  uint64_t write_ops = 0;
  uint64_t retries = 0;           // -EINTR/-EAGAIN resubmits and short-transfer continuations
  uint64_t errors = 0;            // block requests that failed
  uint64_t fixed_buffer_ops = 0;  // block requests done with READ_FIXED/WRITE_FIXED
  uint64_t submit_calls = 0;      // io_uring_submit/_and_wait calls (0 for the thread pool)
};

// Checks ranges and combinations of IoOptions; the message names the field.
Status validate_io_options(const IoOptions& options);

class IoEngine {
 public:
  virtual ~IoEngine() = default;

  // "io_uring" or "threadpool".
  virtual const char* backend_name() const = 0;
  // Why this backend was chosen ("io_uring refused: Operation not permitted").
  virtual const std::string& backend_note() const = 0;

  // Registers an open fd (owned by the caller) for use in requests; `path` is
  // used in error messages. Returns the handle for IoRequest::file. `direct`
  // (or O_DIRECT set on the fd) turns on the alignment checks.
  virtual Result<int> register_file(int fd, std::string path, bool direct) = 0;
  // The file must have no request in flight.
  virtual Status unregister_file(int file) = 0;

  // Optional: register host memory for fixed-buffer I/O (io_uring). A region
  // larger than kMaxRegisteredPiece is registered in pieces. Requests whose
  // whole buffer lies in one registered piece use READ_FIXED/WRITE_FIXED.
  // Fails (and the engine keeps working without fixed buffers) when
  // RLIMIT_MEMLOCK is too low or the kernel refuses. Default: no-op.
  virtual Status register_buffer(void* base, size_t len) { return Status::Ok(); }
  // Removes a region given to register_buffer(); no request may be using it.
  virtual Status unregister_buffer(void* base) { return Status::Ok(); }

  // Submits a batch. All requests of the batch complete before wait() on the
  // returned ticket returns; the first error (with op, path, offset, len and
  // errno text) is returned by wait().
  virtual Result<Ticket> submit(std::span<const IoRequest> batch) = 0;
  // Blocks (without spinning) until the batch completes, then forgets the
  // ticket. An unknown or already waited ticket is InvalidArgument.
  virtual Status wait(Ticket ticket) = 0;
  // Non-blocking: true when complete (then wait() returns at once).
  virtual Result<bool> poll(Ticket ticket) = 0;
  // As wait(), and *done_ns (may be null) gets when the batch's last request
  // completed, in std::chrono::steady_clock nanoseconds (the clock of engine
  // traces) — not when it was waited for, which may be much later. Default:
  // the time wait() returned.
  virtual Status wait_timed(Ticket ticket, int64_t* done_ns);

  // Blocks until every batch submitted so far has completed (used by close()
  // and on errors). Their results are kept for wait().
  virtual void drain() = 0;

  virtual IoStats stats() const = 0;

  // With IoOptions::record_latency: the service times of the block requests
  // completed since the last call, in ns, in completion order. Else empty.
  virtual std::vector<uint64_t> take_latencies_ns() { return {}; }

  // Synchronous conveniences.
  Status read(int file, void* buf, size_t len, uint64_t offset);
  Status write(int file, const void* buf, size_t len, uint64_t offset);
};

// Probes io_uring (unless options.backend says otherwise) and falls back to
// the thread pool when it is missing or refused. With kUring, an unavailable
// io_uring is an error (kUnavailable) instead of a fallback.
Result<std::unique_ptr<IoEngine>> make_io_engine(const IoOptions& options);

}  // namespace strata::io
