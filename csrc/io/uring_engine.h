// io/uring_engine.h — private: the io_uring backend (liburing).
//
// intra_op_parallelism rings, each driven by its own worker thread, which is
// the only thread touching that ring's SQ and CQ:
//   submit()  -> the caller appends the batch's block requests to the rings'
//                incoming lists (round robin over rings) and, only if the
//                worker sleeps with room in its queue, writes the ring's
//                eventfd. No syscall otherwise.
//   worker    -> moves incoming to its pending queue, fills SQEs up to
//                queue_depth, submits them all with one io_uring_submit_and_wait
//                (which also blocks for at least one completion), reaps every
//                available CQE in one pass, checks each res (-EINTR/-EAGAIN
//                resubmitted, short transfers continued, res > len an error,
//                0 on a read an error), and repeats. An armed read of the
//                eventfd inside the ring is what wakes a worker sleeping in
//                io_uring_enter when new work arrives.
//   wait()    -> sleeps on the batch's condition variable.
// Files are registered in a sparse fixed-file table of every ring (handles
// below kFileSlots use IOSQE_FIXED_FILE); buffers given to register_buffer()
// go to a sparse fixed-buffer table, and pieces whose memory lies inside one
// registered piece use READ_FIXED/WRITE_FIXED. No SQPOLL (it burns a core).
//
// Ownership: owns rings, eventfds and threads; the destructor drains, stops
//   and joins the workers, then exits the rings.
// Thread-safety: as IoEngine. register_buffer/unregister_buffer/register_file
//   use io_uring_register, which the kernel serialises with submission.
#pragma once

#if STRATA_HAVE_URING

#include <liburing.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "io/batch_engine.h"

namespace strata::io::detail {

// What the kernel offers, found once per engine (and by probe_uring()).
struct UringCaps {
  bool rw_ops = false;     // IORING_OP_READ/WRITE (5.6); else READV/WRITEV
  bool fixed_ops = false;  // IORING_OP_READ_FIXED/WRITE_FIXED
  bool coop_taskrun = false;
};

// Creates a ring with `entries` SQEs; tries IORING_SETUP_COOP_TASKRUN (no
// IPI per completion) and falls back to no flags. Returns -errno.
int create_ring(unsigned entries, io_uring* ring, bool* coop_taskrun);
// Fills caps from the kernel's opcode probe; an error names what is missing.
Status probe_ring_caps(io_uring* ring, UringCaps* caps);

class UringEngine final : public BatchEngine {
 public:
  static constexpr unsigned kFileSlots = 256;
  static constexpr unsigned kBufferSlots = 1024;

  static Result<std::unique_ptr<UringEngine>> create(const IoOptions& options, std::string note);
  ~UringEngine() override;

  const char* backend_name() const override { return "io_uring"; }
  Status register_buffer(void* base, size_t len) override;
  Status unregister_buffer(void* base) override;

  unsigned rings() const { return unsigned(rings_.size()); }
  bool fixed_files() const { return fixed_files_; }
  const UringCaps& caps() const { return caps_; }
  // Test seam: registered pieces are at most `bytes` (default
  // kMaxRegisteredPiece), so the splitting is tested without pinning 1 GiB.
  void set_max_buffer_piece_for_testing(size_t bytes) { max_piece_ = bytes; }
  // Test seam, a ring torn down mid-batch: the next `times` io_uring_enter
  // calls of every worker (after the one each is blocked in, which this
  // wakes) fail with -err without entering the kernel; times < 0: every call
  // from then on, as on a ring that cannot be entered any more.
  void fail_enter_for_testing(int err, int times);

 protected:
  Status on_register_file(int handle, int fd) override;
  void on_unregister_file(int handle) override;
  void assign_buffers(std::vector<BlockReq>& reqs) const override;
  void dispatch(Batch* batch) override;

 private:
  struct Ring {
    io_uring ring{};
    bool ring_ok = false;
    int event_fd = -1;
    uint64_t event_value = 0;  // target of the armed eventfd read (worker only)
    iovec event_iov{};
    std::thread thread;
    std::mutex mu;
    std::condition_variable cv;        // used only once the ring is broken
    std::vector<BlockReq*> incoming;   // guarded by mu
    bool wake_wanted = false;          // guarded by mu: worker blocks in the kernel with room
    bool stop = false;                 // guarded by mu
    Status broken;                     // guarded by mu: io_uring_enter failed for good
    std::atomic<int> forced_errno{0};  // fail_enter_for_testing
    std::atomic<int> forced_left{0};   // calls still to fail; < 0: all
  };
  struct Region {
    uintptr_t base = 0;   // piece start
    size_t len = 0;       // piece bytes
    int index = -1;       // fixed buffer slot
    uintptr_t owner = 0;  // base given to register_buffer()
  };

  explicit UringEngine(const IoOptions& options, std::string note);
  Status init();
  void run(Ring& r);
  void wake(Ring& r);
  // The worker's io_uring_submit_and_wait, behind the test seam.
  int enter(Ring& r, unsigned wait_nr);
  // After a fatal error: returns once the kernel holds no request of the ring,
  // finishing each in-flight request with `status` as its CQE arrives. It
  // cancels them all (IORING_ASYNC_CANCEL_ANY, else one cancel each) and reaps
  // every CQE; if io_uring_enter keeps failing, SQEs the kernel never consumed
  // are failed at once and the rest are waited for by reading the CQ ring.
  // A request is never finished while the kernel may still move its bytes.
  void quiesce(Ring& r, const Status& status, BlockReq*& inflight_head, unsigned& inflight,
               bool& event_armed);
  // Fails requests the kernel never saw.
  void fail_all(const Status& status, std::deque<BlockReq*>& pending);
  // Sets the fixed-buffer slots of every ring; rolls back on failure.
  Status update_buffer_slots(const std::vector<int>& slots, const std::vector<iovec>& iovs);
  Status reregister_all_buffers();  // kernels without sparse buffer tables

  UringCaps caps_;
  std::vector<std::unique_ptr<Ring>> rings_;
  std::atomic<unsigned> next_ring_{0};
  bool fixed_files_ = false;
  bool sparse_buffers_ = false;

  std::mutex buffers_mu_;  // serialises register/unregister_buffer
  mutable std::shared_mutex regions_mu_;
  std::vector<Region> regions_;    // guarded by regions_mu_, sorted by base
  std::vector<bool> slot_used_;    // guarded by buffers_mu_
  uint64_t registered_bytes_ = 0;  // guarded by buffers_mu_
  size_t max_piece_ = kMaxRegisteredPiece;
};

}  // namespace strata::io::detail

#endif  // STRATA_HAVE_URING
