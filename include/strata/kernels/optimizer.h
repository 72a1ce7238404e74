// strata/kernels/optimizer.h — CPU optimizer steps over one sub-group record.
//
// A sub-group's state is `slots` fp32 arrays of n elements each; slot 0 is
// the master weights. Adam/AdamW: [master, m, v] (+ max_v with amsgrad);
// SGD with momentum: [master, momentum] (SGD without momentum: [master]);
// Adagrad: [master, sum].
// Gradients arrive as fp32, bf16 or fp16 and are multiplied by grad_mul
// (clip coefficient / loss scale) on the fly. New parameters may be written
// to the model (copy_out) in bf16/fp16/fp32 in the same pass, rounded to
// nearest even like torch's casts (see cast.h for the exact bit rules).
//
// Semantics follow torch.optim 1.13 (Adam, AdamW, SGD, Adagrad, single-tensor
// path) in the order of operations torch uses on fp32 tensors, with the
// scalars torch computes in Python (double) — bias corrections, step size,
// 1 - beta, 1 - lr * weight_decay — computed in double and rounded to fp32
// once, as torch does when it passes them to its fp32 kernels. Results match
// torch within rtol=1e-5, atol=1e-6 (in practice mostly bit-identical for
// fp32 gradients with grad_mul == 1). docs/kernels.md lists the formulas.
//
// Determinism: an element's result does not depend on its alignment, on the
// ISA variant (scalar, AVX2, AVX-512 give the same bits), on the thread count
// or on vector body vs tail.
//
// Ownership: all pointers are borrowed for the call.
// Alignment: the element type's own (4 bytes for fp32, 2 for bf16/fp16);
//   nothing more (4 KiB-aligned records are faster).
// Units: n, offsets and counts are elements; lr etc. are plain numbers.
// Thread-safety: one call per record at a time; `pool` may be shared by
//   calls made one after another (ThreadPool::parallel_for is single-caller).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include <strata/kernels/thread_pool.h>
#include <strata/status.h>

namespace strata::kernels {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };
size_t dtype_size(DType dtype);       // 4, 2, 2; 0 for a value outside the enum
const char* dtype_name(DType dtype);  // "fp32", "bf16", "fp16"

enum class OptimizerKind : uint8_t { kAdam, kAdamW, kSgd, kAdagrad };
const char* optimizer_name(OptimizerKind kind);

// Hyper-parameters are double, like the Python floats torch computes its
// step scalars from; the kernels round each derived scalar to fp32 once.
struct OptimizerHyper {
  OptimizerKind kind = OptimizerKind::kAdamW;
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;    // Adam/SGD/Adagrad: L2 added to the gradient; AdamW: decoupled
  bool bias_correction = true;  // false: DeepSpeed's bias_correction=False (bc1 = bc2 = 1)
  bool amsgrad = false;
  double momentum = 0.0, dampening = 0.0;  // SGD
  bool nesterov = false;
  double lr_decay = 0.0, initial_accumulator_value = 0.0;  // Adagrad
};

// Checks the hyper-parameters as torch.optim's constructors do (lr >= 0,
// eps >= 0, 0 <= beta < 1, weight_decay >= 0, nesterov needs momentum > 0 and
// dampening == 0, ...). InvalidArgument names the field.
Status validate_hyper(const OptimizerHyper& hyper);

// Number of fp32 slots (master included) the optimizer keeps per element.
int state_slots(const OptimizerHyper& hyper);
// Initial value of slot `slot` (> 0): 0, or Adagrad's initial accumulator.
float initial_slot_value(const OptimizerHyper& hyper, int slot);

enum class Isa : uint8_t { kScalar, kAvx2, kAvx512, kAuto };
Isa detect_isa();               // best the CPU (and OS) supports
bool isa_supported(Isa isa);    // kAuto and kScalar: always true
const char* isa_name(Isa isa);  // "scalar", "avx2", "avx512", "auto"

struct StateView {
  float* slot[4] = {nullptr, nullptr, nullptr, nullptr};  // slot[0] = master
  size_t n = 0;                                           // elements per slot
};

// Elements [offset, offset + n) of the master weights are written to dst in
// param_dtype after the update. Ranges may come in any order and may overlap
// (each gets its copy); a sorted, non-overlapping list is cheapest (no setup
// allocation, O(log ranges) per tile).
struct CopyOut {
  size_t offset = 0;
  size_t n = 0;
  void* dst = nullptr;
};

struct StepArgs {
  int64_t step = 1;       // 1-based step count of this sub-group (bias correction;
                          // SGD: step 1 initialises the momentum buffer with the gradient)
  float grad_mul = 1.0f;  // gradients are multiplied by this (clip / loss scale); finite
};

// One optimizer step over a record. grad holds state.n elements of
// grad_dtype. pool == nullptr runs on the calling thread. isa kAuto picks
// detect_isa(); an ISA the CPU cannot run is Unavailable. state.n == 0 is a
// no-op. Bad arguments (null pointers, amsgrad without slot 3, a copy-out
// range outside the record, step < 1, bad hyper-parameters) are
// InvalidArgument and touch nothing.
Status optimizer_step(const OptimizerHyper& hyper, const StepArgs& args, const StateView& state,
                      const void* grad, DType grad_dtype, std::span<const CopyOut> copy_out,
                      DType param_dtype, ThreadPool* pool, Isa isa = Isa::kAuto);

// The kernel path's own streaming loop, a diagnostic beside optimizer_step:
// the same arrays (the slots state_slots(hyper) names, grad, the
// copy-out destinations), the same bytes read and written per element, the
// same tiling, threads and store policy, but one multiply-add per element and
// array (s = g * 0 + s, every element loaded, computed and stored; copy-out
// of the master) instead of the optimizer. Finite state values are left
// unchanged, so a bench may alternate it with optimizer_step on the same
// buffers. Not a bound: it shares the kernel path's tiling, pool and
// buffers, so whatever slows those slows it too (strata-bench-adam measures
// an independent loop for that).
Status stream_bound_step(const OptimizerHyper& hyper, const StateView& state, const void* grad,
                         DType grad_dtype, std::span<const CopyOut> copy_out, DType param_dtype,
                         ThreadPool* pool, Isa isa = Isa::kAuto);

// Global-norm helper: sum of squares in double, summed in fixed chunks in a
// fixed order (bit-identical for any thread count and ISA), and whether any
// element is inf/NaN. No fp32 copy of half-precision input.
//
// Reference order (what every ISA reproduces bit for bit): the input is cut
// into chunks of kGradStatsChunk elements from its start; within a chunk,
// element i goes to lane i % 32 (lane += double(x) * double(x), exact
// products); lanes are folded pairwise (lane[j] += lane[j + 16], then + 8,
// + 4, + 2, + 1); the chunk sums are added in chunk order starting from 0.0.
// nonfinite == !isfinite(sum_sq): squares of finite fp32 values cannot
// overflow a double sum, so the sum is finite exactly when every input is.
struct GradStats {
  double sum_sq = 0.0;
  bool nonfinite = false;
};
inline constexpr size_t kGradStatsChunk = size_t(1) << 16;

// Null grad with n > 0 reports {NaN, nonfinite = true}; an ISA the CPU cannot
// run falls back to detect_isa().
GradStats grad_stats(const void* grad, DType dtype, size_t n, ThreadPool* pool,
                     Isa isa = Isa::kAuto);
// Checked form: InvalidArgument / Unavailable instead of the fallbacks above.
Status grad_stats_checked(const void* grad, DType dtype, size_t n, ThreadPool* pool, Isa isa,
                          GradStats* out);

}  // namespace strata::kernels
