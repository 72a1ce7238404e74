// io/threadpool_engine.h — private: the pread/pwrite fallback backend.
//
// Worker threads take block requests from one shared queue and move them with
// pread/pwrite, with the io_uring backend's semantics: EINTR/EAGAIN retried,
// short transfers continued, 0 bytes on a read (end of file) an error.
// Workers sleep on a condition variable when the queue is empty.
//
// Ownership: owns its threads; the destructor drains, then joins them.
// Thread-safety: as IoEngine.
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "io/batch_engine.h"

namespace strata::io::detail {

class ThreadPoolEngine final : public BatchEngine {
 public:
  static Result<std::unique_ptr<ThreadPoolEngine>> create(const IoOptions& options,
                                                          std::string note);
  ~ThreadPoolEngine() override;

  const char* backend_name() const override { return "threadpool"; }
  unsigned threads() const { return unsigned(workers_.size()); }

 protected:
  void dispatch(Batch* batch) override;

 private:
  ThreadPoolEngine(const IoOptions& options, std::string note);
  void run();
  Status transfer(BlockReq* req);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<BlockReq*> queue_;  // guarded by mu_
  bool stop_ = false;            // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace strata::io::detail
