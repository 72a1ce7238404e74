// Platform primitives: mapping, pre-fault, locking, page-node queries,
// RLIMIT_MEMLOCK reporting, /proc/meminfo, rename-exchange and NUMA binding.
#include <linux/mempolicy.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <strata/platform/affinity.h>
#include <strata/platform/fs.h>
#include <strata/platform/meminfo.h>
#include <strata/platform/memlock.h>
#include <strata/platform/topology.h>
#include <strata/platform/vm.h>

#include "unit/test_child.h"

namespace {

namespace fs = std::filesystem;
using namespace strata::platform;

std::string fixture(const std::string& name) {
  return (fs::path(__FILE__).parent_path() / ".." / ".." / "data" / "sysfs" / name)
      .lexically_normal();
}

// Resident pages of [p, p+bytes) according to mincore.
size_t resident_pages(void* p, size_t bytes) {
  std::vector<unsigned char> vec(bytes / kPageSize);
  if (mincore(p, bytes, vec.data()) != 0) {
    return SIZE_MAX;
  }
  size_t n = 0;
  for (unsigned char c : vec) {
    n += c & 1;
  }
  return n;
}

// True when move_pages/get_mempolicy answer (kernel with CONFIG_NUMA, no seccomp filter).
bool numa_syscalls_work(std::string* why) {
  void* p = nullptr;
  if (map_anonymous(kPageSize, kPageSize, &p) != 0) {
    *why = "mmap failed";
    return false;
  }
  static_cast<char*>(p)[0] = 1;
  const void* pages[] = {p};
  int node = -1;
  int r = query_page_nodes(pages, {&node, 1});
  (void)unmap(p, kPageSize);
  if (r != 0) {
    *why = std::string("move_pages: ") + std::strerror(-r);
    return false;
  }
  return true;
}

struct Mapping {
  explicit Mapping(size_t bytes, size_t align = kPageSize) : size(bytes) {
    rc = map_anonymous(bytes, align, &p);
  }
  ~Mapping() {
    if (p) {
      EXPECT_EQ(unmap(p, size), 0);
    }
  }
  void* p = nullptr;
  size_t size;
  int rc;
};

TEST(Vm, MapAnonymousAlignsAndRounds) {
  Mapping m(3 * kHugePageSize + 100, kHugePageSize);
  ASSERT_EQ(m.rc, 0);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.p) % kHugePageSize, 0u);
  // The whole rounded range is usable.
  static_cast<char*>(m.p)[round_up(m.size, kPageSize) - 1] = 7;
  void* bad = nullptr;
  EXPECT_EQ(map_anonymous(4096, 3000, &bad), -EINVAL);
  EXPECT_EQ(map_anonymous(0, kPageSize, &bad), -EINVAL);
  EXPECT_EQ(bad, nullptr);
}

TEST(Vm, PrefaultMakesEveryPageResident) {
  for (unsigned threads : {1u, 4u, 0u}) {
    const size_t bytes = size_t(24) << 20;
    Mapping m(bytes, kHugePageSize);
    ASSERT_EQ(m.rc, 0);
    EXPECT_EQ(resident_pages(m.p, bytes), 0u) << "fresh mapping already resident";
    ASSERT_EQ(prefault(m.p, bytes, threads), 0);
    EXPECT_EQ(resident_pages(m.p, bytes), bytes / kPageSize) << "threads " << threads;
    // Contents of fresh anonymous memory stay zero.
    const char* c = static_cast<const char*>(m.p);
    EXPECT_EQ(c[0], 0);
    EXPECT_EQ(c[bytes / 2 + 123], 0);
    EXPECT_EQ(c[bytes - 1], 0);
  }
}

