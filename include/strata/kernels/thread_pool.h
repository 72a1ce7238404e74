// strata/kernels/thread_pool.h — the private thread pool of the CPU kernels.
//
// Not OpenMP: torch shares the process-wide libgomp, and changing its thread
// count changes torch's. Workers wait passively (condition variable), so an
// idle pool costs no CPU while backward runs.
//
// Ownership: the pool owns its threads; the destructor joins them.
// Thread-safety: parallel_for() may be called from one thread at a time.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace strata::kernels {

class ThreadPool {
 public:
  // threads == 0: one per online CPU. The calling thread takes part in
  // parallel_for, so the pool starts threads-1 workers.
  explicit ThreadPool(unsigned threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const { return threads_; }

  // Runs fn(task) for task in [0, tasks), spread over the threads; returns
  // when all are done. Tasks are claimed dynamically; fn must not depend on
  // which thread runs it.
  void parallel_for(size_t tasks, const std::function<void(size_t task)>& fn);

  // Linux thread ids of the workers (for tests reading /proc/self/task).
  std::vector<int> worker_tids() const;

 private:
  void worker_loop(unsigned index);
  void run_tasks();

  unsigned threads_;
  std::vector<std::thread> workers_;
  std::vector<int> tids_;
  mutable std::mutex mu_;
  std::condition_variable cv_work_;
  std::condition_variable cv_done_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t tasks_ = 0;
  size_t next_ = 0;
  size_t done_ = 0;
  uint64_t generation_ = 0;
  unsigned active_ = 0;
  bool stop_ = false;
};

}  // namespace strata::kernels
