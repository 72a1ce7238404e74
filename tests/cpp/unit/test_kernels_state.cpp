// Compressed optimizer state (bf16 and 8-bit blockwise slots): the q8 bit
// rules on hand-picked values, the encode(decode(x)) round trip, every SIMD
// variant against the scalar reference bit for bit (codec and step), thread
// count independence, optimizer_step on compressed slots against its
// definition (decode the record, one fp32 step, encode back), argument
// checks, and that Adam on compressed moments still tracks fp32 Adam.
#include <strata/kernels/cast.h>
#include <strata/kernels/cpu_features.h>
#include <strata/kernels/optimizer.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "unit/test_kernels_util.h"

namespace strata::kernels {
namespace {

using testing::bits_of;
using testing::Buffer;
using testing::float_of;
using testing::make_record;
using testing::Record;
using testing::simd_isas;

const StatusCode kInvalid = StatusCode::kInvalidArgument;

bool is_q8(SlotDType d) { return d == SlotDType::kQ8S || d == SlotDType::kQ8U; }

size_t blocks_of(size_t n) { return (n + kQ8Block - 1) / kQ8Block; }

// One packed slot as a record holds it: slot_bytes(dtype, n) bytes, the q8
// scales at q8_scales_offset(n). Filled with 0xA5 first, so bytes a codec must
// not write are recognisable.
struct Packed {
  SlotDType dtype = SlotDType::kF32;
  size_t n = 0;
  Buffer bytes;