// populate_pages maps the whole pages of a range that was released, keeps the
// contents of the others, and a write into the populated range then takes no
// page fault.
TEST(Vm, PopulatePagesMapsReleasedPagesAndKeepsContents) {
  const size_t pages = 128;
  Mapping m(pages * kPageSize, kHugePageSize);
  ASSERT_EQ(m.rc, 0);
  unsigned char* c = static_cast<unsigned char*>(m.p);
  for (size_t i = 0; i < pages * kPageSize; ++i) {
    c[i] = static_cast<unsigned char>(i % 251 + 1);
  }
  ASSERT_EQ(release_pages(c + 10 * kPageSize, 50 * kPageSize), 0);
  EXPECT_EQ(resident_pages(m.p, m.size), pages - 50);
  // Unaligned ends: whole pages 6..105 are populated.
  ASSERT_EQ(populate_pages(c + 5 * kPageSize + 100, 101 * kPageSize), 0);
  EXPECT_EQ(resident_pages(m.p, m.size), pages);
  for (size_t i = 0; i < pages * kPageSize; i += 997) {
    const size_t page = i / kPageSize;
    const unsigned char want =
        page >= 10 && page < 60 ? 0 : static_cast<unsigned char>(i % 251 + 1);
    ASSERT_EQ(c[i], want) << "byte " << i;
  }
  rusage before{}, after{};
  ASSERT_EQ(getrusage(RUSAGE_THREAD, &before), 0);
  for (size_t page = 10; page < 60; ++page) {
    c[page * kPageSize + 7] += 1;  // a read and a write, as a gradient hook's add
  }
  ASSERT_EQ(getrusage(RUSAGE_THREAD, &after), 0);
  EXPECT_EQ(after.ru_minflt - before.ru_minflt, 0) << "faults after populate_pages";
  EXPECT_EQ(populate_pages(c, 100), 0);  // no whole page: nothing to do
}

TEST(Vm, HugepageAndDontforkAdvice) {
  Mapping m(size_t(4) << 20, kHugePageSize);
  ASSERT_EQ(m.rc, 0);
  int r = advise_hugepage(m.p, m.size);
  EXPECT_TRUE(r == 0 || r == -EINVAL) << r;
  EXPECT_EQ(advise_dontfork(m.p, m.size), 0);
  // Misaligned address: the kernel says EINVAL, and we pass it through.
  EXPECT_EQ(advise_dontfork(static_cast<char*>(m.p) + 1, 4096), -EINVAL);
}

TEST(Vm, LockAndUnlock) {
  const size_t bytes = size_t(2) << 20;
  MemlockLimit lim = memlock_limit();
  if (!lim.allows(bytes, locked_bytes())) {
    GTEST_SKIP() << "cannot lock 2 MiB here: " << memlock_advice(lim, bytes);
  }
  Mapping m(bytes, kHugePageSize);
  ASSERT_EQ(m.rc, 0);
  uint64_t before = locked_bytes();
  ASSERT_EQ(lock_memory(m.p, bytes), 0);
  EXPECT_GE(locked_bytes(), before + bytes);
  ASSERT_EQ(unlock_memory(m.p, bytes), 0);
  EXPECT_EQ(locked_bytes(), before);
}

TEST(Vm, SamplePages) {
  char* base = reinterpret_cast<char*>(uintptr_t(1) << 30);
  auto all = sample_pages(base, 10 * kPageSize, 100);
  ASSERT_EQ(all.size(), 10u);
  EXPECT_EQ(all.front(), base);
  EXPECT_EQ(all.back(), base + 9 * kPageSize);
  auto some = sample_pages(base, 1000 * kPageSize, 7);
  ASSERT_EQ(some.size(), 7u);
  EXPECT_EQ(some.front(), base);
  EXPECT_EQ(some.back(), base + 999 * kPageSize);
  for (size_t i = 1; i < some.size(); ++i) {
    EXPECT_LT(some[i - 1], some[i]);
  }
  // A range that starts mid-page covers the page it starts in.
  auto mid = sample_pages(base + 100, kPageSize, 8);
  ASSERT_EQ(mid.size(), 2u);
  EXPECT_EQ(mid[0], base);
  EXPECT_TRUE(sample_pages(base, 0, 8).empty());
}

TEST(Vm, PageNodesAndPolicy) {
  std::string why;
  if (!numa_syscalls_work(&why)) {
    GTEST_SKIP() << "NUMA syscalls unavailable: " << why;
  }
  const size_t bytes = size_t(8) << 20;
  Mapping m(bytes, kHugePageSize);
  ASSERT_EQ(m.rc, 0);
  const int node0[] = {0};
  ASSERT_EQ(bind_memory(m.p, bytes, MemPolicy::kBind, node0), 0);
  MemPolicy policy = MemPolicy::kDefault;
  std::vector<int> nodes;
  ASSERT_EQ(query_policy(m.p, &policy, &nodes), 0);
  EXPECT_EQ(policy, MemPolicy::kBind);
  EXPECT_EQ(nodes, std::vector<int>{0});

  // Before the first touch nothing is placed: move_pages says -ENOENT.
  auto pages = sample_pages(m.p, bytes, 16);
  std::vector<int> where(pages.size(), 99);
  ASSERT_EQ(query_page_nodes(pages, where), 0);
  for (int w : where) {
    EXPECT_EQ(w, -ENOENT);
  }
  ASSERT_EQ(prefault(m.p, bytes, 2), 0);
  ASSERT_EQ(query_page_nodes(pages, where), 0);
  for (int w : where) {
    EXPECT_EQ(w, 0);
  }
  int node = -1;
  ASSERT_EQ(query_node_of(static_cast<char*>(m.p) + bytes - 1, &node), 0);
  EXPECT_EQ(node, 0);
}

