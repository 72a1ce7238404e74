// ThreadPool: every task runs exactly once, the caller takes part, each
// thread streams a contiguous run and the others take over a stalled one,
// idle workers sleep (passive wait) and nested calls do not deadlock.
#include <strata/kernels/thread_pool.h>

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "unit/test_child.h"

namespace strata::kernels {
namespace {

int gettid_now() { return int(syscall(SYS_gettid)); }

// Fields of /proc/self/task/<tid>/stat: state (3rd) and utime + stime
// (14th, 15th) in clock ticks. The comm field may hold spaces, so parse
// after the last ')'.
struct TaskStat {
  char state = '?';
  long ticks = -1;
};

TaskStat read_task_stat(int tid) {
  std::ifstream f("/proc/self/task/" + std::to_string(tid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  TaskStat st;
  const auto close = text.rfind(')');
  if (close == std::string::npos) {
    return st;
  }
  std::istringstream in(text.substr(close + 2));
  std::vector<std::string> fields;
  std::string field;
  while (in >> field) {
    fields.push_back(field);
  }
  // fields[0] is the state (stat field 3); utime/stime are fields 14/15.
  if (fields.size() > 13) {
    st.state = fields[0][0];
    st.ticks = std::stol(fields[11]) + std::stol(fields[12]);
  }
  return st;
}

TEST(ThreadPool, RunsEveryTaskExactlyOnce) {
  for (unsigned threads : {1u, 2u, 3u, 5u}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (size_t tasks : {size_t(0), size_t(1), size_t(2), size_t(7), size_t(1000)}) {
      std::vector<std::atomic<int>> hits(tasks);
      pool.parallel_for(tasks, [&](size_t t) { hits[t].fetch_add(1); });
      for (size_t t = 0; t < tasks; ++t) {
        ASSERT_EQ(hits[t].load(), 1)
            << "threads " << threads << " tasks " << tasks << " task " << t;
      }
    }
  }
}

TEST(ThreadPool, DefaultSizeIsTheUsableCpuCount) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  ThreadPool pool;
  EXPECT_EQ(pool.size(), unsigned(CPU_COUNT(&set)));
  EXPECT_EQ(pool.worker_tids().size(), pool.size() - 1);
}

// The engine's update pool (strata.threads 0) takes its size from the same
// count as the backward threads: the affinity mask, not the machine's CPUs.
TEST(ThreadPool, DefaultSizeFollowsAnAffinityMaskOfOneCpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  int first = 0;
  while (first < CPU_SETSIZE && !CPU_ISSET(first, &set)) {
    ++first;
  }
  ASSERT_LT(first, CPU_SETSIZE);
  std::string text;
  int code = run_in_child(
      [&](std::string* out) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(first, &one);
        if (sched_setaffinity(0, sizeof(one), &one) != 0) {
          *out = "sched_setaffinity failed";
          return 1;
        }
        ThreadPool pool;
        *out = "pool of " + std::to_string(pool.size());
        return pool.size() == 1 && pool.worker_tids().empty() ? 0 : 1;
      },
      &text);
  EXPECT_EQ(code, 0) << text;
}

TEST(ThreadPool, WorkerTidsAreDistinctLiveThreadsOfThisProcess) {
  ThreadPool pool(4);
  const std::vector<int> tids = pool.worker_tids();
  ASSERT_EQ(tids.size(), 3u);
  std::set<int> unique(tids.begin(), tids.end());
  EXPECT_EQ(unique.size(), tids.size());
  EXPECT_EQ(unique.count(gettid_now()), 0u);
  for (int tid : tids) {
    EXPECT_GT(tid, 0);
    EXPECT_NE(read_task_stat(tid).state, '?') << "no /proc/self/task/" << tid;
  }
}

TEST(ThreadPool, CallerTakesPartAndWorkersRunTasks) {
  ThreadPool pool(2);
  const int caller = gettid_now();
  const std::vector<int> workers = pool.worker_tids();
  std::vector<int> ran_on(64, 0);
  // Task 0 blocks until every other task is done: only a second thread that
  // takes over the tasks of a stalled thread can finish them (a static split would hang).
  std::atomic<size_t> done{0};
  pool.parallel_for(ran_on.size(), [&](size_t t) {
    ran_on[t] = gettid_now();
    if (t == 0) {
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (done.load() < ran_on.size() - 1 && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::yield();
      }
    } else {
      done.fetch_add(1);
    }
  });
  EXPECT_EQ(done.load(), ran_on.size() - 1);
  std::set<int> threads(ran_on.begin(), ran_on.end());
  for (int tid : threads) {
    EXPECT_TRUE(tid == caller || tid == workers[0]) << tid;
  }
  EXPECT_EQ(threads.size(), 2u) << "both the caller and the worker ran tasks";
}

// Each thread works one contiguous stretch of the tasks: its own run from the
// front, then what is left of the other's from the back, so the tasks each
// thread ran form one interval read cyclically (the thread that finishes
// first takes the tail of the other's run: 0..a, then b..255 after a
// wrap-around). Tasks handed out one at a time from a shared counter
// interleave the two threads and fail this. The first task of each
// half waits until the other half's has started, so both threads take part.
TEST(ThreadPool, EachThreadRunsOneContiguousStretch) {
  ThreadPool pool(2);
  constexpr size_t kTasks = 256;
  for (int round = 0; round < 20; ++round) {
    std::vector<int> ran_on(kTasks, 0);
    std::atomic<int> started{0};
    std::atomic<bool> timed_out{false};
    pool.parallel_for(kTasks, [&](size_t t) {
      ran_on[t] = gettid_now();
      if (t == 0 || t == kTasks / 2) {
        started.fetch_add(1);
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
        while (started.load() < 2) {
          if (std::chrono::steady_clock::now() > give_up) {
            timed_out = true;
            break;
          }
          std::this_thread::yield();
        }
      }
      // Some work per task, so the other thread's run is still open when
      // one finishes its own and steals.
      volatile uint64_t x = t;
      for (int i = 0; i < 2000; ++i) {
        x = x * 6364136223846793005ull + 1;
      }
    });
    ASSERT_FALSE(timed_out.load())
        << "round " << round << ": task " << kTasks / 2 << " never started beside task 0";
    std::set<int> tids(ran_on.begin(), ran_on.end());
    ASSERT_EQ(tids.size(), 2u) << "round " << round;
    size_t changes = 0;  // thread changes from task t - 1 to t, and from the last to 0
    for (size_t t = 0; t < kTasks; ++t) {
      changes += ran_on[t] != ran_on[(t + kTasks - 1) % kTasks] ? 1 : 0;
    }
    EXPECT_EQ(changes, 2u) << "round " << round << ": each thread's tasks are one interval";
    EXPECT_NE(ran_on[0], ran_on[kTasks / 2]) << "round " << round;
  }
}

TEST(ThreadPool, IdleWorkersSleepAndUseNoCpu) {
  ThreadPool pool(3);
  std::atomic<uint64_t> sink{0};
  pool.parallel_for(64, [&](size_t t) {
    uint64_t x = t;
    for (int i = 0; i < 100000; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
    }
    sink.fetch_add(x);
  });
  const std::vector<int> tids = pool.worker_tids();
  // Wait (generously) for the workers to go back to sleep after the call.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  bool all_sleeping = false;
  while (!all_sleeping && std::chrono::steady_clock::now() < give_up) {
    all_sleeping = true;
    for (int tid : tids) {
      all_sleeping = all_sleeping && read_task_stat(tid).state == 'S';
    }
    if (!all_sleeping) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  ASSERT_TRUE(all_sleeping) << "workers should block in the kernel (state S) when idle";
  std::vector<long> before;
  for (int tid : tids) {
    before.push_back(read_task_stat(tid).ticks);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (size_t i = 0; i < tids.size(); ++i) {
    const TaskStat now = read_task_stat(tids[i]);
    EXPECT_EQ(now.state, 'S');
    // A spinning worker would accrue ~30 ticks (at 100 Hz) in 300 ms.
    EXPECT_LE(now.ticks - before[i], 1) << "idle worker " << tids[i] << " used CPU";
  }
}

TEST(ThreadPool, NestedCallRunsSeriallyWithoutDeadlock) {
  ThreadPool pool(2);
  std::vector<std::atomic<int>> hits(8 * 8);
  pool.parallel_for(8, [&](size_t outer) {
    pool.parallel_for(8, [&](size_t inner) { hits[outer * 8 + inner].fetch_add(1); });
  });
  for (auto& h : hits) {
    EXPECT_EQ(h.load(), 1);
  }
}

TEST(ThreadPool, ManyShortCallsBackToBack) {
  ThreadPool pool(3);
  uint64_t expected = 0;
  std::atomic<uint64_t> total{0};
  for (size_t call = 0; call < 3000; ++call) {
    const size_t tasks = 1 + call % 5;
    pool.parallel_for(tasks, [&](size_t t) { total.fetch_add(t + 1); });
    expected += tasks * (tasks + 1) / 2;
  }
  EXPECT_EQ(total.load(), expected);
}

TEST(ThreadPool, ResultsWrittenByWorkersAreVisibleToTheCaller) {
  ThreadPool pool(2);
  std::vector<uint64_t> out(10000, 0);  // plain (non-atomic) writes
  for (int round = 1; round <= 20; ++round) {
    pool.parallel_for(out.size(), [&](size_t t) { out[t] = t * uint64_t(round); });
    for (size_t t = 0; t < out.size(); ++t) {
      ASSERT_EQ(out[t], t * uint64_t(round));
    }
  }
}

#if defined(__x86_64__)
// Regression guard: torch.set_flush_denormal() sets FTZ/DAZ on the calling
// thread only; tasks run by workers must see the caller's mode, or results
// would depend on which thread ran them.
TEST(ThreadPool, WorkersRunWithTheCallersFpControl) {
  ThreadPool pool(3);
  const unsigned saved = _mm_getcsr();
  const unsigned ftz_daz = 0x8040u;
  for (unsigned mode : {0u, ftz_daz}) {
    _mm_setcsr((saved & ~ftz_daz) | mode);
    std::vector<unsigned> seen(256, 0);
    std::vector<int> tid(256, 0);
    pool.parallel_for(seen.size(), [&](size_t t) {
      seen[t] = _mm_getcsr() & ftz_daz;
      tid[t] = gettid_now();
      std::this_thread::sleep_for(std::chrono::microseconds(50));  // let workers join
    });
    for (size_t t = 0; t < seen.size(); ++t) {
      ASSERT_EQ(seen[t], mode) << "task " << t << " on tid " << tid[t];
    }
    std::set<int> threads(tid.begin(), tid.end());
    EXPECT_GT(threads.size(), 1u) << "workers should have run some tasks";
  }
  _mm_setcsr(saved);
  // Workers restore their own register after the call.
  std::vector<unsigned> after(64, 0);
  pool.parallel_for(after.size(), [&](size_t t) {
    after[t] = _mm_getcsr() & ftz_daz;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  });
  for (unsigned a : after) {
    EXPECT_EQ(a, saved & ftz_daz);
  }
}
#endif

// Two threads share one pool (the engine's pipeline thread hashes and
// updates while the driving thread may compute gradient statistics): their
// calls run one after the other, each with its own tasks and results.
TEST(ThreadPool, ConcurrentCallersTakeTurns) {
  ThreadPool pool(3);
  constexpr size_t kTasks = 64;
  constexpr int kRounds = 200;
  std::atomic<bool> bad{false};
  auto caller = [&](uint64_t salt) {
    for (int r = 0; r < kRounds; ++r) {
      std::vector<uint64_t> out(kTasks, 0);
      pool.parallel_for(kTasks, [&](size_t t) { out[t] = salt * 1000003 + t * 7 + uint64_t(r); });
      for (size_t t = 0; t < kTasks; ++t) {
        if (out[t] != salt * 1000003 + t * 7 + uint64_t(r)) {
          bad = true;
        }
      }
    }
  };
  std::thread a(caller, 1), b(caller, 2);
  a.join();
  b.join();
  EXPECT_FALSE(bad.load());
}

TEST(ThreadPool, DestroysCleanlyWithoutCalls) {
  for (int i = 0; i < 20; ++i) {
    ThreadPool pool(3);
    EXPECT_EQ(pool.worker_tids().size(), 2u);
  }
}

}  // namespace
}  // namespace strata::kernels