  Packed() = default;
  Packed(SlotDType d, size_t count, size_t offset_bytes)
      : dtype(d), n(count), bytes(slot_bytes(d, count), offset_bytes) {
    if (bytes.bytes() > 0) {
      std::memset(bytes.data(), 0xA5, bytes.bytes());
    }
  }
  void* data() { return bytes.data(); }
  uint8_t* codes() { return static_cast<uint8_t*>(bytes.data()); }
  float* scales() {
    return is_q8(dtype) ? reinterpret_cast<float*>(codes() + q8_scales_offset(n)) : nullptr;
  }
};

Status encode(Packed& p, const float* x, Isa isa = Isa::kScalar, ThreadPool* pool = nullptr) {
  return encode_slot(p.dtype, x, p.data(), p.scales(), p.n, pool, isa);
}

std::vector<float> decode(Packed& p, Isa isa = Isa::kScalar, ThreadPool* pool = nullptr) {
  std::vector<float> out(p.n);
  const Status st = decode_slot(p.dtype, p.data(), p.scales(), out.data(), p.n, pool, isa);
  EXPECT_TRUE(st.ok()) << st.to_string();
  return out;
}

// A one-block q8 slot encoded by the scalar reference.
struct Encoded {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

Encoded encode_ref(SlotDType d, const std::vector<float>& x) {
  Packed p(d, x.size(), 0);
  EXPECT_TRUE(encode(p, x.data()).ok());
  Encoded e;
  e.codes.assign(p.codes(), p.codes() + x.size());
  e.scales.assign(p.scales(), p.scales() + blocks_of(x.size()));
  return e;
}

// The code the rules give for r = |x| / scale when scale = 1 (inv = 1):
// t = round-to-nearest-even of bits(r) to its top 12 bits.
int expected_code(SlotDType d, float x) {
  const uint32_t b = bits_of(std::min(std::fabs(x), 1.0f));
  const uint32_t t = (b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20;
  if (d == SlotDType::kQ8S) {
    const int mag = t < 904 ? 0 : int(t) - 896;
    return x < 0 ? -mag : mag;
  }
  return t < 776 ? 0 : int(t) - 768;
}

// ------------------------------------------------------------- formats

TEST(StateFormat, SlotBytesAndDtypeChoice) {
  for (size_t n : {size_t(0), size_t(1), size_t(3), size_t(255), size_t(256), size_t(257),
                   size_t(70001), size_t(1) << 26}) {
    EXPECT_EQ(slot_bytes(SlotDType::kF32, n), 4 * n);
    EXPECT_EQ(slot_bytes(SlotDType::kBF16, n), (2 * n + 3) / 4 * 4);
    const size_t q8 = (n + 63) / 64 * 64 + (4 * blocks_of(n) + 63) / 64 * 64;
    EXPECT_EQ(slot_bytes(SlotDType::kQ8S, n), q8) << n;
    EXPECT_EQ(slot_bytes(SlotDType::kQ8U, n), q8) << n;
    EXPECT_EQ(q8_scales_offset(n), (n + 63) / 64 * 64);
    for (SlotDType d : {SlotDType::kF32, SlotDType::kBF16, SlotDType::kQ8S, SlotDType::kQ8U}) {
      EXPECT_EQ(slot_bytes(d, n) % 4, 0u) << slot_dtype_name(d) << " n " << n;
    }
  }
  EXPECT_EQ(slot_bytes(SlotDType::kQ8S, 256), 256u + 64u);
  EXPECT_EQ(slot_bytes(SlotDType::kQ8U, 257), 320u + 64u);
  EXPECT_STREQ(slot_dtype_name(SlotDType::kQ8S), "q8s");
  EXPECT_STREQ(slot_dtype_name(SlotDType::kQ8U), "q8u");
  EXPECT_STREQ(slot_dtype_name(SlotDType::kBF16), "bf16");
  EXPECT_STREQ(state_dtype_name(StateDType::kInt8Blockwise), "int8_blockwise");
  EXPECT_STREQ(state_dtype_name(StateDType::kBF16), "bf16");

  OptimizerHyper adamw;
  OptimizerHyper ams = adamw;
  ams.amsgrad = true;
  OptimizerHyper sgd;
  sgd.kind = OptimizerKind::kSgd;
  sgd.momentum = 0.9;
  OptimizerHyper adagrad;
  adagrad.kind = OptimizerKind::kAdagrad;
  const StateDType q = StateDType::kInt8Blockwise;
  EXPECT_EQ(slot_dtype_for(adamw, 0, q, false), SlotDType::kF32);
  EXPECT_EQ(slot_dtype_for(adamw, 0, q, true), SlotDType::kBF16);
  EXPECT_EQ(slot_dtype_for(adamw, 0, StateDType::kF32, true), SlotDType::kBF16);
  EXPECT_EQ(slot_dtype_for(adamw, 1, q, false), SlotDType::kQ8S);
  EXPECT_EQ(slot_dtype_for(adamw, 2, q, false), SlotDType::kQ8U);
  EXPECT_EQ(slot_dtype_for(ams, 3, q, false), SlotDType::kQ8U);
  EXPECT_EQ(slot_dtype_for(sgd, 1, q, false), SlotDType::kQ8S);
  EXPECT_EQ(slot_dtype_for(adagrad, 1, q, true), SlotDType::kQ8U);
  for (int k = 1; k < 4; ++k) {
    EXPECT_EQ(slot_dtype_for(ams, k, StateDType::kBF16, false), SlotDType::kBF16);
    EXPECT_EQ(slot_dtype_for(ams, k, StateDType::kF32, true), SlotDType::kF32);
  }
}

// ------------------------------------------------------ q8 bit rules

TEST(StateQ8, BlockMaxIsTheScaleAndDecodesExactly) {
  for (float s : {1.0f, 3.0f, 0.1f, 7.3e-20f, 2.5e30f}) {
    std::vector<float> x = {0.0f, s, 0.5f * s, -0.25f * s, s * 1e-3f};
    const Encoded es = encode_ref(SlotDType::kQ8S, x);
    EXPECT_EQ(bits_of(es.scales[0]), bits_of(s));
    EXPECT_EQ(int8_t(es.codes[0]), 0);
    EXPECT_EQ(int8_t(es.codes[1]), 120) << s;
    EXPECT_EQ(int8_t(es.codes[2]), 112) << s;   // 0.5 = 2^-1: t = 1008
    EXPECT_EQ(int8_t(es.codes[3]), -104) << s;  // -0.25: sign and t = 1000
    const Encoded eu = encode_ref(SlotDType::kQ8U, x);
    EXPECT_EQ(bits_of(eu.scales[0]), bits_of(s));
    EXPECT_EQ(eu.codes[1], 248) << s;
    EXPECT_EQ(eu.codes[2], 240) << s;
    EXPECT_EQ(eu.codes[3], 232) << s << ": kQ8U stores |x|";
    for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U}) {
      Packed p(d, x.size(), 0);
      ASSERT_TRUE(encode(p, x.data()).ok());
      const std::vector<float> y = decode(p);
      EXPECT_EQ(bits_of(y[0]), 0u);
      EXPECT_EQ(bits_of(y[1]), bits_of(s)) << "the max decodes to exactly the scale";
      EXPECT_EQ(y[2], 0.5f * s);
      EXPECT_EQ(y[3], d == SlotDType::kQ8S ? -0.25f * s : 0.25f * s);
    }
  }
}

TEST(StateQ8, CodesFollowTheRoundingRuleWithScaleOne) {
  // With the block max 1.0 the scale is 1, inv is 1 and r = |x| exactly, so
  // the code is the rounding rule itself.
  const float tiny_s = std::ldexp(1.0f, -14), tiny_u = std::ldexp(1.0f, -30);
  std::vector<float> x = {
      1.0f,
      0.53125f,         // 1.0625 * 2^-1: a tie, to even (mantissa 0): 0.5
      0.59375f,         // 1.1875 * 2^-1: a tie, to even (mantissa 2/8): 0.625
      0.5625f,          // 1.125 * 2^-1: exactly 1 mantissa step
      0.99f,            // rounds up to 1: the max code
      tiny_s,           // 2^-14: kQ8S's smallest code (8)
      tiny_s * 0.99f,   // just below 2^-14: rounds up to it
      tiny_s * 0.96f,   // further below: below the rounding point, 0
      -tiny_s * 0.99f,  // negative, just below 2^-14
      tiny_u,           // 2^-30: kQ8U's smallest code (8), kQ8S's 0
      tiny_u * 0.99f,   // rounds up to it
      tiny_u * 0.96f,   // 0
      -0.75f,
      -0.0f,
      std::ldexp(1.0f, -20),
  };
  for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U}) {
    const Encoded e = encode_ref(d, x);
    ASSERT_EQ(e.scales[0], 1.0f);
    for (size_t i = 0; i < x.size(); ++i) {
      const int got = d == SlotDType::kQ8S ? int(int8_t(e.codes[i])) : int(e.codes[i]);
      EXPECT_EQ(got, expected_code(d, x[i])) << slot_dtype_name(d) << " x " << x[i];
    }
  }
  const Encoded s = encode_ref(SlotDType::kQ8S, x);
  EXPECT_EQ(int8_t(s.codes[1]), 112);
  EXPECT_EQ(int8_t(s.codes[2]), 114);
  EXPECT_EQ(int8_t(s.codes[3]), 113);
  EXPECT_EQ(int8_t(s.codes[4]), 120);
  EXPECT_EQ(int8_t(s.codes[5]), 8);
  EXPECT_EQ(int8_t(s.codes[6]), 8);
  EXPECT_EQ(int8_t(s.codes[7]), 0);
  EXPECT_EQ(int8_t(s.codes[8]), -8);
  EXPECT_EQ(int8_t(s.codes[9]), 0) << "2^-30 is below kQ8S's range";
  EXPECT_EQ(int8_t(s.codes[13]), 0) << "-0.0";
  const Encoded u = encode_ref(SlotDType::kQ8U, x);
  EXPECT_EQ(u.codes[5], 8 + 128);  // 2^-14 = 2^-30 * 2^16: 16 binades up
  EXPECT_EQ(u.codes[8], 8 + 128) << "kQ8U drops the sign";
  EXPECT_EQ(u.codes[9], 8);
  EXPECT_EQ(u.codes[10], 8);
  EXPECT_EQ(u.codes[11], 0);
  EXPECT_EQ(u.codes[13], 0);
}

TEST(StateQ8, EveryCodeDecodesByTheFormula) {
  std::vector<uint8_t> all(256);
  for (int c = 0; c < 256; ++c) {
    all[size_t(c)] = uint8_t(c);
  }
  const float scale = 0.37f;
  for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U}) {
    Packed p(d, 256, 0);
    std::memcpy(p.codes(), all.data(), 256);
    p.scales()[0] = scale;
    const std::vector<float> y = decode(p);
    for (int c = 0; c < 256; ++c) {
      float r = 0.0f;
      if (d == SlotDType::kQ8S) {
        const int v = int8_t(uint8_t(c));
        const int mag = std::abs(v);
        r = mag ? float_of(uint32_t(mag + 896) << 20) : 0.0f;
        r = v < 0 ? -r : r;
      } else {
        r = c ? float_of(uint32_t(c + 768) << 20) : 0.0f;
      }
      EXPECT_EQ(bits_of(y[size_t(c)]), bits_of(r * scale)) << slot_dtype_name(d) << " code " << c;
    }
    for (Isa isa : simd_isas()) {
      EXPECT_EQ(decode(p, isa), y) << isa_name(isa);
    }
  }
}

