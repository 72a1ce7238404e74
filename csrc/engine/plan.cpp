#include <strata/engine/plan.h>

#include <strata/platform/meminfo.h>

#include <algorithm>
#include <cstdio>
#include <sstream>

namespace strata::engine {
namespace {

constexpr size_t kSlotAlignFloats = 1024;  // 4 KiB of fp32
// Slots are spaced by an odd number of 4 KiB pages plus this skew (1088
// bytes: 17 cache lines), so no two of the update's streams (master, m, v,
// max_v) sit at the same offset modulo a page, nor at the same page number
// modulo 2^16 (virtual address bits 12-27).
// - Spaced by exact multiples of 4 KiB (a power of two for power-of-two
//   sub-groups) every stream maps to the same L1 and L2 sets: on a Zen 4 VM
//   the fused update ran at 0.43 of a plain loop over separately allocated
//   arrays (strata-bench-adam, 64M fp32, 2 threads; issue 17).
// - Skewed by 1088 bytes only, a 64M-element slot is 2^28 + 1088 bytes long:
//   the streams still share address bits 12-27, which AMD's L1 hashes into
//   its way-predictor tag (the "utag"), and they evicted each other's
//   prefetched lines: one thread ran at 0.6-0.8 of the plain loop, 1.0 with
//   the page count made odd (strata-bench-adam --slot-skew sub-page|on).
constexpr size_t kSlotSkewFloats = 272;

}  // namespace

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u ? "%.2f %s" : "%.0f %s", bytes, units[u]);
  return buf;
}

size_t slot_stride_for(size_t numel) {
  size_t pages = (numel + kSlotAlignFloats - 1) / kSlotAlignFloats;
  if (pages % 2 == 0) {
    ++pages;  // odd: k * pages is not a multiple of 2^16 pages for k < 2^16
  }
  return pages * kSlotAlignFloats + kSlotSkewFloats;
}

size_t record_bytes_for(size_t numel, int slots) {
  const size_t bytes = slot_stride_for(numel) * size_t(slots) * sizeof(float);
  return (bytes + 4095) / 4096 * 4096;
}

void lay_out_record(SubGroup& sg, const std::vector<kernels::SlotDType>& dtypes) {
  size_t at = 0;
  sg.compressed = false;
  for (size_t k = 0; k < 4; ++k) {
    sg.slot_dtype[k] = k < dtypes.size() ? dtypes[k] : kernels::SlotDType::kF32;
    sg.slot_offset[k] = k < dtypes.size() ? at : 0;
    if (k >= dtypes.size()) {
      continue;
    }
    if (dtypes[k] == kernels::SlotDType::kF32) {
      at += sg.slot_stride * sizeof(float);
    } else {
      sg.compressed = true;
      const size_t b = kernels::slot_bytes(dtypes[k], sg.numel);
      at += (b + 4095) / 4096 * 4096 + kSlotSkewFloats * sizeof(float);
    }
  }
  sg.record_bytes = (at + 4095) / 4096 * 4096;
}

kernels::StateView state_view(const SubGroup& sg, int slots, void* record) {
  kernels::StateView v;
  v.n = sg.numel;
  char* base = static_cast<char*>(record);
  for (int k = 0; k < slots && k < 4; ++k) {
    char* at = base + sg.slot_offset[size_t(k)];
    v.dtype[k] = sg.slot_dtype[size_t(k)];
    if (v.dtype[k] == kernels::SlotDType::kF32) {
      v.slot[k] = reinterpret_cast<float*>(at);
      continue;
    }
    v.packed[k] = at;
    if (v.dtype[k] == kernels::SlotDType::kQ8S || v.dtype[k] == kernels::SlotDType::kQ8U) {
      v.scales[k] = reinterpret_cast<float*>(at + kernels::q8_scales_offset(sg.numel));
    }
  }
  return v;
}

