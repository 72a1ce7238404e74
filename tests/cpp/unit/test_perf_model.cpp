// The performance model and the scheduler, fed with rates (no timing here).
#include <gtest/gtest.h>

#include <unistd.h>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include <strata/config.h>
#include <strata/engine/perf_model.h>

namespace strata::engine {
namespace {

using kernels::DType;
using tiers::TierKind;

// A CPU-only machine: 2 threads at 1e9 params/s (0.5e9 on one thread),
// XXH3 at 10 GB/s, NVMe 2 GB/s read, 4 GB/s write.
HardwareProfile cpu_machine() {
  HardwareProfile hw;
  hw.name = "test cpu";
  hw.cpu_update_params_per_s = 1e9;
  hw.cpu_update_params_per_s_half = 1e9;
  hw.cpu_update_params_per_s_1thread = 0.5e9;
  hw.cpu_threads = 2;
  hw.checksum_bytes_per_s = 10e9;
  hw.nvme_read_bytes_per_s = 2e9;
  hw.nvme_write_bytes_per_s = 4e9;
  return hw;
}

// n sub-groups of `numel` elements (12 bytes of AdamW state each) on `tier`.
StepShape shape_of(size_t n, size_t numel, TierKind tier, size_t buffers = 4) {
  StepShape s;
  for (size_t i = 0; i < n; ++i) {
    SubGroupLoad l;
    l.numel = numel;
    l.record_bytes = numel * 12;
    l.grad_dtype = DType::kBF16;
    l.tier = tier;
    s.subgroups.push_back(l);
  }
  s.buffer_count = buffers;
  s.checksums = true;
  return s;
}

TEST(HardwareProfile, JsonRoundTripKeepsEveryField) {
  HardwareProfile hw = cpu_machine();
  hw.cpu_update_io_factor = 0.8;
  hw.nvme_cpu_busy_factor = 0.7;
  hw.nvme_duplex_bytes_per_s = 5e9;
  hw.gpu_update_params_per_s = 50e9;
  hw.h2d_bytes_per_s = 25e9;
  hw.d2h_bytes_per_s = 24e9;
  hw.gpu_free_bytes = uint64_t(40) << 30;
  hw.pcie_duplex = false;
  hw.backward_seconds = 1.5;
  hw.forward_seconds = 0.5;
  hw.sources["nvme_read_bytes_per_s"] = "given: datasheet";
  auto back = hardware_profile_from_json(hardware_profile_to_json(hw), "mem");
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  const HardwareProfile& b = back.value();
  EXPECT_EQ(b.name, hw.name);
  EXPECT_DOUBLE_EQ(b.cpu_update_params_per_s, 1e9);
  EXPECT_DOUBLE_EQ(b.cpu_update_params_per_s_half, 1e9);
  EXPECT_DOUBLE_EQ(b.cpu_update_params_per_s_1thread, 0.5e9);
  EXPECT_EQ(b.cpu_threads, 2u);
  EXPECT_DOUBLE_EQ(b.cpu_update_io_factor, 0.8);
  EXPECT_DOUBLE_EQ(b.nvme_cpu_busy_factor, 0.7);
  EXPECT_DOUBLE_EQ(b.nvme_duplex_bytes_per_s, 5e9);
  EXPECT_DOUBLE_EQ(b.h2d_bytes_per_s, 25e9);
  EXPECT_DOUBLE_EQ(b.d2h_bytes_per_s, 24e9);
  EXPECT_EQ(b.gpu_free_bytes, uint64_t(40) << 30);
  EXPECT_FALSE(b.pcie_duplex);
  EXPECT_DOUBLE_EQ(b.backward_seconds, 1.5);
  EXPECT_DOUBLE_EQ(b.forward_seconds, 0.5);
  EXPECT_EQ(b.sources.at("nvme_read_bytes_per_s"), "given: datasheet");
  EXPECT_TRUE(b.has_gpu());
}

TEST(HardwareProfile, ErrorsNameTheOriginAndTheKey) {
  using nlohmann::json;
  auto bad_value = hardware_profile_from_json(json{{"nvme_read_bytes_per_s", -1}}, "p.json");
  ASSERT_FALSE(bad_value.ok());
  EXPECT_NE(bad_value.status().message().find("hardware profile p.json: nvme_read_bytes_per_s"),
            std::string::npos)
      << bad_value.status().message();
  auto bad_type = hardware_profile_from_json(json{{"cpu_threads", "two"}}, "p.json");
  ASSERT_FALSE(bad_type.ok());
  EXPECT_NE(bad_type.status().message().find("cpu_threads"), std::string::npos);
  auto unknown = hardware_profile_from_json(json{{"nvme_speed", 1}}, "p.json");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("unknown key \"nvme_speed\""), std::string::npos);
  auto dtype =
      hardware_profile_from_json(json{{"cpu_update_params_per_s", {{"int8", 1e9}}}}, "p.json");
  ASSERT_FALSE(dtype.ok());
  EXPECT_NE(dtype.status().message().find("cpu_update_params_per_s.int8"), std::string::npos);
  auto gpu_half = hardware_profile_from_json(json{{"h2d_bytes_per_s", 25e9}}, "p.json");
  ASSERT_FALSE(gpu_half.ok());
  EXPECT_NE(gpu_half.status().message().find("gpu_update_params_per_s"), std::string::npos);
  auto factor = hardware_profile_from_json(json{{"nvme_cpu_busy_factor", 1.5}}, "p.json");
  ASSERT_FALSE(factor.ok());
  EXPECT_NE(factor.status().message().find("nvme_cpu_busy_factor"), std::string::npos);
  auto by_dtype = hardware_profile_from_json(
      json{{"cpu_update_params_per_s", {{"fp32", 1e9}, {"bf16", 2e9}}}}, "p");
  ASSERT_TRUE(by_dtype.ok());
  EXPECT_DOUBLE_EQ(by_dtype->cpu_rate(DType::kF32), 1e9);
  EXPECT_DOUBLE_EQ(by_dtype->cpu_rate(DType::kBF16), 2e9);
}

TEST(HardwareProfile, LoadAndSaveFiles) {
  char tmpl[] = "/tmp/strata-profile-XXXXXX";
  int fd = mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  close(fd);
  const std::string path = tmpl;
  ASSERT_TRUE(save_hardware_profile(cpu_machine(), path).ok());
  auto back = load_hardware_profile(path);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_DOUBLE_EQ(back->nvme_write_bytes_per_s, 4e9);
  {
    std::ofstream f(path, std::ios::trunc);
    f << "{ \"cpu_threads\": 2, ";  // truncated JSON
  }
  auto broken = load_hardware_profile(path);
  ASSERT_FALSE(broken.ok());
  EXPECT_NE(broken.status().message().find(path), std::string::npos);
  unlink(path.c_str());
  auto missing = load_hardware_profile(path);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
}

TEST(HardwareProfile, CpuRateScalesWithThreadsUpToTheAllThreadRate) {
  HardwareProfile hw = cpu_machine();
  hw.cpu_threads = 8;
  hw.cpu_update_params_per_s = 2e9;
  hw.cpu_update_params_per_s_half = 3e9;
  hw.cpu_update_params_per_s_1thread = 0.4e9;
  EXPECT_DOUBLE_EQ(hw.cpu_rate(DType::kF32, 1), 0.4e9);
  EXPECT_DOUBLE_EQ(hw.cpu_rate(DType::kF32, 2), 0.8e9);
  EXPECT_DOUBLE_EQ(hw.cpu_rate(DType::kF32, 7), 2e9);  // memory-bound: capped
  EXPECT_DOUBLE_EQ(hw.cpu_rate(DType::kF32), 2e9);
  EXPECT_DOUBLE_EQ(hw.cpu_rate(DType::kBF16, 1), 0.6e9);  // one thread, bf16 speed-up kept
}

TEST(HardwareProfile, ChecksumRateScalesLikeTheUpdate) {
  HardwareProfile hw = cpu_machine();
  hw.cpu_threads = 8;
  hw.cpu_update_params_per_s = 2e9;
  hw.cpu_update_params_per_s_1thread = 0.4e9;
  hw.checksum_bytes_per_s = 10e9;
  EXPECT_DOUBLE_EQ(hw.checksum_rate(1), 10e9);
  EXPECT_DOUBLE_EQ(hw.checksum_rate(2), 20e9);
  EXPECT_DOUBLE_EQ(hw.checksum_rate(), 50e9);  // the update's 5x from one thread to all
  hw.checksum_bytes_per_s = 0;
  EXPECT_DOUBLE_EQ(hw.checksum_rate(), 0);
}

TEST(PerfModel, OneBufferRunsEverySubGroupInSequence) {
  const HardwareProfile hw = cpu_machine();
  const StepShape shape = shape_of(5, 10'000'000, TierKind::kNvme, /*buffers=*/1);
  const Prediction p = predict_step(hw, shape, all_cpu_schedule(5));
  ASSERT_TRUE(p.feasible) << p.infeasible_reason;
  // read 0.06 + verify 0.006 + update 0.01 + write 0.03 each (checksums: 120 MB at 10 GB/s on
  // one thread, over two threads that scale as the update does: 2x; the store's hash reads
  // the chunks the update just wrote from cache and is not counted).
  EXPECT_NEAR(p.step_s, 5 * (0.06 + 0.006 + 0.01 + 0.03), 1e-9);
  EXPECT_NEAR(p.step_s - p.updates_done_s, 0.03, 1e-9);  // the last write-back drains after
  EXPECT_EQ(p.bound, "nvme");
}

TEST(PerfModel, PipelinedStepIsTheBusiestResourcePlusFillAndDrain) {
  HardwareProfile hw = cpu_machine();
  hw.checksum_bytes_per_s = 0;
  // I/O-bound: reads 0.06 s and writes 0.03 s per sub-group, updates 0.01 s.
  const StepShape io = shape_of(16, 10'000'000, TierKind::kNvme);
  const Prediction pio = predict_step(hw, io, all_cpu_schedule(16));
  const double io_total = 16 * (0.06 + 0.03);
  EXPECT_GE(pio.step_s, io_total - 1e-9);
  EXPECT_LE(pio.step_s, io_total + 0.06 + 0.01 + 1e-9);
  EXPECT_EQ(pio.bound, "nvme");
  // CPU-bound: the same sub-groups with a 40x slower CPU (0.4 s per update).
  hw.cpu_update_params_per_s = hw.cpu_update_params_per_s_half = 25e6;
  const Prediction pcpu = predict_step(hw, io, all_cpu_schedule(16));
  const double cpu_total = 16 * 0.4;
  EXPECT_GE(pcpu.step_s, 0.06 + cpu_total + 0.03 - 1e-9);  // fill + updates + drain
  EXPECT_LE(pcpu.step_s, 0.06 + cpu_total + 0.03 + 0.1);
  EXPECT_EQ(pcpu.bound, "cpu");
  // Resident (DRAM) state: only the updates.
  const StepShape host = shape_of(16, 10'000'000, TierKind::kHost);
  const Prediction ph = predict_step(hw, host, all_cpu_schedule(16));
  EXPECT_NEAR(ph.step_s, cpu_total, 1e-9);
}

TEST(PerfModel, TwoBuffersHideOnlyTheSecondInitialFetch) {
  HardwareProfile hw = cpu_machine();
  hw.checksum_bytes_per_s = 0;
  hw.cpu_update_params_per_s = hw.cpu_update_params_per_s_half = 0.2e9;  // 0.05 s per update
  const StepShape s2 = shape_of(6, 10'000'000, TierKind::kNvme, 2);
  const StepShape s4 = shape_of(6, 10'000'000, TierKind::kNvme, 4);
  const StepShape s1 = shape_of(6, 10'000'000, TierKind::kNvme, 1);
  const double t1 = predict_step(hw, s1, all_cpu_schedule(6)).step_s;
  const double t2 = predict_step(hw, s2, all_cpu_schedule(6)).step_s;
  const double t4 = predict_step(hw, s4, all_cpu_schedule(6)).step_s;
  // With lag-1 refill and one FIFO ring, the third fetch queues behind the
  // second store: two buffers gain almost nothing over one; four overlap.
  EXPECT_LT(t2, t1);
  EXPECT_GT(t2, t1 - 0.1);
  EXPECT_LT(t4, t2 - 0.03);
}

TEST(PerfModel, OverlapHidesWorkBehindBackward) {
  HardwareProfile hw = cpu_machine();
  const StepShape shape = shape_of(8, 10'000'000, TierKind::kNvme);
  PredictOptions po;
  po.backward_s = 2.0;
  Schedule off = all_cpu_schedule(8);
  Schedule eager = off;
  eager.overlap = OverlapMode::kEager;
  Schedule exact = off;
  exact.overlap = OverlapMode::kExact;
  const Prediction p_off = predict_step(hw, shape, off, po);
  const Prediction p_eager = predict_step(hw, shape, eager, po);
  const Prediction p_exact = predict_step(hw, shape, exact, po);
  // Without overlap everything is exposed; eager leaves about one sub-group's
  // fetch + update + store; exact saves the prefetched reads.
  EXPECT_NEAR(p_off.exposed_s, p_off.updates_done_s + (p_off.step_s - p_off.updates_done_s), 1e-12);
  EXPECT_LT(p_eager.exposed_s, 0.35 * p_off.exposed_s);
  EXPECT_LT(p_exact.exposed_s, p_off.exposed_s);
  EXPECT_GT(p_exact.exposed_s, p_eager.exposed_s);
  EXPECT_NEAR(p_off.iteration_s, 2.0 + p_off.exposed_s, 1e-12);
  // Write-back hidden by a long enough forward.
  po.forward_s = 5.0;
  const Prediction p_fwd = predict_step(hw, shape, off, po);
  EXPECT_NEAR(p_fwd.exposed_s, p_fwd.updates_done_s, 1e-12);
}

TEST(PerfModel, EagerUpdatesDuringBackwardUseTheBackwardThreads) {
  HardwareProfile hw = cpu_machine();
  hw.cpu_update_params_per_s_1thread = 0.05e9;  // one thread is 20x slower
  const StepShape shape = shape_of(4, 100'000'000, TierKind::kHost);
  PredictOptions po;
  po.backward_s = 4.0;
  Schedule eager = all_cpu_schedule(4);
  eager.overlap = OverlapMode::kEager;
  eager.backward_threads = 1;
  const Prediction slow = predict_step(hw, shape, eager, po);
  eager.backward_threads = 2;
  const Prediction fast = predict_step(hw, shape, eager, po);
  // Ready at 1, 2, 3, 4 s; 2 s of work each on one thread (0.1 s on two):
  // one thread falls behind and finishes the last three after backward.
  EXPECT_GT(slow.exposed_s, fast.exposed_s + 0.05);
  EXPECT_NEAR(fast.exposed_s, 0.1, 1e-9);
}

// A GPU 10x faster than the CPU, PCIe 25 GB/s each way, state in DRAM.
HardwareProfile gpu_machine() {
  HardwareProfile hw = cpu_machine();
  hw.gpu_update_params_per_s = 10e9;
  hw.h2d_bytes_per_s = 25e9;
  hw.d2h_bytes_per_s = 25e9;
  hw.gpu_free_bytes = uint64_t(16) << 30;
  return hw;
}

TEST(Scheduler, GapKBalancesTheCpuAndTheGpu) {
  const HardwareProfile hw = gpu_machine();
  const size_t n = 60;
  const StepShape shape = shape_of(n, 10'000'000, TierKind::kHost);
  ChooseOptions o;
  o.overlap_allowed = false;
  auto choice = choose_schedule(hw, shape, o);
  ASSERT_TRUE(choice.ok()) << choice.status().to_string();
  const Schedule& s = choice->chosen;
  ASSERT_GT(s.gap_k, 0) << s.name;
  // The GPU path is PCIe-bound: 120 MB each way per sub-group at 25 GB/s is
  // 4.8 ms, and the CPU needs 10 ms per sub-group, so about 2/3 of the
  // sub-groups should go to the GPU: both sides then finish together.
  size_t cpu = 0;
  for (auto d : s.device) {
    cpu += d == UpdateDevice::kCpu;
  }
  const double cpu_time = double(cpu) * 0.01;
  const double gpu_time = double(n - cpu) * 0.0048;
  EXPECT_NEAR(cpu_time, gpu_time, 0.01 + 0.0048) << s.name;
  // Better than both ends.
  PredictOptions po;
  const double all_cpu = predict_step(hw, shape, all_cpu_schedule(n), po).exposed_s;
  const double all_gpu = predict_step(hw, shape, interleave_schedule(n, 1, true), po).exposed_s;
  EXPECT_LT(choice->prediction.exposed_s, 0.45 * all_cpu);
  EXPECT_LT(choice->prediction.exposed_s, all_gpu);
  // Every k of both families was evaluated.
  size_t gaps = 0;
  for (const auto& c : choice->candidates) {
    gaps += c.schedule.gap_k > 0;
  }
  EXPECT_EQ(gaps, 60u + 59u);
}

TEST(Scheduler, ASlowLinkKeepsWorkOnTheCpu) {
  HardwareProfile hw = gpu_machine();
  hw.h2d_bytes_per_s = hw.d2h_bytes_per_s = 1e9;  // 120 ms each way per sub-group
  const StepShape shape = shape_of(12, 10'000'000, TierKind::kHost);
  ChooseOptions o;
  o.overlap_allowed = false;
  auto choice = choose_schedule(hw, shape, o);
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->chosen.name, "all-cpu");
}