TEST(StateQ8, ZeroTinyAndNonFiniteBlocksStoreScaleZero) {
  const float min_scale = std::ldexp(1.0f, -96);
  struct Case {
    std::vector<float> x;
    bool kept;
    const char* what;
  };
  const std::vector<Case> cases = {
      {std::vector<float>(256, 0.0f), false, "all zero"},
      {{0.0f, -0.0f, 0.0f}, false, "zeros and -0"},
      {{std::ldexp(1.0f, -97), -std::ldexp(1.0f, -100), 1e-40f}, false, "max 2^-97 < 2^-96"},
      {{min_scale, min_scale * 0.5f, -min_scale * 0.25f}, true, "max exactly 2^-96"},
      {{1.0f, INFINITY, 0.5f}, false, "inf"},
      {{1.0f, -NAN, 0.5f}, false, "NaN"},
      {{1.0f, 2.0f, 3.4e38f}, true, "FLT_MAX-ish"},
  };
  for (const Case& c : cases) {
    for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U}) {
      for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
        if (!isa_supported(isa)) {
          continue;
        }
        Packed p(d, c.x.size(), 0);
        ASSERT_TRUE(encode(p, c.x.data(), isa).ok());
        if (!c.kept) {
          EXPECT_EQ(bits_of(p.scales()[0]), 0u) << c.what << " " << isa_name(isa);
          for (size_t i = 0; i < c.x.size(); ++i) {
            EXPECT_EQ(p.codes()[i], 0) << c.what << " " << isa_name(isa) << " i " << i;
          }
          for (float y : decode(p, isa)) {
            EXPECT_EQ(bits_of(y), 0u) << c.what;
          }
        } else {
          float mx = 0.0f;
          for (float v : c.x) {
            mx = std::max(mx, std::fabs(v));
          }
          EXPECT_EQ(p.scales()[0], mx) << c.what;
          const std::vector<float> y = decode(p, isa);
          for (size_t i = 0; i < c.x.size(); ++i) {
            // Kept blocks decode to normal numbers (no denormal products).
            EXPECT_TRUE(y[i] == 0.0f || std::fpclassify(y[i]) == FP_NORMAL) << c.what;
          }
        }
      }
    }
  }
}

TEST(StateQ8, PartialLastBlockHasItsOwnScaleAndNothingPastNIsWritten) {
  const size_t n = 2 * kQ8Block + 10;
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = float(i % 97) * (i < 2 * kQ8Block ? 1.0f : 1e-3f);
  }
  for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U}) {
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
      if (!isa_supported(isa)) {
        continue;
      }
      Packed p(d, n, 0);
      ASSERT_TRUE(encode(p, x.data(), isa).ok());
      EXPECT_EQ(p.scales()[0], 96.0f);
      EXPECT_EQ(p.scales()[1], 96.0f);
      float last = 0.0f;
      for (size_t i = 2 * kQ8Block; i < n; ++i) {
        last = std::max(last, x[i]);
      }
      EXPECT_EQ(p.scales()[2], last) << "the partial block's scale: its own 10 elements";
      for (size_t i = n; i < q8_scales_offset(n); ++i) {
        EXPECT_EQ(p.codes()[i], 0xA5) << "code padding " << i << " written by " << isa_name(isa);
      }
      const auto* pad = reinterpret_cast<const uint8_t*>(p.scales() + blocks_of(n));
      for (const uint8_t* q = pad; q < p.codes() + p.bytes.bytes(); ++q) {
        EXPECT_EQ(*q, 0xA5) << "scale padding written by " << isa_name(isa);
      }
    }
  }
}

// ---------------------------------------------------------- round trip

// Random slot contents of several shapes: normal values, values spanning
// many binades within a block (Adam's v), blocks of zeros, exact zeros,
// denormals, one huge outlier per block.
std::vector<float> random_slot(size_t n, bool nonneg, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  const int shape = int(rng() % 4);
  for (size_t i = 0; i < n; ++i) {
    float v = normal(rng);
    switch (shape) {
      case 0:
        v *= 0.01f;
        break;
      case 1:
        v = std::ldexp(v, -int(rng() % 40));  // 40 binades
        break;
      case 2:
        v = (i / kQ8Block) % 3 == 1 ? 0.0f : v * 1e-30f;  // zero blocks, tiny blocks
        break;
      default:
        v = i % kQ8Block == 7 ? v * 1e6f : v;  // an outlier per block
        break;
    }
    const uint64_t r = rng() % 64;
    if (r == 0) {
      v = 0.0f;
    } else if (r == 1) {
      v = -0.0f;
    } else if (r == 2) {
      v = 1e-41f;  // denormal
    }
    x[i] = nonneg ? v * v : v;
  }
  return x;
}

TEST(StateCodec, EncodeOfDecodeReproducesCodesAndScales) {
  std::mt19937_64 rng(42);
  size_t blocks_checked = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const size_t n = 1 + rng() % 3000;
    for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U, SlotDType::kBF16}) {
      const std::vector<float> x = random_slot(n, d == SlotDType::kQ8U, rng);
      Packed a(d, n, 4 * (rng() % 16));
      ASSERT_TRUE(encode(a, x.data()).ok());
      const std::vector<float> y = decode(a);
      for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
        if (!isa_supported(isa)) {
          continue;
        }
        Packed b(d, n, 4 * (rng() % 16));
        ASSERT_TRUE(encode(b, y.data(), isa).ok());
        ASSERT_EQ(std::memcmp(a.data(), b.data(), a.bytes.bytes()), 0)
            << slot_dtype_name(d) << " n " << n << " isa " << isa_name(isa) << " trial " << trial;
        EXPECT_EQ(decode(b, isa), y);
      }
      blocks_checked += blocks_of(n);
    }
  }
  EXPECT_GT(blocks_checked, 500u);
}

