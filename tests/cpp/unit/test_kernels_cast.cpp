// fp32 <-> bf16/fp16 conversions: known bit patterns (round to nearest even,
// ties, NaN, inf, overflow, fp16 denormals), exhaustive checks over all
// 65536 half values, and every SIMD variant against the scalar rules.
#include <strata/kernels/cast.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "unit/test_kernels_util.h"

namespace strata::kernels {
namespace {

using testing::bits_of;
using testing::float_of;
using testing::simd_isas;

TEST(CastBf16, KnownBitPatterns) {
  struct Case {
    uint32_t in;
    uint16_t out;
  };
  const Case cases[] = {
      {0x3F800000u, 0x3F80},  // 1.0
      {0xBF800000u, 0xBF80},  // -1.0
      {0x00000000u, 0x0000},  // +0
      {0x80000000u, 0x8000},  // -0
      {0x3F808000u, 0x3F80},  // tie, even below: down
      {0x3F818000u, 0x3F82},  // tie, odd below: up
      {0x3F808001u, 0x3F81},  // above the tie: up
      {0x3F807FFFu, 0x3F80},  // below the tie: down
      {0x7F800000u, 0x7F80},  // +inf
      {0xFF800000u, 0xFF80},  // -inf
      {0x7F7FFFFFu, 0x7F80},  // FLT_MAX rounds up to inf
      {0x7F7F7FFFu, 0x7F7F},  // largest value that stays finite
      {0x7FC00000u, 0x7FC0},  // quiet NaN
      {0xFFC00000u, 0x7FC0},  // negative NaN: canonical
      {0x7F800001u, 0x7FC0},  // signalling NaN: canonical, never inf
      {0x7FFFFFFFu, 0x7FC0},  // NaN whose rounding would carry
      {0x00008000u, 0x0000},  // fp32 denormal, tie to even: 0
      {0x00018000u, 0x0002},  // fp32 denormal, tie to even: up
      {0x00010001u, 0x0001},  // fp32 denormal kept (no flush)
      {0x807FFFFFu, 0x8080},  // largest negative denormal rounds to -FLT_MIN
  };
  for (const Case& c : cases) {
    EXPECT_EQ(float_to_bf16_bits(float_of(c.in)), c.out) << std::hex << c.in;
  }
}

TEST(CastFp16, KnownBitPatterns) {
  struct Case {
    float in;
    uint16_t out;
  };
  const Case cases[] = {
      {1.0f, 0x3C00},
      {-2.0f, 0xC000},
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {65504.0f, 0x7BFF},   // largest finite
      {65519.99f, 0x7BFF},  // below the overflow tie
      {65520.0f, 0x7C00},   // tie between 65504 and inf: to even (inf)
      {1e10f, 0x7C00},      // overflow
      {-1e10f, 0xFC00},
      {std::ldexp(1.0f, -14), 0x0400},     // smallest normal
      {std::ldexp(1.0f, -24), 0x0001},     // smallest denormal
      {std::ldexp(1.0f, -25), 0x0000},     // tie with 0: to even (0)
      {std::ldexp(1.5f, -25), 0x0001},     // above the tie
      {std::ldexp(3.0f, -25), 0x0002},     // 1.5 ulp: tie, odd below: up
      {std::ldexp(1023.0f, -24), 0x03FF},  // largest denormal
      {std::ldexp(1023.5f, -24), 0x0400},  // rounds into the normals
      {std::ldexp(-5.0f, -24), 0x8005},
      {1.0f + std::ldexp(1.0f, -11), 0x3C00},  // tie, even below
      {1.0f + std::ldexp(3.0f, -11), 0x3C02},  // tie, odd below: up
      {1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), 0x3C01},
      {float_of(0x00000001u), 0x0000},  // fp32 denormals vanish, sign kept
      {float_of(0x80400000u), 0x8000},
      {INFINITY, 0x7C00},
      {-INFINITY, 0xFC00},
      {float_of(0x7FC00000u), 0x7E00},  // quiet NaN
      {float_of(0xFFC00000u), 0xFE00},  // sign kept
      {float_of(0x7F800001u), 0x7E00},  // signalling NaN: made quiet
      {float_of(0x7FA02000u), 0x7F01},  // top payload bits kept: 0x202000 >> 13
  };
  for (const Case& c : cases) {
    EXPECT_EQ(float_to_fp16_bits(c.in), c.out) << std::hexfloat << c.in;
  }
  EXPECT_EQ(fp16_bits_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_bits_to_float(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(fp16_bits_to_float(0x8400), -std::ldexp(1.0f, -14));
  EXPECT_EQ(fp16_bits_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(bits_of(fp16_bits_to_float(0x7C01)), 0x7FC02000u);  // made quiet, payload kept
  EXPECT_EQ(bits_of(fp16_bits_to_float(0xFE00)), 0xFFC00000u);
  EXPECT_EQ(bits_of(bf16_bits_to_float(0x3F81)), 0x3F810000u);
}

TEST(CastFp16, EveryHalfValueRoundTrips) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_bits_to_float(uint16_t(h));
    const bool nan = (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0;
    EXPECT_EQ(std::isnan(f), nan) << std::hex << h;
    // NaNs come back quiet (bit 9 set); everything else exactly.
    const uint16_t expect = nan ? uint16_t(h | 0x200) : uint16_t(h);
    ASSERT_EQ(float_to_fp16_bits(f), expect) << std::hex << h;
    if (!nan) {
      // Exact value check independent of the bit tricks.
      const int e = int((h >> 10) & 0x1F);
      const int m = int(h & 0x3FF);
      double v = e == 0 ? std::ldexp(double(m), -24)
                        : (e == 31 ? INFINITY : std::ldexp(double(1024 + m), e - 25));
      if (h & 0x8000) {
        v = -v;
      }
      ASSERT_EQ(double(f), v) << std::hex << h;
    }
  }
}

TEST(CastBf16, EveryBf16ValueRoundTrips) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_bits_to_float(uint16_t(h));
    if (std::isnan(f)) {
      ASSERT_EQ(float_to_bf16_bits(f), 0x7FC0);
    } else {
      ASSERT_EQ(float_to_bf16_bits(f), h) << std::hex << h;
    }
  }
}

// Checks that `h` is the nearest representable value to x with ties to
// even, using only the decode direction (independent of the rounding code).
template <class Decode>
void expect_nearest_even(float x, uint16_t h, Decode decode, const char* what) {
  const double v = decode(h);
  const double xd = x;
  for (int delta : {-1, 1}) {
    const uint16_t nb = uint16_t(h + delta);
    if (((h ^ nb) & 0x8000) != 0) {
      continue;  // crossed the sign
    }
    const double w = decode(nb);
    if (std::isnan(w)) {
      continue;
    }
    const double dv = std::fabs(xd - v), dw = std::fabs(xd - w);
    ASSERT_LE(dv, dw) << what << " x " << std::hexfloat << x << " got " << std::hex << h;
    if (dv == dw && std::isfinite(v)) {
      ASSERT_EQ(h & 1, 0) << what << " tie must go to even, x " << std::hexfloat << x;
    }
  }
}

TEST(Cast, RandomValuesRoundToNearestEven) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = uint32_t(rng());
    const float x = float_of(u);
    if (std::isnan(x) || std::isinf(x)) {
      continue;
    }
    const uint16_t b = float_to_bf16_bits(x);
    if (std::isfinite(bf16_bits_to_float(b))) {
      expect_nearest_even(
          x, b, [](uint16_t h) { return double(bf16_bits_to_float(h)); }, "bf16");
    }
    const float small = std::ldexp(std::fmod(std::fabs(x), 1.0f) + 1.0f, int(rng() % 44) - 28) *
                        ((u & 1) ? -1.0f : 1.0f);  // within and around the fp16 range
    const uint16_t f = float_to_fp16_bits(small);
    if (std::isfinite(fp16_bits_to_float(f))) {
      expect_nearest_even(
          small, f, [](uint16_t h) { return double(fp16_bits_to_float(h)); }, "fp16");
    }
  }
}

