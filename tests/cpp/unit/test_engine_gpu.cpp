// The engine's GPU updates (offload_optimizer.ratio < 1) without a GPU: the
// updater is a host emulation that runs the GPU kernel's per-element math
// (cuda/adam_math.h, the same source nvcc compiles) on host memory standing
// in for the device. What this checks is the engine's side: which sub-groups
// go to the GPU, what a job carries (slots, gradient, copy-out into the
// parameters' device memory), that the model stream is ordered after the
// copy-out, and that the run is bit-identical to CPU-only updates.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include <strata/cuda/device.h>
#include <strata/engine/engine.h>

#include "cuda/adam_math.h"

namespace fs = std::filesystem;
using namespace strata;
using namespace strata::engine;

namespace {

struct HostGpu {
  int jobs = 0;
  int stream_waits = 0;
  void* last_stream = nullptr;
  void* last_after_stream = nullptr;
  int buffers = 0;  // GpuUpdaterOptions::buffers the engine asked for
};

float load(const void* base, size_t i, cuda::ElemType t) {
  switch (t) {
    case cuda::ElemType::kBF16:
      return cuda::math::load_elem<cuda::ElemType::kBF16>(base, i);
    case cuda::ElemType::kF16:
      return cuda::math::load_elem<cuda::ElemType::kF16>(base, i);
    default:
      return cuda::math::load_elem<cuda::ElemType::kF32>(base, i);
  }
}

void store(void* base, size_t i, float x, cuda::ElemType t) {
  switch (t) {
    case cuda::ElemType::kBF16:
      return cuda::math::store_elem<cuda::ElemType::kBF16>(base, i, x);
    case cuda::ElemType::kF16:
      return cuda::math::store_elem<cuda::ElemType::kF16>(base, i, x);
    default:
      return cuda::math::store_elem<cuda::ElemType::kF32>(base, i, x);
  }
}

// Completes each job inside submit(), as if the device were infinitely fast.
class HostGpuUpdater final : public cuda::GpuUpdater {
 public:
  HostGpuUpdater(const cuda::GpuUpdaterOptions& o, HostGpu* log) : o_(o), log_(log) {
    log_->buffers = o.buffers;
  }
  Result<Ticket> submit(const cuda::GpuJob& job) override {
    if (job.n == 0 || job.n > o_.max_elements || !job.host_slot[0] || !job.host_slot[1] ||
        !job.host_slot[2] || !job.grad || job.copy_out_count > o_.max_copy_out) {
      return invalid_argument("host GPU: bad job");
    }
    for (size_t i = 0; i < job.n; ++i) {
      cuda::math::AdamElem e{job.host_slot[0][i], job.host_slot[1][i], job.host_slot[2][i],
                             job.consts.amsgrad ? job.host_slot[3][i] : 0.0f};
      cuda::math::adam_element(job.consts, load(job.grad, i, job.grad_type), e);
      job.host_slot[0][i] = e.p;
      job.host_slot[1][i] = e.m;
      job.host_slot[2][i] = e.v;
      if (job.consts.amsgrad) {
        job.host_slot[3][i] = e.vmax;
      }
    }
    for (size_t r = 0; r < job.copy_out_count; ++r) {
      const auto& c = job.copy_out[r];
      for (size_t k = 0; k < c.n; ++k) {
        store(c.dst, k, job.host_slot[0][c.offset + k], job.param_type);
      }
    }
    log_->jobs += 1;
    log_->last_after_stream = job.after_stream;
    return ++last_;
  }
  Status wait(Ticket t) override {
    return t >= 1 && t <= last_ ? Status::Ok() : invalid_argument("host GPU: unknown ticket");
  }
  Status wait_all() override { return Status::Ok(); }
  Result<bool> done(Ticket t) override { return t <= last_; }
  Status stream_wait(Ticket t, void* stream) override {
    log_->stream_waits += 1;
    log_->last_stream = stream;
    return wait(t);
  }
  Result<cuda::GpuJobTimes> job_times(Ticket) override {
    return Status(StatusCode::kNotFound, "none");
  }
  const cuda::GpuUpdaterOptions& options() const override { return o_; }
  cuda::GpuUpdaterStats stats() const override { return {}; }