TEST(Scheduler, NoGpuMeansAllCpu) {
  const HardwareProfile hw = cpu_machine();
  const StepShape shape = shape_of(8, 10'000'000, TierKind::kNvme);
  ChooseOptions o;
  o.ratio = 0.5;
  o.predict.backward_s = 1.0;
  auto choice = choose_schedule(hw, shape, o);
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->chosen.name, "all-cpu");
  EXPECT_DOUBLE_EQ(choice->chosen.cpu_fraction(), 1.0);
  EXPECT_EQ(choice->chosen.overlap, OverlapMode::kEager);  // backward hides I/O
  bool noted = false;
  for (const auto& n : choice->notes) {
    noted = noted || n.find("no GPU") != std::string::npos;
  }
  EXPECT_TRUE(noted);
  // A GPU schedule asked for on a machine without one is infeasible.
  EXPECT_FALSE(predict_step(hw, shape, interleave_schedule(8, 2, true)).feasible);
}

TEST(Scheduler, OverlapIsChosenWhenBackwardHidesIo) {
  const HardwareProfile hw = cpu_machine();
  const StepShape shape = shape_of(8, 10'000'000, TierKind::kNvme);
  ChooseOptions o;
  o.exact = true;  // clipping: exact mode
  o.predict.backward_s = 3.0;
  auto with = choose_schedule(hw, shape, o);
  ASSERT_TRUE(with.ok());
  EXPECT_EQ(with->chosen.overlap, OverlapMode::kExact);
  o.overlap_allowed = false;  // strata.overlap_backward: false
  auto without = choose_schedule(hw, shape, o);
  ASSERT_TRUE(without.ok());
  EXPECT_EQ(without->chosen.overlap, OverlapMode::kOff);
  EXPECT_GT(without->prediction.exposed_s, with->prediction.exposed_s);
}

