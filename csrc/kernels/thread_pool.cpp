#include <strata/kernels/thread_pool.h>

#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <system_error>

#include <strata/platform/affinity.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define STRATA_HAVE_MXCSR 1
#endif

namespace strata::kernels {
namespace {

// The pool whose task the current thread is running, to turn a nested
// parallel_for into a serial loop instead of a deadlock.
thread_local const ThreadPool* tls_current_pool = nullptr;

// The control bits of MXCSR (DAZ, exception masks, rounding, FTZ); the low
// six bits are sticky exception flags, not settings.
constexpr unsigned kFpControlMask = 0xFFC0u;

unsigned read_fp_control() {
#ifdef STRATA_HAVE_MXCSR
  return _mm_getcsr() & kFpControlMask;
#else
  return 0;
#endif
}

// Runs with `control` as the thread's MXCSR settings, restoring the old
// register after.
class FpControlScope {
 public:
  explicit FpControlScope(unsigned control) {
#ifdef STRATA_HAVE_MXCSR
    saved_ = _mm_getcsr();
    changed_ = (saved_ & kFpControlMask) != control;
    if (changed_) {
      _mm_setcsr((saved_ & ~kFpControlMask) | control);
    }
#else
    (void)control;
#endif
  }
  ~FpControlScope() {
#ifdef STRATA_HAVE_MXCSR
    if (changed_) {
      _mm_setcsr(saved_);
    }
#endif
  }
  FpControlScope(const FpControlScope&) = delete;
  FpControlScope& operator=(const FpControlScope&) = delete;

 private:
  unsigned saved_ = 0;
  bool changed_ = false;
};

class CurrentPoolScope {
 public:
  explicit CurrentPoolScope(const ThreadPool* pool) : saved_(tls_current_pool) {
    tls_current_pool = pool;
  }
  ~CurrentPoolScope() { tls_current_pool = saved_; }

 private:
  const ThreadPool* saved_;
};

}  // namespace

ThreadPool::ThreadPool(unsigned threads)
    : threads_(threads == 0 ? platform::usable_cpus() : threads) {
  const unsigned wanted = threads_ - 1;
  tids_.assign(wanted, 0);
  workers_.reserve(wanted);
  for (unsigned i = 0; i < wanted; ++i) {
    try {
      workers_.emplace_back([this, i] { worker_loop(i); });
    } catch (const std::system_error&) {
      // EAGAIN from the OS (thread limit): run with the threads we have.
      break;
    }
  }
  threads_ = unsigned(workers_.size()) + 1;
  runs_ = std::vector<Run>(threads_);
  tids_.resize(workers_.size());
  // Wait until every worker has published its tid, so worker_tids() is
  // complete when the constructor returns.
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [this] {
    for (int tid : tids_) {
      if (tid == 0) {
        return false;
      }
    }
    return true;
  });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) {
    t.join();
  }
}

std::vector<int> ThreadPool::worker_tids() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tids_;
}

size_t ThreadPool::take(Run& run, bool from_back) {
  uint64_t span = run.span.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t front = span & 0xFFFFFFFFu, back = span >> 32;
    if (front >= back) {
      return kNoTask;
    }
    const uint64_t rest = from_back ? (back - 1) << 32 | front : span + 1;
    if (run.span.compare_exchange_weak(span, rest, std::memory_order_relaxed)) {
      return size_t(from_back ? back - 1 : front);
    }
  }
}

void ThreadPool::run_tasks() {
  CurrentPoolScope scope(this);
  const auto& fn = *fn_;
  const size_t runs = runs_used_;
  // Runs of our own, front to back, while unclaimed ones are left (a worker
  // that has not woken yet leaves its run to whoever finishes first)...
  size_t home = 0;
  for (size_t r; (r = homes_.fetch_add(1, std::memory_order_relaxed)) < runs;) {
    home = r;
    for (size_t task; (task = take(runs_[r], false)) != kNoTask;) {
      fn(task);
    }
  }
  // ...then the others' from the back, starting after our own so thieves
  // spread over the runs.
  for (size_t k = 1; k <= runs; ++k) {
    Run& run = runs_[(home + k) % runs];
    for (size_t task; (task = take(run, true)) != kNoTask;) {
      fn(task);
    }
  }
}

void ThreadPool::worker_loop(unsigned index) {
  pthread_setname_np(pthread_self(), "strata-kernel");
  std::unique_lock<std::mutex> lock(mu_);
  if (index < tids_.size()) {
    tids_[index] = int(syscall(SYS_gettid));
  }
  cv_done_.notify_all();
  uint64_t seen = generation_;
  for (;;) {
    cv_work_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) {
      return;
    }
    seen = generation_;
    if (!open_) {
      continue;  // woke after the caller finished: nothing to join
    }
    ++active_;
    const unsigned control = fp_control_;
    lock.unlock();
    {
      FpControlScope fp(control);
      run_tasks();
    }
    lock.lock();
    if (--active_ == 0) {
      cv_done_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(size_t tasks, const std::function<void(size_t task)>& fn) {
  if (tasks == 0) {
    return;
  }
  if (workers_.empty() || tasks == 1 || tls_current_pool == this) {
    for (size_t t = 0; t < tasks; ++t) {
      fn(t);
    }
    return;
  }
  // A run's ends are 32-bit: more tasks than that go in calls of 2^32 - 1.
  constexpr size_t kMaxCall = 0xFFFFFFFFu;
  std::lock_guard<std::mutex> call(call_mu_);
  for (size_t begin = 0; begin < tasks; begin += kMaxCall) {
    const size_t count = std::min(kMaxCall, tasks - begin);
    if (begin == 0 && count == tasks) {
      run_call(tasks, fn);
    } else {
      run_call(count, [&fn, begin](size_t t) { fn(begin + t); });
    }
  }
}

void ThreadPool::run_call(size_t tasks, const std::function<void(size_t task)>& fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    runs_used_ = std::min<size_t>(threads_, tasks);
    for (size_t r = 0; r < runs_used_; ++r) {
      const uint64_t front = tasks * r / runs_used_, back = tasks * (r + 1) / runs_used_;
      runs_[r].span.store(front | back << 32, std::memory_order_relaxed);
    }
    homes_.store(0, std::memory_order_relaxed);
    open_ = true;
    fp_control_ = read_fp_control();
    ++generation_;
  }
  // Wake no more workers than there are tasks beyond the caller's first.
  if (tasks - 1 >= workers_.size()) {
    cv_work_.notify_all();
  } else {
    for (size_t i = 0; i + 1 < tasks; ++i) {
      cv_work_.notify_one();
    }
  }
  run_tasks();
  std::unique_lock<std::mutex> lock(mu_);
  open_ = false;
  cv_done_.wait(lock, [this] { return active_ == 0; });
  fn_ = nullptr;
}

}  // namespace strata::kernels
