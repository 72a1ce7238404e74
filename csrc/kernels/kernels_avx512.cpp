// AVX-512 (F/BW/VL/DQ) variant (compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mavx2 -mfma -mf16c; called only when
// cpu_features().can_run_avx512()). Tails use masked loads and stores
// (fault-suppressing, zeros past the end), so they run the body's
// instructions on the live lanes. The bf16 stores' one AVX512_BF16
// instruction is inline assembly run only where cpu_features() reports it.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include <strata/kernels/cpu_features.h>

#include "kernels/kernel_impl.h"

#pragma GCC optimize("fp-contract=off")
// GCC 12 reports the deliberate self-initialisation inside
// _mm512_undefined_ps() & co. once the optimize pragma is in effect.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace strata::kernels {
namespace avx512_impl {

inline __mmask16 tail_mask(size_t cnt) { return __mmask16((1u << cnt) - 1u); }

template <bool kTail>
inline __m256i load_u16x16(const uint16_t* p, size_t cnt) {
  if constexpr (kTail) {
    return _mm256_maskz_loadu_epi16(tail_mask(cnt), p);
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

template <bool kTail>
inline void store_u16x16(uint16_t* p, __m256i h, size_t cnt) {
  if constexpr (kTail) {
    _mm256_mask_storeu_epi16(p, tail_mask(cnt), h);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
}

inline __m512i set1i(uint32_t x) { return _mm512_set1_epi32(int(x)); }

// AVX512_BF16 (vcvtneps2bf16), detected once: the bf16 stores' fast path.
const bool has_bf16 = cpu_features().avx512_bf16;

struct V {
  using F = __m512;
  using M = __m512i;
  static constexpr size_t kLanes = 16;
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  // a / b for a broadcast b in (0, 1] with inv_b = RN(1 / b), a from a
  // square root (+0, a normal number, +inf or NaN), in round-to-nearest:
  // q0 = a * inv_b is within an ulp of a / b, the FMA gives its remainder
  // exactly, and one correction step rounds to RN(a / b) (Markstein's
  // theorem; checked against the division for every positive float a and 8
  // divisors, and on a stride for 1000 more, before it went in; the ISA
  // tests compare it with the scalar reference's division). Where q0 is NaN,
  // infinite or zero it is a / b with the division's bits, and is kept
  // (vfpclassps: QNaN 0x01, +0 0x02, -0 0x04, +inf 0x08, -inf 0x10, SNaN
  // 0x80). A multiply and two FMAs instead of a divide: with the square root
  // and the second division, the divider bounds the AdamW loop in cache.
  static F div_by(F a, F b, F inv_b) {
    const F q0 = _mm512_mul_ps(a, inv_b);
    const F r = _mm512_fnmadd_ps(q0, b, a);
    const F q = _mm512_fmadd_ps(r, inv_b, q0);
    return _mm512_mask_blend_ps(_mm512_fpclass_ps_mask(q0, 0x9F), q, q0);
  }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F max_nan(F a, F b) {
    const F r = _mm512_max_ps(a, b);
    return _mm512_mask_add_ps(r, _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), a, b);
  }
  template <bool kTail>
  static F load(const float* p, size_t cnt) {
    if constexpr (kTail) {
      return _mm512_maskz_loadu_ps(tail_mask(cnt), p);
    } else {
      return _mm512_loadu_ps(p);
    }
  }
  template <bool kTail>
  static void store(float* p, F x, size_t cnt) {
    if constexpr (kTail) {
      _mm512_mask_storeu_ps(p, tail_mask(cnt), x);
    } else {
      _mm512_storeu_ps(p, x);
    }
  }
  template <bool kTail>
  static F load_bf16(const uint16_t* p, size_t cnt) {
    const __m512i w = _mm512_cvtepu16_epi32(load_u16x16<kTail>(p, cnt));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  template <bool kTail>
  static F load_f16(const uint16_t* p, size_t cnt) {
    return _mm512_cvtph_ps(load_u16x16<kTail>(p, cnt));
  }
  template <bool kTail>
  static void store_bf16(uint16_t* p, F x, size_t cnt) {
    // With AVX512_BF16, vcvtneps2bf16 (one instruction, round to nearest
    // even) for vectors without denormals or NaNs: it flushes fp32 denormals
    // to zero and keeps a NaN's sign and payload, where the scalar reference
    // (like c10) rounds denormals and writes 0x7FC0 for every NaN. Such a
    // vector takes the integer rounding below, which matches the reference
    // on every input (Cast.SimdVariantsEqualScalarRules checks all of it).
    // Its mask lanes past a tail are zeros (masked loads): never denormal.
    if (has_bf16 && _mm512_fpclass_ps_mask(x, 0x20 | 0x01 | 0x80) == 0) {
      __m256i h;
      // Inline assembly: the translation unit is not compiled for
      // AVX512_BF16, which not every AVX-512 CPU has (has_bf16 says this one
      // does).
      __asm__("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(x));
      store_u16x16<kTail>(p, h, cnt);
      return;
    }
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    r = _mm512_srli_epi32(r, 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    store_u16x16<kTail>(p, _mm512_cvtepi32_epi16(r), cnt);
  }
  template <bool kTail>
  static void store_f16(uint16_t* p, F x, size_t cnt) {
    store_u16x16<kTail>(p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), cnt);
  }

  // q8 (rules at encode_slot(), optimizer.h): the scalar reference's
  // integer and IEEE fp32 operations, lane by lane, except where noted.
  // (The block max stays an integer max of |x|'s bits: vrangeps would save an
  // instruction but drops a NaN in its second operand.)
  static M max_init() { return _mm512_setzero_si512(); }
  template <bool kTail>
  static M max_abs_bits(M acc, F x, size_t cnt) {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(x), set1i(0x7FFFFFFFu));
    if constexpr (kTail) {
      return _mm512_mask_max_epu32(acc, tail_mask(cnt), acc, a);
    } else {
      return _mm512_max_epu32(acc, a);
    }
  }
  static uint32_t reduce_max(M acc) { return uint32_t(_mm512_reduce_max_epu32(acc)); }
  template <bool kSigned, bool kTail>
  static F load_q8(const uint8_t* p, F scale, size_t cnt) {
    __m128i c8;
    if constexpr (kTail) {
      c8 = _mm_maskz_loadu_epi8(tail_mask(cnt), p);
    } else {
      c8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    }
    __m512i bits;
    if constexpr (kSigned) {
      const __m512i c = _mm512_cvtepi8_epi32(c8);
      const __m512i mag = _mm512_abs_epi32(c);
      bits = _mm512_maskz_slli_epi32(_mm512_test_epi32_mask(mag, mag),
                                     _mm512_add_epi32(mag, set1i(detail::kQ8SBias)), 20);
      // bits | (c & sign): -r for negative codes.
      bits = _mm512_ternarylogic_epi32(bits, c, set1i(0x80000000u), 0xF8);
    } else {
      const __m512i c = _mm512_cvtepu8_epi32(c8);
      bits = _mm512_maskz_slli_epi32(_mm512_test_epi32_mask(c, c),
                                     _mm512_add_epi32(c, set1i(detail::kQ8UBias)), 20);
    }
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), scale);
  }
  // t of the rules: the rounded top 12 bits of r = |x| * inv. The rules'
  // min(r, 1) is left out: encoding, |x| <= scale, so r <= scale * fl(1 /
  // scale) <= 1 + 2^-23, whose t (1016) is that of 1.0 (1 + 2^-21 with the
  // 21-bit inv of a scale above 2^126: the same).
  static __m512i q8_t(F x, F inv) {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(x), set1i(0x7FFFFFFFu));
    const __m512i b = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(a), inv));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 20), set1i(1));
    return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, set1i(0x7FFFF)), lsb), 20);
  }
  template <bool kSigned, bool kTail>
  static void store_q8(uint8_t* p, F x, F inv, size_t cnt) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i t = q8_t(x, inv);
    __m512i code;
    if constexpr (kSigned) {
      const __m512i mag = _mm512_maskz_sub_epi32(
          _mm512_cmpge_epu32_mask(t, set1i(detail::kQ8SMinT)), t, set1i(detail::kQ8SBias));
      // Sign bit set: x < 0, or x == -0.0, whose magnitude is 0 anyway.
      const __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
      code = _mm512_mask_sub_epi32(mag, neg, _mm512_setzero_si512(), mag);
    } else {
      code = _mm512_maskz_sub_epi32(_mm512_cmpge_epu32_mask(t, set1i(detail::kQ8UMinT)), t,
                                    set1i(detail::kQ8UBias));
    }
    if constexpr (kTail) {
      _mm512_mask_cvtepi32_storeu_epi8(p, tail_mask(cnt), code);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(code));
    }
  }
  // Four vectors' codes at once (64 bytes), the bits of four store_q8: t
  // narrowed by unsigned-saturating packs (t <= 0xFFF), the bias taken off
  // with an unsigned-saturating subtract (below it: 0), the cutoff (code <
  // 8: 0) and the sign applied to bytes, the packs' lane interleave undone by
  // one dword permute.
  template <bool kSigned>
  static void store_q8x4(uint8_t* p, F x0, F x1, F x2, F x3, F inv) {
    const __m512i bias =
        _mm512_set1_epi16(kSigned ? short(detail::kQ8SBias) : short(detail::kQ8UBias));
    const __m512i m01 = _mm512_subs_epu16(_mm512_packus_epi32(q8_t(x0, inv), q8_t(x1, inv)), bias);
    const __m512i m23 = _mm512_subs_epu16(_mm512_packus_epi32(q8_t(x2, inv), q8_t(x3, inv)), bias);
    __m512i b = _mm512_packus_epi16(m01, m23);  // per 128-bit lane L: x0[L], x1[L], x2[L], x3[L]
    b = _mm512_maskz_mov_epi8(_mm512_cmpge_epu8_mask(b, _mm512_set1_epi8(8)), b);
    b = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), b);
    if constexpr (kSigned) {
      const __mmask32 lo = _mm512_kunpackw(_mm512_movepi32_mask(_mm512_castps_si512(x1)),
                                           _mm512_movepi32_mask(_mm512_castps_si512(x0)));
      const __mmask32 hi = _mm512_kunpackw(_mm512_movepi32_mask(_mm512_castps_si512(x3)),
                                           _mm512_movepi32_mask(_mm512_castps_si512(x2)));
      b = _mm512_mask_sub_epi8(b, _mm512_kunpackd(hi, lo), _mm512_setzero_si512(), b);
    }
    _mm512_storeu_si512(p, b);
  }
};