std::vector<kernels::SlotDType> plan_slot_dtypes(const Config& config,
                                                 const kernels::OptimizerHyper& hyper) {
  const EngineConfig& c = config.typed();
  kernels::StateDType state = kernels::StateDType::kF32;
  switch (optimizer_state_dtype(c)) {
    case OptimizerStateDType::kF32:
      break;
    case OptimizerStateDType::kBF16:
      state = kernels::StateDType::kBF16;
      break;
    case OptimizerStateDType::kInt8Blockwise:
      state = kernels::StateDType::kInt8Blockwise;
      break;
  }
  std::vector<kernels::SlotDType> out;
  for (int k = 0; k < kernels::state_slots(hyper); ++k) {
    out.push_back(
        kernels::slot_dtype_for(hyper, k, state, c.precision.bf16_master_weights_and_grads));
  }
  return out;
}

uint64_t Plan::bytes_on(tiers::TierKind tier) const {
  for (const auto& t : tiers) {
    if (t.tier == tier) {
      return t.bytes;
    }
  }
  return 0;
}

kernels::DType grad_dtype_for(const Config& config, kernels::DType param) {
  const auto& want = config.typed().precision.grad_accum_dtype;
  if (!want) {
    return param;
  }
  switch (*want) {
    case GradAccumDType::kBF16:
      return kernels::DType::kBF16;
    case GradAccumDType::kF16:
      return kernels::DType::kF16;
    case GradAccumDType::kF32:
      break;
  }
  return kernels::DType::kF32;
}

