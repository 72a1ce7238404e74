// strata/engine/plan.h — sub-groups and where their state lives.
//
// build_plan() is pure: from the config, the parameters and the optimizer's
// slot count it cuts sub-groups and assigns each to a tier, following the
// offload_optimizer.device rules of docs/config.md. It needs no model and no
// hardware, so `python -m strata plan --params 7e9` uses it directly.
//
// Units: elements for numel, bytes for everything called *_bytes.
// Invariants: sum(subgroup.numel) == trainable elements;
//   slot_stride % 16 == 0 (64-byte aligned slots), slot_stride % 1024 == 272
//   and (slot_stride / 1024) odd (slots skewed against cache-set and L1
//   way-predictor aliasing, see plan.cpp). With every slot fp32 (the
//   default), slot k starts at byte k * slot_stride * 4 and record_bytes ==
//   slots * slot_stride * 4 rounded up to 4096 (direct I/O). A compressed
//   slot (bf16 or 8-bit, strata.optimizer_state_dtype and the bf16.* keys)
//   takes kernels::slot_bytes() rounded up to 4 KiB plus the same 1088-byte
//   skew; slot_offset gives every slot's first byte (64-byte aligned).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <strata/config.h>
#include <strata/kernels/optimizer.h>
#include <strata/status.h>
#include <strata/tiers/tier.h>

namespace strata::engine {

// A piece of one parameter inside a sub-group.
struct Segment {
  size_t param = 0;         // index into the engine's params
  size_t param_offset = 0;  // elements into the parameter
  size_t offset = 0;        // elements into the sub-group
  size_t numel = 0;
};

struct SubGroup {
  uint32_t id = 0;
  int group = 0;
  kernels::DType dtype = kernels::DType::kF32;       // the model parameters'
  kernels::DType grad_dtype = kernels::DType::kF32;  // the gradient arena's (see grad_dtype_for)
  size_t numel = 0;
  size_t slot_stride = 0;  // floats per slot (an odd multiple of 1024 >= numel, plus 272)
  size_t record_bytes = 0;
  // How each slot is stored and where it starts (bytes into the record);
  // slots past the optimizer's count are unused.
  std::array<kernels::SlotDType, 4> slot_dtype{kernels::SlotDType::kF32, kernels::SlotDType::kF32,
                                               kernels::SlotDType::kF32, kernels::SlotDType::kF32};
  std::array<size_t, 4> slot_offset{0, 0, 0, 0};
  bool compressed = false;  // some slot is not fp32
  size_t grad_offset = 0;   // elements into the gradient arena of grad_dtype
  tiers::TierKind tier = tiers::TierKind::kHost;
  std::vector<Segment> segments;
};

struct PlanParam {
  int64_t numel = 0;
  kernels::DType dtype = kernels::DType::kF32;
  int group = 0;
  bool host_copy = false;  // a device parameter the engine keeps a host copy of, in its pool
};

struct PlanInputs {
  std::vector<PlanParam> params;  // gradient-ready order
  std::vector<int> slots;         // state slots per group (master included)
  // Per group, each slot's storage (slot_dtypes[g].size() == slots[g]).
  // Empty: from the config (plan_slot_dtypes with signed moments, which
  // counts the same bytes as the engine's exact choice).
  std::vector<std::vector<kernels::SlotDType>> slot_dtypes;
  bool gpu_available = false;
  uint64_t mem_available = 0;  // bytes, MemAvailable (0: read /proc/meminfo)
};

struct TierBytes {
  tiers::TierKind tier;
  uint64_t subgroups = 0;
  uint64_t bytes = 0;
};

struct Plan {
  std::vector<SubGroup> subgroups;
  std::vector<TierBytes> tiers;  // one row per tier used
  size_t sub_group_size = 0;     // effective (after the DRAM cap)
  size_t buffer_count = 0;
  size_t working_buffer_bytes = 0;  // each
  // Exact mode (clipping, fp16: no update before every gradient is in):
  // working buffers the engine adds, at its first exact-mode backward, to
  // the buffer_count it starts with, so that more records are fetched while
  // backward runs. From the headroom strata.dram_budget leaves over host
  // state, working buffers, gradients and host copies, all working buffers
  // together at most half the budget; never more than the records on
  // fetch tiers beyond buffer_count. 0 without strata.overlap_backward.
  size_t exact_prefetch_buffers = 0;
  uint64_t dram_budget = 0;
  uint64_t grad_bytes = 0;       // flat gradient arenas
  uint64_t host_copy_bytes = 0;  // host copies of device parameters (each rounded to 4 KiB)
  uint64_t model_param_bytes = 0;
  // predicted pinned pool: host records + working buffers + grads + host copies
  uint64_t pool_bytes = 0;
  uint64_t nvme_bytes = 0;
  // The first group's slots as stored ("fp32", "bf16", "q8s", "q8u"; master
  // first) and their bytes per element (q8: 1 + 4/256 for the scales).
  std::vector<std::string> state_slot_dtypes;
  double state_bytes_per_element = 0;
  // ZeRO stage 3 (one process): the model's weights on the param tier
  // (offload_param), fetched per module into a window of at most
  // window_elements; gradient arenas are not in the pool (they take memory
  // only while gradients are in flight).
  struct ParamTier {
    bool on = false;
    std::string device;              // offload_param.device: none, cpu, cxl, nvme
    uint64_t bytes = 0;              // the weights' records (4 KiB each at least)
    uint64_t window_elements = 0;    // resident at most (nvme/cxl: fetched per module)
    uint64_t window_bytes = 0;       // at the largest parameter dtype
    uint64_t prefetch_elements = 0;  // stage3_prefetch_bucket_size
    // Host memory at the peak of a step, estimated: the pool, the window (or
    // every weight, device cpu/none), and gradients — two sub-groups' worth
    // when updates overlap backward (no clipping, no fp16), all of them else.
    uint64_t peak_host_bytes_overlapped = 0;
    uint64_t peak_host_bytes_exact = 0;
  } param_tier;
  std::vector<std::string> notes;  // spills, caps, warnings (shown once)