TEST(Vm, BindRejectsBadNodes) {
  std::string why;
  if (!numa_syscalls_work(&why)) {
    GTEST_SKIP() << "NUMA syscalls unavailable: " << why;
  }
  Mapping m(kHugePageSize, kHugePageSize);
  ASSERT_EQ(m.rc, 0);
  const int too_big[] = {kMaxNumaNodes};
  EXPECT_EQ(bind_memory(m.p, m.size, MemPolicy::kBind, too_big), -EINVAL);
  const int negative[] = {-1};
  EXPECT_EQ(bind_memory(m.p, m.size, MemPolicy::kBind, negative), -EINVAL);
  EXPECT_EQ(bind_memory(m.p, m.size, MemPolicy::kBind, {}), -EINVAL);
  // A node the kernel does not have (ids are < 1024; this machine has far fewer).
  const int absent[] = {kMaxNumaNodes - 1};
  EXPECT_EQ(bind_memory(m.p, m.size, MemPolicy::kBind, absent), -EINVAL);
  EXPECT_EQ(bind_memory(m.p, m.size, MemPolicy::kDefault, {}), 0);
}

TEST(Memlock, ReportsTheRealLimit) {
  rlimit rl{};
  ASSERT_EQ(getrlimit(RLIMIT_MEMLOCK, &rl), 0);
  MemlockLimit lim = memlock_limit();
  EXPECT_EQ(lim.unlimited, rl.rlim_cur == RLIM_INFINITY);
  if (!lim.unlimited) {
    EXPECT_EQ(lim.soft, uint64_t(rl.rlim_cur));
  }
  if (rl.rlim_max != RLIM_INFINITY) {
    EXPECT_EQ(lim.hard, uint64_t(rl.rlim_max));
  }
}

TEST(Memlock, OverrideSeamAndAllows) {
  const MemlockLimit real = memlock_limit();
  MemlockLimit low{};
  low.soft = low.hard = 64 << 10;
  {
    ScopedMemlockOverride guard(low);
    MemlockLimit seen = memlock_limit();
    EXPECT_EQ(seen.soft, uint64_t(64 << 10));
    EXPECT_FALSE(seen.unlimited);
    EXPECT_FALSE(seen.cap_ipc_lock);
  }
  MemlockLimit after = memlock_limit();
  EXPECT_EQ(after.soft, real.soft) << "override still active after the guard";
  EXPECT_EQ(after.unlimited, real.unlimited);
  EXPECT_EQ(after.cap_ipc_lock, real.cap_ipc_lock);

  EXPECT_TRUE(low.allows(32 << 10, 0));
  EXPECT_TRUE(low.allows(32 << 10, 32 << 10));
  EXPECT_FALSE(low.allows(32 << 10, 48 << 10));
  EXPECT_FALSE(low.allows(1 << 20, 0));
  EXPECT_FALSE(low.allows(1, 128 << 10));  // already over the limit
  MemlockLimit cap = low;
  cap.cap_ipc_lock = true;
  EXPECT_TRUE(cap.allows(uint64_t(1) << 40, 0));
  MemlockLimit inf = low;
  inf.unlimited = true;
  EXPECT_TRUE(inf.allows(uint64_t(1) << 40, uint64_t(1) << 40));
}

TEST(Memlock, AdviceNamesLimitAndRemedies) {
  MemlockLimit low{};
  low.soft = 8 << 20;
  low.hard = 16 << 20;
  std::string msg = memlock_advice(low, 256 << 20);
  for (const char* want :
       {"RLIMIT_MEMLOCK is 8.00 MiB (hard 16.00 MiB)", "CAP_IPC_LOCK is not held",
        "256.00 MiB cannot be locked", "ulimit -l", "/etc/security/limits.conf", "LimitMEMLOCK"}) {
    EXPECT_NE(msg.find(want), std::string::npos) << want << " missing from: " << msg;
  }
}

