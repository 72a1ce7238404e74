// The closed-form step model and the scheduler (see perf_model.h and
// docs/performance-model.md for the equations).
#include <strata/engine/perf_model.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace strata::engine {

// ---------------------------------------------------------------------------
// HardwareProfile
// ---------------------------------------------------------------------------

double HardwareProfile::cpu_rate(kernels::DType grad_dtype, unsigned threads) const {
  const bool half = grad_dtype != kernels::DType::kF32;
  const double all = (half && cpu_update_params_per_s_half > 0) ? cpu_update_params_per_s_half
                                                                : cpu_update_params_per_s;
  if (all <= 0) {
    return 0;
  }
  const unsigned total = std::max(cpu_threads, 1u);
  const unsigned t = threads == 0 ? total : threads;
  if (t >= total) {
    return all;
  }
  // One-thread rate scaled by the dtype's speed-up over fp32 (the same
  // bytes-per-element saving applies to one thread).
  double one = all / total;
  if (cpu_update_params_per_s_1thread > 0 && cpu_update_params_per_s > 0) {
    one = cpu_update_params_per_s_1thread * (all / cpu_update_params_per_s);
  }
  return std::min(all, one * t);
}

double HardwareProfile::checksum_rate(unsigned threads) const {
  if (checksum_bytes_per_s <= 0) {
    return 0;
  }
  const unsigned total = std::max(cpu_threads, 1u);
  const unsigned t = threads == 0 ? total : std::min(threads, total);
  double scale = double(t);
  if (cpu_update_params_per_s_1thread > 0 && cpu_update_params_per_s > 0) {
    scale = std::max(1.0, cpu_rate(kernels::DType::kF32, t) / cpu_update_params_per_s_1thread);
  }
  return checksum_bytes_per_s * scale;
}

double HardwareProfile::stats_rate(unsigned threads) const {
  if (grad_stats_params_per_s <= 0) {
    return 0;
  }
  const unsigned total = std::max(cpu_threads, 1u);
  const unsigned t = threads == 0 ? total : threads;
  if (t >= total) {
    return grad_stats_params_per_s;
  }
  double one = grad_stats_params_per_s / total;
  if (cpu_update_params_per_s_1thread > 0 && cpu_update_params_per_s > 0) {
    one = grad_stats_params_per_s *
          std::min(1.0, cpu_update_params_per_s_1thread / cpu_update_params_per_s);
  }
  return std::min(grad_stats_params_per_s, one * t);
}

double HardwareProfile::nvme_mixed_seconds(double read_bytes, double write_bytes) const {
  if (read_bytes <= 0 && write_bytes <= 0) {
    return 0;
  }
  const double r = nvme_read_bytes_per_s > 0 ? read_bytes / nvme_read_bytes_per_s : 0;
  const double w = nvme_write_bytes_per_s > 0 ? write_bytes / nvme_write_bytes_per_s : 0;
  if (nvme_duplex_bytes_per_s <= 0) {
    return r + w;  // time-shared
  }
  return std::max({r, w, (read_bytes + write_bytes) / nvme_duplex_bytes_per_s});
}

namespace {

using nlohmann::json;

struct NumberKey {
  const char* key;
  double HardwareProfile::*field;
};

const NumberKey kNumberKeys[] = {
    {"cpu_update_params_per_s_1thread", &HardwareProfile::cpu_update_params_per_s_1thread},
    {"cpu_update_io_factor", &HardwareProfile::cpu_update_io_factor},
    {"checksum_bytes_per_s", &HardwareProfile::checksum_bytes_per_s},
    {"grad_stats_params_per_s", &HardwareProfile::grad_stats_params_per_s},
    {"nvme_read_bytes_per_s", &HardwareProfile::nvme_read_bytes_per_s},
    {"nvme_write_bytes_per_s", &HardwareProfile::nvme_write_bytes_per_s},
    {"nvme_duplex_bytes_per_s", &HardwareProfile::nvme_duplex_bytes_per_s},
    {"nvme_cpu_busy_factor", &HardwareProfile::nvme_cpu_busy_factor},
    {"h2d_bytes_per_s", &HardwareProfile::h2d_bytes_per_s},
    {"d2h_bytes_per_s", &HardwareProfile::d2h_bytes_per_s},
    {"gpu_update_params_per_s", &HardwareProfile::gpu_update_params_per_s},
    {"backward_seconds", &HardwareProfile::backward_seconds},
    {"forward_seconds", &HardwareProfile::forward_seconds},
};

std::string describe(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

Status bad(const std::string& origin, const std::string& key, const std::string& what,
           const json& v) {
  return invalid_argument("hardware profile " + origin + ": " + key + ": " + what + ", got " +
                          describe(v));
}

Result<double> non_negative(const std::string& origin, const std::string& key, const json& v) {
  if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < 0) {
    return bad(origin, key, "must be a non-negative number", v);
  }
  return v.get<double>();
}

}  // namespace

