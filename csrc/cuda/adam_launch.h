// cuda/adam_launch.h — how one Adam step is cut into thread blocks, and the
// per-block kernel bodies, shared by the GPU kernels (adam.cu) and a host
// emulation in the unit tests (which runs every block and thread on the CPU
// and compares with kernels::optimizer_step, copy-out included).
//
// A step is at most two launches:
//   update pass  segments that partition [0, n); a segment that is a
//                copy-out range carries its destination, so the converted
//                parameter is stored from registers in the same pass;
//   copy pass    copy-out ranges that overlap an earlier range (rare), copied
//                from the updated master after the update pass (stream order).
// Every segment gets ceil(len / kTile) blocks; block b finds its segment by
// binary search over first_block (uniform per block, L1-resident), thread t
// handles elements begin + tile * kTile + t + k * kThreads (k < kUnroll):
// coalesced, and the kUnroll loads of a thread are issued before any math.
// No vector loads: ranges start at any element, and scalar coalesced loads
// with this much memory-level parallelism stream at HBM speed.
//
// Compiles as C++17 (nvcc) and C++20 (tests); no CUDA header.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <strata/cuda/adam.h>

#include "cuda/adam_math.h"

#if defined(__CUDA_ARCH__)
#define STRATA_UNROLL _Pragma("unroll")
#else
#define STRATA_UNROLL
#endif

namespace strata::cuda::detail {

inline constexpr uint32_t kThreads = 256;
inline constexpr uint32_t kUnroll = 4;
inline constexpr uint64_t kTile = uint64_t(kThreads) * kUnroll;
// Grid x is limited to 2^31 - 1 blocks.
inline constexpr uint64_t kMaxBlocks = (uint64_t(1) << 31) - 1;

struct Seg {
  uint64_t begin;        // first element of the record
  uint64_t len;          // elements
  uint64_t first_block;  // blocks of the segments before it in its pass
  void* dst;             // where element `begin` goes (param type); nullptr: no copy-out
};

struct LaunchPlan {
  std::vector<Seg> update;  // partition of [0, n), in order
  uint64_t update_blocks = 0;
  std::vector<Seg> copy;  // overlapping copy-out ranges
  uint64_t copy_blocks = 0;
  size_t segments() const { return update.size() + copy.size(); }
};

struct RecordPtrs {
  float* p = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  float* vmax = nullptr;  // amsgrad only
  const void* g = nullptr;
};

inline uint64_t blocks_for(uint64_t len) { return (len + kTile - 1) / kTile; }

// Checks a step's arguments as kernels::optimizer_step checks its own:
// InvalidArgument naming the field, nothing touched. `what` prefixes the
// message ("adam_step_device", "GpuUpdater::submit").
inline Status check_step(const char* what, const AdamStepConsts& c, float* const slot[4], size_t n,
                         const void* grad, ElemType grad_type, const CopyOutRange* copy_out,
                         size_t copy_out_count, ElemType param_type) {
  const std::string w(what);
  if (!valid_elem_type(grad_type)) {
    return invalid_argument(w + ": bad grad type " + std::to_string(int(grad_type)));
  }
  if (!valid_elem_type(param_type)) {
    return invalid_argument(w + ": bad param type " + std::to_string(int(param_type)));
  }
  if (!std::isfinite(c.grad_mul)) {
    return invalid_argument(w + ": grad_mul is not finite");
  }
  const int slots = c.amsgrad ? 4 : 3;
  if (n > 0) {
    for (int s = 0; s < slots; ++s) {
      if (slot[s] == nullptr) {
        return invalid_argument(w + ": Adam" + (c.amsgrad && s == 3 ? " with amsgrad" : "") +
                                " needs slot " + std::to_string(s) + " (of " +
                                std::to_string(slots) + "), got nullptr");
      }
    }
    if (grad == nullptr) {
      return invalid_argument(w + ": grad is nullptr with n = " + std::to_string(n));
    }
  }
  if (copy_out_count > 0 && copy_out == nullptr) {
    return invalid_argument(w + ": copy_out is nullptr with " + std::to_string(copy_out_count) +
                            " ranges");
  }
  for (size_t i = 0; i < copy_out_count; ++i) {
    const CopyOutRange& r = copy_out[i];
    if (r.offset > n || r.n > n - r.offset) {
      return invalid_argument(w + ": copy_out[" + std::to_string(i) + "] = [" +
                              std::to_string(r.offset) + ", +" + std::to_string(r.n) +
                              ") is outside the record of " + std::to_string(n) + " elements");
    }
    if (r.n > 0 && r.dst == nullptr) {
      return invalid_argument(w + ": copy_out[" + std::to_string(i) + "].dst is nullptr");
    }
  }
  return Status::Ok();
}

// The two passes for a record of n elements. Ranges are taken in offset
// order (stable); a range that starts at or after the end of the last fused
// range is fused, any other goes to the copy pass. Empty ranges are skipped.
inline Status plan_launch(size_t n, const CopyOutRange* ranges, size_t count, LaunchPlan* plan) {
  plan->update.clear();
  plan->copy.clear();
  plan->update_blocks = 0;
  plan->copy_blocks = 0;
  std::vector<const CopyOutRange*> order;
  order.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    if (ranges[i].n > 0) {
      order.push_back(&ranges[i]);
    }
  }
  std::stable_sort(order.begin(), order.end(), [](const CopyOutRange* a, const CopyOutRange* b) {
    return a->offset < b->offset;
  });
  auto add = [](std::vector<Seg>& pass, uint64_t& blocks, uint64_t begin, uint64_t len, void* dst) {
    pass.push_back(Seg{begin, len, blocks, dst});
    blocks += blocks_for(len);
  };
  uint64_t pos = 0;
  for (const CopyOutRange* r : order) {
    if (r->offset >= pos) {
      if (r->offset > pos) {
        add(plan->update, plan->update_blocks, pos, r->offset - pos, nullptr);
      }
      add(plan->update, plan->update_blocks, r->offset, r->n, r->dst);
      pos = r->offset + r->n;
    } else {
      add(plan->copy, plan->copy_blocks, r->offset, r->n, r->dst);
    }
  }
  if (pos < n) {
    add(plan->update, plan->update_blocks, pos, n - pos, nullptr);
  }
  if (plan->update_blocks > kMaxBlocks || plan->copy_blocks > kMaxBlocks) {
    return invalid_argument("GPU Adam: " + std::to_string(n) +
                            " elements need more than 2^31-1 "
                            "thread blocks; split the record");
  }
  return Status::Ok();
}

