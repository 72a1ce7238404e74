// The ISA-free driver of the optimizer kernels: argument checks, the fp32
// scalars (computed in double once, like torch's Python-side math), tiling
// over the thread pool, copy-out segments, grad_stats and the bound loop.
#include <strata/kernels/cpu_features.h>
#include <strata/kernels/optimizer.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/kernel_impl.h"

namespace strata::kernels {

namespace {

using detail::KernelTable;
using detail::OutKind;
using detail::Segment;

// Elements per tile: 16K fp32 = 64 KiB per array, large enough that the
// hardware prefetchers run at full stride and the per-tile work (copy-out
// lookup, dispatch) is noise, small enough that two threads balance well on
// records of a few MB.
constexpr size_t kTile = size_t(1) << 14;

// Copy-out pieces shorter than this are written from the updated master in
// a second pass over the (cache-hot) tile instead of splitting the update:
// a kernel call per piece costs ~25 ns of setup, which dominates below a few
// dozen elements.
constexpr size_t kMinFused = 64;

bool valid_dtype(DType d) { return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16; }

bool valid_isa(Isa isa) {
  return isa == Isa::kScalar || isa == Isa::kAvx2 || isa == Isa::kAvx512 || isa == Isa::kAuto;
}

bool finite_nonneg(double x) { return std::isfinite(x) && x >= 0.0; }

// Copy-out ranges, ordered so a tile finds its ranges by binary search.
// `max_end[i]` = max over ranges[0..i] of (offset + n): monotone, so the
// first range that can reach into a tile is the first with max_end > begin.
struct RangeIndex {
  std::span<const CopyOut> ranges;
  std::vector<CopyOut> sorted;  // used when the input is not sorted/disjoint
  std::vector<size_t> max_end;  // empty when ranges are sorted and disjoint

  size_t end_at(size_t i) const {
    return max_end.empty() ? ranges[i].offset + ranges[i].n : max_end[i];
  }

  void build(std::span<const CopyOut> in) {
    bool simple = true;
    for (size_t i = 1; i < in.size() && simple; ++i) {
      simple = in[i].offset >= in[i - 1].offset + in[i - 1].n;
    }
    if (simple) {
      ranges = in;
      return;
    }
    sorted.assign(in.begin(), in.end());
    std::stable_sort(sorted.begin(), sorted.end(),
                     [](const CopyOut& a, const CopyOut& b) { return a.offset < b.offset; });
    max_end.resize(sorted.size());
    size_t running = 0;
    for (size_t i = 0; i < sorted.size(); ++i) {
      running = std::max(running, sorted[i].offset + sorted[i].n);
      max_end[i] = running;
    }
    ranges = sorted;
  }

