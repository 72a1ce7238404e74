// strata/kernels/cast.h — fp32 <-> bf16/fp16 conversions of the kernels.
//
// The exact bit rules, shared by the scalar reference and every SIMD variant
// (tests check each ISA against these functions bit for bit):
//   fp32 -> bf16: round to nearest, ties to even, on the bit pattern (as
//     c10::BFloat16 does); fp32 denormals round like any other value (no
//     flush); overflow rounds to +-inf; any NaN becomes 0x7FC0 (torch's
//     canonical bf16 NaN).
//   fp32 -> fp16: IEEE round to nearest even, fp16 denormals produced
//     exactly, overflow (|x| >= 65520) to +-inf, fp32 denormals to +-0; NaN
//     keeps its sign and the top 10 payload bits and is made quiet:
//     sign | 0x7E00 | (mantissa >> 13) — the x86 F16C (vcvtps2ph) rule.
//   bf16 -> fp32: exact (bits << 16).
//   fp16 -> fp32: exact, denormals included; NaN keeps sign and payload and
//     is made quiet (the F16C vcvtph2ps rule).
//
// Ownership: pointers are borrowed for the call. Alignment: the element
// type's own (4 bytes for fp32, 2 for bf16/fp16), nothing more.
// Thread-safety: pure functions; cast_* with a pool follow ThreadPool's rule
//   (one parallel_for caller at a time).
#pragma once

#include <cstddef>
#include <cstdint>

#include <strata/kernels/optimizer.h>
#include <strata/status.h>

namespace strata::kernels {

uint16_t float_to_bf16_bits(float value);
uint16_t float_to_fp16_bits(float value);
float bf16_bits_to_float(uint16_t bits);
float fp16_bits_to_float(uint16_t bits);

// dst[i] = src[i] converted to dst_dtype (fp32: a copy), for i < n.
Status cast_from_f32(const float* src, void* dst, DType dst_dtype, size_t n, ThreadPool* pool,
                     Isa isa = Isa::kAuto);
// dst[i] = src[i] (of src_dtype) as fp32, for i < n.
Status cast_to_f32(const void* src, DType src_dtype, float* dst, size_t n, ThreadPool* pool,
                   Isa isa = Isa::kAuto);

}  // namespace strata::kernels
