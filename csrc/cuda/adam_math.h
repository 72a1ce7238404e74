// cuda/adam_math.h — the per-element Adam/AdamW math and the bf16/fp16 bit
// rules, written once for the GPU kernel (nvcc, device code) and for the
// host (g++), so a host-only unit test can prove the GPU's formula equal to
// the CPU scalar reference bit for bit (tests/cpp/unit/test_cuda_math.cpp).
//
// Why the results agree across CPU and GPU:
//   - every operation is one IEEE-rounded fp32 operation: on the device the
//     _rn intrinsics (__fadd_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn,
//     __fmaf_rn), which nvcc never contracts into FMAs and which ignore
//     -use_fast_math/-prec-div/-prec-sqrt; on the host plain operators and
//     std::fma/std::sqrt;
//   - an FMA is used exactly where the CPU kernel (kernel_body.h) uses one,
//     and nowhere else. No other multiply feeds an add here (the adds take a
//     quotient or an fma as operand), so host contraction
//     (-ffp-contract=fast) has nothing it could fuse either;
//   - the fp32 <-> bf16/fp16 conversions are the integer bit rules of
//     strata/kernels/cast.h (the same code as kernels_scalar.cpp), not the
//     hardware cvt instructions, whose NaN encodings differ (CUDA's cvt gives
//     0x7FFF for every NaN; strata and torch give 0x7FC0 for bf16);
//   - denormals are kept (no -ftz: nvcc's default -ftz=false, and the _rn
//     intrinsics honour denormals).
// NaN payloads are the one difference: CUDA arithmetic returns the canonical
// NaN (0x7FFFFFFF), x86 propagates an operand's payload or its default NaN
// (0xFFC00000). Finite results and infinities are bit-identical.
//
// No CUDA header is needed: nvcc provides the intrinsics in device code.
// Compiles as C++17.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <strata/cuda/adam.h>

#if defined(__CUDACC__)
#define STRATA_HD __host__ __device__ __forceinline__
#else
#define STRATA_HD inline
#endif

namespace strata::cuda::math {

// ------------------------------------------------------------ fp32 operations
STRATA_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
STRATA_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
STRATA_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
STRATA_HD float f_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
// a * b + c, rounded once.
STRATA_HD float f_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

STRATA_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}
STRATA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}
STRATA_HD bool is_nan(float x) { return (float_bits(x) & 0x7FFFFFFFu) > 0x7F800000u; }

// torch.maximum as the CPU kernel computes it: a NaN operand gives a NaN
// (a + b), otherwise the larger, and the second operand on ties (+0 vs -0).
STRATA_HD float max_nan(float a, float b) {
  if (is_nan(a) || is_nan(b)) {
    return f_add(a, b);
  }
  return a > b ? a : b;
}

// ------------------------------------------------- casts (strata/kernels/cast.h)
STRATA_HD uint16_t float_to_bf16_bits(float value) {
  const uint32_t u = float_bits(value);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return 0x7FC0;
  }
  // Round to nearest even on the dropped 16 bits; a carry into the exponent
  // is the correct rounding (and reaches inf for the largest values).
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

STRATA_HD uint16_t float_to_fp16_bits(float value) {
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
      ++r;
    }
    return uint16_t(sign | r);
  }
  const uint32_t e = a >> 23;
  if (e < 102) {  // < 2^-25 (and 2^-25 itself ties to even 0)
    return sign;
  }
  // fp16 denormal: mant * 2^(e - 150) in units of 2^-24, rounded to nearest even.
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

STRATA_HD float bf16_bits_to_float(uint16_t bits) { return bits_float(uint32_t(bits) << 16); }

STRATA_HD float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  const uint32_t e = (bits >> 10) & 0x1Fu;
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

template <ElemType T>
STRATA_HD float load_elem(const void* base, uint64_t i) {
  if constexpr (T == ElemType::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == ElemType::kBF16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return fp16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

template <ElemType T>
STRATA_HD void store_elem(void* base, uint64_t i, float x) {
  if constexpr (T == ElemType::kF32) {
    static_cast<float*>(base)[i] = x;
  } else if constexpr (T == ElemType::kBF16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(x);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_fp16_bits(x);
  }
}

// ------------------------------------------------------------ Adam/AdamW
// One element, in kernel_body.h's order (torch 1.13's single-tensor fp32
// path). g is the gradient as loaded (before grad_mul). p, m, v (and vmax
// with amsgrad) are read and replaced.
struct AdamElem {
  float p, m, v, vmax;
};

STRATA_HD void adam_element(const AdamStepConsts& c, float g_in, AdamElem& e) {
  float pv = e.p;
  float g = f_mul(g_in, c.grad_mul);
  if (c.decoupled) {
    pv = f_mul(pv, c.decay);  // param.mul_(1 - lr * weight_decay)
  }
  if (c.l2) {
    g = f_fma(pv, c.weight_decay, g);  // grad.add(param, alpha=weight_decay)
  }
  // exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
  const float mv = f_fma(g, c.one_minus_beta1, f_mul(e.m, c.beta1));
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  const float vv = f_fma(f_mul(c.one_minus_beta2, g), g, f_mul(e.v, c.beta2));
  float vden = vv;
  if (c.amsgrad) {
    vden = max_nan(e.vmax, vv);  // torch.maximum(max_exp_avg_sq, exp_avg_sq)
    e.vmax = vden;
  }
  // denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
  const float denom = f_add(f_div(f_sqrt(vden), c.bc2_sqrt), c.eps);
  // param.addcdiv_(exp_avg, denom, value=-step_size)
  pv = f_add(pv, f_div(f_mul(c.neg_step_size, mv), denom));
  e.p = pv;
  e.m = mv;
  e.v = vv;
}

}  // namespace strata::cuda::math