  // First range whose end may exceed `begin`.
  size_t first_reaching(size_t begin) const {
    size_t lo = 0, hi = ranges.size();
    while (lo < hi) {
      const size_t mid = lo + (hi - lo) / 2;
      if (end_at(mid) > begin) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    return lo;
  }
};

// How a record's slots are stepped. Every path computes, bit for bit, what
// optimizer_step defines for compressed slots — decode the whole record, one
// fp32 step, encode it back — because the step is elementwise and a q8
// block's scale depends only on the block's own new values:
//   kFused:   the layouts slot_dtype_for() gives without q8 (fp32 or bf16
//             master, the other slots all fp32 or all bf16): the kernels load
//             and store the slots in place (bf16 decode / encode in
//             registers), copy-out fused as for fp32 state.
//   kBlocked: the same with q8 slots: the kernels work block by block
//             (decode, update, max, encode from an L1 buffer), so segments
//             are whole blocks: a chunk whose copy-out is one range covering
//             it is fused, any other is written from the stored master after.
//   kChunked: any other layout (a q8 master, mixed moment formats): chunks
//             of kChunk elements are decoded into a stack scratch, stepped
//             by the fp32 kernels there, and encoded back.
enum class Path : uint8_t { kFused, kBlocked, kChunked };

// kChunked: 4 KiB per slot of scratch, L1-resident (larger chunks ran at half
// the speed on Zen 5: the scratch spilled to L2 while the phases took turns
// on the memory streams). kBlockedChunk: the copy-out decision's unit.
// Both are multiples of kQ8Block dividing kTile, so every q8 block is
// decoded, updated and re-encoded whole by one thread.
constexpr size_t kChunk = size_t(1) << 10;
constexpr size_t kCompressedTile = size_t(1) << 16;
constexpr size_t kBlockedChunk = size_t(1) << 11;
// Scratch slots are kChunk + 80 floats apart (an odd number of cache lines
// past 4 KiB), so their streams do not alias in L1 sets or in the 4 KiB
// store-to-load disambiguation.
constexpr size_t kScratchStride = kChunk + 80;
static_assert(kTile % kChunk == 0 && kChunk % kQ8Block == 0);
static_assert(kCompressedTile % kBlockedChunk == 0 && kCompressedTile % kChunk == 0 &&
              kBlockedChunk % kQ8Block == 0);

// Where a tile's (or chunk's) slots live: element e of slot k is at
// at[k] + (e - origin) * elem[k]; a q8 slot's block scales at scales[k]
// (the block holding element `origin`, which is block-aligned).
struct SlotPtrs {
  unsigned char* at[4] = {nullptr, nullptr, nullptr, nullptr};
  size_t elem[4] = {4, 4, 4, 4};
  float* scales[4] = {nullptr, nullptr, nullptr, nullptr};
  size_t origin = 0;
};

// Everything a tile needs; `run(seg, out, kinds)` applies the optimizer (or
// the bound) to one segment.
template <class RunSegment>
struct TileRunner {
  const StateView& state;
  int slots;
  const unsigned char* grad;
  size_t grad_size;
  OutKind out;
  size_t out_size;
  const RangeIndex& index;
  const KernelTable& table;
  RunSegment run;
  Path path;
  detail::StateKinds kinds;  // kFused, kBlocked
  SlotPtrs base;             // the record's slots in place (origin 0)
  bool compressed;           // some slot is not fp32

  Segment segment(size_t begin, size_t end, void* dst, const SlotPtrs& at) const {
    Segment s{};
    for (int k = 0; k < slots; ++k) {
      if (at.at[k] != nullptr) {
        s.slot[k] = at.at[k] + (begin - at.origin) * at.elem[k];
        s.scales[k] =
            at.scales[k] != nullptr ? at.scales[k] + (begin - at.origin) / kQ8Block : nullptr;
      }
    }
    s.g = grad + begin * grad_size;
    s.out = dst;
    s.n = end - begin;
    return s;
  }

  void update(size_t begin, size_t end, void* dst, OutKind kind, const SlotPtrs& at,
              detail::StateKinds k) const {
    if (end > begin) {
      run(segment(begin, end, dst, at), kind, k);
    }
  }

  static void* dst_at(const CopyOut& r, size_t element, size_t out_size) {
    return static_cast<unsigned char*>(r.dst) + (element - r.offset) * out_size;
  }

  size_t tile_elems() const { return compressed ? kCompressedTile : kTile; }

  void tile(size_t begin, size_t end) const {
    switch (path) {
      case Path::kFused:
        fused_tile(begin, end, base, kinds);
        break;
      case Path::kBlocked:
        blocked_tile(begin, end);
        break;
      case Path::kChunked:
        chunked_tile(begin, end);
        break;
    }
  }

  // The copy-out of master elements [begin, end) to dst from the stored
  // master: fp32 as is, bf16 as a later decode gives it (for a bf16
  // copy-out that is its bits).
  void copy_master(const SlotPtrs& at, detail::SlotKind master, size_t begin, size_t end,
                   void* dst) const {
    const unsigned char* m = at.at[0] + (begin - at.origin) * at.elem[0];
    const size_t n = end - begin;
    if (master == detail::SlotKind::kF32) {
      table.cast_from_f32(reinterpret_cast<const float*>(m), dst, out, n);
    } else if (out == OutKind::kBF16) {
      std::memcpy(dst, m, n * 2);
    } else if (out == OutKind::kF32) {
      table.cast_to_f32(m, DType::kBF16, static_cast<float*>(dst), n);
    } else {
      alignas(64) float buf[1024];
      for (size_t i = 0; i < n; i += 1024) {
        const size_t cnt = std::min<size_t>(1024, n - i);
        table.cast_to_f32(m + i * 2, DType::kBF16, buf, cnt);
        table.cast_from_f32(buf, static_cast<unsigned char*>(dst) + i * out_size, out, cnt);
      }
    }
  }

