// AVX2 + FMA + F16C variant (compiled with -mavx2 -mfma -mf16c; called only
// when cpu_features().can_run_avx2()). Tails: fp32 lanes use maskload /
// maskstore, 16-bit lanes go through a small zeroed stack buffer (AVX2 has no
// 16-bit masked moves); either way the tail runs the same instructions as the
// body.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_impl.h"

#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace strata::kernels {
namespace avx2_impl {

inline __m256i tail_mask(size_t cnt) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cnt)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m128i load_u16x8(const uint16_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

template <bool kTail>
inline __m128i load_u16x8(const uint16_t* p, size_t cnt) {
  if constexpr (kTail) {
    alignas(16) uint16_t buf[8] = {};
    __builtin_memcpy(buf, p, cnt * sizeof(uint16_t));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  } else {
    return load_u16x8(p);
  }
}

template <bool kTail>
inline void store_u16x8(uint16_t* p, __m128i h, size_t cnt) {
  if constexpr (kTail) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
    __builtin_memcpy(p, buf, cnt * sizeof(uint16_t));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
}

inline __m256i set1i(uint32_t x) { return _mm256_set1_epi32(int(x)); }

struct V {
  using F = __m256;
  using M = __m256i;
  static constexpr size_t kLanes = 8;
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  // a / b, divided: the AVX-512 variant's reciprocal form (div_by there) was
  // slower here on the Zen 4 VM (one thread in cache, AdamW fp32 grads:
  // 2.44 -> 2.03 G params/s, with a bf16 copy-out 1.70 -> 1.18): its blend
  // needs compares and constants the 16 ymm registers do not hold.
  static F div_by(F a, F b, F /*inv_b*/) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F max_nan(F a, F b) {
    const F r = _mm256_max_ps(a, b);
    return _mm256_blendv_ps(r, _mm256_add_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  template <bool kTail>
  static F load(const float* p, size_t cnt) {
    if constexpr (kTail) {
      return _mm256_maskload_ps(p, tail_mask(cnt));
    } else {
      return _mm256_loadu_ps(p);
    }
  }
  template <bool kTail>
  static void store(float* p, F x, size_t cnt) {
    if constexpr (kTail) {
      _mm256_maskstore_ps(p, tail_mask(cnt), x);
    } else {
      _mm256_storeu_ps(p, x);
    }
  }
  template <bool kTail>
  static F load_bf16(const uint16_t* p, size_t cnt) {
    const __m256i w = _mm256_cvtepu16_epi32(load_u16x8<kTail>(p, cnt));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  template <bool kTail>
  static F load_f16(const uint16_t* p, size_t cnt) {
    return _mm256_cvtph_ps(load_u16x8<kTail>(p, cnt));
  }
  template <bool kTail>
  static void store_bf16(uint16_t* p, F x, size_t cnt) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    r = _mm256_srli_epi32(r, 16);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    // Values are <= 0xFFFF, so the unsigned saturating pack is a plain narrow.
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    store_u16x8<kTail>(p, h, cnt);
  }
  template <bool kTail>
  static void store_f16(uint16_t* p, F x, size_t cnt) {
    store_u16x8<kTail>(p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), cnt);
  }

  // q8 (rules at encode_slot(), optimizer.h): the scalar reference's
  // integer and IEEE fp32 operations, lane by lane; 8-bit tails go through a
  // stack buffer.
  static M max_init() { return _mm256_setzero_si256(); }
  template <bool kTail>
  static M max_abs_bits(M acc, F x, size_t cnt) {
    __m256i a = _mm256_and_si256(_mm256_castps_si256(x), set1i(0x7FFFFFFFu));
    if constexpr (kTail) {
      a = _mm256_and_si256(a, tail_mask(cnt));  // dead lanes: 0, which max ignores
    }
    return _mm256_max_epu32(acc, a);
  }
  static uint32_t reduce_max(M acc) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    return uint32_t(_mm_cvtsi128_si32(m));
  }
  template <bool kSigned, bool kTail>
  static F load_q8(const uint8_t* p, F scale, size_t cnt) {
    __m128i c8;
    if constexpr (kTail) {
      alignas(16) uint8_t buf[16] = {};
      __builtin_memcpy(buf, p, cnt);
      c8 = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    } else {
      c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    }
    __m256i bits;
    if constexpr (kSigned) {
      const __m256i c = _mm256_cvtepi8_epi32(c8);
      const __m256i mag = _mm256_abs_epi32(c);
      const __m256i zero = _mm256_cmpeq_epi32(mag, _mm256_setzero_si256());
      bits = _mm256_andnot_si256(
          zero, _mm256_slli_epi32(_mm256_add_epi32(mag, set1i(detail::kQ8SBias)), 20));
      bits = _mm256_or_si256(bits, _mm256_and_si256(c, set1i(0x80000000u)));  // -r
    } else {
      const __m256i c = _mm256_cvtepu8_epi32(c8);
      const __m256i zero = _mm256_cmpeq_epi32(c, _mm256_setzero_si256());
      bits = _mm256_andnot_si256(
          zero, _mm256_slli_epi32(_mm256_add_epi32(c, set1i(detail::kQ8UBias)), 20));
    }
    return _mm256_mul_ps(_mm256_castsi256_ps(bits), scale);
  }
  template <bool kSigned, bool kTail>
  static void store_q8(uint8_t* p, F x, F inv, size_t cnt) {
    // The rules' min(r, 1) is left out: encoding, |x| <= scale, so r <= scale
    // * fl(1 / scale) <= 1 + 2^-23, whose t (1016) is that of 1.0.
    const __m256i u = _mm256_castps_si256(x);
    const __m256i a = _mm256_and_si256(u, set1i(0x7FFFFFFFu));
    const __m256i b = _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(a), inv));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 20), set1i(1));
    const __m256i t =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, set1i(0x7FFFF)), lsb), 20);
    // t <= 0xFFF: signed compares are exact.
    __m256i code;
    if constexpr (kSigned) {
      const __m256i keep = _mm256_cmpgt_epi32(t, set1i(detail::kQ8SMinT - 1));
      const __m256i mag = _mm256_and_si256(keep, _mm256_sub_epi32(t, set1i(detail::kQ8SBias)));
      // All ones where the sign bit is set (x < 0, or -0.0 with magnitude 0):
      // (mag ^ neg) - neg negates there.
      const __m256i neg = _mm256_srai_epi32(u, 31);
      code = _mm256_sub_epi32(_mm256_xor_si256(mag, neg), neg);
    } else {
      const __m256i keep = _mm256_cmpgt_epi32(t, set1i(detail::kQ8UMinT - 1));
      code = _mm256_and_si256(keep, _mm256_sub_epi32(t, set1i(detail::kQ8UBias)));
    }
    // Codes are within int8 / uint8: the saturating packs are plain narrows.
    const __m128i w =
        _mm_packs_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    const __m128i bytes = kSigned ? _mm_packs_epi16(w, w) : _mm_packus_epi16(w, w);
    if constexpr (kTail) {
      alignas(16) uint8_t buf[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(buf), bytes);
      __builtin_memcpy(p, buf, cnt);
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p), bytes);
    }
  }
  template <bool kSigned>
  static void store_q8x4(uint8_t* p, F x0, F x1, F x2, F x3, F inv) {
    store_q8<kSigned, false>(p, x0, inv, kLanes);
    store_q8<kSigned, false>(p + kLanes, x1, inv, kLanes);
    store_q8<kSigned, false>(p + 2 * kLanes, x2, inv, kLanes);
    store_q8<kSigned, false>(p + 3 * kLanes, x3, inv, kLanes);
  }
};