TEST(Cast, SimdVariantsEqualScalarRules) {
  const std::vector<Isa> isas = simd_isas();
  if (isas.empty()) {
    GTEST_SKIP() << "no SIMD variant runs on this CPU";
  }
  // Every half value, then random fp32 bit patterns plus the specials, at
  // odd lengths and misaligned starts.
  std::vector<uint16_t> halves(65536 + 3);
  for (size_t i = 0; i < halves.size(); ++i) {
    halves[i] = uint16_t(i);
  }
  std::mt19937_64 rng(2);
  std::vector<float> floats(300001 + 1);
  for (auto& f : floats) {
    f = float_of(uint32_t(rng()));
  }
  const uint32_t specials[] = {0x7F800000u, 0xFF800000u, 0x7FC00000u, 0x7F800001u, 0xFFFFFFFFu,
                               0x00000001u, 0x80000001u, 0x007FFFFFu, 0x477FF000u, 0x477FEFFFu,
                               0x33000000u, 0x33000001u, 0x387FE000u, 0x7F7FFFFFu, 0x3F808000u};
  for (size_t i = 0; i < std::size(specials); ++i) {
    floats[1 + i] = float_of(specials[i]);
  }
  for (Isa isa : isas) {
    for (DType dt : {DType::kBF16, DType::kF16}) {
      std::vector<float> want(halves.size() - 1), got(halves.size() - 1);
      ASSERT_TRUE(
          cast_to_f32(halves.data() + 1, dt, want.data(), want.size(), nullptr, Isa::kScalar).ok());
      ASSERT_TRUE(cast_to_f32(halves.data() + 1, dt, got.data(), got.size(), nullptr, isa).ok());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(bits_of(got[i]), bits_of(want[i]))
            << isa_name(isa) << " " << dtype_name(dt) << " half " << std::hex << halves[i + 1];
      }
      const size_t n = floats.size() - 1;
      std::vector<uint16_t> w(n), g(n);
      ASSERT_TRUE(cast_from_f32(floats.data() + 1, w.data(), dt, n, nullptr, Isa::kScalar).ok());
      ASSERT_TRUE(cast_from_f32(floats.data() + 1, g.data(), dt, n, nullptr, isa).ok());
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(g[i], w[i]) << isa_name(isa) << " " << dtype_name(dt) << " from " << std::hex
                              << bits_of(floats[i + 1]);
      }
    }
  }
}

TEST(Cast, ScalarBulkCastUsesTheBitRules) {
  std::vector<float> x = {1.0f, -0.0f, 65520.0f, std::ldexp(1.0f, -25), NAN, 3.14159f};
  std::vector<uint16_t> out(x.size());
  ASSERT_TRUE(cast_from_f32(x.data(), out.data(), DType::kF16, x.size(), nullptr).ok());
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(out[i], float_to_fp16_bits(x[i]));
  }
  EXPECT_EQ(cast_from_f32(nullptr, out.data(), DType::kF16, 1, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(cast_from_f32(nullptr, nullptr, DType::kF16, 0, nullptr).ok());
}

}  // namespace
}  // namespace strata::kernels