Result<Plan> build_plan(const Config& config, const PlanInputs& in) {
  Plan plan;
  const EngineConfig& c = config.typed();
  const OffloadDevice device = c.zero.offload.device;
  const bool has_nvme_path = c.zero.offload.nvme_path.has_value();
  plan.buffer_count = size_t(c.zero.offload.buffer_count);  // >= 1 by the schema
  int64_t sgs = c.zero.sub_group_size;
  if (sgs <= 0) {
    return invalid_argument("zero_optimization.sub_group_size: must be positive");
  }

  uint64_t mem_available = in.mem_available;
  if (mem_available == 0) {
    auto ma = platform::mem_available_bytes();
    mem_available = ma.ok() ? ma.value() : 0;
  }
  if (c.strata.dram_budget) {
    plan.dram_budget = uint64_t(*c.strata.dram_budget);
  } else {
    plan.dram_budget = mem_available / 4 * 3;  // default: 75% of MemAvailable
  }

  int max_slots = 0;
  for (int s : in.slots) {
    max_slots = std::max(max_slots, s);
  }
  if (max_slots <= 0) {
    return invalid_argument("optimizer declares no state slots");
  }
  // Each group's slot dtypes: given by the engine, or from the config (an
  // Adam-like optimizer's signs; the bytes are the same either way).
  std::vector<std::vector<kernels::SlotDType>> dtypes = in.slot_dtypes;
  if (dtypes.empty()) {
    for (int s : in.slots) {
      kernels::OptimizerHyper h;  // AdamW: master, m, v (+ one more slot if s == 4)
      h.amsgrad = s == 4;
      auto d = plan_slot_dtypes(config, h);
      d.resize(size_t(s), d.empty() ? kernels::SlotDType::kF32 : d.back());
      dtypes.push_back(std::move(d));
    }
  }
  if (dtypes.size() != in.slots.size()) {
    return invalid_argument("plan: slot dtypes for " + std::to_string(dtypes.size()) +
                            " groups, slot counts for " + std::to_string(in.slots.size()));
  }
  double max_elem_bytes = 0;  // state bytes per element of the widest group
  for (size_t g = 0; g < dtypes.size(); ++g) {
    if (dtypes[g].size() != size_t(in.slots[g])) {
      return invalid_argument("plan: group " + std::to_string(g) + " has " +
                              std::to_string(in.slots[g]) + " slots but " +
                              std::to_string(dtypes[g].size()) + " slot dtypes");
    }
    double b = 0;
    for (auto d : dtypes[g]) {
      b += d == kernels::SlotDType::kF32    ? 4.0
           : d == kernels::SlotDType::kBF16 ? 2.0
                                            : 1.0 + 4.0 / double(kernels::kQ8Block);
    }
    max_elem_bytes = std::max(max_elem_bytes, b);
    if (g == 0) {
      plan.state_bytes_per_element = b;
      for (auto d : dtypes[g]) {
        plan.state_slot_dtypes.push_back(kernels::slot_dtype_name(d));
      }
    }
  }
  for (const auto& p : in.params) {
    if (p.group < 0 || size_t(p.group) >= in.slots.size()) {
      return invalid_argument("parameter names param group " + std::to_string(p.group) +
                              " but there are " + std::to_string(in.slots.size()));
    }
    if (p.numel <= 0) {
      return invalid_argument("parameter with no elements");
    }
  }

  // Working buffers of fetch/store tiers must fit a quarter of the budget:
  // DeepSpeed's default sub_group_size (1e9) would mean 12 GB records.
  const bool may_fetch =
      device == OffloadDevice::kNvme || device == OffloadDevice::kCxl || has_nvme_path;
  if (may_fetch) {
    const double per_elem = max_elem_bytes * double(plan.buffer_count);
    uint64_t cap =
        std::max<uint64_t>(uint64_t(double(plan.dram_budget / 4) / per_elem), kSlotAlignFloats);
    cap = cap / kSlotAlignFloats * kSlotAlignFloats;
    if (uint64_t(sgs) > cap) {
      plan.notes.push_back("sub_group_size " + std::to_string(sgs) + " capped to " +
                           std::to_string(cap) + " so that " + std::to_string(plan.buffer_count) +
                           " working buffers fit a quarter of strata.dram_budget (" +
                           human_bytes(double(plan.dram_budget)) + ")");
      sgs = int64_t(cap);
    }
  }
  plan.sub_group_size = size_t(sgs);

  // Cut sub-groups: one group and one dtype each, at most sgs elements; each
  // takes the next range of the arena of its gradient dtype.
  std::vector<size_t> arena_fill(3, 0);
  SubGroup cur;
  bool open = false;
  auto close_cur = [&]() {
    if (open && cur.numel > 0) {
      cur.id = uint32_t(plan.subgroups.size());
      cur.slot_stride = slot_stride_for(cur.numel);
      lay_out_record(cur, dtypes[size_t(cur.group)]);
      cur.grad_dtype = grad_dtype_for(config, cur.dtype);
      cur.grad_offset = arena_fill[size_t(cur.grad_dtype)];
      arena_fill[size_t(cur.grad_dtype)] += cur.numel;
      plan.subgroups.push_back(std::move(cur));
    }
    cur = SubGroup{};
    open = false;
  };
  for (size_t i = 0; i < in.params.size(); ++i) {
    const auto& p = in.params[i];
    plan.model_param_bytes += uint64_t(p.numel) * kernels::dtype_size(p.dtype);
    if (p.host_copy) {  // one pool allocation each, 4 KiB-aligned
      plan.host_copy_bytes +=
          (uint64_t(p.numel) * kernels::dtype_size(p.dtype) + 4095) / 4096 * 4096;
    }
    if (open && (cur.group != p.group || cur.dtype != p.dtype)) {
      close_cur();
    }
    size_t done = 0;
    while (done < size_t(p.numel)) {
      if (!open) {
        cur.group = p.group;
        cur.dtype = p.dtype;
        open = true;
      }
      size_t take = std::min(size_t(p.numel) - done, size_t(sgs) - cur.numel);
      cur.segments.push_back(Segment{i, done, cur.numel, take});
      cur.numel += take;
      done += take;
      if (cur.numel == size_t(sgs)) {
        close_cur();
      }
    }
  }
  close_cur();
  // Each arena is one pool allocation, 4 KiB-aligned: count it rounded so the
  // pool's single slab holds everything.
  for (size_t d = 0; d < arena_fill.size(); ++d) {
    uint64_t bytes = arena_fill[d] * kernels::dtype_size(kernels::DType(d));
    plan.grad_bytes += (bytes + 4095) / 4096 * 4096;
  }

  // Placement.
  const double ratio = c.zero.offload.ratio;
  if (ratio < 1.0 && !in.gpu_available) {
    plan.notes.push_back("offload_optimizer.ratio " + std::to_string(ratio) +
                         " asks for GPU updates, but no GPU is available: every sub-group is "
                         "updated on the CPU");
  }
  size_t max_record = 0;
  for (const auto& sg : plan.subgroups) {
    max_record = std::max(max_record, sg.record_bytes);
  }
  uint64_t working = uint64_t(max_record) * plan.buffer_count;

  tiers::TierKind primary = tiers::TierKind::kHost;
  if (device == OffloadDevice::kNvme) {
    primary = tiers::TierKind::kNvme;
  } else if (device == OffloadDevice::kCxl) {
    primary = tiers::TierKind::kCxl;
  }

  if (primary == tiers::TierKind::kNvme) {
    uint64_t cache = uint64_t(c.strata.dram_cache_bytes);
    uint64_t cached = 0;
    for (auto& sg : plan.subgroups) {
      if (cached + sg.record_bytes <= cache) {
        sg.tier = tiers::TierKind::kHost;
        cached += sg.record_bytes;
      } else {
        sg.tier = tiers::TierKind::kNvme;
      }
    }
  } else {
    // cpu / none / cxl: keep state there while it fits the budget, spill the rest.
    uint64_t used = 0;
    bool spilled = false;
    for (auto& sg : plan.subgroups) {
      uint64_t need = sg.record_bytes;
      uint64_t limit = plan.dram_budget > working ? plan.dram_budget - working : 0;
      if (primary == tiers::TierKind::kCxl) {
        limit = UINT64_MAX;  // CXL capacity is checked when the tier allocates
      }
      if (used + need <= limit || (!has_nvme_path && primary != tiers::TierKind::kCxl)) {
        sg.tier = primary;
        used += need;
      } else {
        sg.tier = tiers::TierKind::kNvme;
        spilled = true;
      }
    }
    if (primary == tiers::TierKind::kHost && used > plan.dram_budget) {
      return Status(StatusCode::kNoSpace,
                    "optimizer state needs " + human_bytes(double(used)) +
                        " of host memory but "
                        "strata.dram_budget is " +
                        human_bytes(double(plan.dram_budget)) +
                        "; set zero_optimization.offload_optimizer.nvme_path to spill the rest to "
                        "NVMe, use device \"nvme\", or raise strata.dram_budget");
    }
    if (spilled) {
      plan.notes.push_back("optimizer state does not fit strata.dram_budget (" +
                           human_bytes(double(plan.dram_budget)) +
                           "): part of it spills to NVMe at " +
                           c.zero.offload.nvme_path.value_or(std::string()));
    }
  }

  // Totals per tier.
  bool any_fetch = false;
  for (const auto& sg : plan.subgroups) {
    auto it = std::find_if(plan.tiers.begin(), plan.tiers.end(),
                           [&](const TierBytes& t) { return t.tier == sg.tier; });
    if (it == plan.tiers.end()) {
      plan.tiers.push_back(TierBytes{sg.tier, 0, 0});
      it = plan.tiers.end() - 1;
    }
    it->subgroups += 1;
    it->bytes += sg.record_bytes;
    if (sg.tier == tiers::TierKind::kNvme || sg.tier == tiers::TierKind::kCxl) {
      any_fetch = true;
    }
  }
  if (!any_fetch) {
    working = 0;
  }
  plan.working_buffer_bytes = any_fetch ? max_record : 0;
  plan.nvme_bytes = plan.bytes_on(tiers::TierKind::kNvme);
  plan.pool_bytes =
      plan.bytes_on(tiers::TierKind::kHost) + working + plan.grad_bytes + plan.host_copy_bytes;
  if (any_fetch && c.strata.overlap_backward) {
    uint64_t fetched = 0;  // records on fetch tiers
    for (const auto& sg : plan.subgroups) {
      fetched += sg.tier == tiers::TierKind::kNvme || sg.tier == tiers::TierKind::kCxl;
    }
    const uint64_t want = fetched > plan.buffer_count ? fetched - plan.buffer_count : 0;
    const uint64_t used = plan.pool_bytes;  // host state, working buffers, gradients, copies
    const uint64_t headroom = plan.dram_budget > used ? plan.dram_budget - used : 0;
    const uint64_t half = plan.dram_budget / 2 > working ? plan.dram_budget / 2 - working : 0;
    const uint64_t fit = std::min(headroom, half) / max_record;
    plan.exact_prefetch_buffers = size_t(std::min(want, fit));
    // Said when the config asks for exact mode; a backward(exact=True) of the
    // Python layer without it uses the buffers as well, and the engine logs it.
    if (want > 0 && (c.training.gradient_clipping > 0 || c.precision.fp16_enabled)) {
      const uint64_t held = plan.buffer_count + plan.exact_prefetch_buffers;
      plan.notes.push_back(
          "exact mode (gradient clipping, fp16): " + std::to_string(plan.exact_prefetch_buffers) +
          " more working buffers (" +
          human_bytes(double(plan.exact_prefetch_buffers) * double(max_record)) +
          ", pinned at the first such backward) let backward prefetch " +
          (held >= fetched ? "every record"
                           : std::to_string(held) + " of " + std::to_string(fetched) +
                                 " records (strata.dram_budget " +
                                 human_bytes(double(plan.dram_budget)) + " allows no more)"));
    }
  }
  if (plan.nvme_bytes && !(device == OffloadDevice::kNvme || has_nvme_path)) {
    return internal_error("plan puts state on NVMe without an nvme_path");
  }
  if (c.zero.stage == 3) {
    auto& pt = plan.param_tier;
    const OffloadParamConfig& op = c.zero.offload_param;
    static const char* kDevices[] = {"none", "cpu", "nvme", "cxl"};
    pt.on = true;
    pt.device = kDevices[size_t(op.device)];
    uint64_t numel = 0, largest_es = 1, weights = 0;
    for (const auto& p : in.params) {
      const uint64_t es = kernels::dtype_size(p.dtype);
      numel += uint64_t(p.numel);
      largest_es = std::max(largest_es, es);
      weights += (uint64_t(p.numel) * es + 4095) / 4096 * 4096;
    }
    const bool on_demand = op.device == OffloadDevice::kNvme || op.device == OffloadDevice::kCxl;
    pt.bytes = op.device == OffloadDevice::kNone ? 0 : weights;
    pt.window_elements = uint64_t(c.zero.stage3.max_live_parameters);
    if (on_demand) {
      pt.window_elements =
          std::min<uint64_t>(pt.window_elements, uint64_t(op.buffer_count * op.buffer_size));
    }
    pt.window_elements = std::min(pt.window_elements, numel);
    pt.window_bytes = pt.window_elements * largest_es;
    pt.prefetch_elements = uint64_t(c.zero.stage3.prefetch_bucket_size);
    const uint64_t resident_weights = on_demand ? pt.window_bytes : weights;
    const uint64_t pool = plan.pool_bytes - plan.grad_bytes;  // arenas live outside the pool
    uint64_t grad_es = 4;
    for (const auto& sg : plan.subgroups) {
      grad_es = std::max<uint64_t>(grad_es, kernels::dtype_size(sg.grad_dtype));
    }
    const uint64_t in_flight =
        std::min<uint64_t>(plan.grad_bytes, 2 * plan.sub_group_size * grad_es);
    pt.peak_host_bytes_overlapped = pool + resident_weights + in_flight;
    // Exact mode also holds the working buffers it adds at its first backward.
    pt.peak_host_bytes_exact = pool + resident_weights + plan.grad_bytes +
                               uint64_t(plan.exact_prefetch_buffers) * plan.working_buffer_bytes;
  }
  return plan;
}