 private:
  cuda::GpuUpdaterOptions o_;
  HostGpu* log_;
  Ticket last_ = 0;
};

Config config(double ratio, const std::string& profile = "") {
  nlohmann::json j = {
      {"zero_optimization",
       {{"sub_group_size", 4096}, {"offload_optimizer", {{"device", "cpu"}, {"ratio", ratio}}}}},
      {"strata", {{"threads", 2}}}};
  if (!profile.empty()) {
    j["strata"]["hardware_profile"] = profile;
    j["strata"]["schedule"] = "auto";
  } else {
    j["strata"]["schedule"] = "static";
  }
  auto c = Config::parse(j);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  return c.value();
}

std::vector<kernels::OptimizerHyper> hypers() {
  kernels::OptimizerHyper a;
  a.kind = kernels::OptimizerKind::kAdamW;
  a.lr = 1e-2;
  a.weight_decay = 0.1;
  kernels::OptimizerHyper b = a;
  b.kind = kernels::OptimizerKind::kAdam;
  b.lr = 3e-3;
  b.weight_decay = 0.01;
  b.amsgrad = true;
  return {a, b};
}

struct Outcome {
  std::vector<std::vector<float>> host, device, masters;
  std::vector<uint8_t> on_gpu;
  std::vector<SubGroup> subgroups;
  std::vector<std::string> notes;
  HostGpu log;
  size_t gpu_update_events = 0;
};

// Four parameters of odd sizes, one spanning several sub-groups; the host
// copy starts from the weights, the "device" copy from zeros.
Outcome run(double ratio, int steps, bool unavailable = false, const std::string& profile = "") {
  Outcome out;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 0.5f);
  for (size_t n : {size_t(3001), size_t(17), size_t(25000), size_t(1)}) {
    std::vector<float> p(n);
    for (auto& x : p) x = nd(rng);
    out.host.push_back(p);
    out.device.push_back(std::vector<float>(n, 0.f));
  }
  EngineOptions o;
  o.config = config(ratio, profile);
  for (size_t i = 0; i < out.host.size(); ++i) {
    ParamInfo p{"p" + std::to_string(i), int64_t(out.host[i].size()), kernels::DType::kF32,
                int(i % 2), out.host[i].data()};
    p.device_data = out.device[i].data();
    o.params.push_back(p);
  }
  o.groups = hypers();
  HostGpu* log = &out.log;
  o.make_gpu_updater =
      [log, unavailable](
          const cuda::GpuUpdaterOptions& go) -> Result<std::unique_ptr<cuda::GpuUpdater>> {
    if (unavailable) {
      return Status(StatusCode::kUnavailable, "no device (test)");
    }
    return std::unique_ptr<cuda::GpuUpdater>(new HostGpuUpdater(go, log));
  };
  auto r = Engine::create(std::move(o));
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  if (!r.ok()) {
    return out;
  }
  Engine& e = *r.value();
  int stream_token = 0;
  e.set_model_stream(&stream_token);
  float* g = static_cast<float*>(e.grad_arenas().at(0).data);
  for (int s = 0; s < steps; ++s) {
    for (size_t i = 0; i < out.host.size(); ++i) {
      for (size_t k = 0; k < out.host[i].size(); ++k) {
        g[e.grad_offset(i) + k] = std::sin(float(k * 7 + i * 131 + size_t(s) * 17)) * 0.3f;
      }
    }
    EXPECT_TRUE(e.step(0.75f).ok());
  }
  EXPECT_TRUE(e.sync().ok());
  for (size_t i = 0; i < out.host.size(); ++i) {
    std::vector<float> m(out.host[i].size());
    EXPECT_TRUE(e.read_param_state(i, 0, m.data()).ok());
    out.masters.push_back(m);
  }
  out.subgroups = e.subgroups();
  for (uint32_t sg = 0; sg < out.subgroups.size(); ++sg) {
    out.on_gpu.push_back(e.gpu_updated(sg));
  }
  out.notes = e.plan().notes;
  const nlohmann::json chrome = e.trace().chrome_json();
  for (const auto& ev : chrome["traceEvents"]) {
    if (ev.value("cat", std::string()) == "update" &&
        ev["args"].value("tier", std::string()) == "gpu") {
      out.gpu_update_events += 1;
    }
  }
  EXPECT_EQ(out.log.last_after_stream, out.log.jobs ? static_cast<void*>(&stream_token) : nullptr);
  EXPECT_EQ(out.log.last_stream,
            out.log.stream_waits ? static_cast<void*>(&stream_token) : nullptr);
  EXPECT_TRUE(e.close().ok());
  return out;
}

}  // namespace