Result<HardwareProfile> hardware_profile_from_json(const json& j, const std::string& origin) {
  if (!j.is_object()) {
    return invalid_argument("hardware profile " + origin + ": must be a JSON object, got " +
                            describe(j));
  }
  HardwareProfile hw;
  for (const auto& [key, v] : j.items()) {
    if (v.is_null()) {
      continue;  // null means "not given", as in configs
    }
    if (key == "name") {
      if (!v.is_string()) {
        return bad(origin, key, "must be a string", v);
      }
      hw.name = v.get<std::string>();
    } else if (key == "notes") {
      if (!v.is_string() && !v.is_array()) {
        return bad(origin, key, "must be a string or an array of strings", v);
      }
    } else if (key == "cpu_update_params_per_s") {
      if (v.is_object()) {
        for (const auto& [dt, rate] : v.items()) {
          const std::string path = key + "." + dt;
          STRATA_ASSIGN_OR_RETURN(double r, non_negative(origin, path, rate));
          if (dt == "fp32") {
            hw.cpu_update_params_per_s = r;
          } else if (dt == "bf16" || dt == "fp16" || dt == "half") {
            hw.cpu_update_params_per_s_half = r;
          } else {
            return bad(origin, path, "is not a gradient dtype (fp32, bf16, fp16)", json(dt));
          }
        }
      } else {
        STRATA_ASSIGN_OR_RETURN(hw.cpu_update_params_per_s, non_negative(origin, key, v));
      }
    } else if (key == "cpu_update_params_per_s_half") {
      STRATA_ASSIGN_OR_RETURN(hw.cpu_update_params_per_s_half, non_negative(origin, key, v));
    } else if (key == "cpu_threads") {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 65536) {
        return bad(origin, key, "must be an integer in [0, 65536]", v);
      }
      hw.cpu_threads = unsigned(v.get<int64_t>());
    } else if (key == "gpu_free_bytes") {
      if (!v.is_number() || v.get<double>() < 0 || v.get<double>() > 1.8e19) {
        return bad(origin, key, "must be a non-negative number of bytes", v);
      }
      hw.gpu_free_bytes = uint64_t(v.get<double>());
    } else if (key == "pcie_duplex") {
      if (!v.is_boolean()) {
        return bad(origin, key, "must be true or false", v);
      }
      hw.pcie_duplex = v.get<bool>();
    } else if (key == "sources") {
      if (!v.is_object()) {
        return bad(origin, key, "must be an object of strings", v);
      }
      for (const auto& [k, s] : v.items()) {
        if (!s.is_string()) {
          return bad(origin, key + "." + k, "must be a string", s);
        }
        hw.sources[k] = s.get<std::string>();
      }
    } else {
      bool found = false;
      for (const auto& nk : kNumberKeys) {
        if (key == nk.key) {
          STRATA_ASSIGN_OR_RETURN(hw.*nk.field, non_negative(origin, key, v));
          found = true;
          break;
        }
      }
      if (!found) {
        return invalid_argument("hardware profile " + origin + ": unknown key \"" + key +
                                "\" (see docs/performance-model.md for the keys)");
      }
    }
  }
  for (const auto& [key, f] :
       {std::pair<const char*, double>{"cpu_update_io_factor", hw.cpu_update_io_factor},
        {"nvme_cpu_busy_factor", hw.nvme_cpu_busy_factor}}) {
    if (f > 1.0) {
      return invalid_argument("hardware profile " + origin + ": " + key +
                              ": must be in [0, 1], got " + std::to_string(f));
    }
  }
  if ((hw.h2d_bytes_per_s > 0 || hw.d2h_bytes_per_s > 0 || hw.gpu_free_bytes > 0) &&
      hw.gpu_update_params_per_s <= 0) {
    return invalid_argument("hardware profile " + origin +
                            ": gpu_update_params_per_s: must be positive when PCIe rates or "
                            "gpu_free_bytes are given (a GPU without an update rate)");
  }
  if (hw.gpu_update_params_per_s > 0 && (hw.h2d_bytes_per_s <= 0 || hw.d2h_bytes_per_s <= 0)) {
    return invalid_argument("hardware profile " + origin +
                            ": h2d_bytes_per_s and d2h_bytes_per_s: must be positive when "
                            "gpu_update_params_per_s is given");
  }
  return hw;
}

Result<HardwareProfile> load_hardware_profile(const std::string& path) {
  std::ifstream f(path);
  if (!f) {
    return Status(StatusCode::kNotFound, "hardware profile " + path + ": cannot open the file");
  }
  json j = json::parse(f, nullptr, /*allow_exceptions=*/false, /*ignore_comments=*/true);
  if (j.is_discarded()) {
    return invalid_argument("hardware profile " + path + ": not valid JSON");
  }
  return hardware_profile_from_json(j, path);
}

json hardware_profile_to_json(const HardwareProfile& hw) {
  json j = json::object();
  j["name"] = hw.name;
  if (hw.cpu_update_params_per_s_half > 0) {
    j["cpu_update_params_per_s"] = {{"fp32", hw.cpu_update_params_per_s},
                                    {"bf16", hw.cpu_update_params_per_s_half}};
  } else {
    j["cpu_update_params_per_s"] = hw.cpu_update_params_per_s;
  }
  j["cpu_threads"] = hw.cpu_threads;
  for (const auto& nk : kNumberKeys) {
    j[nk.key] = hw.*nk.field;
  }
  j["gpu_free_bytes"] = hw.gpu_free_bytes;
  j["pcie_duplex"] = hw.pcie_duplex;
  j["sources"] = json::object();
  for (const auto& [k, s] : hw.sources) {
    j["sources"][k] = s;
  }
  return j;
}