TEST(Scheduler, GpuMemoryLimitsAreRespected) {
  HardwareProfile hw = gpu_machine();
  const StepShape shape = shape_of(10, 10'000'000, TierKind::kHost);  // 120 MB records
  // Room for one record only: streaming needs two (double buffering).
  hw.gpu_free_bytes = 200'000'000;
  EXPECT_FALSE(predict_step(hw, shape, interleave_schedule(10, 2, true)).feasible);
  // Twin-Flow's static ratio keeps state resident: 5 records = 600 MB.
  EXPECT_FALSE(predict_step(hw, shape, static_ratio_schedule(10, 0.5)).feasible);
  hw.gpu_free_bytes = 700'000'000;
  EXPECT_TRUE(predict_step(hw, shape, static_ratio_schedule(10, 0.5)).feasible);
  hw.gpu_free_bytes = 200'000'000;
  ChooseOptions o;
  o.ratio = 0.5;
  o.overlap_allowed = false;
  auto choice = choose_schedule(hw, shape, o);
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->chosen.name, "all-cpu");
  size_t infeasible = 0;
  for (const auto& c : choice->candidates) {
    if (!c.prediction.feasible) {
      ++infeasible;
      EXPECT_NE(c.prediction.infeasible_reason.find("gpu_free_bytes"), std::string::npos);
    }
  }
  EXPECT_GT(infeasible, 0u);
  // With room, every chosen schedule fits.
  hw.gpu_free_bytes = uint64_t(8) << 30;
  auto roomy = choose_schedule(hw, shape, o);
  ASSERT_TRUE(roomy.ok());
  EXPECT_TRUE(roomy->prediction.feasible);
  EXPECT_LT(roomy->chosen.cpu_fraction(), 1.0);
}