  // Pass 1 updates [begin, end), split at the boundaries of the long
  // copy-out pieces so their converted store is fused into the update (from
  // registers). Pass 2 writes every other piece — short ones, where a split
  // would cost more than the data, and ones overlapping an earlier piece —
  // from the just-updated master, still hot in L1/L2. Both passes make the
  // same decisions, so each piece is written exactly once.
  void fused_tile(size_t begin, size_t end, const SlotPtrs& at, detail::StateKinds k) const {
    const auto& ranges = index.ranges;
    const size_t first = index.first_reaching(begin);
    size_t pos = begin;
    bool any_deferred = false;
    for (size_t i = first; i < ranges.size() && ranges[i].offset < end; ++i) {
      const CopyOut& r = ranges[i];
      const size_t rb = std::max(r.offset, begin);
      const size_t re = std::min(r.offset + r.n, end);
      if (re <= rb) {
        continue;
      }
      if (re - rb >= kMinFused && rb >= pos) {
        update(pos, rb, nullptr, OutKind::kNone, at, k);
        update(rb, re, dst_at(r, rb, out_size), out, at, k);
        pos = re;
      } else {
        any_deferred = true;
      }
    }
    update(pos, end, nullptr, OutKind::kNone, at, k);
    if (!any_deferred) {
      return;
    }
    pos = begin;
    for (size_t i = first; i < ranges.size() && ranges[i].offset < end; ++i) {
      const CopyOut& r = ranges[i];
      const size_t rb = std::max(r.offset, begin);
      const size_t re = std::min(r.offset + r.n, end);
      if (re <= rb) {
        continue;
      }
      if (re - rb >= kMinFused && rb >= pos) {
        pos = re;  // fused in pass 1
        continue;
      }
      copy_master(at, k.master, rb, re, dst_at(r, rb, out_size));
    }
  }

  // kBlocked: whole-block segments. A chunk covered by one copy-out range
  // (and touched by no other) writes it fused; otherwise its pieces are
  // written from the stored master, still in L1/L2.
  void blocked_tile(size_t begin, size_t end) const {
    const auto& ranges = index.ranges;
    for (size_t cb = begin; cb < end; cb += kBlockedChunk) {
      const size_t ce = std::min(end, cb + kBlockedChunk);
      const size_t first = index.first_reaching(cb);
      size_t pieces = 0;
      const CopyOut* only = nullptr;
      for (size_t i = first; i < ranges.size() && ranges[i].offset < ce; ++i) {
        if (std::min(ranges[i].offset + ranges[i].n, ce) > std::max(ranges[i].offset, cb)) {
          ++pieces;
          only = &ranges[i];
        }
      }
      if (pieces == 1 && only->offset <= cb && only->offset + only->n >= ce) {
        update(cb, ce, dst_at(*only, cb, out_size), out, base, kinds);
        continue;
      }
      update(cb, ce, nullptr, OutKind::kNone, base, kinds);
      for (size_t i = first; pieces > 0 && i < ranges.size() && ranges[i].offset < ce; ++i) {
        const CopyOut& r = ranges[i];
        const size_t rb = std::max(r.offset, cb);
        const size_t re = std::min(r.offset + r.n, ce);
        if (re > rb) {
          copy_master(base, kinds.master, rb, re, dst_at(r, rb, out_size));
        }
      }
    }
  }

  // Slot k's elements [begin, begin + n) as fp32 into dst (k compressed;
  // begin is a multiple of kQ8Block).
  void decode(int k, size_t begin, size_t n, float* dst) const {
    if (state.dtype[k] == SlotDType::kBF16) {
      table.cast_to_f32(static_cast<const uint16_t*>(state.packed[k]) + begin, DType::kBF16, dst,
                        n);
    } else {
      table.q8_decode(state.dtype[k], static_cast<const uint8_t*>(state.packed[k]) + begin,
                      state.scales[k] + begin / kQ8Block, dst, n);
    }
  }

  void encode(int k, size_t begin, size_t n, const float* src) const {
    if (state.dtype[k] == SlotDType::kBF16) {
      table.cast_from_f32(src, static_cast<uint16_t*>(state.packed[k]) + begin, OutKind::kBF16, n);
    } else {
      table.q8_encode(state.dtype[k], src, static_cast<uint8_t*>(state.packed[k]) + begin,
                      state.scales[k] + begin / kQ8Block, n);
    }
  }

