// The scalar reference: the same kernel bodies as the SIMD variants with a
// one-lane "vector", plus the bit rules of the fp32 <-> bf16/fp16 casts.
// Always compiled; no ISA flags.
#include <cmath>
#include <cstdint>
#include <cstring>

#include <strata/kernels/cast.h>

#include "kernels/kernel_impl.h"

// Contraction would fuse a * b + c into an FMA where the build allows it
// (GCC's default -ffp-contract=fast), giving bits the SIMD variants do not.
#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace strata::kernels {

namespace {

uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

}  // namespace

uint16_t float_to_bf16_bits(float value) {
  const uint32_t u = float_bits(value);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return 0x7FC0;
  }
  // Round to nearest even on the dropped 16 bits; a carry into the exponent
  // is the correct rounding (and reaches inf for the largest values).
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

uint16_t float_to_fp16_bits(float value) {
  const uint32_t u = float_bits(value);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) {
    if (a > 0x7F800000u) {
      return uint16_t(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // quiet NaN, top payload
    }
    return uint16_t(sign | 0x7C00u);
  }
  if (a >= 0x477FF000u) {  // >= 65520: rounds to inf
    return uint16_t(sign | 0x7C00u);
  }
  if (a >= 0x38800000u) {                  // >= 2^-14: fp16 normal
    uint32_t r = (a - 0x38000000u) >> 13;  // rebias 127 -> 15, drop 13 bits
    const uint32_t rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) {
      ++r;  // a carry into the exponent is the correct rounding
    }
    return uint16_t(sign | r);
  }
  const uint32_t e = a >> 23;
  if (e < 102) {  // < 2^-25: rounds to zero (2^-25 itself ties to even 0 below)
    return sign;
  }
  // fp16 denormal. With mant = 1.m as a 24-bit integer, value = mant *
  // 2^(e - 150); in units of 2^-24 (the fp16 denormal step) that is
  // mant * 2^(e - 126) = mant >> (126 - e), rounded to nearest even.
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24
  uint32_t r = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) {
    ++r;  // may become 0x400, the smallest normal: still the right encoding
  }
  return uint16_t(sign | r);
}

float bf16_bits_to_float(uint16_t bits) { return bits_float(uint32_t(bits) << 16); }

float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  uint32_t e = (bits >> 10) & 0x1Fu;
  uint32_t m = bits & 0x3FFu;
  if (e == 0x1F) {
    return bits_float(m == 0 ? (sign | 0x7F800000u) : (sign | 0x7FC00000u | (m << 13)));
  }
  if (e == 0) {
    if (m == 0) {
      return bits_float(sign);
    }
    uint32_t e32 = 113;  // 2^-14 = 2^(113 - 127) once the leading 1 is at bit 10
    while ((m & 0x400u) == 0) {
      m <<= 1;
      --e32;
    }
    return bits_float(sign | (e32 << 23) | ((m & 0x3FFu) << 13));
  }
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