TEST(StateCodec, QuantisationErrorIsBoundedRelativeToTheBlock) {
  // |decode(encode(x)) - x| <= |x| / 16 (3 mantissa bits, to nearest) for
  // elements inside the format's range, <= the range's floor below it.
  std::mt19937_64 rng(8);
  for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U}) {
    const std::vector<float> x = random_slot(4096, d == SlotDType::kQ8U, rng);
    Packed p(d, x.size(), 0);
    ASSERT_TRUE(encode(p, x.data()).ok());
    const std::vector<float> y = decode(p);
    const double floor_r = d == SlotDType::kQ8S ? std::ldexp(1.0, -14) : std::ldexp(1.0, -30);
    for (size_t i = 0; i < x.size(); ++i) {
      const double s = p.scales()[i / kQ8Block];
      if (s == 0.0) {
        continue;
      }
      const double err = std::fabs(double(y[i]) - double(x[i]));
      EXPECT_LE(err, std::max(std::fabs(double(x[i])) / 16.0, floor_r * s) * 1.0001) << i;
    }
  }
}

// ------------------------------------------------- SIMD == scalar, threads

TEST(StateCodecSimd, EncodeAndDecodeEqualScalarBitForBit) {
  const std::vector<Isa> isas = simd_isas();
  if (isas.empty()) {
    GTEST_SKIP() << "no SIMD variant runs on this CPU (" << cpu_features_string() << ")";
  }
  std::mt19937_64 rng(1234);
  std::vector<size_t> sizes = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 255, 256, 257, 511, 4099, 70001};
  for (int k = 0; k < 20; ++k) {
    sizes.push_back(1 + rng() % 2000);
  }
  for (size_t n : sizes) {
    for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U, SlotDType::kBF16}) {
      std::vector<float> x = random_slot(n, d == SlotDType::kQ8U && rng() % 2, rng);
      if (rng() % 4 == 0) {
        x[rng() % n] = (rng() % 2) ? INFINITY : NAN;  // a non-finite block
      }
      Packed ref(d, n, 0);
      ASSERT_TRUE(encode(ref, x.data()).ok());
      // Decode arbitrary bytes too: every code, -128 included, random scales.
      Packed junk(d, n, 0);
      for (size_t i = 0; i < slot_bytes(d, n); ++i) {
        junk.codes()[i] = uint8_t(rng());
      }
      if (is_q8(d)) {
        for (size_t b = 0; b < blocks_of(n); ++b) {
          junk.scales()[b] = b % 5 == 0 ? 0.0f : std::ldexp(float(rng() % 1000), -int(rng() % 80));
        }
      }
      const std::vector<float> junk_ref = decode(junk);
      for (Isa isa : isas) {
        Packed got(d, n, 4 * (rng() % 16));
        ASSERT_TRUE(encode(got, x.data(), isa).ok());
        ASSERT_EQ(std::memcmp(ref.data(), got.data(), ref.bytes.bytes()), 0)
            << slot_dtype_name(d) << " encode n " << n << " isa " << isa_name(isa);
        const std::vector<float> a = decode(ref), b = decode(got, isa);
        ASSERT_EQ(std::memcmp(a.data(), b.data(), n * 4), 0)
            << slot_dtype_name(d) << " decode n " << n << " isa " << isa_name(isa);
        const std::vector<float> j = decode(junk, isa);
        for (size_t i = 0; i < n; ++i) {
          // Arbitrary bf16 bits may be NaNs; only their payload may differ.
          if (!(std::isnan(j[i]) && std::isnan(junk_ref[i]))) {
            ASSERT_EQ(bits_of(j[i]), bits_of(junk_ref[i]))
                << slot_dtype_name(d) << " junk decode n " << n << " i " << i << " "
                << isa_name(isa);
          }
        }
      }
    }
  }
}

TEST(StateCodec, ThreadCountDoesNotChangeTheBits) {
  std::mt19937_64 rng(77);
  ThreadPool two(2);
  const size_t n = 3 * 65536 + 1000;
  for (SlotDType d : {SlotDType::kQ8S, SlotDType::kQ8U, SlotDType::kBF16, SlotDType::kF32}) {
    const std::vector<float> x = random_slot(n, d == SlotDType::kQ8U, rng);
    Packed a(d, n, 0), b(d, n, 0);
    ASSERT_TRUE(encode(a, x.data(), Isa::kAuto, nullptr).ok());
    ASSERT_TRUE(encode(b, x.data(), Isa::kAuto, &two).ok());
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.bytes.bytes()), 0) << slot_dtype_name(d);
    EXPECT_EQ(decode(a, Isa::kAuto, &two), decode(a, Isa::kScalar, nullptr));
    if (d == SlotDType::kF32) {
      EXPECT_EQ(decode(a), x) << "kF32 is a copy";
    }
  }
}

TEST(StateCodec, BadArgumentsAreInvalid) {
  std::vector<float> x(300, 1.0f);
  Packed q(SlotDType::kQ8S, 300, 0);
  EXPECT_EQ(encode_slot(SlotDType::kQ8S, x.data(), q.data(), nullptr, 300, nullptr).code(),
            kInvalid);
  EXPECT_EQ(decode_slot(SlotDType::kQ8U, q.data(), nullptr, x.data(), 300, nullptr).code(),
            kInvalid);
  EXPECT_EQ(encode_slot(SlotDType::kBF16, x.data(), nullptr, nullptr, 300, nullptr).code(),
            kInvalid);
  EXPECT_EQ(decode_slot(SlotDType::kBF16, q.data(), nullptr, nullptr, 300, nullptr).code(),
            kInvalid);
  EXPECT_EQ(encode_slot(SlotDType(9), x.data(), q.data(), q.scales(), 300, nullptr).code(),
            kInvalid);
  EXPECT_EQ(
      encode_slot(SlotDType::kQ8S, x.data(), q.data(), q.scales(), 300, nullptr, Isa(42)).code(),
      kInvalid);
  EXPECT_TRUE(encode_slot(SlotDType::kQ8S, nullptr, nullptr, nullptr, 0, nullptr).ok())
      << "n = 0 needs no buffers";
}

// ------------------------------------------------ steps on compressed state

// A record whose slots are stored as `dtype[k]`: the fp32 Record of
// test_kernels_util.h for the gradient, the copy-out and the fp32 slots, and
// a Packed buffer per compressed slot (encoded from the Record's random
// values, so they start as a real step would find them).
struct CRecord {
  Record fp;
  SlotDType dtype[4] = {SlotDType::kF32, SlotDType::kF32, SlotDType::kF32, SlotDType::kF32};
  Packed packed[4];