  void chunked_tile(size_t begin, size_t end) const {
    alignas(64) float scratch[4 * kScratchStride];
    const detail::StateKinds f32{};
    const bool master_packed = state.dtype[0] != SlotDType::kF32;
    for (size_t cb = begin; cb < end; cb += kChunk) {
      const size_t ce = std::min(end, cb + kChunk);
      const size_t n = ce - cb;
      SlotPtrs at;
      at.origin = cb;
      for (int k = 0; k < slots; ++k) {
        if (state.dtype[k] == SlotDType::kF32) {
          at.at[k] = reinterpret_cast<unsigned char*>(state.slot[k] + cb);
        } else {
          float* const x = scratch + size_t(k) * kScratchStride;
          at.at[k] = reinterpret_cast<unsigned char*>(x);
          decode(k, cb, n, x);
        }
      }
      if (master_packed) {
        update(cb, ce, nullptr, OutKind::kNone, at, f32);
      } else {
        fused_tile(cb, ce, at, f32);  // copy-out fused as for fp32 state
      }
      for (int k = 0; k < slots; ++k) {
        if (state.dtype[k] != SlotDType::kF32) {
          encode(k, cb, n, reinterpret_cast<const float*>(at.at[k]));
        }
      }
      if (master_packed) {
        copy_out_rounded(cb, ce, scratch);
      }
    }
  }