TEST(EngineGpu, InterleavedUpdatesAreBitIdenticalToCpuOnly) {
  const int steps = 4;
  Outcome cpu = run(1.0, steps);
  Outcome mixed = run(0.5, steps);
  ASSERT_FALSE(cpu.masters.empty());
  ASSERT_FALSE(mixed.masters.empty());
  size_t gpu_sgs = 0;
  for (uint8_t x : mixed.on_gpu) gpu_sgs += x;
  const size_t n_sgs = mixed.subgroups.size();
  ASSERT_GE(n_sgs, 8u);
  EXPECT_EQ(gpu_sgs, size_t(std::llround(0.5 * double(n_sgs))));
  for (size_t j = 1; j < n_sgs; ++j) {
    EXPECT_FALSE(mixed.on_gpu[j] && mixed.on_gpu[j - 1]) << "spread evenly, not in a block";
  }
  EXPECT_EQ(mixed.log.jobs, int(gpu_sgs) * steps);
  EXPECT_EQ(mixed.log.stream_waits, steps);
  EXPECT_EQ(cpu.log.jobs, 0);

  for (size_t i = 0; i < cpu.masters.size(); ++i) {
    ASSERT_EQ(
        0, std::memcmp(cpu.masters[i].data(), mixed.masters[i].data(), cpu.masters[i].size() * 4))
        << "masters of parameter " << i;
  }
  // Each element's new value is where its sub-group was updated: the device
  // copy for GPU sub-groups, the host copy for CPU ones; the other copy keeps
  // its initial value.
  Outcome initial = run(1.0, 0);
  for (const auto& sg : mixed.subgroups) {
    for (const auto& seg : sg.segments) {
      for (size_t k = 0; k < seg.numel; ++k) {
        const size_t at = seg.param_offset + k;
        const float want = cpu.host[seg.param][at];
        if (mixed.on_gpu[sg.id]) {
          ASSERT_EQ(mixed.device[seg.param][at], want) << "sub-group " << sg.id;
          ASSERT_EQ(mixed.host[seg.param][at], initial.host[seg.param][at]);
        } else {
          ASSERT_EQ(mixed.host[seg.param][at], want) << "sub-group " << sg.id;
          ASSERT_EQ(mixed.device[seg.param][at], 0.0f);
        }
      }
    }
  }
  EXPECT_EQ(mixed.gpu_update_events, gpu_sgs);  // the trace keeps the last step
}

TEST(EngineGpu, AllOnTheGpuAndNoUpdaterFallsBackToTheCpu) {
  Outcome all = run(0.0, 2);
  size_t gpu_sgs = 0;
  for (uint8_t x : all.on_gpu) gpu_sgs += x;
  EXPECT_EQ(gpu_sgs, all.subgroups.size());
  Outcome cpu = run(1.0, 2);
  for (size_t i = 0; i < cpu.masters.size(); ++i) {
    ASSERT_EQ(0,
              std::memcmp(cpu.masters[i].data(), all.masters[i].data(), cpu.masters[i].size() * 4));
    ASSERT_EQ(0, std::memcmp(cpu.host[i].data(), all.device[i].data(), cpu.host[i].size() * 4));
  }

  Outcome none = run(0.5, 1, /*unavailable=*/true);
  for (uint8_t x : none.on_gpu) EXPECT_EQ(x, 0);
  ASSERT_FALSE(none.notes.empty());
  bool said = false;
  for (const auto& n : none.notes) {
    said = said || n.find("GPU updates unavailable (no device (test))") != std::string::npos;
  }
  EXPECT_TRUE(said);
}