  StateView view() {
    StateView v = fp.view();
    for (int k = 0; k < fp.slots; ++k) {
      v.dtype[k] = dtype[k];
      if (dtype[k] != SlotDType::kF32) {
        v.slot[k] = nullptr;
        v.packed[k] = packed[k].data();
        v.scales[k] = packed[k].scales();
      }
    }
    return v;
  }
  bool master_packed() const { return dtype[0] != SlotDType::kF32; }
  std::span<const CopyOut> copy_out() const { return fp.copy_out; }
};

CRecord make_crecord(const OptimizerHyper& h, size_t n, const SlotDType (&dtypes)[4], DType gd,
                     DType od, std::mt19937_64& rng, bool with_copy_out) {
  CRecord r;
  r.fp = make_record(h, n, gd, od, rng, with_copy_out);
  for (int k = 0; k < r.fp.slots; ++k) {
    r.dtype[k] = dtypes[k];
    if (dtypes[k] == SlotDType::kF32) {
      continue;
    }
    r.packed[k] = Packed(dtypes[k], n, 4 * (rng() % 16));
    EXPECT_TRUE(encode(r.packed[k], r.fp.slot[k].f32()).ok());
    r.fp.slot[k] = Buffer();  // only the packed copy exists
  }
  return r;
}

CRecord copy_of(const CRecord& r) {
  CRecord c = r;
  c.fp.bind_outs();
  return c;
}

std::string first_difference(const CRecord& a, const CRecord& b) {
  for (int k = 0; k < a.fp.slots; ++k) {
    const Buffer& x = a.dtype[k] == SlotDType::kF32 ? a.fp.slot[k] : a.packed[k].bytes;
    const Buffer& y = b.dtype[k] == SlotDType::kF32 ? b.fp.slot[k] : b.packed[k].bytes;
    if (!x.same_bytes(y)) {
      const auto* p = static_cast<const uint8_t*>(x.data());
      const auto* q = static_cast<const uint8_t*>(y.data());
      size_t i = 0;
      while (i < x.bytes() && p[i] == q[i]) {
        ++i;
      }
      return "slot " + std::to_string(k) + " (" + slot_dtype_name(a.dtype[k]) + ") byte " +
             std::to_string(i) + " of " + std::to_string(x.bytes());
    }
  }
  for (size_t k = 0; k < a.fp.outs.size(); ++k) {
    if (!a.fp.outs[k].same_bytes(b.fp.outs[k])) {
      return "copy_out " + std::to_string(k) + " (offset " +
             std::to_string(a.fp.copy_out[k].offset) + ", n " + std::to_string(a.fp.copy_out[k].n) +
             ") differs";
    }
  }
  return "";
}

Status step(const OptimizerHyper& h, CRecord& r, int64_t t, float grad_mul, DType od,
            ThreadPool* pool, Isa isa) {
  return optimizer_step(h, StepArgs{t, grad_mul}, r.view(), r.fp.grad.data(), r.fp.grad_dtype,
                        r.copy_out(), od, pool, isa);
}

// optimizer_step's definition for compressed slots, spelled out with the
// scalar reference: decode every compressed slot of the whole record, one
// fp32 step (copy-out off when the master is compressed), encode every slot
// back whole, then the copy-out from the decoded, rounded master.
void reference_step(const OptimizerHyper& h, CRecord& r, int64_t t, float grad_mul, DType od) {
  const size_t n = r.fp.n;
  std::vector<float> dec[4];
  StateView v = r.fp.view();
  for (int k = 0; k < r.fp.slots; ++k) {
    if (r.dtype[k] != SlotDType::kF32) {
      dec[k] = decode(r.packed[k]);
      v.slot[k] = dec[k].data();
    }
  }
  const std::span<const CopyOut> co = r.master_packed() ? std::span<const CopyOut>() : r.copy_out();
  ASSERT_TRUE(optimizer_step(h, StepArgs{t, grad_mul}, v, r.fp.grad.data(), r.fp.grad_dtype, co, od,
                             nullptr, Isa::kScalar)
                  .ok());
  for (int k = 0; k < r.fp.slots; ++k) {
    if (r.dtype[k] != SlotDType::kF32) {
      ASSERT_TRUE(encode(r.packed[k], dec[k].data()).ok());
    }
  }
  if (r.master_packed()) {
    const std::vector<float> master = decode(r.packed[0]);
    ASSERT_EQ(master.size(), n);
    for (const CopyOut& c : r.copy_out()) {
      ASSERT_TRUE(
          cast_from_f32(master.data() + c.offset, c.dst, od, c.n, nullptr, Isa::kScalar).ok());
    }
  }
}

struct Opt {
  std::string name;
  OptimizerHyper hyper;
};

std::vector<Opt> optimizers() {
  std::vector<Opt> out;
  OptimizerHyper adam;
  adam.kind = OptimizerKind::kAdam;
  adam.lr = 1e-2;
  out.push_back({"Adam", adam});
  OptimizerHyper adam_l2 = adam;
  adam_l2.weight_decay = 0.05;
  out.push_back({"Adam wd", adam_l2});
  OptimizerHyper adamw = adam;
  adamw.kind = OptimizerKind::kAdamW;
  adamw.weight_decay = 0.01;
  out.push_back({"AdamW", adamw});
  OptimizerHyper ams = adamw;
  ams.amsgrad = true;
  out.push_back({"AdamW amsgrad", ams});
  OptimizerHyper sgd;
  sgd.kind = OptimizerKind::kSgd;
  sgd.lr = 0.05;
  sgd.momentum = 0.9;
  sgd.weight_decay = 1e-3;
  out.push_back({"SGD momentum", sgd});
  OptimizerHyper nesterov = sgd;
  nesterov.nesterov = true;
  out.push_back({"SGD nesterov", nesterov});
  OptimizerHyper adagrad;
  adagrad.kind = OptimizerKind::kAdagrad;
  adagrad.lr = 0.1;
  adagrad.eps = 1e-10;
  adagrad.initial_accumulator_value = 0.1;
  adagrad.lr_decay = 0.01;
  out.push_back({"Adagrad", adagrad});
  return out;
}

// The slot layouts a config can select: moments bf16 or q8 (slot_dtype_for),
// master fp32 or bf16, plus mixed ones the view allows (a bf16 master over
// fp32 moments, one q8 slot only).
struct Layout {
  std::string name;
  SlotDType dtype[4];
};