  // The copy-out pieces in [begin, end) from the stored (rounded) master:
  // its encoded chunk decoded again into buf.
  void copy_out_rounded(size_t begin, size_t end, float* buf) const {
    const auto& ranges = index.ranges;
    bool decoded = false;
    for (size_t i = index.first_reaching(begin); i < ranges.size() && ranges[i].offset < end; ++i) {
      const CopyOut& r = ranges[i];
      const size_t rb = std::max(r.offset, begin);
      const size_t re = std::min(r.offset + r.n, end);
      if (re <= rb) {
        continue;
      }
      if (!decoded) {
        decode(0, begin, end - begin, buf);
        decoded = true;
      }
      table.cast_from_f32(buf + (rb - begin), dst_at(r, rb, out_size), out, re - rb);
    }
  }
};

template <class RunSegment>
void run_tiles(const TileRunner<RunSegment>& runner, size_t n, ThreadPool* pool) {
  const size_t tile = runner.tile_elems();
  const size_t tiles = (n + tile - 1) / tile;
  auto one = [&runner, n, tile](size_t t) {
    const size_t begin = t * tile;
    runner.tile(begin, std::min(n, begin + tile));
  };
  if (pool == nullptr || tiles == 1) {
    for (size_t t = 0; t < tiles; ++t) {
      one(t);
    }
    return;
  }
  pool->parallel_for(tiles, one);
}

Status check_hyper_value(bool ok, const char* field, double value, const char* rule) {
  if (ok) {
    return Status::Ok();
  }
  return invalid_argument(std::string("optimizer ") + field + " = " + std::to_string(value) + ": " +
                          rule);
}

// Shared argument checks of optimizer_step and stream_bound_step.
Status check_step_args(const OptimizerHyper& hyper, const StateView& state, const void* grad,
                       DType grad_dtype, std::span<const CopyOut> copy_out, DType param_dtype,
                       Isa isa, const KernelTable** table) {
  STRATA_RETURN_IF_ERROR(validate_hyper(hyper));
  if (!valid_dtype(grad_dtype)) {
    return invalid_argument("optimizer_step: bad grad dtype " + std::to_string(int(grad_dtype)));
  }
  if (!valid_dtype(param_dtype)) {
    return invalid_argument("optimizer_step: bad param dtype " + std::to_string(int(param_dtype)));
  }
  if (!valid_isa(isa)) {
    return invalid_argument("optimizer_step: bad isa " + std::to_string(int(isa)));
  }
  *table = detail::table_for(isa);
  if (*table == nullptr) {
    return Status(StatusCode::kUnavailable,
                  std::string("optimizer_step: this CPU cannot run the ") + isa_name(isa) +
                      " kernels (cpu: " + cpu_features_string() + ")");
  }
  const int slots = state_slots(hyper);
  if (state.n > 0) {
    for (int s = 0; s < slots; ++s) {
      const SlotDType d = state.dtype[s];
      if (d != SlotDType::kF32 && d != SlotDType::kBF16 && d != SlotDType::kQ8S &&
          d != SlotDType::kQ8U) {
        return invalid_argument("optimizer_step: slot " + std::to_string(s) + " has bad dtype " +
                                std::to_string(int(d)));
      }
      const bool q8 = d == SlotDType::kQ8S || d == SlotDType::kQ8U;
      const char* missing = d == SlotDType::kF32 ? (state.slot[s] == nullptr ? "slot" : nullptr)
                            : state.packed[s] == nullptr       ? "packed"
                            : q8 && state.scales[s] == nullptr ? "scales"
                                                               : nullptr;
      if (missing != nullptr) {
        return invalid_argument(std::string("optimizer_step: ") + optimizer_name(hyper.kind) +
                                (hyper.amsgrad && s == 3 ? " with amsgrad" : "") + " needs slot " +
                                std::to_string(s) + " (of " + std::to_string(slots) + ", " +
                                slot_dtype_name(d) + "), got " + missing + "[" + std::to_string(s) +
                                "] = nullptr");
      }
    }
    if (grad == nullptr) {
      return invalid_argument("optimizer_step: grad is nullptr with n = " +
                              std::to_string(state.n));
    }
  }
  for (size_t i = 0; i < copy_out.size(); ++i) {
    const CopyOut& r = copy_out[i];
    if (r.offset > state.n || r.n > state.n - r.offset) {
      return invalid_argument("optimizer_step: copy_out[" + std::to_string(i) + "] = [" +
                              std::to_string(r.offset) + ", +" + std::to_string(r.n) +
                              ") is outside the record of " + std::to_string(state.n) +
                              " elements");
    }
    if (r.n > 0 && r.dst == nullptr) {
      return invalid_argument("optimizer_step: copy_out[" + std::to_string(i) + "].dst is nullptr");
    }
  }
  return Status::Ok();
}

// The calling thread's SSE rounding mode (MXCSR.RC; the pool's workers run
// with the caller's) is round-to-nearest-even.
bool rounds_to_nearest() {
#if defined(__x86_64__) || defined(__i386__)
  return (_mm_getcsr() & 0x6000u) == 0;
#else
  return std::fegetround() == FE_TONEAREST;
#endif
}

detail::AdamConsts adam_consts(const OptimizerHyper& h, const StepArgs& args) {
  // torch: bias_correction1 = 1 - beta1 ** step; step_size = lr / bc1;
  // bias_correction2_sqrt = math.sqrt(1 - beta2 ** step), all Python floats.
  const double step = double(args.step);
  const double bc1 = h.bias_correction ? 1.0 - std::pow(h.beta1, step) : 1.0;
  const double bc2 = h.bias_correction ? 1.0 - std::pow(h.beta2, step) : 1.0;
  const double step_size = h.lr / bc1;
  detail::AdamConsts c{};
  c.grad_mul = args.grad_mul;
  c.beta1 = float(h.beta1);
  c.one_minus_beta1 = float(1.0 - h.beta1);
  c.beta2 = float(h.beta2);
  c.one_minus_beta2 = float(1.0 - h.beta2);
  c.eps = float(h.eps);
  c.bc2_sqrt = float(std::sqrt(bc2));
  c.inv_bc2_sqrt = 1.0f / c.bc2_sqrt;
  c.neg_step_size = float(-step_size);
  c.decay = float(1.0 - h.lr * h.weight_decay);
  c.weight_decay = float(h.weight_decay);
  c.decoupled = h.kind == OptimizerKind::kAdamW && h.weight_decay != 0.0;
  c.l2 = h.kind == OptimizerKind::kAdam && h.weight_decay != 0.0;
  c.amsgrad = h.amsgrad;
  c.nearest = rounds_to_nearest();
  return c;
}

detail::SgdConsts sgd_consts(const OptimizerHyper& h, const StepArgs& args) {
  detail::SgdConsts c{};
  c.grad_mul = args.grad_mul;
  c.weight_decay = float(h.weight_decay);
  c.momentum = float(h.momentum);
  c.one_minus_dampening = float(1.0 - h.dampening);
  c.neg_lr = float(-h.lr);
  c.has_weight_decay = h.weight_decay != 0.0;
  c.has_momentum = h.momentum != 0.0;
  c.first_step = args.step == 1;
  c.nesterov = h.nesterov;
  return c;
}

detail::AdagradConsts adagrad_consts(const OptimizerHyper& h, const StepArgs& args) {
  // torch: clr = lr / (1 + (step - 1) * lr_decay), a Python float.
  const double clr = h.lr / (1.0 + (double(args.step) - 1.0) * h.lr_decay);
  detail::AdagradConsts c{};
  c.grad_mul = args.grad_mul;
  c.weight_decay = float(h.weight_decay);
  c.eps = float(h.eps);
  c.neg_clr = float(-clr);
  c.has_weight_decay = h.weight_decay != 0.0;
  return c;
}

// The path and kinds for a record's layout (see Path).
Path choose_path(const OptimizerHyper& hyper, const StateView& state, int slots,
                 detail::StateKinds* kinds) {
  using detail::SlotKind;
  *kinds = detail::StateKinds{};
  switch (state.dtype[0]) {
    case SlotDType::kF32:
      break;
    case SlotDType::kBF16:
      kinds->master = SlotKind::kBF16;
      break;
    default:
      return Path::kChunked;
  }
  if (slots == 1) {
    return Path::kFused;
  }
  const SlotDType first = state.dtype[1];
  for (int k = 1; k < slots; ++k) {
    const SlotDType d = state.dtype[k];
    const bool same = first == SlotDType::kF32 || first == SlotDType::kBF16
                          ? d == first
                          : d == slot_dtype_for(hyper, k, StateDType::kInt8Blockwise, false);
    if (!same) {
      return Path::kChunked;
    }
  }
  switch (first) {
    case SlotDType::kF32:
      return Path::kFused;
    case SlotDType::kBF16:
      kinds->rest = SlotKind::kBF16;
      return Path::kFused;
    default:
      kinds->rest = SlotKind::kQ8;
      return Path::kBlocked;
  }
}

template <class RunSegment>
void drive(const OptimizerHyper& hyper, const StateView& state, const void* grad, DType grad_dtype,
           std::span<const CopyOut> copy_out, DType param_dtype, ThreadPool* pool,
           const KernelTable& table, RunSegment run) {
  RangeIndex index;
  index.build(copy_out);
  const int slots = state_slots(hyper);
  detail::StateKinds kinds;
  const Path path = choose_path(hyper, state, slots, &kinds);
  SlotPtrs base;
  bool compressed = false;
  for (int k = 0; k < slots; ++k) {
    compressed = compressed || state.dtype[k] != SlotDType::kF32;
    switch (state.dtype[k]) {
      case SlotDType::kF32:
        base.at[k] = reinterpret_cast<unsigned char*>(state.slot[k]);
        break;
      case SlotDType::kBF16:
        base.at[k] = static_cast<unsigned char*>(state.packed[k]);
        base.elem[k] = 2;
        break;
      case SlotDType::kQ8S:
      case SlotDType::kQ8U:
        base.at[k] = static_cast<unsigned char*>(state.packed[k]);
        base.elem[k] = 1;
        base.scales[k] = state.scales[k];
        break;
    }
  }
  const TileRunner<RunSegment> runner{state,
                                      slots,
                                      static_cast<const unsigned char*>(grad),
                                      dtype_size(grad_dtype),
                                      detail::out_kind(param_dtype),
                                      dtype_size(param_dtype),
                                      index,
                                      table,
                                      run,
                                      path,
                                      kinds,
                                      base,
                                      compressed};
  run_tiles(runner, state.n, pool);
}

}  // namespace

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
  }
  return "unknown";
}