// Index of the segment holding `block`: the last one whose first_block <= block.
STRATA_HD uint32_t find_segment(const Seg* segs, uint32_t count, uint64_t block) {
  uint32_t lo = 0;
  uint32_t hi = count;
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (segs[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <ElemType GT, ElemType PT>
STRATA_HD void adam_block(const AdamStepConsts& c, const RecordPtrs& r, const Seg* segs,
                          uint32_t nsegs, uint64_t block, uint32_t tid) {
  const Seg s = segs[find_segment(segs, nsegs, block)];
  const uint64_t base = s.begin + (block - s.first_block) * kTile + tid;
  const uint64_t end = s.begin + s.len;
  math::AdamElem e[kUnroll];
  float g[kUnroll];
  STRATA_UNROLL
  for (uint32_t k = 0; k < kUnroll; ++k) {
    const uint64_t i = base + uint64_t(k) * kThreads;
    if (i < end) {
      e[k].p = r.p[i];
      e[k].m = r.m[i];
      e[k].v = r.v[i];
      e[k].vmax = c.amsgrad ? r.vmax[i] : 0.0f;
      g[k] = math::load_elem<GT>(r.g, i);
    }
  }
  STRATA_UNROLL
  for (uint32_t k = 0; k < kUnroll; ++k) {
    const uint64_t i = base + uint64_t(k) * kThreads;
    if (i < end) {
      math::adam_element(c, g[k], e[k]);
      r.p[i] = e[k].p;
      r.m[i] = e[k].m;
      r.v[i] = e[k].v;
      if (c.amsgrad) {
        r.vmax[i] = e[k].vmax;
      }
      if (s.dst != nullptr) {
        math::store_elem<PT>(s.dst, i - s.begin, e[k].p);
      }
    }
  }
}

template <ElemType PT>
STRATA_HD void copy_block(const float* master, const Seg* segs, uint32_t nsegs, uint64_t block,
                          uint32_t tid) {
  const Seg s = segs[find_segment(segs, nsegs, block)];
  const uint64_t base = s.begin + (block - s.first_block) * kTile + tid;
  const uint64_t end = s.begin + s.len;
  STRATA_UNROLL
  for (uint32_t k = 0; k < kUnroll; ++k) {
    const uint64_t i = base + uint64_t(k) * kThreads;
    if (i < end) {
      math::store_elem<PT>(s.dst, i - s.begin, master[i]);
    }
  }
}

// Enqueues the passes of `plan` whose segment tables are already in device
// memory (d_update: plan.update.size() entries, d_copy: plan.copy.size()) on
// `stream` (cudaStream_t). Defined in adam.cu; callers have checked
// cuda_available() and the arguments.
Status launch_adam(const AdamStepConsts& c, const RecordPtrs& r, ElemType grad_type,
                   ElemType param_type, const LaunchPlan& plan, const Seg* d_update,
                   const Seg* d_copy, void* stream);

}  // namespace strata::cuda::detail