  uint64_t bytes_on(tiers::TierKind tier) const;
  std::string to_string() const;  // readable table
  nlohmann::json to_json() const;
};

Result<Plan> build_plan(const Config& config, const PlanInputs& inputs);

// Bytes as a person reads them: "512 B", "1.50 GiB" (powers of 1024).
std::string human_bytes(double bytes);

// The dtype gradients of a parameter of dtype `param` accumulate in:
// data_types.grad_accum_dtype when the config gives it, else `param` itself
// (DeepSpeed's default under ZeRO). Sub-groups of one parameter dtype share it.
kernels::DType grad_dtype_for(const Config& config, kernels::DType param);

// The slot dtypes the config asks for, for an optimizer (hyper): master
// from bf16.bf16_master_weights_and_grads, moments from
// optimizer_state_dtype() (kernels::slot_dtype_for).
std::vector<kernels::SlotDType> plan_slot_dtypes(const Config& config,
                                                 const kernels::OptimizerHyper& hyper);

// Record layout helpers.
size_t slot_stride_for(size_t numel);
size_t record_bytes_for(size_t numel, int slots);  // every slot fp32
// Fills sg.slot_dtype, sg.slot_offset, sg.compressed and sg.record_bytes
// from sg.numel, sg.slot_stride and the slots' dtypes.
void lay_out_record(SubGroup& sg, const std::vector<kernels::SlotDType>& dtypes);
// The kernels' view of a record laid out as sg: its first `slots` slots
// (fp32 pointers, or packed data and q8 scales). Borrows `record`.
kernels::StateView state_view(const SubGroup& sg, int slots, void* record);

}  // namespace strata::engine