const char* optimizer_name(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdam:
      return "Adam";
    case OptimizerKind::kAdamW:
      return "AdamW";
    case OptimizerKind::kSgd:
      return "SGD";
    case OptimizerKind::kAdagrad:
      return "Adagrad";
  }
  return "unknown";
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAuto:
      return "auto";
  }
  return "unknown";
}

Isa detect_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.can_run_avx512()) {
    return Isa::kAvx512;
  }
  if (f.can_run_avx2()) {
    return Isa::kAvx2;
  }
  return Isa::kScalar;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return cpu_features().can_run_avx2();
    case Isa::kAvx512:
      return cpu_features().can_run_avx512();
    case Isa::kAuto:
      return true;
  }
  return false;
}

namespace detail {

const KernelTable* table_for(Isa isa) {
  if (isa == Isa::kAuto) {
    isa = detect_isa();
  }
  if (!isa_supported(isa)) {
    return nullptr;
  }
  switch (isa) {
    case Isa::kScalar:
      return &scalar_table();
    case Isa::kAvx2:
      return &avx2_table();
    case Isa::kAvx512:
      return &avx512_table();
    case Isa::kAuto:
      break;
  }
  return nullptr;
}

}  // namespace detail

Status validate_hyper(const OptimizerHyper& h) {
  switch (h.kind) {
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.lr), "lr", h.lr, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.eps), "eps", h.eps, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.beta1) && h.beta1 < 1.0, "beta1",
                                               h.beta1, "must be in [0, 1)"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.beta2) && h.beta2 < 1.0, "beta2",
                                               h.beta2, "must be in [0, 1)"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.weight_decay), "weight_decay",
                                               h.weight_decay, "must be >= 0"));
      return Status::Ok();
    case OptimizerKind::kSgd:
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.lr), "lr", h.lr, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(
          check_hyper_value(finite_nonneg(h.momentum), "momentum", h.momentum, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(std::isfinite(h.dampening), "dampening", h.dampening,
                                               "must be finite"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.weight_decay), "weight_decay",
                                               h.weight_decay, "must be >= 0"));
      if (h.nesterov && (h.momentum <= 0.0 || h.dampening != 0.0)) {
        return invalid_argument("optimizer SGD: nesterov requires momentum > 0 and dampening = 0");
      }
      return Status::Ok();
    case OptimizerKind::kAdagrad:
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.lr), "lr", h.lr, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.eps), "eps", h.eps, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(
          check_hyper_value(finite_nonneg(h.lr_decay), "lr_decay", h.lr_decay, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.weight_decay), "weight_decay",
                                               h.weight_decay, "must be >= 0"));
      STRATA_RETURN_IF_ERROR(check_hyper_value(finite_nonneg(h.initial_accumulator_value),
                                               "initial_accumulator_value",
                                               h.initial_accumulator_value, "must be >= 0"));
      return Status::Ok();
  }
  return invalid_argument("optimizer: unknown kind " + std::to_string(int(h.kind)));
}