#include "kernels/kernel_body.h"

// Eight fp32 values starting at x + i as fp32, whatever the input dtype.
inline __m256 load8(const void* x, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kF32:
      return _mm256_loadu_ps(static_cast<const float*>(x) + i);
    case DType::kBF16:
      return V::load_bf16<false>(static_cast<const uint16_t*>(x) + i, 8);
    case DType::kF16:
      return V::load_f16<false>(static_cast<const uint16_t*>(x) + i, 8);
  }
  return _mm256_setzero_ps();
}

// 32 lanes as 8 accumulators of 4 doubles: acc[k] holds lanes 4k..4k+3.
inline void accumulate32(__m256d acc[8], const void* x, DType dtype, size_t i) {
  for (int q = 0; q < 4; ++q) {
    const __m256 f = load8(x, dtype, i + 8 * size_t(q));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
    acc[2 * q] = _mm256_fmadd_pd(lo, lo, acc[2 * q]);  // exact product: same as add(mul)
    acc[2 * q + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * q + 1]);
  }
}

double sum_squares(const void* x, DType dtype, size_t n) {
  __m256d acc[8];
  for (auto& a : acc) {
    a = _mm256_setzero_pd();
  }
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    accumulate32(acc, x, dtype, i);
  }
  if (i < n) {
    // Zero bits are +0.0 in every dtype; +0.0 leaves a lane sum unchanged.
    alignas(32) unsigned char buf[32 * 4] = {};
    const size_t elem = dtype == DType::kF32 ? 4 : 2;
    __builtin_memcpy(buf, static_cast<const unsigned char*>(x) + i * elem, (n - i) * elem);
    accumulate32(acc, buf, dtype, 0);
  }
  for (int k = 0; k < 4; ++k) {
    acc[k] = _mm256_add_pd(acc[k], acc[k + 4]);  // lane j += lane j + 16
  }
  acc[0] = _mm256_add_pd(acc[0], acc[2]);  // lane j += lane j + 8
  acc[1] = _mm256_add_pd(acc[1], acc[3]);
  acc[0] = _mm256_add_pd(acc[0], acc[1]);  // lane j += lane j + 4
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(acc[0]), _mm256_extractf128_pd(acc[0], 1));  // + 2
  h = _mm_add_sd(h, _mm_unpackhi_pd(h, h));                                                  // + 1
  return _mm_cvtsd_f64(h);
}

}  // namespace avx2_impl

namespace detail {

const KernelTable& avx2_table() {
  static const KernelTable table = {
      Isa::kAvx2,
      &avx2_impl::adam_entry<avx2_impl::V>,
      &avx2_impl::sgd_entry<avx2_impl::V>,
      &avx2_impl::adagrad_entry<avx2_impl::V>,
      &avx2_impl::bound_entry<avx2_impl::V>,
      &avx2_impl::sum_squares,
      &avx2_impl::cast_from_f32_entry<avx2_impl::V>,
      &avx2_impl::cast_to_f32_entry<avx2_impl::V>,
      &avx2_impl::q8_encode_entry<avx2_impl::V>,
      &avx2_impl::q8_decode_entry<avx2_impl::V>,
  };
  return table;
}

}  // namespace detail
}  // namespace strata::kernels
