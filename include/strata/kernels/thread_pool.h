// strata/kernels/thread_pool.h — the private thread pool of the CPU kernels.
//
// Not OpenMP: torch shares the process-wide libgomp, and changing its thread
// count changes torch's. Workers wait passively (condition variable, no
// spinning), so an idle pool costs no CPU while backward runs.
//
// parallel_for(tasks, fn): the calling thread takes part. The tasks are cut
// into one contiguous run per thread; each thread that joins claims a run of
// its own and takes its tasks one at a time from the front, and a thread whose
// run is empty takes tasks from the back of the others' runs. So a kernel's
// tiles stream as one long stretch per thread (the hardware prefetchers follow
// it; with tiles handed out alternately, two threads ran at 0.75-0.91 of the
// memory bound where the memory is fast: docs/kernels.md), and a slow or descheduled thread still
// does not hold back the others. The call returns when every task has run and no worker still
// touches fn. Workers that wake after all tasks are claimed do not join, so a short call does not
// wait for sleeping threads to wake.
//
// Floating-point environment: for the duration of a call, workers run with
// the caller's SSE control register (MXCSR: rounding mode, flush-to-zero,
// denormals-are-zero), so a task's result does not depend on which thread ran
// it (torch.set_flush_denormal sets these on the calling thread only).
//
// Ownership: the pool owns its threads; the destructor joins them.
// Thread-safety: parallel_for() may be called from several threads; calls
//   run one at a time (a second caller waits for the first call to return).
//   A parallel_for() called from inside a task of the same pool runs its tasks
//   serially on the calling thread (no deadlock). fn must not throw.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace strata::kernels {

class ThreadPool {
 public:
  // threads == 0: one per CPU this process may run on (platform::
  // usable_cpus(): the affinity mask, else the online CPUs). The calling
  // thread takes part in parallel_for, so the pool starts threads-1 workers.
  // If the OS refuses to start a thread, the pool runs with the threads it got
  // (size() says so).
  explicit ThreadPool(unsigned threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const { return threads_; }

  // Runs fn(task) for task in [0, tasks), spread over the threads; returns
  // when all are done. Which thread runs a task is decided at run time (runs
  // and stealing, above); fn must not depend on it.
  void parallel_for(size_t tasks, const std::function<void(size_t task)>& fn);

  // Linux thread ids of the workers (for tests reading /proc/self/task).
  // Complete as soon as the constructor returns.
  std::vector<int> worker_tids() const;

 private:
  // One thread's contiguous run of tasks: [front, back) packed as
  // front | back << 32, claimed by compare-and-swap from either end. On its
  // own cache line, so a run's owner and its thieves share one line only
  // while they contend for it.
  struct alignas(64) Run {
    std::atomic<uint64_t> span{0};
  };
  static constexpr size_t kNoTask = ~size_t(0);
  // The next task of `run`, from its front or (a thief) its back; kNoTask
  // when it is empty.
  static size_t take(Run& run, bool from_back);
  void worker_loop(unsigned index);
  void run_tasks();
  void run_call(size_t tasks, const std::function<void(size_t task)>& fn);

  unsigned threads_;
  std::vector<std::thread> workers_;
  std::vector<int> tids_;
  std::mutex call_mu_;  // one parallel_for at a time (held for the whole call)
  mutable std::mutex mu_;
  std::condition_variable cv_work_;  // workers: a new generation_ or stop_
  std::condition_variable cv_done_;  // caller: active_ reached 0 / a tid was recorded
  const std::function<void(size_t)>* fn_ = nullptr;  // valid while a call is open
  std::vector<Run> runs_;         // threads_ of them; the open call uses runs_used_
  size_t runs_used_ = 0;          // min(threads_, tasks) for the open call
  std::atomic<size_t> homes_{0};  // next run to hand a joining thread as its own
  uint64_t generation_ = 0;       // bumped by each parallel_for that uses workers
  unsigned active_ = 0;           // workers inside run_tasks() for the open call
  bool open_ = false;             // workers may still join the current call
  unsigned fp_control_ = 0;       // the caller's MXCSR for the open call
  bool stop_ = false;
};

}  // namespace strata::kernels