#include "kernels/kernel_body.h"

template <bool kTail>
inline __m512 load16(const void* x, DType dtype, size_t i, size_t cnt) {
  switch (dtype) {
    case DType::kF32:
      return V::load<kTail>(static_cast<const float*>(x) + i, cnt);
    case DType::kBF16:
      return V::load_bf16<kTail>(static_cast<const uint16_t*>(x) + i, cnt);
    case DType::kF16:
      return V::load_f16<kTail>(static_cast<const uint16_t*>(x) + i, cnt);
  }
  return _mm512_setzero_ps();
}

// 16 values into two accumulators of 8 doubles (lanes base..base+7, +8..+15).
inline void accumulate16(__m512d& lo_acc, __m512d& hi_acc, __m512 f) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
  const __m512d hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
  lo_acc = _mm512_fmadd_pd(lo, lo, lo_acc);  // exact product: same as add(mul)
  hi_acc = _mm512_fmadd_pd(hi, hi, hi_acc);
}

// 32 lanes as 4 accumulators of 8 doubles: acc[k] holds lanes 8k..8k+7.
double sum_squares(const void* x, DType dtype, size_t n) {
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  __m512d acc2 = _mm512_setzero_pd(), acc3 = _mm512_setzero_pd();
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    accumulate16(acc0, acc1, load16<false>(x, dtype, i, 16));
    accumulate16(acc2, acc3, load16<false>(x, dtype, i + 16, 16));
  }
  if (i < n) {
    // Masked loads read +0.0 past the end; +0.0 leaves a lane sum unchanged.
    const size_t rest = n - i;
    accumulate16(acc0, acc1, load16<true>(x, dtype, i, rest < 16 ? rest : 16));
    if (rest > 16) {
      accumulate16(acc2, acc3, load16<true>(x, dtype, i + 16, rest - 16));
    }
  }
  acc0 = _mm512_add_pd(acc0, acc2);  // lane j += lane j + 16
  acc1 = _mm512_add_pd(acc1, acc3);
  acc0 = _mm512_add_pd(acc0, acc1);  // lane j += lane j + 8
  const __m256d q =
      _mm256_add_pd(_mm512_castpd512_pd256(acc0), _mm512_extractf64x4_pd(acc0, 1));  // + 4
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));    // + 2
  h = _mm_add_sd(h, _mm_unpackhi_pd(h, h));                                          // + 1
  return _mm_cvtsd_f64(h);
}

}  // namespace avx512_impl

namespace detail {

const KernelTable& avx512_table() {
  static const KernelTable table = {
      Isa::kAvx512,
      &avx512_impl::adam_entry<avx512_impl::V>,
      &avx512_impl::sgd_entry<avx512_impl::V>,
      &avx512_impl::adagrad_entry<avx512_impl::V>,
      &avx512_impl::bound_entry<avx512_impl::V>,
      &avx512_impl::sum_squares,
      &avx512_impl::cast_from_f32_entry<avx512_impl::V>,
      &avx512_impl::cast_to_f32_entry<avx512_impl::V>,
      &avx512_impl::q8_encode_entry<avx512_impl::V>,
      &avx512_impl::q8_decode_entry<avx512_impl::V>,
  };
  return table;
}

}  // namespace detail
}  // namespace strata::kernels