TEST(Scheduler, StaticKeepsTheConfiguredRatio) {
  const HardwareProfile hw = gpu_machine();
  const StepShape shape = shape_of(8, 10'000'000, TierKind::kHost);
  ChooseOptions o;
  o.auto_schedule = false;
  o.ratio = 0.75;
  o.overlap_allowed = false;
  auto choice = choose_schedule(hw, shape, o);
  ASSERT_TRUE(choice.ok());
  EXPECT_EQ(choice->candidates.size(), 1u);
  EXPECT_DOUBLE_EQ(choice->chosen.cpu_fraction(), 0.75);
  size_t resident = 0;
  for (auto d : choice->chosen.device) {
    resident += d == UpdateDevice::kGpuResident;
  }
  EXPECT_EQ(resident, 2u);
}

TEST(Scheduler, InterleaveFamilies) {
  const Schedule g3 = interleave_schedule(9, 3, true);
  const Schedule c3 = interleave_schedule(9, 3, false);
  for (size_t i = 0; i < 9; ++i) {
    const bool kth = (i + 1) % 3 == 0;
    EXPECT_EQ(g3.device[i] == UpdateDevice::kGpuStreamed, kth) << i;
    EXPECT_EQ(c3.device[i] == UpdateDevice::kCpu, kth) << i;
  }
  EXPECT_NEAR(g3.cpu_fraction(), 6.0 / 9.0, 1e-12);
  EXPECT_NEAR(c3.cpu_fraction(), 3.0 / 9.0, 1e-12);
}

