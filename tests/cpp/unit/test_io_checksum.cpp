// strata/io/checksum.h: every XXH3 variant this CPU can run gives the value of
// the SSE2 baseline (so checksums written on one machine verify on another),
// for lengths across XXH3's size classes and unaligned starts; the streaming
// XXH3-128 gives the same digest however its input is split and whichever
// variant runs it; the machine's variant is the widest it has.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include <strata/io/checksum.h>

using namespace strata::io;

namespace {

std::vector<unsigned char> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<unsigned char> v(n);
  for (auto& c : v) {
    c = static_cast<unsigned char>(rng());
  }
  return v;
}

std::vector<HashIsa> runnable() {
  std::vector<HashIsa> out;
  for (HashIsa isa : {HashIsa::kSse2, HashIsa::kAvx2, HashIsa::kAvx512}) {
    if (xxh3_64_variant(isa)) {
      out.push_back(isa);
    }
  }
  return out;
}

}  // namespace

TEST(Checksum, EveryVariantGivesTheBaselineValue) {
  // XXH3-64 of no bytes, seed 0 (xxhash's published test vector).
  EXPECT_EQ(xxh3_64(nullptr, 0), 0x2D06800538D394C2ull);
  const auto data = random_bytes((size_t(1) << 20) + 4096, 7);
  Xxh3Fn base = xxh3_64_variant(HashIsa::kSse2);
  ASSERT_NE(base, nullptr);
  const auto isas = runnable();
  for (size_t len :
       {size_t(1), size_t(3), size_t(16), size_t(17), size_t(128), size_t(129), size_t(240),
        size_t(241), size_t(1024), size_t(4095), size_t(65536) + 13, size_t(1) << 20}) {
    for (size_t off : {size_t(0), size_t(1), size_t(63)}) {
      const uint64_t want = base(data.data() + off, len);
      EXPECT_EQ(xxh3_64(data.data() + off, len), want) << len << " at +" << off;
      for (HashIsa isa : isas) {
        EXPECT_EQ(xxh3_64_variant(isa)(data.data() + off, len), want)
            << hash_isa_name(isa) << ", " << len << " bytes at +" << off;
      }
    }
  }
  if (isas.size() < 3) {
    std::cout << "[ note ] this CPU runs " << isas.size()
              << " of the 3 variants; the others were not compared\n";
  }
}

TEST(Checksum, StreamDigestIsTheSameForAnySplitAndVariant) {
  const auto data = random_bytes(3 * 1000 * 1000 + 17, 11);
  Xxh3Stream whole(HashIsa::kSse2);
  whole.update(data.data(), data.size());
  const Hash128 want = whole.digest();
  EXPECT_FALSE(want.high == 0 && want.low == 0);
  for (HashIsa isa : runnable()) {
    for (size_t piece : {size_t(1) << 20, size_t(4099), size_t(1000000)}) {
      Xxh3Stream s(isa);
      for (size_t at = 0; at < data.size(); at += piece) {
        s.update(data.data() + at, std::min(piece, data.size() - at));
      }
      const Hash128 got = s.digest();
      EXPECT_EQ(got.high, want.high) << hash_isa_name(isa) << ", pieces of " << piece;
      EXPECT_EQ(got.low, want.low) << hash_isa_name(isa) << ", pieces of " << piece;
    }
  }
  // A different input gives a different digest (the stream hashes what it is given).
  auto other = data;
  other[123456] ^= 1;
  Xxh3Stream s;
  s.update(other.data(), other.size());
  EXPECT_NE(s.digest().low, want.low);
}

TEST(Checksum, TheMachinesVariantIsTheWidestItCanRun) {
  const auto isas = runnable();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(hash_isa(), isas.back()) << hash_isa_name(hash_isa());
}