namespace scalar_impl {

struct V {
  using F = float;
  using M = uint32_t;
  static constexpr size_t kLanes = 1;
  static F set1(float x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  // a / b (the reference divides; the SIMD variants' div_by must equal it).
  static F div_by(F a, F b, F /*inv_b*/) { return a / b; }
  static F sqrt(F a) { return std::sqrt(a); }
  static F fma(F a, F b, F c) { return std::fma(a, b, c); }
  static F max_nan(F a, F b) {
    if (std::isnan(a) || std::isnan(b)) {
      return a + b;  // the NaN the SIMD add returns
    }
    return a > b ? a : b;  // x86 max: the second operand on ties
  }
  template <bool kTail>
  static F load(const float* p, size_t) {
    return *p;
  }
  template <bool kTail>
  static void store(float* p, F x, size_t) {
    *p = x;
  }
  template <bool kTail>
  static F load_bf16(const uint16_t* p, size_t) {
    return bf16_bits_to_float(*p);
  }
  template <bool kTail>
  static F load_f16(const uint16_t* p, size_t) {
    return fp16_bits_to_float(*p);
  }
  template <bool kTail>
  static void store_bf16(uint16_t* p, F x, size_t) {
    *p = float_to_bf16_bits(x);
  }
  template <bool kTail>
  static void store_f16(uint16_t* p, F x, size_t) {
    *p = float_to_fp16_bits(x);
  }

  // q8: the rules at encode_slot() (optimizer.h), literally.
  static M max_init() { return 0; }
  template <bool kTail>
  static M max_abs_bits(M acc, F x, size_t) {
    const uint32_t a = float_bits(x) & 0x7FFFFFFFu;  // |x|'s order; NaN above inf
    return a > acc ? a : acc;
  }
  static uint32_t reduce_max(M acc) { return acc; }
  template <bool kSigned, bool kTail>
  static F load_q8(const uint8_t* p, F scale, size_t) {
    if constexpr (kSigned) {
      const int32_t c = int8_t(*p);
      const uint32_t mag = uint32_t(c < 0 ? -c : c);
      const float r = mag != 0 ? bits_float((mag + detail::kQ8SBias) << 20) : 0.0f;
      return (c < 0 ? -r : r) * scale;
    } else {
      const float r = *p != 0 ? bits_float((uint32_t(*p) + detail::kQ8UBias) << 20) : 0.0f;
      return r * scale;
    }
  }
  template <bool kSigned, bool kTail>
  static void store_q8(uint8_t* p, F x, F inv, size_t) {
    const float a = std::fabs(x) * inv;
    const float r = a < 1.0f ? a : 1.0f;  // no NaN here: the block is finite
    const uint32_t b = float_bits(r);
    const uint32_t t = (b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20;
    if constexpr (kSigned) {
      const int32_t mag = t < detail::kQ8SMinT ? 0 : int32_t(t - detail::kQ8SBias);
      *p = uint8_t(int8_t(x < 0.0f ? -mag : mag));
    } else {
      *p = uint8_t(t < detail::kQ8UMinT ? 0 : t - detail::kQ8UBias);
    }
  }
  template <bool kSigned>
  static void store_q8x4(uint8_t* p, F x0, F x1, F x2, F x3, F inv) {
    store_q8<kSigned, false>(p, x0, inv, 1);
    store_q8<kSigned, false>(p + 1, x1, inv, 1);
    store_q8<kSigned, false>(p + 2, x2, inv, 1);
    store_q8<kSigned, false>(p + 3, x3, inv, 1);
  }
};

#include "kernels/kernel_body.h"

float load_element(const void* x, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(x)[i];
    case DType::kBF16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
    case DType::kF16:
      return fp16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
  }
  return 0.0f;
}

// The reference order of grad_stats (see optimizer.h): 32 lanes, exact
// double products, pairwise fold.
double sum_squares(const void* x, DType dtype, size_t n) {
  double lane[32] = {};
  for (size_t i = 0; i < n; ++i) {
    const double d = load_element(x, dtype, i);
    lane[i & 31] += d * d;
  }
  for (size_t width = 16; width >= 1; width /= 2) {
    for (size_t j = 0; j < width; ++j) {
      lane[j] += lane[j + width];
    }
  }
  return lane[0];
}

}  // namespace scalar_impl

namespace detail {

const KernelTable& scalar_table() {
  static const KernelTable table = {
      Isa::kScalar,
      &scalar_impl::adam_entry<scalar_impl::V>,
      &scalar_impl::sgd_entry<scalar_impl::V>,
      &scalar_impl::adagrad_entry<scalar_impl::V>,
      &scalar_impl::bound_entry<scalar_impl::V>,
      &scalar_impl::sum_squares,
      &scalar_impl::cast_from_f32_entry<scalar_impl::V>,
      &scalar_impl::cast_to_f32_entry<scalar_impl::V>,
      &scalar_impl::q8_encode_entry<scalar_impl::V>,
      &scalar_impl::q8_decode_entry<scalar_impl::V>,
  };
  return table;
}

}  // namespace detail
}  // namespace strata::kernels
