// kernels/kernel_impl.h — private contract between the ISA-free driver
// (optimizer.cpp, cast.cpp) and the per-ISA translation units
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
//
// The driver computes every scalar once (in double, rounded to fp32 once),
// cuts the record into tiles and tiles into segments at copy-out range
// boundaries, and calls one KernelTable entry per segment. A segment is
// contiguous; its element i lives at slot[k] + i (in the slot's storage, see
// Segment), g + i * grad_size, out + i * out_size.
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
  float inv_bc2_sqrt;   // 1 / bc2_sqrt, correctly rounded (V::div_by's reciprocal)
  float neg_step_size;  // -(lr / (1 - beta1^step))
  float decay;          // AdamW: 1 - lr * weight_decay
  float weight_decay;   // Adam: L2 coefficient
  bool decoupled;       // AdamW with weight_decay != 0: p *= decay first
  bool l2;              // Adam with weight_decay != 0: g += wd * p
  bool amsgrad;
  // The caller's rounding mode is round-to-nearest: the SIMD variants may
  // divide by bc2_sqrt through its reciprocal (V::div_by), which is exact
  // only in that mode; otherwise they divide.
  bool nearest;
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
  float a;            // s = g * a + s; 0 keeps finite state unchanged
  int slots;          // state arrays touched (1..4)
  bool first_signed;  // kQ8 state: slot 1 is kQ8S (Adam's m, SGD's momentum), else kQ8U
};

// How the slots of a segment are stored: the master as `master` (kF32 or
// kBF16), every other slot as `rest` — the layouts slot_dtype_for() gives.
// kQ8: each slot's signedness is the optimizer's (Adam's m and SGD's
// momentum kQ8S; v, max_v and Adagrad's sum kQ8U; the bound: first_signed).
// Other layouts (a q8 master, mixed moments) reach the kernels as fp32
// scratch: the driver decodes, steps and encodes them chunk by chunk.
enum class SlotKind : uint8_t { kF32 = 0, kBF16 = 1, kQ8 = 2 };
struct StateKinds {
  SlotKind master = SlotKind::kF32;
  SlotKind rest = SlotKind::kF32;
};

// Slot k's element i: kF32 at (float*)slot[k] + i, kBF16 at (uint16_t*)
// slot[k] + i, kQ8 its code at (uint8_t*)slot[k] + i and its block's scale at
// scales[k][i / kQ8Block] — a segment with kQ8 slots starts at a block
// boundary, so a kernel re-encodes whole blocks. A slot past the optimizer's
// count (or max_v without amsgrad) is null.
struct Segment {
  void* slot[4];
  float* scales[4];
  const void* g;
  void* out;
  size_t n;
};

// The q8 bit rules' constants (optimizer.h, encode_slot): a block keeps its
// scale when kQ8MinScaleBits <= bits(max |x|) <= kQ8MaxScaleBits (2^-96 up to
// FLT_MAX; |x|'s bits compare like |x|, NaN above inf); t = the rounded top 12
// bits of r; kQ8S: code magnitude t - kQ8SBias, 0 below kQ8SMinT (2^-14);
// kQ8U: t - kQ8UBias, 0 below kQ8UMinT (2^-30).
inline constexpr uint32_t kQ8MinScaleBits = 0x0F800000u;
inline constexpr uint32_t kQ8MaxScaleBits = 0x7F7FFFFFu;
inline constexpr uint32_t kQ8SBias = 896, kQ8SMinT = 904;
inline constexpr uint32_t kQ8UBias = 768, kQ8UMinT = 776;

struct KernelTable {
  Isa isa;
  void (*adam)(const AdamConsts& c, const Segment& seg, DType grad, OutKind out, StateKinds kinds);
  void (*sgd)(const SgdConsts& c, const Segment& seg, DType grad, OutKind out, StateKinds kinds);
  void (*adagrad)(const AdagradConsts& c, const Segment& seg, DType grad, OutKind out,
                  StateKinds kinds);
  void (*bound)(const BoundConsts& c, const Segment& seg, DType grad, OutKind out,
                StateKinds kinds);
  // Sum of squares of one chunk (n <= kGradStatsChunk) in the reference lane
  // order documented at grad_stats().
  double (*sum_squares)(const void* x, DType dtype, size_t n);
  void (*cast_from_f32)(const float* src, void* dst, OutKind out, size_t n);
  void (*cast_to_f32)(const void* src, DType dtype, float* dst, size_t n);
  // The q8 codec (dtype kQ8S or kQ8U; bit rules at encode_slot() in
  // optimizer.h) over n elements starting at a block boundary: block j is
  // elements [j * kQ8Block, ...) with its scale at scales[j]; codes[i] for
  // i < n (int8 for kQ8S, uint8 for kQ8U). A partial last block takes its
  // scale from the elements present; nothing past codes[n - 1] is written.
  void (*q8_encode)(SlotDType dtype, const float* in, void* codes, float* scales, size_t n);
  void (*q8_decode)(SlotDType dtype, const void* codes, const float* scales, float* out, size_t n);
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