TEST(Meminfo, Fixture) {
  auto avail = mem_available_bytes(fixture("proc_meminfo"));
  ASSERT_TRUE(avail.ok()) << avail.status().to_string();
  EXPECT_EQ(avail.value(), uint64_t(24282112) * 1024);
  auto total = mem_total_bytes(fixture("proc_meminfo"));
  ASSERT_TRUE(total.ok());
  EXPECT_EQ(total.value(), uint64_t(24683520) * 1024);
  auto pages = meminfo_bytes("HugePages_Total", fixture("proc_meminfo"));
  ASSERT_TRUE(pages.ok());
  EXPECT_EQ(pages.value(), 0u);  // a count without unit
  auto missing = meminfo_bytes("NoSuchKey", fixture("proc_meminfo"));
  EXPECT_EQ(missing.status().code(), strata::StatusCode::kNotFound);
  auto nofile = mem_available_bytes("/nonexistent/meminfo");
  EXPECT_EQ(nofile.status().code(), strata::StatusCode::kNotFound);
  // "MemAvail" must not match the "MemAvailable" line by prefix.
  EXPECT_FALSE(meminfo_bytes("MemAvail", fixture("proc_meminfo")).ok());
}

TEST(Meminfo, RealMachine) {
  auto avail = mem_available_bytes();
  auto total = mem_total_bytes();
  ASSERT_TRUE(avail.ok()) << avail.status().to_string();
  ASSERT_TRUE(total.ok());
  EXPECT_GT(avail.value(), 0u);
  EXPECT_LE(avail.value(), total.value());
}

TEST(Meminfo, FormatBytes) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(1023), "1023 B");
  EXPECT_EQ(format_bytes(1536), "1.50 KiB");
  EXPECT_EQ(format_bytes(uint64_t(256) << 20), "256.00 MiB");
  EXPECT_EQ(format_bytes(uint64_t(3) << 40), "3.00 TiB");
}

// A fresh directory under /tmp, removed with what it holds.
struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/strata_platform_XXXXXX";
    if (mkdtemp(tmpl) != nullptr) {
      path = tmpl;
    }
  }
  ~TempDir() {
    if (!path.empty()) {
      fs::remove_all(path);
    }
  }
  fs::path path;
};

void write_file(const fs::path& path, const std::string& text) { std::ofstream(path) << text; }

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(Fs, RenameExchangeSwapsTwoDirectories) {
  TempDir t;
  ASSERT_FALSE(t.path.empty());
  const fs::path a = t.path / "a", b = t.path / "b";
  fs::create_directory(a);
  fs::create_directory(b);
  write_file(a / "which", "a");
  write_file(b / "which", "b");
  strata::Status st = rename_exchange(a, b);
  if (st.code() == strata::StatusCode::kUnavailable) {
    GTEST_SKIP() << "no RENAME_EXCHANGE on this kernel or file system: " << st.to_string();
  }
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(read_file(a / "which"), "b");
  EXPECT_EQ(read_file(b / "which"), "a");
}

TEST(Fs, RenameExchangeWithAMissingPathNamesBothPathsAndTheErrno) {
  TempDir t;
  ASSERT_FALSE(t.path.empty());
  const fs::path a = t.path / "a", missing = t.path / "missing";
  fs::create_directory(a);
  strata::Status st = rename_exchange(a, missing);
  if (st.code() == strata::StatusCode::kUnavailable) {
    GTEST_SKIP() << "no RENAME_EXCHANGE on this kernel or file system: " << st.to_string();
  }
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), strata::StatusCode::kNotFound) << st.to_string();
  EXPECT_EQ(st.sys_errno(), ENOENT);
  for (const std::string& want : {a.string(), missing.string(), std::string(strerror(ENOENT))}) {
    EXPECT_NE(st.message().find(want), std::string::npos)
        << want << " missing from: " << st.message();
  }
  EXPECT_TRUE(fs::is_directory(a));  // nothing moved
}

TEST(Affinity, UsableCpusFollowTheAffinityMask) {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  ASSERT_EQ(sched_getaffinity(0, sizeof(mask), &mask), 0);
  EXPECT_EQ(usable_cpus(), unsigned(CPU_COUNT(&mask)));
  std::vector<int> allowed;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &mask)) {
      allowed.push_back(cpu);
    }
  }
  ASSERT_FALSE(allowed.empty());
  // In a child, as taskset would: one CPU, then two where there are two.
  for (size_t k = 1; k <= std::min<size_t>(2, allowed.size()); ++k) {
    std::string text;
    int code = run_in_child(
        [&](std::string* out) {
          cpu_set_t few;
          CPU_ZERO(&few);
          for (size_t i = 0; i < k; ++i) {
            CPU_SET(allowed[i], &few);
          }
          if (sched_setaffinity(0, sizeof(few), &few) != 0) {
            *out = std::string("sched_setaffinity: ") + strerror(errno);
            return 1;
          }
          const unsigned n = unsigned(k);
          const unsigned usable = usable_cpus(), all = backward_update_threads(0),
                         one_left = backward_update_threads(n - 1),
                         none_left = backward_update_threads(n + 4);
          *out = "usable " + std::to_string(usable) + ", backward(0) " + std::to_string(all) +
                 ", backward(" + std::to_string(n - 1) + ") " + std::to_string(one_left) +
                 ", backward(" + std::to_string(n + 4) + ") " + std::to_string(none_left);
          return usable == n && all == n && one_left == 1 && none_left == 1 ? 0 : 1;
        },
        &text);
    EXPECT_EQ(code, 0) << k << " CPU(s): " << text;
  }
}