std::string Plan::to_string() const {
  std::ostringstream os;
  char line[160];
  std::snprintf(line, sizeof(line), "%-8s %10s %14s\n", "tier", "subgroups", "state");
  os << line;
  for (const auto& t : tiers) {
    std::snprintf(line, sizeof(line), "%-8s %10llu %14s\n", tiers::tier_name(t.tier),
                  (unsigned long long)t.subgroups, human_bytes(double(t.bytes)).c_str());
    os << line;
  }
  if (!state_slot_dtypes.empty()) {
    std::string names;
    for (const auto& d : state_slot_dtypes) {
      names += (names.empty() ? "" : " + ") + d;
    }
    std::snprintf(line, sizeof(line), "state per element: %s = %.2f bytes (master first)\n",
                  names.c_str(), state_bytes_per_element);
    os << line;
  }
  os << "sub_group_size " << sub_group_size << " elements, buffer_count " << buffer_count
     << ", working buffer " << human_bytes(double(working_buffer_bytes)) << " each\n";
  os << "host memory: pinned pool " << human_bytes(double(pool_bytes)) << " (of which gradients "
     << human_bytes(double(grad_bytes));
  if (host_copy_bytes) {
    os << ", host copies of device parameters " << human_bytes(double(host_copy_bytes));
  }
  os << "), model parameters " << human_bytes(double(model_param_bytes)) << ", dram_budget "
     << human_bytes(double(dram_budget)) << "\n";
  if (param_tier.on) {
    const auto& pt = param_tier;
    os << "stage 3: weights on " << pt.device;
    if (pt.device != "none") {
      os << " (" << human_bytes(double(pt.bytes)) << ")";
    }
    os << ", window " << pt.window_elements << " elements (" << human_bytes(double(pt.window_bytes))
       << "), prefetch " << pt.prefetch_elements << " elements\n";
    os << "stage 3: peak host memory about " << human_bytes(double(pt.peak_host_bytes_overlapped))
       << " with updates overlapping backward, " << human_bytes(double(pt.peak_host_bytes_exact))
       << " with clipping or fp16 (gradients held until the step)\n";
  }
  for (const auto& n : notes) {
    os << "note: " << n << "\n";
  }
  return os.str();
}