int state_slots(const OptimizerHyper& hyper) {
  switch (hyper.kind) {
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      return hyper.amsgrad ? 4 : 3;
    case OptimizerKind::kSgd:
      return hyper.momentum != 0.0 ? 2 : 1;
    case OptimizerKind::kAdagrad:
      return 2;
  }
  return 1;
}

float initial_slot_value(const OptimizerHyper& hyper, int slot) {
  if (hyper.kind == OptimizerKind::kAdagrad && slot == 1) {
    return float(hyper.initial_accumulator_value);
  }
  return 0.0f;
}

Status optimizer_step(const OptimizerHyper& hyper, const StepArgs& args, const StateView& state,
                      const void* grad, DType grad_dtype, std::span<const CopyOut> copy_out,
                      DType param_dtype, ThreadPool* pool, Isa isa) {
  const KernelTable* table = nullptr;
  STRATA_RETURN_IF_ERROR(
      check_step_args(hyper, state, grad, grad_dtype, copy_out, param_dtype, isa, &table));
  if (args.step < 1) {
    return invalid_argument("optimizer_step: step = " + std::to_string(args.step) +
                            " (1-based, must be >= 1)");
  }
  if (!std::isfinite(args.grad_mul)) {
    return invalid_argument("optimizer_step: grad_mul = " + std::to_string(args.grad_mul) +
                            " is not finite");
  }
  if (state.n == 0) {
    return Status::Ok();
  }
  switch (hyper.kind) {
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW: {
      const detail::AdamConsts c = adam_consts(hyper, args);
      drive(hyper, state, grad, grad_dtype, copy_out, param_dtype, pool, *table,
            [&c, table, grad_dtype](const Segment& s, OutKind out, detail::StateKinds k) {
              table->adam(c, s, grad_dtype, out, k);
            });
      break;
    }
    case OptimizerKind::kSgd: {
      const detail::SgdConsts c = sgd_consts(hyper, args);
      drive(hyper, state, grad, grad_dtype, copy_out, param_dtype, pool, *table,
            [&c, table, grad_dtype](const Segment& s, OutKind out, detail::StateKinds k) {
              table->sgd(c, s, grad_dtype, out, k);
            });
      break;
    }
    case OptimizerKind::kAdagrad: {
      const detail::AdagradConsts c = adagrad_consts(hyper, args);
      drive(hyper, state, grad, grad_dtype, copy_out, param_dtype, pool, *table,
            [&c, table, grad_dtype](const Segment& s, OutKind out, detail::StateKinds k) {
              table->adagrad(c, s, grad_dtype, out, k);
            });
      break;
    }
  }
  return Status::Ok();
}

