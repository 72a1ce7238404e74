// strata/kernels/cpu_features.h — what the CPU and the OS let the kernels use.
//
// Detected once with cpuid and xgetbv: an instruction set counts only when the
// CPU reports it AND the OS saves its register state (XCR0), so an AVX-512 CPU
// under a kernel or hypervisor that does not enable ZMM state reports no
// AVX-512. The SIMD translation units are compiled with ISA flags
// (*_avx2.cpp: AVX2+FMA+F16C; *_avx512.cpp: AVX-512 F/BW/VL/DQ); the
// dispatcher calls one only when these flags say the CPU can run it.
//
// Ownership: the returned object is a process-wide constant.
// Thread-safety: cpu_features() may be called from any thread (detected once,
//   under a function-local static).
#pragma once

#include <string>

namespace strata::kernels {

struct CpuFeatures {
  // cpuid leaf 1 / 7 bits.
  bool sse2 = false;
  bool avx = false;
  bool fma = false;
  bool f16c = false;
  bool avx2 = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512_bf16 = false;
  // XCR0: the OS saves XMM+YMM state (bits 1, 2) / opmask+ZMM state (5, 6, 7).
  bool os_avx = false;
  bool os_avx512 = false;

  // Everything the *_avx2.cpp variants need (AVX2, FMA, F16C, OS YMM state).
  bool can_run_avx2() const { return avx && avx2 && fma && f16c && os_avx; }
  // Everything the *_avx512.cpp variants need (adds F/BW/VL/DQ and ZMM state).
  bool can_run_avx512() const {
    return can_run_avx2() && avx512f && avx512bw && avx512vl && avx512dq && os_avx512;
  }
};

const CpuFeatures& cpu_features();

// "sse2 avx fma f16c avx2 avx512f ... os_avx512" — for logs and `strata info`.
std::string cpu_features_string();

}  // namespace strata::kernels
