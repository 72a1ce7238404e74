// Pool stress: long random alloc/free sequences from fixed seeds, single- and
// multi-threaded, against the invariants of strata/memory/pinned_pool.h.
// Ends with zero leaked bytes and every slab coalesced back to one range.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <strata/memory/pinned_pool.h>

namespace {

using namespace strata::memory;

struct Live {
  PinnedBuffer buf;
  uint64_t tag;
};

// Marks bytes at the start, middle and end of the buffer with values that
// depend on the tag and the offset only, so the three spots may overlap in
// small buffers and still agree.
unsigned char mark(uint64_t tag, size_t off) {
  return static_cast<unsigned char>((tag * 0x9E3779B97F4A7C15ULL + off) >> 56);
}

template <typename Fn>
bool for_marked(const PinnedBuffer& b, Fn fn) {
  size_t n = b.size();
  for (size_t start : {size_t(0), n / 2, n > 8 ? n - 8 : 0}) {
    for (size_t off = start; off < std::min(n, start + 8); ++off) {
      if (!fn(off)) {
        return false;
      }
    }
  }
  return true;
}

void stamp(const PinnedBuffer& b, uint64_t tag) {
  auto* p = b.as<unsigned char>();
  for_marked(b, [&](size_t off) {
    p[off] = mark(tag, off);
    return true;
  });
}

bool stamped(const PinnedBuffer& b, uint64_t tag) {
  const auto* p = b.as<unsigned char>();
  return for_marked(b, [&](size_t off) { return p[off] == mark(tag, off); });
}

// Sizes as the engine asks for them: mostly sub-group records and staging
// buffers (KiB..MiB, log-uniform), some tiny, a few larger than a slab.
size_t draw_size(std::mt19937_64& rng) {
  unsigned r = rng() % 100;
  if (r < 5) {
    return 1 + rng() % 4096;
  }
  if (r < 98) {
    size_t base = size_t(1) << (12 + rng() % 12);  // 4 KiB .. 8 MiB
    return base + rng() % base;
  }
  return (size_t(20) << 20) + rng() % (size_t(20) << 20);  // > slab_bytes
}

TEST(PoolStress, RandomAllocFreeSingleThread) {
  PoolOptions o;
  o.slab_bytes = size_t(16) << 20;
  o.pin = false;  // the allocator is under test; pinning costs time, not coverage
  auto created = PinnedPool::create(o);
  ASSERT_TRUE(created.ok());
  auto& pool = *created.value();
  std::mt19937_64 rng(0x5eed5eedULL);
  std::vector<Live> live;
  uint64_t live_bytes = 0;
  const uint64_t kBudget = uint64_t(512) << 20;  // live requested bytes stay below this
  uint64_t next_tag = 1;
  for (int op = 0; op < 200'000; ++op) {
    bool alloc = live.empty() || (live_bytes < kBudget && rng() % 100 < 52);
    if (alloc) {
      size_t bytes = draw_size(rng);
      auto b = pool.allocate(bytes);
      ASSERT_TRUE(b.ok()) << b.status().to_string();
      ASSERT_EQ(reinterpret_cast<uintptr_t>(b->data()) % kPoolAlignment, 0u);
      stamp(b.value(), next_tag);
      live_bytes += bytes;
      live.push_back({std::move(b).value(), next_tag++});
    } else {
      size_t i = rng() % live.size();
      ASSERT_TRUE(stamped(live[i].buf, live[i].tag)) << "buffer overwritten: ranges overlap";
      live_bytes -= live[i].buf.size();
      std::swap(live[i], live.back());
      live.pop_back();
    }
    if (op % 2000 == 0) {
      ASSERT_TRUE(pool.check_invariants().ok())
          << "op " << op << ": " << pool.check_invariants().to_string();
      PoolStats s = pool.stats();
      ASSERT_EQ(s.requested, live_bytes);
      ASSERT_EQ(s.reserved, s.in_use + s.free_bytes);
    }
  }
  PoolStats before_free = pool.stats();
  live.clear();
  PoolStats s = pool.stats();
  EXPECT_EQ(s.in_use, 0u) << "leaked bytes";
  EXPECT_EQ(s.requested, 0u);
  EXPECT_EQ(s.buffers, 0u);
  EXPECT_EQ(s.free_bytes, s.reserved);
  EXPECT_EQ(s.free_ranges, s.slabs);
  ASSERT_TRUE(pool.check_invariants().ok());
  std::printf(
      "single thread: %llu slabs, peak reserved %.1f MiB for peak requested %.1f MiB "
      "(peak ratio %.3f); %llu free ranges before the final free\n",
      (unsigned long long)s.slabs, s.peak_reserved / 1048576.0, s.peak_requested / 1048576.0,
      s.peak_ratio(), (unsigned long long)before_free.free_ranges);
  EXPECT_EQ(pool.trim(), s.reserved);
  EXPECT_EQ(pool.stats().reserved, 0u);
}

TEST(PoolStress, RandomAllocFreeFourThreadsPinned) {
  PoolOptions o;
  o.slab_bytes = size_t(32) << 20;
  auto created = PinnedPool::create(o);  // pinned when memlock allows, else unpinned with a warning
  ASSERT_TRUE(created.ok());
  auto& pool = *created.value();
  std::atomic<int> failures{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      std::vector<Live> live;
      uint64_t live_bytes = 0;
      for (int op = 0; op < 25'000 && !stop; ++op) {
        if (live.empty() || (live_bytes < (uint64_t(96) << 20) && rng() % 2)) {
          size_t bytes = draw_size(rng) / 4 + 1;
          auto b = pool.allocate(bytes);
          if (!b.ok()) {
            failures++;
            stop = true;
            return;
          }
          uint64_t tag = (uint64_t(t) << 56) | uint64_t(op);
          stamp(b.value(), tag);
          live_bytes += bytes;
          live.push_back({std::move(b).value(), tag});
        } else {
          size_t i = rng() % live.size();
          if (!stamped(live[i].buf, live[i].tag)) {
            failures++;
          }
          live_bytes -= live[i].buf.size();
          std::swap(live[i], live.back());
          live.pop_back();
        }
      }
    });
  }
  // The checker runs concurrently with the workers: invariants hold between
  // any two locked operations.
  for (int i = 0; i < 50 && !stop; ++i) {
    strata::Status st = pool.check_invariants();
    if (!st.ok()) {
      ADD_FAILURE() << st.to_string();
      stop = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (auto& th : threads) {
    th.join();
  }
  EXPECT_EQ(failures.load(), 0);
  PoolStats s = pool.stats();
  EXPECT_EQ(s.in_use, 0u) << "leaked bytes";
  EXPECT_EQ(s.requested, 0u);
  EXPECT_EQ(s.free_ranges, s.slabs);
  EXPECT_TRUE(pool.check_invariants().ok());
  std::printf("4 threads: %llu slabs, pinned=%d, peak ratio %.3f\n", (unsigned long long)s.slabs,
              int(s.pinned), s.peak_ratio());
}

}  // namespace
