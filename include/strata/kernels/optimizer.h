// strata/kernels/optimizer.h — CPU optimizer steps over one sub-group record.
//
// A sub-group's state is `slots` fp32 arrays of n elements each; slot 0 is
// the master weights. Adam/AdamW: [master, m, v] (+ max_v with amsgrad);
// SGD with momentum: [master, momentum]; Adagrad: [master, sum].
// Gradients arrive as fp32, bf16 or fp16 and are multiplied by grad_mul
// (clip coefficient / loss scale) on the fly. New parameters may be written
// to the model (copy_out) in bf16/fp16/fp32 in the same pass, rounded to
// nearest even like torch's casts.
//
// Semantics follow torch.optim (Adam, AdamW, SGD, Adagrad) in the order of
// operations torch uses, so results match within rtol=1e-5, atol=1e-6.
// Determinism: an element's result does not depend on its alignment, on the
// ISA variant, on the thread count or on vector body vs tail.
//
// Ownership: all pointers are borrowed for the call.
// Alignment: none required (4 KiB-aligned records are faster).
// Thread-safety: one call per record at a time; `pool` may be shared by
//   calls made one after another.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include <strata/kernels/thread_pool.h>
#include <strata/status.h>

namespace strata::kernels {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };
size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

enum class OptimizerKind : uint8_t { kAdam, kAdamW, kSgd, kAdagrad };
const char* optimizer_name(OptimizerKind kind);

struct OptimizerHyper {
  OptimizerKind kind = OptimizerKind::kAdamW;
  float lr = 1e-3f;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float weight_decay = 0.0f;  // Adam: L2 added to the gradient; AdamW: decoupled
  bool bias_correction = true;
  bool amsgrad = false;
  float momentum = 0.0f, dampening = 0.0f;  // SGD
  bool nesterov = false;
  float lr_decay = 0.0f, initial_accumulator_value = 0.0f;  // Adagrad
};

// Number of fp32 slots (master included) the optimizer keeps per element.
int state_slots(const OptimizerHyper& hyper);
// Initial value of slot `slot` (> 0): 0, or Adagrad's initial accumulator.
float initial_slot_value(const OptimizerHyper& hyper, int slot);

enum class Isa : uint8_t { kScalar, kAvx2, kAvx512, kAuto };
Isa detect_isa();               // best the CPU supports
const char* isa_name(Isa isa);

struct StateView {
  float* slot[4] = {nullptr, nullptr, nullptr, nullptr};  // slot[0] = master
  size_t n = 0;  // elements per slot
};

// Elements [offset, offset + n) of the master weights are written to dst in
// param_dtype after the update.
struct CopyOut {
  size_t offset = 0;
  size_t n = 0;
  void* dst = nullptr;
};

struct StepArgs {
  int64_t step = 1;      // 1-based step count of this sub-group (bias correction)
  float grad_mul = 1.0f; // gradients are multiplied by this (clip / loss scale)
};

// One optimizer step over a record. grad holds state.n elements of
// grad_dtype. pool == nullptr runs on the calling thread. isa kAuto picks
// detect_isa().
Status optimizer_step(const OptimizerHyper& hyper, const StepArgs& args, const StateView& state,
                      const void* grad, DType grad_dtype, std::span<const CopyOut> copy_out,
                      DType param_dtype, ThreadPool* pool, Isa isa = Isa::kAuto);

// Global-norm helper: sum of squares in double, summed in fixed chunks in a
// fixed order (bit-identical for any thread count), and whether any element
// is inf/NaN. No fp32 copy of half-precision input.
struct GradStats {
  double sum_sq = 0.0;
  bool nonfinite = false;
};
GradStats grad_stats(const void* grad, DType dtype, size_t n, ThreadPool* pool);

}  // namespace strata::kernels