std::vector<Layout> layouts(const OptimizerHyper& h) {
  std::vector<Layout> out;
  for (StateDType state : {StateDType::kBF16, StateDType::kInt8Blockwise, StateDType::kF32}) {
    for (bool master_bf16 : {false, true}) {
      if (state == StateDType::kF32 && !master_bf16) {
        continue;  // plain fp32: test_kernels.cpp
      }
      Layout l;
      l.name = std::string(state_dtype_name(state)) + (master_bf16 ? " bf16-master" : "");
      for (int k = 0; k < 4; ++k) {
        l.dtype[k] = slot_dtype_for(h, k, state, master_bf16);
      }
      out.push_back(l);
    }
  }
  // Layouts slot_dtype_for never gives run through the decode / fp32 /
  // encode chunks: they must be exact too.
  if (state_slots(h) >= 3) {
    Layout l{"m fp32, v q8u", {SlotDType::kF32, SlotDType::kF32, SlotDType::kQ8U, SlotDType::kF32}};
    out.push_back(l);
  }
  if (state_slots(h) >= 2) {
    Layout l{"q8s master, bf16 then q8u",
             {SlotDType::kQ8S, SlotDType::kBF16, SlotDType::kQ8U, SlotDType::kQ8U}};
    out.push_back(l);
  }
  return out;
}

const DType kDtypes[] = {DType::kF32, DType::kBF16, DType::kF16};