// Issue 18 item 7: GPU staging was hard-coded to 2 device buffers whatever
// offload_optimizer.buffer_count said (default 4); it follows the key now.
TEST(EngineGpu, DeviceStagingFollowsBufferCount) {
  Outcome all = run(0.0, 1);
  EXPECT_EQ(all.log.buffers, strata::default_engine_config().zero.offload.buffer_count);
}

// strata.schedule auto with a hardware profile: the performance model picks
// the split (a fast GPU and a slow CPU: most sub-groups go to the GPU), says
// so in the plan's notes, and the run stays bit-identical to CPU-only.
TEST(EngineGpu, AutoScheduleTakesTheModelsSplit) {
  const fs::path profile = fs::temp_directory_path() / "strata-test-gpu-profile.json";
  {
    nlohmann::json hw = {{"name", "test GPU box"},
                         {"cpu_update_params_per_s", 2e6},
                         {"cpu_update_params_per_s_half", 2e6},
                         {"cpu_update_params_per_s_1thread", 1e6},
                         {"cpu_threads", 2},
                         {"h2d_bytes_per_s", 50e9},
                         {"d2h_bytes_per_s", 50e9},
                         {"gpu_update_params_per_s", 50e9},
                         {"gpu_free_bytes", uint64_t(1) << 34}};
    std::ofstream(profile) << hw.dump();
  }
  Outcome cpu = run(1.0, 2);
  Outcome chosen = run(1.0, 2, false, profile.string());
  fs::remove(profile);
  size_t gpu_sgs = 0;
  for (uint8_t x : chosen.on_gpu) gpu_sgs += x;
  EXPECT_GT(gpu_sgs, chosen.subgroups.size() / 2);
  bool said = false;
  for (const auto& n : chosen.notes) {
    said = said || (n.rfind("schedule: ", 0) == 0 && n.find("test GPU box") != std::string::npos);
  }
  EXPECT_TRUE(said) << [&] {
    std::string all;
    for (const auto& n : chosen.notes) all += n + " | ";
    return all;
  }();
  for (size_t i = 0; i < cpu.masters.size(); ++i) {
    ASSERT_EQ(
        0, std::memcmp(cpu.masters[i].data(), chosen.masters[i].data(), cpu.masters[i].size() * 4));
  }
}

// Regression (issue 18, item 5): Engine::create never set
// PlanInputs::gpu_available, so with offload_optimizer.ratio < 1 the plan
// told users "no GPU is available" and the engine then updated on the GPU.
TEST(EngineGpu, PlanNotesAgreeWithWhereUpdatesRun) {
  auto says_no_gpu = [](const Outcome& o) {
    for (const auto& n : o.notes) {
      if (n.find("no GPU is available") != std::string::npos) {
        return true;
      }
    }
    return false;
  };
  Outcome mixed = run(0.5, 1);
  size_t gpu_sgs = 0;
  for (uint8_t x : mixed.on_gpu) gpu_sgs += x;
  ASSERT_GT(gpu_sgs, 0u);
  EXPECT_FALSE(says_no_gpu(mixed)) << "the GPU took " << gpu_sgs << " sub-groups";

  // Without an injected updater the answer is the CUDA runtime's.
  std::vector<float> host(5000, 0.5f), device(5000, 0.f);
  EngineOptions o;
  o.config = config(0.5);
  ParamInfo p{"w", int64_t(host.size()), kernels::DType::kF32, 0, host.data()};
  p.device_data = device.data();
  o.params = {p};
  o.groups = {hypers()[0]};
  auto r = Engine::create(std::move(o));
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  bool any_gpu = false;
  for (uint32_t sg = 0; sg < r.value()->subgroups().size(); ++sg) {
    any_gpu = any_gpu || r.value()->gpu_updated(sg);
  }
  Outcome plain;
  plain.notes = r.value()->plan().notes;
  if (!cuda::cuda_available().ok()) {
    EXPECT_FALSE(any_gpu);
    EXPECT_TRUE(says_no_gpu(plain)) << cuda::cuda_available().to_string();
  } else {
    EXPECT_FALSE(says_no_gpu(plain)) << "a device is here";
  }
  ASSERT_TRUE(r.value()->close().ok());
}
