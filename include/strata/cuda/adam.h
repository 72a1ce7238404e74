// strata/cuda/adam.h — Adam/AdamW (+ amsgrad) on the GPU, with the CPU
// kernel's semantics.
//
// The GPU kernel computes exactly what kernels::optimizer_step computes for
// Adam and AdamW: the same fp32 scalars (derived in double from the hyper-
// parameters and rounded to fp32 once, by the same formulas), the same
// per-element sequence of IEEE-rounded operations (fma where the CPU kernel
// fuses, single-rounded add/mul/div/sqrt elsewhere), the same bf16/fp16
// round-to-nearest-even bit rules for gradients in and parameters out. For
// finite results the bits equal the CPU scalar reference; NaN results are NaN
// on both, with payloads that may differ (CUDA arithmetic returns the
// canonical NaN). docs/gpu.md says how this is kept true.
//
// Two ways in:
//   adam_step_device()  the state, gradient and copy-out destinations are
//                       already in device memory (a GPU-resident tier, tests);
//   GpuUpdater          (gpu_updater.h) the state is in pinned host memory and
//                       travels H2D → kernel → D2H on the updater's streams.
//
// This header compiles as C++17 (nvcc builds csrc/cuda as C++17), except the
// section at the end that converts kernels::OptimizerHyper, which is only
// seen by C++20 translation units.
//
// Ownership: pointers are borrowed; device pointers must stay valid until
//   the work is complete (synchronize, or the stream has passed it).
// Alignment: the element type's own (4 bytes fp32, 2 bytes bf16/fp16).
// Units: elements for n, offsets and counts.
// Thread-safety: adam_step_device may be called from any thread; calls on
//   one stream run in stream order.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <strata/cuda/device.h>
#include <strata/status.h>

namespace strata::cuda {

// Element types; the values equal kernels::DType's.
enum class ElemType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline size_t elem_size(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }
inline bool valid_elem_type(ElemType t) {
  return t == ElemType::kF32 || t == ElemType::kBF16 || t == ElemType::kF16;
}
inline const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::kF32:
      return "fp32";
    case ElemType::kBF16:
      return "bf16";
    case ElemType::kF16:
      return "fp16";
  }
  return "unknown";
}

// The fp32 constants of one Adam/AdamW step (the fields and formulas of the
// CPU driver's, csrc/kernels/optimizer.cpp).
struct AdamStepConsts {
  float grad_mul = 1.0f;
  float beta1 = 0.9f, one_minus_beta1 = 0.1f;
  float beta2 = 0.999f, one_minus_beta2 = 0.001f;
  float eps = 1e-8f;
  float bc2_sqrt = 1.0f;       // sqrt(1 - beta2^step), or 1
  float neg_step_size = 0.0f;  // -(lr / (1 - beta1^step))
  float decay = 1.0f;          // AdamW: 1 - lr * weight_decay
  float weight_decay = 0.0f;   // Adam: L2 coefficient
  bool decoupled = false;      // AdamW with weight_decay != 0: p *= decay first
  bool l2 = false;             // Adam with weight_decay != 0: g += wd * p
  bool amsgrad = false;        // slot 3 holds max_v
};

// torch's Python-side scalar math in double, each result rounded to fp32
// once. No validation here (see adam_step_consts() below, or validate the
// hyper-parameters yourself): step >= 1, 0 <= beta < 1.
inline AdamStepConsts make_adam_step_consts(bool adamw, double lr, double beta1, double beta2,
                                            double eps, double weight_decay, bool bias_correction,
                                            bool amsgrad, int64_t step, float grad_mul) {
  const double s = double(step);
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, s) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, s) : 1.0;
  const double step_size = lr / bc1;
  AdamStepConsts c;
  c.grad_mul = grad_mul;
  c.beta1 = float(beta1);
  c.one_minus_beta1 = float(1.0 - beta1);
  c.beta2 = float(beta2);
  c.one_minus_beta2 = float(1.0 - beta2);
  c.eps = float(eps);
  c.bc2_sqrt = float(std::sqrt(bc2));
  c.neg_step_size = float(-step_size);
  c.decay = float(1.0 - lr * weight_decay);
  c.weight_decay = float(weight_decay);
  c.decoupled = adamw && weight_decay != 0.0;
  c.l2 = !adamw && weight_decay != 0.0;
  c.amsgrad = amsgrad;
  return c;
}

// Elements [offset, offset + n) of the new master weights are written to
// dst (device memory) in the job's param type. Same meaning as
// kernels::CopyOut: any order, overlaps allowed (each range gets its copy).
struct CopyOutRange {
  size_t offset = 0;
  size_t n = 0;
  void* dst = nullptr;
};

// One step over state that is already on the device.
struct DeviceAdamArgs {
  AdamStepConsts consts;
  float* slot[4] = {nullptr, nullptr, nullptr, nullptr};  // master, m, v, max_v (amsgrad)
  size_t n = 0;                                           // elements per slot
  const void* grad = nullptr;                             // n elements of grad_type
  ElemType grad_type = ElemType::kF32;
  const CopyOutRange* copy_out = nullptr;
  size_t copy_out_count = 0;
  ElemType param_type = ElemType::kF32;
};

#if STRATA_CUDA_ENABLED

// Enqueues the step on `stream` (a cudaStream_t; nullptr: the legacy
// default stream) on the current device; with synchronize, waits for it.
// Unavailable without a device; InvalidArgument for bad arguments (nothing
// is enqueued); Internal with CUDA's error string when CUDA fails.
Status adam_step_device(const DeviceAdamArgs& args, void* stream, bool synchronize);

#else

inline Status adam_step_device(const DeviceAdamArgs&, void*, bool) {
  return cuda_not_compiled("adam_step_device");
}

#endif

}  // namespace strata::cuda

// ---------------------------------------------------------------------------
// C++20 side: from the CPU kernels' types. (optimizer.h needs std::span.)
#if __cplusplus >= 202002L
#include <string>

#include <strata/kernels/optimizer.h>

namespace strata::cuda {

static_assert(int(ElemType::kF32) == int(kernels::DType::kF32) &&
              int(ElemType::kBF16) == int(kernels::DType::kBF16) &&
              int(ElemType::kF16) == int(kernels::DType::kF16));

inline ElemType elem_type(kernels::DType d) { return ElemType(uint8_t(d)); }

// The constants kernels::optimizer_step would use for this step, after the
// same checks (validate_hyper, step >= 1, finite grad_mul). SGD and Adagrad
// are Unavailable: the GPU path implements Adam and AdamW only.
inline Result<AdamStepConsts> adam_step_consts(const kernels::OptimizerHyper& h,
                                               const kernels::StepArgs& args) {
  if (h.kind != kernels::OptimizerKind::kAdam && h.kind != kernels::OptimizerKind::kAdamW) {
    return Status(StatusCode::kUnavailable, std::string("GPU update: ") +
                                                kernels::optimizer_name(h.kind) +
                                                " has no GPU kernel (Adam and AdamW only)");
  }
  STRATA_RETURN_IF_ERROR(kernels::validate_hyper(h));
  if (args.step < 1) {
    return invalid_argument("GPU update: step = " + std::to_string(args.step) +
                            " (1-based, must be >= 1)");
  }
  if (!std::isfinite(args.grad_mul)) {
    return invalid_argument("GPU update: grad_mul is not finite");
  }
  return make_adam_step_consts(h.kind == kernels::OptimizerKind::kAdamW, h.lr, h.beta1, h.beta2,
                               h.eps, h.weight_decay, h.bias_correction, h.amsgrad, args.step,
                               args.grad_mul);
}

}  // namespace strata::cuda
#endif