Status stream_bound_step(const OptimizerHyper& hyper, const StateView& state, const void* grad,
                         DType grad_dtype, std::span<const CopyOut> copy_out, DType param_dtype,
                         ThreadPool* pool, Isa isa) {
  const KernelTable* table = nullptr;
  STRATA_RETURN_IF_ERROR(
      check_step_args(hyper, state, grad, grad_dtype, copy_out, param_dtype, isa, &table));
  if (state.n == 0) {
    return Status::Ok();
  }
  // a = 0 comes from here, at run time: the compiler cannot drop the FMA.
  const detail::BoundConsts c{0.0f, state_slots(hyper), state.dtype[1] == SlotDType::kQ8S};
  drive(hyper, state, grad, grad_dtype, copy_out, param_dtype, pool, *table,
        [&c, table, grad_dtype](const Segment& s, OutKind out, detail::StateKinds k) {
          table->bound(c, s, grad_dtype, out, k);
        });
  return Status::Ok();
}

Status grad_stats_checked(const void* grad, DType dtype, size_t n, ThreadPool* pool, Isa isa,
                          GradStats* out) {
  if (out == nullptr) {
    return invalid_argument("grad_stats: out is nullptr");
  }
  if (!valid_dtype(dtype)) {
    return invalid_argument("grad_stats: bad dtype " + std::to_string(int(dtype)));
  }
  if (n > 0 && grad == nullptr) {
    return invalid_argument("grad_stats: grad is nullptr with n = " + std::to_string(n));
  }
  if (!valid_isa(isa)) {
    return invalid_argument("grad_stats: bad isa " + std::to_string(int(isa)));
  }
  const KernelTable* table = detail::table_for(isa);
  if (table == nullptr) {
    return Status(StatusCode::kUnavailable,
                  std::string("grad_stats: this CPU cannot run the ") + isa_name(isa) + " kernels");
  }
  const size_t chunks = (n + kGradStatsChunk - 1) / kGradStatsChunk;
  const auto* bytes = static_cast<const unsigned char*>(grad);
  const size_t elem = dtype_size(dtype);
  std::vector<double> partial(chunks, 0.0);
  auto one = [&](size_t c) {
    const size_t begin = c * kGradStatsChunk;
    const size_t count = std::min(n - begin, kGradStatsChunk);
    partial[c] = table->sum_squares(bytes + begin * elem, dtype, count);
  };
  if (pool == nullptr || chunks <= 1) {
    for (size_t c = 0; c < chunks; ++c) {
      one(c);
    }
  } else {
    pool->parallel_for(chunks, one);
  }
  double sum = 0.0;
  for (double p : partial) {
    sum += p;  // chunk order, whatever thread computed each chunk
  }
  out->sum_sq = sum;
  out->nonfinite = !std::isfinite(sum);
  return Status::Ok();
}

GradStats grad_stats(const void* grad, DType dtype, size_t n, ThreadPool* pool, Isa isa) {
  GradStats stats;
  if (!isa_supported(isa)) {
    isa = Isa::kAuto;
  }
  if (!grad_stats_checked(grad, dtype, n, pool, isa, &stats).ok()) {
    stats.sum_sq = std::numeric_limits<double>::quiet_NaN();
    stats.nonfinite = true;
  }
  return stats;
}

}  // namespace strata::kernels
