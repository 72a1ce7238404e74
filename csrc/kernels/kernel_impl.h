// kernels/kernel_impl.h — private contract between the ISA-free driver
// (optimizer.cpp, cast.cpp) and the per-ISA translation units
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
//
// The driver computes every scalar once (in double, rounded to fp32 once),
// cuts the record into tiles and tiles into segments at copy-out range
// boundaries, and calls one KernelTable entry per segment. A segment is
// contiguous; its element i lives at p[i], s1[i], ..., g + i * grad_size,
// out + i * out_size.
//
// Only plain structs and declarations here: the ISA translation units must
// not instantiate shared inline code (a COMDAT copy compiled with AVX-512
// flags could be picked by the linker for the scalar path).
#pragma once

#include <cstddef>
#include <cstdint>

#include <strata/kernels/optimizer.h>

namespace strata::kernels::detail {

// Where the new master weights go; kNone: nowhere.
enum class OutKind : uint8_t { kNone = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

struct AdamConsts {
  float grad_mul;
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float bc2_sqrt;       // sqrt(1 - beta2^step), or 1
  float neg_step_size;  // -(lr / (1 - beta1^step))
  float decay;          // AdamW: 1 - lr * weight_decay
  float weight_decay;   // Adam: L2 coefficient
  bool decoupled;       // AdamW with weight_decay != 0: p *= decay first
  bool l2;              // Adam with weight_decay != 0: g += wd * p
  bool amsgrad;
};

struct SgdConsts {
  float grad_mul;
  float weight_decay;
  float momentum;
  float one_minus_dampening;
  float neg_lr;
  bool has_weight_decay;
  bool has_momentum;
  bool first_step;  // momentum buffer := d_p (torch's clone on the first step)
  bool nesterov;
};

struct AdagradConsts {
  float grad_mul;
  float weight_decay;
  float eps;
  float neg_clr;  // -(lr / (1 + (step - 1) * lr_decay))
  bool has_weight_decay;
};

struct BoundConsts {
  float a;    // s = g * a + s; 0 keeps finite state unchanged
  int slots;  // state arrays touched (1..4)
};

struct Segment {
  float* p;
  float* s1;
  float* s2;
  float* s3;
  const void* g;
  void* out;
  size_t n;
};

struct KernelTable {
  Isa isa;
  void (*adam)(const AdamConsts& c, const Segment& seg, DType grad, OutKind out);
  void (*sgd)(const SgdConsts& c, const Segment& seg, DType grad, OutKind out);
  void (*adagrad)(const AdagradConsts& c, const Segment& seg, DType grad, OutKind out);
  void (*bound)(const BoundConsts& c, const Segment& seg, DType grad, OutKind out);
  // Sum of squares of one chunk (n <= kGradStatsChunk) in the reference lane
  // order documented at grad_stats().
  double (*sum_squares)(const void* x, DType dtype, size_t n);
  void (*cast_from_f32)(const float* src, void* dst, OutKind out, size_t n);
  void (*cast_to_f32)(const void* src, DType dtype, float* dst, size_t n);
};

const KernelTable& scalar_table();
const KernelTable& avx2_table();
const KernelTable& avx512_table();

// The table for `isa` (kAuto: detect_isa()), or nullptr when the CPU cannot
// run it.
const KernelTable* table_for(Isa isa);

inline OutKind out_kind(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return OutKind::kF32;
    case DType::kBF16:
      return OutKind::kBF16;
    case DType::kF16:
      return OutKind::kF16;
  }
  return OutKind::kNone;
}

}  // namespace strata::kernels::detail