TEST(Scheduler, OptionsFromConfig) {
  HardwareProfile gpu = gpu_machine();
  auto cfg =
      Config::parse(nlohmann::json{{"gradient_clipping", 1.0},
                                   {"zero_optimization", {{"offload_optimizer", {{"ratio", 0.6}}}}},
                                   {"strata", {{"threads", 8}}}});
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  ChooseOptions o = choose_options_from_config(cfg.value(), gpu);
  EXPECT_TRUE(o.auto_schedule);  // not given, GPU present
  EXPECT_TRUE(o.exact);          // clipping in exact mode
  EXPECT_DOUBLE_EQ(o.ratio, 0.6);
  EXPECT_TRUE(o.overlap_allowed);
  EXPECT_GE(o.backward_threads, 1u);
  ChooseOptions no_gpu = choose_options_from_config(cfg.value(), cpu_machine());
  EXPECT_FALSE(no_gpu.auto_schedule);
  auto cfg2 = Config::parse(
      nlohmann::json{{"strata", {{"schedule", "static"}, {"overlap_backward", false}}}});
  ASSERT_TRUE(cfg2.ok());
  ChooseOptions o2 = choose_options_from_config(cfg2.value(), gpu);
  EXPECT_FALSE(o2.auto_schedule);
  EXPECT_FALSE(o2.overlap_allowed);
  EXPECT_FALSE(o2.exact);
}

