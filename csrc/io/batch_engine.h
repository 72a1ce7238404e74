// io/batch_engine.h — private: what both IoEngine backends share.
//
// BatchEngine owns the ticket table, the file table, the validation and the
// splitting of requests into block requests (BlockReq), the counters and the
// completion of batches. A backend only moves BlockReqs: dispatch() hands a
// batch's pieces to its workers, which call finish() exactly once per piece.
//
// Life of a batch: submit() validates everything first (no piece of an
// invalid batch is submitted), builds the Batch with all its pieces (their
// addresses never change), inserts it in batches_ and dispatches it. Workers
// finish pieces in any order; the piece that brings `remaining` to 0 marks
// the batch done under mu_ and notifies. wait() erases it.
//
// Invariant: Batch::remaining == pieces not yet finished; a Batch is
// destroyed only by wait() (or the engine destructor) after done.
// Thread-safety: as IoEngine. mu_ guards batches_ and the done/error fields
// of every Batch; files_mu_ guards files_.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <strata/io/io_engine.h>

namespace strata::io::detail {

struct Batch;

// One block-sized piece of a request. Owned by its Batch; a backend keeps
// raw pointers to it until it calls finish().
struct BlockReq {
  Batch* batch = nullptr;
  char* buf = nullptr;        // next byte to move (advanced by short transfers)
  uint64_t offset = 0;        // next file offset
  uint32_t remaining = 0;     // bytes still to move
  uint32_t len = 0;           // bytes of the whole piece
  uint64_t start_offset = 0;  // file offset of the whole piece (messages)
  int file = -1;              // engine handle
  int fd = -1;
  int buf_index = -1;  // registered buffer index, -1: none
  IoOp op = IoOp::kRead;
  uint16_t attempts = 0;     // -EINTR/-EAGAIN resubmits so far
  uint64_t start_ns = 0;     // when first handed to the kernel (record_latency)
  iovec iov{};               // for READV/WRITEV on kernels without READ/WRITE
  BlockReq* prev = nullptr;  // backend's intrusive in-flight list
  BlockReq* next = nullptr;
};

struct Batch {
  Ticket ticket = 0;
  std::vector<BlockReq> reqs;
  std::atomic<size_t> remaining{0};
  // Set with the first error: pieces not yet started are skipped.
  std::atomic<bool> failed{false};
  // Guarded by BatchEngine::mu_.
  Status error;
  bool done = false;
  uint64_t done_ns = 0;  // monotonic_ns() when done was set
  std::condition_variable cv;
};

// Retries of -EINTR/-EAGAIN on one piece before giving up.
inline constexpr uint16_t kMaxAttempts = 1000;

uint64_t monotonic_ns();

class BatchEngine : public IoEngine {
 public:
  BatchEngine(const IoOptions& options, std::string note);
  ~BatchEngine() override;

  const std::string& backend_note() const override { return note_; }
  Result<int> register_file(int fd, std::string path, bool direct) override;
  Status unregister_file(int file) override;
  Result<Ticket> submit(std::span<const IoRequest> batch) override;
  Status wait(Ticket ticket) override;
  Status wait_timed(Ticket ticket, int64_t* done_ns) override;
  Result<bool> poll(Ticket ticket) override;
  void drain() override;
  IoStats stats() const override;
  std::vector<uint64_t> take_latencies_ns() override;

  const IoOptions& options() const { return options_; }

 protected:
  // Backend hooks. on_register_file/on_unregister_file run under files_mu_.
  virtual Status on_register_file(int handle, int fd) { return Status::Ok(); }
  virtual void on_unregister_file(int handle) {}
  // Sets BlockReq::buf_index of every piece whose memory lies in one
  // registered buffer (default: none). Called by submit() before dispatch.
  virtual void assign_buffers(std::vector<BlockReq>& reqs) const {}
  // Hands every piece of `batch` (at least one) to the workers. Must not fail:
  // a backend that cannot run a piece finishes it with an error.
  virtual void dispatch(Batch* batch) = 0;

  // Workers: exactly once per piece. `status` is the piece's result.
  void finish(BlockReq* req, const Status& status);
  // Workers: a piece skipped because its batch already failed.
  void skip(BlockReq* req);
  void count_retry() { retries_.fetch_add(1, std::memory_order_relaxed); }
  void count_submit_call() { submit_calls_.fetch_add(1, std::memory_order_relaxed); }

  // "read /path offset O len L" for a piece (the whole piece), plus "after N
  // bytes" when part of it moved.
  std::string describe(const BlockReq& req) const;
  Status errno_status(const BlockReq& req, int err) const;
  Status io_status(const BlockReq& req, int err, const std::string& what) const;

  void set_note(std::string note) { note_ = std::move(note); }

  const IoOptions options_;

 private:
  struct FileEntry {
    int fd = -1;
    std::string path;
    bool direct = false;
    bool live = false;
  };

  std::string note_;

  mutable std::mutex files_mu_;
  std::vector<FileEntry> files_;

  std::mutex mu_;
  std::condition_variable drain_cv_;
  unsigned drainers_ = 0;
  std::unordered_map<Ticket, std::unique_ptr<Batch>> batches_;
  std::atomic<Ticket> next_ticket_{1};

  std::atomic<uint64_t> bytes_read_{0}, bytes_written_{0}, read_ops_{0}, write_ops_{0}, retries_{0},
      errors_{0}, fixed_ops_{0}, submit_calls_{0};

  std::mutex latency_mu_;
  std::vector<uint64_t> latencies_;
};

}  // namespace strata::io::detail