TEST(Affinity, BindRefusesNodesWithoutCpusAndChangesNothing) {
  cpu_set_t before;
  ASSERT_EQ(sched_getaffinity(0, sizeof(before), &before), 0);
  strata::Status bad = bind_to_numa_node(-1);
  EXPECT_EQ(bad.code(), strata::StatusCode::kInvalidArgument) << bad.to_string();
  strata::Status cxl = bind_to_numa_node(1, fixture("dram_cxl"));  // memory only
  EXPECT_EQ(cxl.code(), strata::StatusCode::kNotFound) << cxl.to_string();
  EXPECT_NE(cxl.message().find("NUMA node 1: no CPUs"), std::string::npos) << cxl.message();
  strata::Status absent = bind_to_numa_node(7, fixture("dram_cxl"));
  EXPECT_EQ(absent.code(), strata::StatusCode::kNotFound) << absent.to_string();
  EXPECT_NE(absent.message().find("node7/cpulist"), std::string::npos) << absent.message();
  cpu_set_t after;
  ASSERT_EQ(sched_getaffinity(0, sizeof(after), &after), 0);
  EXPECT_TRUE(CPU_EQUAL(&before, &after));
}

TEST(Affinity, BindToNode0SetsCpusAndPreferredMemory) {
  if (!fs::exists("/sys/devices/system/node/node0")) {
    GTEST_SKIP() << "no /sys/devices/system/node/node0 (kernel without CONFIG_NUMA)";
  }
  auto cpus = node_cpus(0);
  ASSERT_TRUE(cpus.ok()) << cpus.status().to_string();
  if (cpus->empty()) {
    GTEST_SKIP() << "NUMA node 0 has no CPUs here";
  }
  // In a child: the binding changes the calling thread for good.
  std::string text;
  int code = run_in_child(
      [&](std::string* out) {
        strata::Status st = bind_to_numa_node(0);
        if (!st.ok()) {
          *out = st.to_string();
          // set_mempolicy refused by a seccomp filter or missing: a capability, not a bug.
          return st.code() == strata::StatusCode::kUnavailable || st.sys_errno() == EPERM ? 2 : 1;
        }
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof(set), &set) != 0) {
          *out = "sched_getaffinity failed";
          return 1;
        }
        for (int cpu : *cpus) {
          if (!CPU_ISSET(cpu, &set)) {
            *out = "CPU " + std::to_string(cpu) + " of node 0 not in the affinity mask";
            return 1;
          }
        }
        if (size_t(CPU_COUNT(&set)) != cpus->size()) {
          *out = "affinity has " + std::to_string(CPU_COUNT(&set)) + " CPUs, node 0 " +
                 std::to_string(cpus->size());
          return 1;
        }
        int mode = -1;
        unsigned long mask[kMaxNumaNodes / 64] = {};
        if (syscall(SYS_get_mempolicy, &mode, mask, kMaxNumaNodes + 1, nullptr, 0) != 0) {
          *out = std::string("get_mempolicy: ") + strerror(errno);
          return 1;
        }
        if (mode != MPOL_PREFERRED || mask[0] != 1) {
          *out = "policy " + std::to_string(mode) + " mask " + std::to_string(mask[0]);
          return 1;
        }
        if (set_thread_policy(MemPolicy::kDefault, {}) != 0 ||
            syscall(SYS_get_mempolicy, &mode, nullptr, 0, nullptr, 0) != 0 ||
            mode != MPOL_DEFAULT) {
          *out = "set_thread_policy(kDefault) did not restore the default policy";
          return 1;
        }
        return 0;
      },
      &text);
  if (code == 2) {
    GTEST_SKIP() << "memory policy refused here: " << text;
  }
  EXPECT_EQ(code, 0) << text;
}

}  // namespace
