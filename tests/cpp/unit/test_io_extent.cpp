// ExtentAllocator: first fit, alignment, coalescing, exhaustion, and a
// randomized comparison against a byte-map model (fixed seed).
#include <cstdint>
#include <map>
#include <vector>

#include <gtest/gtest.h>

#include "io/extent_allocator.h"
#include "unit/test_io_common.h"

namespace strata::io::detail {
namespace {

constexpr uint64_t kA = 4096;

TEST(ExtentAllocatorTest, FirstFitAlignedAndCoalescing) {
  ExtentAllocator a(16 * kA);
  auto e0 = a.allocate(1);  // rounds up to one page
  auto e1 = a.allocate(kA + 1);
  auto e2 = a.allocate(3 * kA);
  ASSERT_TRUE(e0.ok() && e1.ok() && e2.ok());
  EXPECT_EQ(e0->offset, 0u);
  EXPECT_EQ(e0->length, kA);
  EXPECT_EQ(e1->offset, kA);
  EXPECT_EQ(e1->length, 2 * kA);
  EXPECT_EQ(e2->offset, 3 * kA);
  EXPECT_EQ(a.used_bytes(), 6 * kA);
  EXPECT_TRUE(a.check_invariants());

  // Free the middle one: a hole of 2 pages that first fit reuses.
  ASSERT_TRUE(a.free(*e1).ok());
  EXPECT_EQ(a.fragments(), 2u);
  auto e3 = a.allocate(2 * kA);
  ASSERT_TRUE(e3.ok());
  EXPECT_EQ(e3->offset, kA);
  EXPECT_EQ(e3->id, e1->id);  // ids are reused
  // Too big for the hole: taken from the tail.
  ASSERT_TRUE(a.free(*e3).ok());
  auto e4 = a.allocate(3 * kA);
  ASSERT_TRUE(e4.ok());
  EXPECT_EQ(e4->offset, 6 * kA);

  // Freeing both neighbours of a hole merges all three ranges.
  ASSERT_TRUE(a.free(*e0).ok());
  ASSERT_TRUE(a.free(*e2).ok());
  EXPECT_EQ(a.fragments(), 2u);  // [0, 6 pages) and the tail after e4
  EXPECT_EQ(a.largest_free(), 7 * kA);
  ASSERT_TRUE(a.free(*e4).ok());
  EXPECT_EQ(a.fragments(), 1u);
  EXPECT_EQ(a.free_bytes(), 16 * kA);
  EXPECT_TRUE(a.check_invariants());
}

TEST(ExtentAllocatorTest, ErrorsAreClean) {
  ExtentAllocator a(4 * kA);
  EXPECT_EQ(a.allocate(0).status().code(), StatusCode::kInvalidArgument);
  auto e = a.allocate(4 * kA);
  ASSERT_TRUE(e.ok());
  auto full = a.allocate(1);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), StatusCode::kNoSpace);
  ASSERT_TRUE(a.free(*e).ok());
  EXPECT_EQ(a.free(*e).code(), StatusCode::kInvalidArgument);  // double free
  Extent forged{kA, kA, 0};
  EXPECT_EQ(a.free(forged).code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(a.allocate(UINT64_MAX).ok());
  EXPECT_TRUE(a.check_invariants());
}

TEST(ExtentAllocatorTest, RandomizedAgainstModel) {
  const uint64_t pages = 256;
  ExtentAllocator a(pages * kA);
  std::vector<int> owner(pages, -1);  // model: page -> extent id or -1
  std::map<uint32_t, Extent> live;
  uint64_t seed = 20240611;
  for (int step = 0; step < 5000; ++step) {
    const uint64_t r = test::splitmix64(seed);
    if (live.empty() || r % 3 != 0) {
      const uint64_t bytes = 1 + test::splitmix64(seed) % (12 * kA);
      const uint64_t need = (bytes + kA - 1) / kA;
      // First fit in the model.
      int64_t first = -1;
      for (uint64_t p = 0; p + need <= pages && first < 0; ++p) {
        bool ok = true;
        for (uint64_t q = p; q < p + need; ++q) {
          if (owner[q] != -1) {
            ok = false;
            p = q;
            break;
          }
        }
        if (ok) {
          first = int64_t(p);
        }
      }
      auto e = a.allocate(bytes);
      if (first < 0) {
        ASSERT_FALSE(e.ok());
        ASSERT_EQ(e.status().code(), StatusCode::kNoSpace);
        continue;
      }
      ASSERT_TRUE(e.ok());
      ASSERT_EQ(e->offset, uint64_t(first) * kA) << "step " << step;
      ASSERT_EQ(e->length, need * kA);
      for (uint64_t q = uint64_t(first); q < uint64_t(first) + need; ++q) {
        owner[q] = int(e->id);
      }
      live[e->id] = *e;
    } else {
      auto it = live.begin();
      std::advance(it, long(test::splitmix64(seed) % live.size()));
      ASSERT_TRUE(a.free(it->second).ok());
      for (uint64_t q = it->second.offset / kA; q < (it->second.offset + it->second.length) / kA;
           ++q) {
        owner[q] = -1;
      }
      live.erase(it);
    }
    ASSERT_TRUE(a.check_invariants()) << "step " << step;
  }
}

}  // namespace
}  // namespace strata::io::detail