TEST(Scheduler, ShapeFromPlan) {
  auto cfg = Config::parse(
      nlohmann::json{{"zero_optimization",
                      {{"sub_group_size", 1 << 20},
                       {"offload_optimizer", {{"device", "cpu"}, {"buffer_count", 3}}}}},
                     {"strata", {{"verify_checksums", false}, {"dram_budget", int64_t(1) << 32}}}});
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  PlanInputs in;
  in.params = {PlanParam{int64_t(3) << 20, DType::kBF16, 0}};
  in.slots = {3};
  in.mem_available = uint64_t(8) << 30;
  auto plan = build_plan(cfg.value(), in);
  ASSERT_TRUE(plan.ok()) << plan.status().to_string();
  const StepShape s = step_shape_from_plan(plan.value(), cfg.value(), true);
  ASSERT_EQ(s.subgroups.size(), 3u);
  EXPECT_EQ(s.buffer_count, 3u);
  EXPECT_FALSE(s.checksums);
  EXPECT_TRUE(s.model_on_gpu);
  EXPECT_EQ(s.param_bytes, 2u);
  // Three fp32 slots of 1M elements, each skewed by less than 8 KiB (an odd page
  // count plus 1088 B, plan.cpp), rounded to 4 KiB.
  EXPECT_GE(s.subgroups[0].record_bytes, size_t(3) << 22);
  EXPECT_LT(s.subgroups[0].record_bytes, (size_t(3) << 22) + 7 * 4096);
  EXPECT_EQ(s.subgroups[0].record_bytes % 4096, 0u);
  EXPECT_EQ(s.total_numel(), size_t(3) << 20);
}

TEST(Scheduler, ChoiceRendersAsTableAndJson) {
  const HardwareProfile hw = gpu_machine();
  const StepShape shape = shape_of(6, 10'000'000, TierKind::kHost);
  ChooseOptions o;
  o.predict.backward_s = 0.5;
  auto choice = choose_schedule(hw, shape, o);
  ASSERT_TRUE(choice.ok());
  const std::string text = choice->to_string();
  EXPECT_NE(text.find("all-cpu"), std::string::npos);
  EXPECT_NE(text.find("*"), std::string::npos);
  const auto j = choice->to_json();
  EXPECT_EQ(j["chosen"]["name"], choice->chosen.name);
  EXPECT_EQ(j["candidates"].size(), choice->candidates.size());
  EXPECT_TRUE(j["prediction"]["feasible"].get<bool>());
}

}  // namespace
}  // namespace strata::engine