TEST(StateStep, CompressedStepIsItsDefinitionAndEverySimdVariantAgrees) {
  std::mt19937_64 rng(20250101);
  const std::vector<Isa> isas = simd_isas();
  const std::vector<size_t> sizes = {1, 17, 255, 257, 4097, 70001};
  size_t cases = 0;
  for (const Opt& opt : optimizers()) {
    for (const Layout& layout : layouts(opt.hyper)) {
      for (DType gd : kDtypes) {
        for (int out = -1; out < 3; ++out) {
          const bool with_out = out >= 0;
          const DType od = with_out ? kDtypes[out] : DType::kBF16;
          for (size_t n : sizes) {
            if (n > 300 && (gd != DType::kF32) != (out == 1)) {
              continue;  // big sizes: half the dtype pairs (the tails are the same)
            }
            const int64_t t = 1 + int64_t(rng() % 3);
            const float grad_mul = (rng() % 2) ? 1.0f : 0.37f;
            CRecord base = make_crecord(opt.hyper, n, layout.dtype, gd, od, rng, with_out);
            CRecord ref = copy_of(base);
            CRecord scalar = copy_of(base);
            for (int s = 0; s < 2; ++s) {
              reference_step(opt.hyper, ref, t + s, grad_mul, od);
              const Status st = step(opt.hyper, scalar, t + s, grad_mul, od, nullptr, Isa::kScalar);
              ASSERT_TRUE(st.ok()) << st.to_string();
            }
            const std::string what = opt.name + " / " + layout.name + " grad " + dtype_name(gd) +
                                     " out " + (with_out ? dtype_name(od) : "none") + " n " +
                                     std::to_string(n) + " step " + std::to_string(t);
            ASSERT_EQ(first_difference(ref, scalar), "") << "scalar vs definition: " << what;
            for (Isa isa : isas) {
              CRecord simd = copy_of(base);
              for (int s = 0; s < 2; ++s) {
                ASSERT_TRUE(step(opt.hyper, simd, t + s, grad_mul, od, nullptr, isa).ok());
              }
              ASSERT_EQ(first_difference(scalar, simd), "") << isa_name(isa) << ": " << what;
            }
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 500u);
}

TEST(StateStep, OneAndTwoThreadsGiveIdenticalResults) {
  std::mt19937_64 rng(31);
  ThreadPool one(1), two(2);
  const size_t n = 5 * 16384 + 333;  // several tiles and a partial one
  for (const Opt& opt : optimizers()) {
    for (const Layout& layout : layouts(opt.hyper)) {
      CRecord base =
          make_crecord(opt.hyper, n, layout.dtype, DType::kBF16, DType::kBF16, rng, true);
      CRecord a = copy_of(base), b = copy_of(base), c = copy_of(base);
      for (int t = 1; t <= 3; ++t) {
        ASSERT_TRUE(step(opt.hyper, a, t, 0.5f, DType::kBF16, nullptr, Isa::kAuto).ok());
        ASSERT_TRUE(step(opt.hyper, b, t, 0.5f, DType::kBF16, &one, Isa::kAuto).ok());
        ASSERT_TRUE(step(opt.hyper, c, t, 0.5f, DType::kBF16, &two, Isa::kAuto).ok());
      }
      EXPECT_EQ(first_difference(a, b), "") << opt.name << " / " << layout.name;
      EXPECT_EQ(first_difference(a, c), "") << opt.name << " / " << layout.name;
    }
  }
}

TEST(StateStep, OverlappingAndUnsortedCopyOutFromACompressedMaster) {
  std::mt19937_64 rng(5);
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdamW;
  const size_t n = 2 * 16384 + 999;
  const SlotDType dt[4] = {SlotDType::kBF16, SlotDType::kQ8S, SlotDType::kQ8U, SlotDType::kF32};
  for (DType od : kDtypes) {
    CRecord r = make_crecord(h, n, dt, DType::kF32, od, rng, false);
    for (int k = 0; k < 200; ++k) {
      CopyOut c;
      c.offset = rng() % n;
      c.n = std::min<size_t>(n - c.offset, 1 + rng() % (k % 10 == 0 ? 30000 : 50));
      r.fp.outs.emplace_back(c.n * dtype_size(od), (rng() % 8) * dtype_size(od));
      r.fp.copy_out.push_back(c);
    }
    r.fp.bind_outs();
    CRecord ref = copy_of(r);
    ThreadPool pool(2);
    ASSERT_TRUE(step(h, r, 1, 1.0f, od, &pool, Isa::kAuto).ok());
    reference_step(h, ref, 1, 1.0f, od);
    EXPECT_EQ(first_difference(ref, r), "") << dtype_name(od);
    // bf16 master, bf16 copy-out: the copy is the stored master's bits.
    if (od == DType::kBF16) {
      const auto* master = reinterpret_cast<const uint16_t*>(r.packed[0].data());
      for (size_t k = 0; k < r.fp.copy_out.size(); ++k) {
        ASSERT_EQ(std::memcmp(r.fp.outs[k].data(), master + r.fp.copy_out[k].offset,
                              r.fp.copy_out[k].n * 2),
                  0);
      }
    }
  }
}

TEST(StateStep, BoundLoopLeavesEncodedStateUnchanged) {
  // stream_bound_step runs the same decode / s = g * 0 + s / encode chunks;
  // since encode(decode(x)) == x, encoded state comes back bit for bit.
  std::mt19937_64 rng(9);
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdamW;
  h.amsgrad = true;
  for (const Layout& layout : layouts(h)) {
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
      if (!isa_supported(isa)) {
        continue;
      }
      CRecord r = make_crecord(h, 40000, layout.dtype, DType::kF32, DType::kF16, rng, true);
      CRecord before = copy_of(r);
      ThreadPool pool(2);
      ASSERT_TRUE(stream_bound_step(h, r.view(), r.fp.grad.data(), DType::kF32, r.copy_out(),
                                    DType::kF16, &pool, isa)
                      .ok());
      for (int k = 0; k < 4; ++k) {
        if (layout.dtype[k] != SlotDType::kF32) {
          EXPECT_TRUE(r.packed[k].bytes.same_bytes(before.packed[k].bytes))
              << layout.name << " slot " << k << " " << isa_name(isa);
        } else {
          EXPECT_TRUE(r.fp.slot[k].same_bytes(before.fp.slot[k])) << layout.name << " slot " << k;
        }
      }
      // The copy-out holds the (decoded) master.
      std::vector<float> master;
      if (layout.dtype[0] == SlotDType::kF32) {
        master.assign(r.fp.slot[0].f32(), r.fp.slot[0].f32() + r.fp.n);
      } else {
        master = decode(r.packed[0]);
      }
      for (size_t k = 0; k < r.fp.copy_out.size(); ++k) {
        const CopyOut& c = r.fp.copy_out[k];
        for (size_t i = 0; i < c.n; ++i) {
          ASSERT_EQ(r.fp.outs[k].u16()[i], float_to_fp16_bits(master[c.offset + i]))
              << layout.name << " range " << k;
        }
      }
    }
  }
}

TEST(StateStep, MissingPackedOrScalesIsInvalidAndTouchesNothing) {
  std::mt19937_64 rng(3);
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdamW;
  const SlotDType dt[4] = {SlotDType::kBF16, SlotDType::kQ8S, SlotDType::kQ8U, SlotDType::kF32};
  CRecord r = make_crecord(h, 1000, dt, DType::kF32, DType::kBF16, rng, true);
  const CRecord before = copy_of(r);
  auto run = [&](const StateView& v) {
    return optimizer_step(h, StepArgs{}, v, r.fp.grad.data(), DType::kF32, r.copy_out(),
                          DType::kBF16, nullptr)
        .code();
  };
  ASSERT_EQ(run(r.view()), StatusCode::kOk);  // a valid view steps...
  r = copy_of(before);                        // ...and is put back
  for (int k = 0; k < 3; ++k) {
    StateView v = r.view();
    v.packed[k] = nullptr;
    EXPECT_EQ(run(v), kInvalid) << "packed[" << k << "] null";
    const Status st =
        optimizer_step(h, StepArgs{}, v, r.fp.grad.data(), DType::kF32, {}, DType::kBF16, nullptr);
    EXPECT_NE(st.to_string().find("slot " + std::to_string(k)), std::string::npos)
        << st.to_string();
  }
  for (int k = 1; k < 3; ++k) {
    StateView v = r.view();
    v.scales[k] = nullptr;
    EXPECT_EQ(run(v), kInvalid) << "scales[" << k << "] null";
    const Status st =
        optimizer_step(h, StepArgs{}, v, r.fp.grad.data(), DType::kF32, {}, DType::kBF16, nullptr);
    EXPECT_NE(st.to_string().find("scales[" + std::to_string(k) + "]"), std::string::npos)
        << st.to_string();
  }
  StateView bad = r.view();
  bad.dtype[1] = SlotDType(7);
  EXPECT_EQ(run(bad), kInvalid);
  StateView no_fp32 = r.view();
  no_fp32.dtype[1] = SlotDType::kF32;  // says fp32, but slot[1] is null
  EXPECT_EQ(run(no_fp32), kInvalid);
  StateView bound = r.view();
  bound.scales[2] = nullptr;
  EXPECT_EQ(
      stream_bound_step(h, bound, r.fp.grad.data(), DType::kF32, {}, DType::kBF16, nullptr).code(),
      kInvalid);
  EXPECT_EQ(first_difference(before, r), "") << "a rejected call wrote something";
}

// ------------------------------------------------------------- usability

// `steps` Adam(W) steps from p0 with the given gradients, state stored as
// slot_dtype_for(h, k, state, master_bf16) says; returns the (decoded) master.
std::vector<float> run_adam(const OptimizerHyper& h, const std::vector<float>& p0,
                            const std::vector<std::vector<float>>& grads, StateDType state,
                            bool master_bf16) {
  const size_t n = p0.size();
  Packed packed[3];
  std::vector<float> fp[3];
  StateView v;
  v.n = n;
  for (int k = 0; k < 3; ++k) {
    v.dtype[k] = slot_dtype_for(h, k, state, master_bf16);
    const std::vector<float> init = k == 0 ? p0 : std::vector<float>(n, 0.0f);
    if (v.dtype[k] == SlotDType::kF32) {
      fp[k] = init;
      v.slot[k] = fp[k].data();
    } else {
      packed[k] = Packed(v.dtype[k], n, 0);
      EXPECT_TRUE(encode(packed[k], init.data()).ok());
      v.packed[k] = packed[k].data();
      v.scales[k] = packed[k].scales();
    }
  }
  for (size_t t = 1; t <= grads.size(); ++t) {
    EXPECT_TRUE(optimizer_step(h, StepArgs{int64_t(t), 1.0f}, v, grads[t - 1].data(), DType::kF32,
                               {}, DType::kF32, nullptr)
                    .ok());
  }
  return v.dtype[0] == SlotDType::kF32 ? fp[0] : decode(packed[0]);
}

// Gradients ~ N(0, 1) times a per-element scale 10^-(i % decades): elements
// of one block spread over `decades` decades, as in a real layer.
std::vector<std::vector<float>> spread_grads(size_t n, int steps, int decades,
                                             std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> grads(size_t(steps), std::vector<float>(n, 0.0f));
  for (auto& g : grads) {
    for (size_t i = 0; i < n; ++i) {
      g[i] = normal(rng) * std::pow(10.0f, -float(i % size_t(decades)));
    }
  }
  return grads;
}

// ||a - b|| over the elements i % stride == cls, relative to ||b - p0|| (the
// reference's update) there; stride 1: all elements.
double update_error(const std::vector<float>& a, const std::vector<float>& b,
                    const std::vector<float>& p0, size_t stride, size_t cls) {
  double e2 = 0.0, u2 = 0.0;
  for (size_t i = cls; i < a.size(); i += stride) {
    e2 += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    u2 += (double(b[i]) - double(p0[i])) * (double(b[i]) - double(p0[i]));
  }
  return std::sqrt(e2 / u2);
}

double max_rel_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    m = std::max(m, d / std::max(1.0, std::fabs(double(b[i]))));
  }
  return m;
}

// Ten Adam(W) steps on random data from fp32 state, and the same on
// compressed moments: the master weights stay close to fp32 Adam's.
TEST(StateUsable, AdamOnCompressedMomentsTracksFp32Adam) {
  std::mt19937_64 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = 50000;
  for (OptimizerKind kind : {OptimizerKind::kAdam, OptimizerKind::kAdamW}) {
    OptimizerHyper h;
    h.kind = kind;
    h.lr = 1e-3;
    h.weight_decay = kind == OptimizerKind::kAdamW ? 0.01 : 0.0;
    std::vector<float> p0(n);
    for (auto& x : p0) {
      x = normal(rng);
    }
    const auto grads = spread_grads(n, 10, 3, rng);
    const std::vector<float> ref = run_adam(h, p0, grads, StateDType::kF32, false);
    const std::string name = optimizer_name(kind);

    const std::vector<float> bf16 = run_adam(h, p0, grads, StateDType::kBF16, false);
    EXPECT_LT(max_rel_difference(bf16, ref), 1e-4) << name << " bf16 moments";
    EXPECT_LT(update_error(bf16, ref, p0, 1, 0), 0.005) << name << " bf16 moments";

    const std::vector<float> q8 = run_adam(h, p0, grads, StateDType::kInt8Blockwise, false);
    EXPECT_LT(max_rel_difference(q8, ref), 1e-3) << name << " q8 moments";
    EXPECT_LT(update_error(q8, ref, p0, 1, 0), 0.05) << name << " q8 moments";

    // A bf16 master holds p to 2^-8 relative: with lr = 1e-3 most updates are
    // below half an ulp of |p| ~ 1 and are lost (the cost of bf16 master
    // weights, whatever the moments): the test only bounds the damage by the
    // rounding of p plus the 10 updates fp32 Adam made.
    const std::vector<float> bf16_master = run_adam(h, p0, grads, StateDType::kInt8Blockwise, true);
    EXPECT_LT(max_rel_difference(bf16_master, ref), std::ldexp(1.0, -9) + 10 * 1.5 * h.lr) << name;
    std::printf(
        "[   info   ] %s, 10 steps: ||p - p_fp32|| / ||update||: bf16 moments %.3g, q8 "
        "moments %.3g, q8 moments + bf16 master %.3g\n",
        name.c_str(), update_error(bf16, ref, p0, 1, 0), update_error(q8, ref, p0, 1, 0),
        update_error(bf16_master, ref, p0, 1, 0));
  }
}

TEST(StateUsable, ElementsFarBelowTheBlockMaxFreezeInsteadOfExploding) {
  // Gradient scales spread over 5 decades inside every block: m of the
  // elements 4 decades below the block's largest is under kQ8S's 2^-14
  // floor and stores as 0, so they stop moving (their v, under kQ8U's
  // 2^-30 ~ (2^-15)^2, is not what flushes first). The other classes track
  // fp32 Adam; no element moves further than Adam's steps could take it.
  std::mt19937_64 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = 50000;
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdamW;
  h.lr = 1e-3;
  std::vector<float> p0(n);
  for (auto& x : p0) {
    x = normal(rng);
  }
  const auto grads = spread_grads(n, 10, 5, rng);
  const std::vector<float> ref = run_adam(h, p0, grads, StateDType::kF32, false);
  const std::vector<float> q8 = run_adam(h, p0, grads, StateDType::kInt8Blockwise, false);
  for (size_t cls = 0; cls < 3; ++cls) {
    EXPECT_LT(update_error(q8, ref, p0, 5, cls), 0.05) << "10^-" << cls << " of the largest";
  }
  EXPECT_LT(update_error(q8, ref, p0, 5, 3), 0.15) << "10^-3 of the largest";
  for (size_t i = 0; i < n; ++i) {
    ASSERT_LE(std::fabs(q8[i] - p0[i]), 10 * 1.5 * h.lr) << i;
  }
}

TEST(StateUsable, SmallGradientsKeepTheirSecondMoment) {
  // Guards the format choice: with a linear 8-bit absmax code,
  // v of an element whose gradient is 16x below its block's largest rounds
  // to 0 (v ratio 1/256 < half a step of 1/127), and the next update m /
  // (sqrt(0) + eps) is ~1e5 x lr. Here every element's v must stay nonzero
  // and every update bounded by ~lr.
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdam;
  h.lr = 1e-3;
  const size_t n = 4 * kQ8Block;
  std::vector<float> g(n);
  for (size_t i = 0; i < n; ++i) {
    g[i] = (i % kQ8Block == 0) ? 1.0f : std::pow(2.0f, -float(1 + i % 12));  // down to 4096x below
  }
  std::vector<float> p(n, 0.0f);
  Packed m(SlotDType::kQ8S, n, 0), v(SlotDType::kQ8U, n, 0);
  const std::vector<float> zeros(n, 0.0f);
  ASSERT_TRUE(encode(m, zeros.data()).ok());
  ASSERT_TRUE(encode(v, zeros.data()).ok());
  StateView s;
  s.n = n;
  s.slot[0] = p.data();
  s.dtype[1] = SlotDType::kQ8S;
  s.packed[1] = m.data();
  s.scales[1] = m.scales();
  s.dtype[2] = SlotDType::kQ8U;
  s.packed[2] = v.data();
  s.scales[2] = v.scales();
  for (int t = 1; t <= 5; ++t) {
    const std::vector<float> before = p;
    ASSERT_TRUE(
        optimizer_step(h, StepArgs{t, 1.0f}, s, g.data(), DType::kF32, {}, DType::kF32, nullptr)
            .ok());
    const std::vector<float> vv = decode(v);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_GT(vv[i], 0.0f) << "v flushed to 0 at " << i << " step " << t;
      ASSERT_LT(std::fabs(p[i] - before[i]), 2.0 * h.lr) << "update exploded at " << i;
    }
  }
}

}  // namespace
}  // namespace strata::kernels
