// AVX-512 (F/BW/VL/DQ) variant (compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mavx2 -mfma -mf16c; called only when
// cpu_features().can_run_avx512()). Tails use masked loads and stores
// (fault-suppressing, zeros past the end), so they run the body's
// instructions on the live lanes.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

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

struct V {
  using F = __m512;
  static constexpr size_t kLanes = 16;
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
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
    // Integer round-to-nearest-even rather than vcvtneps2bf16: that one
    // flushes fp32 denormals, and the scalar reference (like c10) does not.
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
  };
  return table;
}

}  // namespace detail
}  // namespace strata::kernels
