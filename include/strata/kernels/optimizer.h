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

// How one state slot is stored in a record (docs/kernels.md, "Compressed
// state"). Values are what strata.optimizer_state_dtype and DeepSpeed's
// bf16.bf16_optimizer_states / bf16.bf16_master_weights_and_grads select.
//   kF32:  one float per element.
//   kBF16: one bf16 per element; stores round to nearest even (cast.h rules).
//   kQ8S / kQ8U: 8-bit blockwise. Element i belongs to block i / kQ8Block
//     (counted from the slot's element 0); each block keeps one fp32 scale,
//     the block's max |x|, and per element an 8-bit code of r = |x| / scale
//     in a small float format relative to the scale: kQ8S (signed slots: m,
//     momentum) is sign + 4-bit exponent + 3-bit mantissa (r in {0} U
//     [2^-14, 1]); kQ8U (slots that are never negative: v, max_v, Adagrad's
//     sum) stores |x| with a 5-bit exponent and 3-bit mantissa (r in {0} U
//     [2^-30, 1]). Exact bit rules at encode_slot().
enum class SlotDType : uint8_t { kF32 = 0, kBF16 = 1, kQ8S = 2, kQ8U = 3 };
inline constexpr size_t kQ8Block = 256;
const char* slot_dtype_name(SlotDType dtype);  // "fp32", "bf16", "q8s", "q8u"
// Bytes of one slot of n elements in a record: 4n, 2n, or for q8 the codes
// (n rounded up to 64) followed by the scales (4 * ceil(n / kQ8Block),
// rounded up to 64). Always a multiple of 4; the codes of a q8 slot start at
// its first byte and its scales at q8_scales_offset(n).
size_t slot_bytes(SlotDType dtype, size_t n);
size_t q8_scales_offset(size_t n);

// What the optimizer state is stored as (the config's choice); master weights
// are fp32 unless master_bf16.
enum class StateDType : uint8_t { kF32 = 0, kBF16 = 1, kInt8Blockwise = 2 };
const char* state_dtype_name(StateDType dtype);  // "fp32", "bf16", "int8_blockwise"
// The dtype of slot `slot` of this optimizer: slot 0 (master) kBF16 when
// master_bf16, else kF32; the other slots kF32, kBF16, or kQ8S/kQ8U by
// whether the slot can be negative (Adam's m: S; v and max_v: U; SGD's
// momentum: S; Adagrad's sum: U).
SlotDType slot_dtype_for(const OptimizerHyper& hyper, int slot, StateDType state, bool master_bf16);

struct StateView {
  float* slot[4] = {nullptr, nullptr, nullptr, nullptr};  // fp32 slots; slot[0] = master
  size_t n = 0;                                           // elements per slot
  // A slot whose dtype is not kF32 leaves slot[k] null and is found at
  // packed[k] (bf16 elements, or q8 codes: int8 for kQ8S, uint8 for kQ8U)
  // with, for q8, ceil(n / kQ8Block) fp32 scales at scales[k].
  SlotDType dtype[4] = {SlotDType::kF32, SlotDType::kF32, SlotDType::kF32, SlotDType::kF32};
  void* packed[4] = {nullptr, nullptr, nullptr, nullptr};
  float* scales[4] = {nullptr, nullptr, nullptr, nullptr};
};

// Packed slot <-> fp32, for state access outside a step (checkpoints,
// state_dict). decode_slot writes n floats; encode_slot recomputes the scale
// of every block from the n values given (n counts from the slot's element
// 0, so a whole slot is encoded in one call). Round trip: encode(decode(x))
// reproduces x's codes and scales bit for bit (see docs/kernels.md for the
// proof sketch), so a checkpoint holding decoded fp32 resumes exactly.
// kF32 is a copy. Bit-identical for every ISA and thread count.
//
// q8 bit rules (the scalar reference; SIMD reproduces them bit for bit):
//   scale = max over the block of |x| (fp32); a block whose scale is below
//     2^-96, or not finite, is stored as scale 0 and codes 0.
//   inv = 1.0f / scale; r = min(|x| * inv, 1.0f) (fp32 ops).
//   b = bits(r); t = (b + 0x7FFFF + ((b >> 20) & 1)) >> 20 (3 mantissa bits,
//     round to nearest even); kQ8S: mag = t - 896, 0 when t < 904, code =
//     x < 0 ? -mag : mag (int8); kQ8U: code = t - 768, 0 when t < 776
//     (uint8).
//   decode: kQ8S: mag = |code|, r = mag ? from_bits((mag + 896) << 20) : 0,
//     x = (code < 0 ? -r : r) * scale; kQ8U: r = code ? from_bits((code +
//     768) << 20) : 0, x = r * scale.
Status decode_slot(SlotDType dtype, const void* packed, const float* scales, float* out, size_t n,
                   ThreadPool* pool, Isa isa = Isa::kAuto);
Status encode_slot(SlotDType dtype, const float* in, void* packed, float* scales, size_t n,
                   ThreadPool* pool, Isa isa = Isa::kAuto);

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
//
// Compressed slots (state.dtype[k] != kF32 for some k < state_slots(hyper);
// a null packed[k], or null scales[k] for q8, is InvalidArgument naming the
// slot): the result is bit for bit that of decoding every compressed slot of
// the whole record (decode_slot), this fp32 step on the decoded arrays,
// encoding every one of them back (encode_slot over the whole slot) and,
// when the master itself is compressed, writing the copy-out ranges from the
// stored master as decode_slot returns it (with an fp32 master the copy-out
// is the step's, as for fp32 state). It is computed in one pass: the layouts
// slot_dtype_for() gives (fp32 or bf16 master; the other slots all bf16, or
// all q8 with the optimizer's signedness) decode and encode in registers, q8
// block by block through an L1 buffer; any other layout chunk by chunk
// through an fp32 scratch. Still bit-identical for every ISA and thread
// count. stream_bound_step takes compressed views the same way (decode,
// s = g * 0 + s, encode): state that encode_slot produced comes back
// unchanged, since encode(decode(x)) == x.
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