Status save_hardware_profile(const HardwareProfile& hw, const std::string& path) {
  std::ofstream f(path, std::ios::trunc);
  if (!f) {
    return Status::from_errno(errno, "hardware profile " + path + ": open for writing");
  }
  f << hardware_profile_to_json(hw).dump(2) << "\n";
  f.close();
  if (!f) {
    return Status(StatusCode::kIoError, "hardware profile " + path + ": write failed");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Shapes and schedules
// ---------------------------------------------------------------------------

const char* update_device_name(UpdateDevice device) {
  switch (device) {
    case UpdateDevice::kCpu:
      return "cpu";
    case UpdateDevice::kGpuStreamed:
      return "gpu-streamed";
    case UpdateDevice::kGpuResident:
      return "gpu-resident";
  }
  return "?";
}

const char* overlap_mode_name(OverlapMode mode) {
  switch (mode) {
    case OverlapMode::kOff:
      return "off";
    case OverlapMode::kEager:
      return "eager";
    case OverlapMode::kExact:
      return "exact";
  }
  return "?";
}

size_t StepShape::total_numel() const {
  size_t n = 0;
  for (const auto& s : subgroups) {
    n += s.numel;
  }
  return n;
}

uint64_t StepShape::total_record_bytes() const {
  uint64_t n = 0;
  for (const auto& s : subgroups) {
    n += s.record_bytes;
  }
  return n;
}

StepShape step_shape_from_plan(const Plan& plan, const Config& config, bool gpu) {
  StepShape shape;
  for (const auto& sg : plan.subgroups) {
    SubGroupLoad l;
    l.numel = sg.numel;
    l.record_bytes = sg.record_bytes;
    l.grad_dtype = sg.grad_dtype;  // the dtype of the engine's gradient arena
    l.tier = sg.tier;
    shape.subgroups.push_back(l);
  }
  const EngineConfig& c = config.typed();
  shape.checksums = c.strata.verify_checksums;
  shape.grad_stats = c.training.gradient_clipping > 0 || c.precision.fp16_enabled;
  // offload_optimizer.buffer_count (>= 1 by the schema); in exact mode the
  // engine adds plan.exact_prefetch_buffers at its first backward.
  shape.buffer_count =
      plan.buffer_count +
      (shape.grad_stats && c.strata.overlap_backward ? plan.exact_prefetch_buffers : 0);
  shape.model_on_gpu = gpu;
  shape.param_bytes =
      plan.subgroups.empty() ? 2 : kernels::dtype_size(plan.subgroups.front().dtype);
  shape.io_block_bytes = size_t(c.aio.block_size);
  shape.io_queue_depth = unsigned(c.aio.queue_depth);
  return shape;
}

double Schedule::cpu_fraction() const {
  if (device.empty()) {
    return 1.0;
  }
  size_t cpu = 0;
  for (auto d : device) {
    cpu += d == UpdateDevice::kCpu;
  }
  return double(cpu) / double(device.size());
}

Schedule all_cpu_schedule(size_t n) {
  Schedule s;
  s.name = "all-cpu";
  s.device.assign(n, UpdateDevice::kCpu);
  return s;
}

Schedule static_ratio_schedule(size_t n, double ratio) {
  Schedule s;
  char buf[64];
  std::snprintf(buf, sizeof(buf), "static ratio %.2f", ratio);
  s.name = buf;
  s.device.assign(n, UpdateDevice::kCpu);
  // (1 - ratio) of the sub-groups keep their state on the GPU, spread evenly
  // (Bresenham) so they interleave with the CPU's in ready order.
  const double g = std::clamp(1.0 - ratio, 0.0, 1.0);
  for (size_t i = 0; i < n; ++i) {
    if (std::floor(double(i + 1) * g + 1e-9) > std::floor(double(i) * g + 1e-9)) {
      s.device[i] = UpdateDevice::kGpuResident;
    }
  }
  return s;
}

namespace {
std::string ordinal(int k) {
  const int t = k % 100;
  const char* suffix = (t >= 11 && t <= 13) ? "th"
                       : k % 10 == 1        ? "st"
                       : k % 10 == 2        ? "nd"
                       : k % 10 == 3        ? "rd"
                                            : "th";
  return std::to_string(k) + suffix;
}
}  // namespace

Schedule interleave_schedule(size_t n, int k, bool gpu_every) {
  Schedule s;
  k = std::max(k, 1);
  s.gap_k = k;
  s.gpu_every = gpu_every;
  if (gpu_every) {
    s.name = k == 1 ? "all-gpu (streamed)" : "gpu every " + ordinal(k);
  } else {
    s.name = "cpu every " + ordinal(k);
  }
  s.device.assign(n, gpu_every ? UpdateDevice::kCpu : UpdateDevice::kGpuStreamed);
  for (size_t i = 0; i < n; ++i) {
    if ((i + 1) % size_t(k) == 0) {
      s.device[i] = gpu_every ? UpdateDevice::kGpuStreamed : UpdateDevice::kCpu;
    }
  }
  return s;
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

namespace {

// One sub-group's demands on each resource (seconds at full rate; the CPU
// demand is given as work in parameters and converted at the rate in force).
struct Demand {
  double read = 0, write = 0;  // NVMe
  double nvme = 0;             // read + write as the drive mixes them
  double grad_d2h = 0;         // gradients to the host (model on GPU, CPU sub-groups)
  double h2d = 0, gpu = 0, d2h = 0;
  double cpu_params = 0;  // update work, parameters (rate depends on threads)
  double cpu_fixed = 0;   // checksums on the pipeline thread, seconds
  double cpu_factor = 1;  // rate factor: < 1 while NVMe I/O streams (cpu_update_io_factor)
  double param_h2d = 0;   // new parameters to the GPU after a CPU update
  kernels::DType dtype = kernels::DType::kF32;
  bool fetch = false;  // uses a working buffer (NVMe/CXL tier)
  bool cpu = false, gpu_path = false;
};

struct Model {
  const HardwareProfile& hw;
  unsigned full_threads;
  unsigned bw_threads;
  double B;  // backward seconds

  double cpu_seconds(const Demand& d, double start) const {
    // Work at the backward-time rate until B, then at the full rate.
    if (d.cpu_params <= 0) {
      return d.cpu_fixed;
    }
    const double fast = hw.cpu_rate(d.dtype, full_threads) * d.cpu_factor;
    const double slow = hw.cpu_rate(d.dtype, bw_threads) * d.cpu_factor;
    double t = start, work = d.cpu_params;
    if (t < B && slow > 0) {
      const double can = (B - t) * slow;
      if (can >= work) {
        return work / slow + d.cpu_fixed;
      }
      work -= can;
      t = B;
    }
    return (t - start) + work / fast + d.cpu_fixed;
  }
};

Demand demand_of(const HardwareProfile& hw, const StepShape& shape, const SubGroupLoad& sg,
                 UpdateDevice dev) {
  Demand d;
  d.dtype = sg.grad_dtype;
  const double b = double(sg.record_bytes);
  d.fetch = sg.tier == tiers::TierKind::kNvme || sg.tier == tiers::TierKind::kCxl;
  if (sg.tier == tiers::TierKind::kNvme && dev != UpdateDevice::kGpuResident) {
    d.read = hw.nvme_read_bytes_per_s > 0 ? b / hw.nvme_read_bytes_per_s : 0;
    d.write = hw.nvme_write_bytes_per_s > 0 ? b / hw.nvme_write_bytes_per_s : 0;
    d.nvme = hw.nvme_mixed_seconds(b, b);
    // A fetch-tier sub-group is updated while the pipeline streams others.
    d.cpu_factor = hw.io_factor();
    if (shape.checksums && hw.checksum_bytes_per_s > 0) {
      // The pipeline verifies each chunk before its update slice reads it
      // (from DRAM) and hashes it for the store right after (from cache):
      // one hash of the record at the measured (DRAM) rate, chunks over the
      // update threads (Engine::Impl::step_in_slices).
      d.cpu_fixed += b / hw.checksum_rate();
    }
  }
  if (dev == UpdateDevice::kGpuResident) {
    d.fetch = false;
  }
  switch (dev) {
    case UpdateDevice::kCpu:
      d.cpu = true;
      d.cpu_params = double(sg.numel);
      if (shape.model_on_gpu && hw.has_gpu()) {
        d.grad_d2h =
            double(sg.numel) * double(kernels::dtype_size(sg.grad_dtype)) / hw.d2h_bytes_per_s;
        d.param_h2d = double(sg.numel) * double(shape.param_bytes) / hw.h2d_bytes_per_s;
      }
      break;
    case UpdateDevice::kGpuStreamed:
      d.gpu_path = true;
      if (hw.has_gpu()) {
        d.h2d = b / hw.h2d_bytes_per_s;
        d.d2h = b / hw.d2h_bytes_per_s;
        d.gpu = double(sg.numel) / hw.gpu_update_params_per_s;
      }
      break;
    case UpdateDevice::kGpuResident:
      d.gpu_path = true;
      if (hw.has_gpu()) {
        d.gpu = double(sg.numel) / hw.gpu_update_params_per_s;
      }
      break;
  }
  return d;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / double(1ull << 30));
  return buf;
}

}  // namespace

json Prediction::to_json() const {
  json j;
  j["updates_done_s"] = updates_done_s;
  j["step_s"] = step_s;
  j["exposed_s"] = exposed_s;
  j["iteration_s"] = iteration_s;
  j["busy"] = {
      {"cpu_s", cpu_s}, {"nvme_s", nvme_s}, {"h2d_s", h2d_s}, {"d2h_s", d2h_s}, {"gpu_s", gpu_s}};
  j["bound"] = bound;
  j["feasible"] = feasible;
  if (!feasible) {
    j["infeasible_reason"] = infeasible_reason;
  }
  return j;
}

Prediction predict_step(const HardwareProfile& hw, const StepShape& shape, const Schedule& sched,
                        const PredictOptions& opt) {
  Prediction p;
  const size_t n = shape.subgroups.size();
  auto fail = [&](std::string why) {
    p.feasible = false;
    p.infeasible_reason = std::move(why);
    return p;
  };
  if (shape.buffer_count < 1) {
    return fail("buffer_count 0: the pipeline needs at least one buffer");
  }
  if (sched.device.size() != n) {
    return fail("schedule has " + std::to_string(sched.device.size()) + " devices for " +
                std::to_string(n) + " sub-groups");
  }
  // Feasibility: devices the profile has, memory the GPU has.
  uint64_t resident = 0, max_streamed = 0;
  bool any_nvme = false, any_cpu = false, any_gpu = false;
  for (size_t i = 0; i < n; ++i) {
    const auto& sg = shape.subgroups[i];
    any_nvme = any_nvme ||
               (sg.tier == tiers::TierKind::kNvme && sched.device[i] != UpdateDevice::kGpuResident);
    any_cpu = any_cpu || sched.device[i] == UpdateDevice::kCpu;
    any_gpu = any_gpu || sched.device[i] != UpdateDevice::kCpu;
    if (sched.device[i] == UpdateDevice::kGpuResident) {
      resident += sg.record_bytes;
    } else if (sched.device[i] == UpdateDevice::kGpuStreamed) {
      max_streamed = std::max<uint64_t>(max_streamed, sg.record_bytes);
    }
  }
  if (any_gpu && !hw.has_gpu()) {
    return fail("the profile has no GPU (gpu_update_params_per_s, h2d/d2h rates)");
  }
  if (any_cpu && hw.cpu_update_params_per_s <= 0) {
    return fail("the profile has no CPU update rate (cpu_update_params_per_s)");
  }
  if (any_nvme && !hw.has_nvme()) {
    return fail("state on NVMe but the profile has no NVMe rates (nvme_read/write_bytes_per_s)");
  }
  const uint64_t gpu_need = resident + uint64_t(std::max(opt.gpu_buffers, 1u)) * max_streamed;
  if (any_gpu && gpu_need > hw.gpu_free_bytes) {
    return fail("GPU memory: needs " + gib(double(gpu_need)) + " (resident state " +
                gib(double(resident)) + " + " + std::to_string(opt.gpu_buffers) + " x " +
                gib(double(max_streamed)) + " streaming buffers) > gpu_free_bytes " +
                gib(double(hw.gpu_free_bytes)));
  }

  const double B = opt.backward_s >= 0 ? opt.backward_s : hw.backward_seconds;
  const double F = opt.forward_s >= 0 ? opt.forward_s : hw.forward_seconds;
  Model model{hw, std::max(hw.cpu_threads, 1u),
              std::max(1u, std::min(sched.backward_threads, std::max(hw.cpu_threads, 1u))), B};

  std::vector<Demand> d(n);
  double total_numel = 0;
  for (size_t i = 0; i < n; ++i) {
    d[i] = demand_of(hw, shape, shape.subgroups[i], sched.device[i]);
    total_numel += double(shape.subgroups[i].numel);
  }
  // The drive slows while the pipeline computes (nvme_cpu_busy_factor,
  // measured with every update thread busy, scaled by the share of the cores
  // taken: hashing uses one thread). The model blends it by the share of the
  // I/O time that computing overlaps:
  //   f = 1 - (1 - busy_factor) * min(1, (updates + hashing / cores) / io).
  if (hw.busy_factor() < 1.0) {
    double upd = 0, io = 0;
    const double cores = double(std::max(hw.cpu_threads, 1u));
    for (size_t i = 0; i < n; ++i) {
      if (d[i].read > 0) {
        if (d[i].cpu) {
          upd += d[i].cpu_params / (hw.cpu_rate(d[i].dtype) * d[i].cpu_factor);
        }
        upd += d[i].cpu_fixed / cores;
      }
      io += d[i].read + d[i].write;
    }
    if (io > 0) {
      const double f = 1.0 - (1.0 - hw.busy_factor()) * std::min(1.0, upd / io);
      for (auto& x : d) {
        x.read /= f;
        x.write /= f;
        x.nvme /= f;
      }
    }
  }
  // Ready times (seconds after backward starts).
  std::vector<double> ready(n, 0.0);
  {
    double cum = 0;
    for (size_t i = 0; i < n; ++i) {
      cum += double(shape.subgroups[i].numel);
      const double r = shape.subgroups[i].ready_s;
      ready[i] = r >= 0 ? std::min(r, B) : (total_numel > 0 ? B * cum / total_numel : B);
    }
  }

  // Busy totals (the bound).
  for (size_t i = 0; i < n; ++i) {
    p.cpu_s += model.cpu_seconds(d[i], B + 1e30);  // full rate
    p.h2d_s += d[i].h2d + d[i].param_h2d;
    p.d2h_s += d[i].d2h;
    p.gpu_s += d[i].gpu;
  }
  p.nvme_s = 0;
  for (const auto& x : d) {
    p.nvme_s += x.nvme;
  }
  {
    const double pcie = hw.pcie_duplex ? std::max(p.h2d_s, p.d2h_s) : p.h2d_s + p.d2h_s;
    const std::pair<double, const char*> busy[] = {
        {p.cpu_s, "cpu"}, {p.nvme_s, "nvme"}, {pcie, "pcie"}, {p.gpu_s, "gpu"}};
    double best = -1;
    for (const auto& [t, name] : busy) {
      if (t > best) {
        best = t;
        p.bound = name;
      }
    }
  }

  const size_t nb = shape.buffer_count;  // >= 1, checked above
  double upd_done = 0, all_done = 0;

  // NVMe operations go through one FIFO ring in the order run_pipeline()
  // submits them, and each runs alone at the drive's read or write rate (the
  // ring's window mixes reads and writes only at batch boundaries; the
  // simulator models the window and the duplex rate). Submit times:
  //   F(j), j < nb : when fetch-tier sub-group j is ready
  //   F(j), j >= nb: max(ready j, update (j-nb+1) done, store (j-nb) done)
  //                  (lag-1 refill: after update w the pipeline stores w,
  //                  waits for store w-1 and reuses its buffer)
  //   F(j), nb == 1: max(ready j, store (j-1) done)
  //   S(w)          : when update w is done
  // The ring serves them by submit time (a store before a fetch submitted at
  // the same moment, as the pipeline does). Updates run in ready order on the
  // pipeline thread; a fetch-tier update starts when its fetch is done.
  std::vector<size_t> fetch_items;  // item index of the j-th fetch-tier sub-group
  std::vector<int64_t> fetch_index(n, -1);
  for (size_t i = 0; i < n; ++i) {
    if (d[i].read > 0 || d[i].write > 0) {
      fetch_index[i] = int64_t(fetch_items.size());
      fetch_items.push_back(i);
    }
  }
  const size_t m = fetch_items.size();
  constexpr double kUnknown = -1;
  std::vector<double> read_end(m, kUnknown), write_end(m, kUnknown), upd_end_f(m, kUnknown);
  size_t next_f = 0, next_s = 0;  // next fetch / store to place on the drive
  double drive_free = 0;
  auto item_ready = [&](size_t i) { return sched.overlap == OverlapMode::kOff ? B : ready[i]; };
  auto fetch_submit = [&](size_t j) -> double {
    double t = item_ready(fetch_items[j]);
    if (nb >= 2 && j >= nb) {
      if (upd_end_f[j - nb + 1] < 0 || write_end[j - nb] < 0) {
        return kUnknown;
      }
      t = std::max({t, upd_end_f[j - nb + 1], write_end[j - nb]});
    } else if (nb == 1 && j >= 1) {
      if (write_end[j - 1] < 0) {
        return kUnknown;
      }
      t = std::max(t, write_end[j - 1]);
    }
    return t;
  };

  double free_cpu = 0, free_h2d = 0, free_gpu = 0, free_d2h = 0, free_gd2h = 0;
  double worker_free = 0;  // the pipeline thread (updates, checksums, waits)
  // Gradient statistics on the pipeline thread: exact overlap computes them
  // as sub-groups become ready (backward threads until B); without overlap
  // a pass over every sub-group precedes the updates when the step needs
  // the global norm (clipping, fp16).
  if (hw.grad_stats_params_per_s > 0) {
    const unsigned bw =
        std::max(1u, std::min(sched.backward_threads, std::max(hw.cpu_threads, 1u)));
    if (sched.overlap == OverlapMode::kExact) {
      for (size_t i = 0; i < n; ++i) {
        const double s = std::max(ready[i], worker_free);
        worker_free = s + double(shape.subgroups[i].numel) / hw.stats_rate(s < B ? bw : 0);
      }
    } else if (sched.overlap == OverlapMode::kOff && shape.grad_stats) {
      worker_free = B + total_numel / hw.stats_rate();
      free_cpu = worker_free;
    }
  }
  size_t next_item = 0;      // next sub-group to update, in ready order
  int64_t last_stored = -1;  // fetch index of the last fetch-tier update (its store follows)
  // Updates every sub-group whose inputs are known, in order.
  auto run_updates = [&]() {
    while (next_item < n) {
      const size_t i = next_item;
      const Demand& x = d[i];
      const int64_t j = fetch_index[i];
      if (j >= 0 && read_end[size_t(j)] < 0) {
        return;  // its fetch is not placed yet
      }
      if (last_stored >= 0 && int64_t(next_s) <= last_stored) {
        return;  // the previous store (and the wait after it) comes first
      }
      const double a = item_ready(i);
      double grads_at = a;
      if (x.grad_d2h > 0) {
        // Gradients to the host (model on GPU), during backward as they become ready.
        const double s = std::max(ready[i], free_gd2h);
        free_gd2h = s + x.grad_d2h;
        grads_at = std::max(a, free_gd2h);
      }
      double in_at = std::max(a, grads_at);
      if (j >= 0) {
        in_at = std::max(in_at, read_end[size_t(j)]);
      }
      double done;
      if (x.cpu) {
        double s = std::max({in_at, free_cpu, worker_free});
        if (sched.overlap != OverlapMode::kEager) {
          s = std::max(s, B);  // updates wait for the gate (the step, or the clip factor)
        }
        const double c = model.cpu_seconds(x, s);
        free_cpu = s + c;
        done = free_cpu;
        worker_free = done;
      } else {
        // GPU path: the pipeline thread only verifies the fetched record
        // (the store's hash runs where the D2H completion is handled);
        // copies and the kernel run on the GPU's streams, the kernel after
        // backward.
        double t = in_at;
        if (x.cpu_fixed > 0) {
          const double s = std::max(t, worker_free);
          worker_free = s + x.cpu_fixed / 2;
          t = worker_free;
        }
        if (x.h2d > 0) {
          const double s = std::max(t, free_h2d);
          free_h2d = s + x.h2d;
          t = free_h2d;
        }
        const double gs = std::max({t, free_gpu, B});
        free_gpu = gs + x.gpu;
        t = free_gpu;
        if (x.d2h > 0) {
          const double s = std::max(t, free_d2h);
          free_d2h = s + x.d2h;
          t = free_d2h;
        }
        done = t;
      }
      upd_done = std::max(upd_done, done);
      if (j >= 0) {
        upd_end_f[size_t(j)] = done;
        if (x.cpu) {
          last_stored = j;
        }
      }
      if (x.param_h2d > 0) {
        // New parameters back to the model on the GPU before the next forward.
        const double s = std::max(done, free_h2d);
        free_h2d = s + x.param_h2d;
        upd_done = std::max(upd_done, free_h2d);
      }
      ++next_item;
    }
  };
  while (next_f < m || next_s < m || next_item < n) {
    run_updates();
    const double sf = next_f < m ? fetch_submit(next_f) : kUnknown;
    const double ss = next_s < next_f && upd_end_f[next_s] >= 0 ? upd_end_f[next_s] : kUnknown;
    if (sf < 0 && ss < 0) {
      if (next_f >= m && next_s >= m) {
        run_updates();
        break;
      }
      return fail("internal: the model's pipeline stalled (fetch " + std::to_string(next_f) +
                  ", store " + std::to_string(next_s) + ")");
    }
    const bool store = ss >= 0 && (sf < 0 || ss <= sf);
    const size_t j = store ? next_s++ : next_f++;
    const Demand& x = d[fetch_items[j]];
    const double s = std::max(drive_free, store ? ss : sf);
    drive_free = s + (store ? x.write : x.read);
    (store ? write_end : read_end)[j] = drive_free;
    if (store && x.cpu) {
      // Before the next update the pipeline thread waited for the previous
      // store (to refill its buffer) when another fetch follows.
      const bool refill = nb >= 2 ? (j >= 1 && j + nb - 1 < m) : (j + 1 < m);
      if (refill && nb >= 2 && write_end[j - 1] >= 0) {
        worker_free = std::max(worker_free, write_end[j - 1]);
      } else if (refill && nb == 1) {
        worker_free = std::max(worker_free, write_end[j]);
      }
    }
  }
  all_done = std::max({upd_done, drive_free});
  for (double w : write_end) {
    all_done = std::max(all_done, w);
  }

  p.updates_done_s = std::max(0.0, upd_done - B);
  p.step_s = std::max(p.updates_done_s, all_done - B);
  const double writeback_tail = p.step_s - p.updates_done_s;
  p.exposed_s = p.updates_done_s + std::max(0.0, writeback_tail - F);
  p.iteration_s = (B > 0 || F > 0) ? F + B + p.exposed_s : 0;
  return p;
}

// ---------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------

ChooseOptions choose_options_from_config(const Config& config, const HardwareProfile& hw) {
  const EngineConfig& c = config.typed();
  ChooseOptions o;
  o.auto_schedule = schedule_is_auto(c.strata, hw.has_gpu());
  o.ratio = c.zero.offload.ratio;
  o.overlap_allowed = c.strata.overlap_backward;
  // strata.clip_mode is exact (the only mode): clipping or fp16 need the
  // global gradient statistics before any update.
  o.exact = c.precision.fp16_enabled || c.training.gradient_clipping > 0;
  // GPU-streamed sub-groups use as many device buffers as the host pipeline has.
  o.predict.gpu_buffers = unsigned(c.zero.offload.buffer_count);
  // During backward the engine uses the cores torch leaves free, at least
  // one: with the model on a GPU torch keeps about two busy (the Python
  // thread and the autograd engine); on the CPU torch's intra-op pool takes
  // most of them.
  const unsigned cores = std::max(hw.cpu_threads, 1u);
  const int64_t threads = c.strata.threads;
  const unsigned pool = threads > 0 ? unsigned(threads) : cores;
  o.backward_threads =
      hw.has_gpu() ? std::max(1u, pool > 2 ? pool - 2 : 1u) : std::max(1u, pool / 4);
  return o;
}

json ScheduleChoice::to_json() const {
  auto sched_json = [](const Schedule& s) {
    json j;
    j["name"] = s.name;
    j["overlap"] = overlap_mode_name(s.overlap);
    j["cpu_fraction"] = s.cpu_fraction();
    j["gap_k"] = s.gap_k;
    if (s.gap_k > 0) {
      j["gap_family"] = s.gpu_every ? "gpu every k-th" : "cpu every k-th";
    }
    j["backward_threads"] = s.backward_threads;
    size_t cpu = 0, gs = 0, gr = 0;
    for (auto d : s.device) {
      cpu += d == UpdateDevice::kCpu;
      gs += d == UpdateDevice::kGpuStreamed;
      gr += d == UpdateDevice::kGpuResident;
    }
    j["subgroups"] = {{"cpu", cpu}, {"gpu_streamed", gs}, {"gpu_resident", gr}};
    return j;
  };
  json j;
  j["chosen"] = sched_json(chosen);
  j["prediction"] = prediction.to_json();
  j["candidates"] = json::array();
  for (const auto& c : candidates) {
    json cj = sched_json(c.schedule);
    cj["prediction"] = c.prediction.to_json();
    j["candidates"].push_back(cj);
  }
  j["notes"] = notes;
  return j;
}

std::string ScheduleChoice::to_string() const {
  std::ostringstream os;
  char line[200];
  std::snprintf(line, sizeof(line), "  %-22s %-6s %5s %10s %10s %10s %-5s %s\n", "schedule",
                "overlap", "cpu%", "updates_s", "step_s", "exposed_s", "bound", "");
  os << line;
  for (const auto& c : candidates) {
    const bool is_chosen = c.schedule.name == chosen.name && c.schedule.overlap == chosen.overlap;
    if (!c.prediction.feasible) {
      std::snprintf(line, sizeof(line), "  %-22s %-6s %5.0f  infeasible: %s\n",
                    c.schedule.name.c_str(), overlap_mode_name(c.schedule.overlap),
                    c.schedule.cpu_fraction() * 100, c.prediction.infeasible_reason.c_str());
    } else {
      std::snprintf(line, sizeof(line), "%s %-22s %-6s %5.0f %10.3f %10.3f %10.3f %-5s\n",
                    is_chosen ? "*" : " ", c.schedule.name.c_str(),
                    overlap_mode_name(c.schedule.overlap), c.schedule.cpu_fraction() * 100,
                    c.prediction.updates_done_s, c.prediction.step_s, c.prediction.exposed_s,
                    c.prediction.bound.c_str());
    }
    os << line;
  }
  for (const auto& n : notes) {
    os << "  note: " << n << "\n";
  }
  return os.str();
}

Result<ScheduleChoice> choose_schedule(const HardwareProfile& hw, const StepShape& shape,
                                       const ChooseOptions& o) {
  const size_t n = shape.subgroups.size();
  if (n == 0) {
    return invalid_argument("choose_schedule: no sub-groups");
  }
  ScheduleChoice choice;
  std::vector<OverlapMode> modes;
  const OverlapMode on = o.exact ? OverlapMode::kExact : OverlapMode::kEager;
  if (o.overlap_allowed) {
    modes = {on, OverlapMode::kOff};  // the config's default first: ties keep it
  } else {
    modes = {OverlapMode::kOff};
  }
  const double B = o.predict.backward_s >= 0 ? o.predict.backward_s : hw.backward_seconds;
  if (o.overlap_allowed && B <= 0) {
    choice.notes.push_back("backward time unknown (backward_seconds): overlap cannot be credited");
  }

  std::vector<Schedule> splits;
  const bool gpu = hw.has_gpu();
  if (!o.auto_schedule) {
    if (o.ratio < 1.0 && gpu) {
      splits.push_back(static_ratio_schedule(n, o.ratio));
    } else {
      if (o.ratio < 1.0) {
        choice.notes.push_back(
            "offload_optimizer.ratio < 1 asks for GPU updates, but the profile has no GPU: "
            "every sub-group is updated on the CPU");
      }
      splits.push_back(all_cpu_schedule(n));
    }
    // Static keeps the split and the configured overlap.
    modes.resize(1);
  } else {
    splits.push_back(all_cpu_schedule(n));
    if (gpu) {
      if (o.ratio < 1.0) {
        splits.push_back(static_ratio_schedule(n, o.ratio));
      }
      // Deep Optimizer States' gap k, both families, k up to 64 (finer
      // fractions change the step by less than a sub-group).
      const int kmax = int(std::min<size_t>(n, 64));
      for (int k = 1; k <= kmax; ++k) {
        splits.push_back(interleave_schedule(n, k, true));
      }
      for (int k = 2; k <= kmax; ++k) {
        splits.push_back(interleave_schedule(n, k, false));
      }
    } else {
      choice.notes.push_back("no GPU in the profile: every sub-group is updated on the CPU");
    }
  }

  const Candidate* best = nullptr;
  for (const auto& split : splits) {
    for (OverlapMode mode : modes) {
      Schedule s = split;
      s.overlap = mode;
      s.backward_threads = o.backward_threads;
      Candidate c{s, predict_step(hw, shape, s, o.predict)};
      choice.candidates.push_back(std::move(c));
    }
  }
  // Smallest exposed time; a later candidate must win by more than 0.5% so
  // ties keep the simpler schedule (earlier in the list).
  for (const auto& c : choice.candidates) {
    if (!c.prediction.feasible) {
      continue;
    }
    if (!best || c.prediction.exposed_s < best->prediction.exposed_s * 0.995) {
      best = &c;
    }
  }
  if (!best) {
    std::string why = choice.candidates.empty()
                          ? "no candidates"
                          : choice.candidates.front().prediction.infeasible_reason;
    return Status(StatusCode::kFailedPrecondition, "no feasible schedule: " + why);
  }
  choice.chosen = best->schedule;
  choice.prediction = best->prediction;
  return choice;
}

}  // namespace strata::engine