nlohmann::json Plan::to_json() const {
  nlohmann::json j;
  j["sub_group_size"] = sub_group_size;
  j["subgroups"] = subgroups.size();
  j["buffer_count"] = buffer_count;
  j["working_buffer_bytes"] = working_buffer_bytes;
  j["exact_prefetch_buffers"] = exact_prefetch_buffers;
  j["dram_budget"] = dram_budget;
  j["grad_bytes"] = grad_bytes;
  j["host_copy_bytes"] = host_copy_bytes;
  j["model_param_bytes"] = model_param_bytes;
  j["pool_bytes"] = pool_bytes;
  j["nvme_bytes"] = nvme_bytes;
  j["state_slot_dtypes"] = state_slot_dtypes;
  j["state_bytes_per_element"] = state_bytes_per_element;
  j["tiers"] = nlohmann::json::array();
  for (const auto& t : tiers) {
    j["tiers"].push_back(
        {{"tier", tiers::tier_name(t.tier)}, {"subgroups", t.subgroups}, {"bytes", t.bytes}});
  }
  if (param_tier.on) {
    const auto& pt = param_tier;
    j["param_tier"] = {{"device", pt.device},
                       {"bytes", pt.bytes},
                       {"window_elements", pt.window_elements},
                       {"window_bytes", pt.window_bytes},
                       {"prefetch_elements", pt.prefetch_elements},
                       {"peak_host_bytes_overlapped", pt.peak_host_bytes_overlapped},
                       {"peak_host_bytes_exact", pt.peak_host_bytes_exact}};
  }
  j["notes"] = notes;
  return j;
}

}  // namespace strata::engine
