// The discrete-event simulator of a step, fed with rates (no timing here).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include <strata/engine/simulator.h>

namespace strata::engine {
namespace {

using kernels::DType;
using tiers::TierKind;

HardwareProfile machine() {
  HardwareProfile hw;
  hw.cpu_update_params_per_s = 1e9;
  hw.cpu_update_params_per_s_half = 1e9;
  hw.cpu_update_params_per_s_1thread = 0.5e9;
  hw.cpu_threads = 2;
  hw.checksum_bytes_per_s = 10e9;
  hw.nvme_read_bytes_per_s = 2e9;
  hw.nvme_write_bytes_per_s = 4e9;
  return hw;
}

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
  s.io_block_bytes = 1 << 20;
  s.io_queue_depth = 8;
  return s;
}

struct Events {
  std::map<int, std::vector<SimEvent>> by_sg;
  explicit Events(const SimResult& r) {
    for (const auto& e : r.events) {
      by_sg[e.subgroup].push_back(e);
    }
  }
  const SimEvent* find(int sg, EventKind kind, const char* resource = nullptr) const {
    auto it = by_sg.find(sg);
    if (it == by_sg.end()) {
      return nullptr;
    }
    for (const auto& e : it->second) {
      if (e.kind == kind && (!resource || std::string(resource) == e.resource)) {
        return &e;
      }
    }
    return nullptr;
  }
};

TEST(Simulator, OneBufferIsFullySerial) {
  const HardwareProfile hw = machine();
  const StepShape shape = shape_of(4, 10'000'000, TierKind::kNvme, 1);
  auto r = simulate_step(hw, shape, all_cpu_schedule(4));
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  // read 0.06 + verify 0.006 + update 0.01 + write 0.03 each (checksums over both threads:
  // 2x the one-thread 10 GB/s, as the update scales; the store's hash of the chunks the
  // update just wrote reads them from cache and is not counted).
  EXPECT_NEAR(r->step_s, 4 * 0.106, 1e-6);
  EXPECT_NEAR(r->step_s - r->updates_done_s, 0.03, 1e-6);
  EXPECT_NEAR(r->nvme_busy_s, 4 * 0.09, 1e-6);
  EXPECT_NEAR(r->cpu_busy_s, 4 * 0.016, 1e-6);
  EXPECT_EQ(r->io_requests, 4u * 2u * 115u);  // 120 MB = 114.4 MiB -> 115 block requests each way
}

TEST(Simulator, EverySubGroupIsFetchedUpdatedAndStoredOnceInOrder) {
  const HardwareProfile hw = machine();
  const StepShape shape = shape_of(7, 10'000'000, TierKind::kNvme, 3);
  auto r = simulate_step(hw, shape, all_cpu_schedule(7));
  ASSERT_TRUE(r.ok());
  Events ev(r.value());
  for (int sg = 0; sg < 7; ++sg) {
    ASSERT_EQ(ev.by_sg[sg].size(), 3u) << "sub-group " << sg;
    const SimEvent* f = ev.find(sg, EventKind::kFetch);
    const SimEvent* u = ev.find(sg, EventKind::kUpdate);
    const SimEvent* s = ev.find(sg, EventKind::kStore);
    ASSERT_TRUE(f && u && s);
    EXPECT_LE(f->end_s, u->start_s + 1e-12);
    EXPECT_LE(u->end_s, s->start_s + 1e-12);
    EXPECT_LE(s->start_s, s->end_s);
  }
  // At most buffer_count records are held at once (fetch submit .. store end).
  std::vector<std::pair<double, int>> edges;
  for (int sg = 0; sg < 7; ++sg) {
    edges.push_back({ev.find(sg, EventKind::kFetch)->start_s, +1});
    edges.push_back({ev.find(sg, EventKind::kStore)->end_s, -1});
  }
  std::sort(edges.begin(), edges.end());
  int held = 0, most = 0;
  for (const auto& [t, d] : edges) {
    held += d;
    most = std::max(most, held);
  }
  EXPECT_LE(most, 3);
}

TEST(Simulator, AgreesWithTheModelOnAPipelinedStep) {
  HardwareProfile hw = machine();
  for (double cpu_rate : {1e9, 0.1e9}) {  // I/O-bound, then CPU-bound
    hw.cpu_update_params_per_s = hw.cpu_update_params_per_s_half = cpu_rate;
    const StepShape shape = shape_of(12, 10'000'000, TierKind::kNvme, 4);
    auto r = simulate_step(hw, shape, all_cpu_schedule(12));
    ASSERT_TRUE(r.ok());
    const Prediction p = predict_step(hw, shape, all_cpu_schedule(12));
    EXPECT_NEAR(r->step_s, p.step_s, 0.05 * p.step_s) << "cpu rate " << cpu_rate;
    EXPECT_NEAR(r->updates_done_s, p.updates_done_s, 0.05 * p.updates_done_s);
  }
}

TEST(Simulator, ChecksumsAndABusyCpuCostTime) {
  HardwareProfile hw = machine();
  hw.checksum_bytes_per_s = 1e9;  // 0.06 s per hash on both threads: the CPU is the bottleneck
  StepShape shape = shape_of(8, 10'000'000, TierKind::kNvme);
  const double with = simulate_step(hw, shape, all_cpu_schedule(8)).value().step_s;
  shape.checksums = false;
  const double without = simulate_step(hw, shape, all_cpu_schedule(8)).value().step_s;
  // The verification and the update in sequence on the pipeline thread's pool: 0.07 s per
  // sub-group, against the drive's 0.09 s (a hash rate of 0.5e9 makes the CPU the bottleneck
  // at 0.13 s).
  EXPECT_GE(with, without);
  hw.checksum_bytes_per_s = 0.5e9;
  shape.checksums = true;
  const double slow_hash = simulate_step(hw, shape, all_cpu_schedule(8)).value().step_s;
  EXPECT_GE(slow_hash, 8 * (0.12 + 0.01));
  EXPECT_GT(slow_hash, without + 8 * (0.13 - 0.09) - 1e-6);
  hw.checksum_bytes_per_s = 1e9;
  shape.checksums = false;
  // The drive halves while the update threads run (0.05 s per update here).
  hw.cpu_update_params_per_s = hw.cpu_update_params_per_s_half = 0.2e9;
  const double busy_free = simulate_step(hw, shape, all_cpu_schedule(8)).value().step_s;
  hw.nvme_cpu_busy_factor = 0.5;
  const double slowed = simulate_step(hw, shape, all_cpu_schedule(8)).value().step_s;
  EXPECT_GT(slowed, busy_free + 0.1);
}

TEST(Simulator, DuplexRateSpeedsUpMixedTraffic) {
  HardwareProfile hw = machine();
  hw.checksum_bytes_per_s = 0;
  hw.cpu_update_params_per_s = hw.cpu_update_params_per_s_half = 100e9;  // I/O-bound
  StepShape shape = shape_of(16, 2'000'000, TierKind::kNvme, 6);
  shape.io_queue_depth = 64;  // the ring's window spans several records
  const double shared = simulate_step(hw, shape, all_cpu_schedule(16)).value().step_s;
  hw.nvme_duplex_bytes_per_s = 5e9;  // reads and writes overlap on the drive
  const double duplex = simulate_step(hw, shape, all_cpu_schedule(16)).value().step_s;
  EXPECT_LT(duplex, shared * 0.97);
  // Never faster than the read or the write stream alone.
  EXPECT_GE(duplex, 16 * 24e6 / 4e9);
}

TEST(Simulator, EagerOverlapUpdatesDuringBackward) {
  const HardwareProfile hw = machine();
  const StepShape shape = shape_of(8, 10'000'000, TierKind::kNvme);
  Schedule eager = all_cpu_schedule(8);
  eager.overlap = OverlapMode::kEager;
  eager.backward_threads = 1;
  SimOptions so;
  so.backward_s = 2.0;
  auto r = simulate_step(hw, shape, eager, so);
  ASSERT_TRUE(r.ok());
  Events ev(r.value());
  // Sub-group 0 is ready at 0.25 s and is done long before backward ends.
  const SimEvent* f0 = ev.find(0, EventKind::kFetch);
  const SimEvent* u0 = ev.find(0, EventKind::kUpdate);
  ASSERT_TRUE(f0 && u0);
  EXPECT_NEAR(f0->start_s, 0.25, 1e-9);
  EXPECT_LT(u0->end_s, 1.0);
  // During backward the update uses one thread (0.5e9/s): 20 ms for 10M.
  EXPECT_NEAR(u0->end_s - u0->start_s, 0.02, 1e-9);
  // After backward only the last sub-group remains.
  Schedule off = all_cpu_schedule(8);
  auto r_off = simulate_step(hw, shape, off, so);
  ASSERT_TRUE(r_off.ok());
  EXPECT_LT(r->exposed_s, 0.3 * r_off->exposed_s);
  EXPECT_GT(r->exposed_s, 0.06 + 0.01);  // at least the last read and update
  EXPECT_NEAR(r_off->iteration_s, 2.0 + r_off->exposed_s, 1e-9);
}

TEST(Simulator, ExactOverlapOnlyPrefetchesDuringBackward) {
  HardwareProfile hw = machine();
  hw.grad_stats_params_per_s = 20e9;
  const StepShape shape = shape_of(8, 10'000'000, TierKind::kNvme, 4);
  Schedule exact = all_cpu_schedule(8);
  exact.overlap = OverlapMode::kExact;
  SimOptions so;
  so.backward_s = 2.0;
  auto r = simulate_step(hw, shape, exact, so);
  ASSERT_TRUE(r.ok());
  Events ev(r.value());
  int fetched_before = 0;
  for (int sg = 0; sg < 8; ++sg) {
    const SimEvent* u = ev.find(sg, EventKind::kUpdate);
    ASSERT_TRUE(u);
    EXPECT_GE(u->start_s, 2.0) << "update of sub-group " << sg << " before backward ended";
    const SimEvent* f = ev.find(sg, EventKind::kFetch);
    ASSERT_TRUE(f);
    fetched_before += f->start_s < 2.0;
  }
  EXPECT_EQ(fetched_before, 4);  // buffer_count records prefetched
  Schedule off = all_cpu_schedule(8);
  auto r_off = simulate_step(hw, shape, off, so);
  ASSERT_TRUE(r_off.ok());
  EXPECT_LT(r->exposed_s, r_off->exposed_s - 3 * 0.06 + 0.01);  // about the prefetched reads saved
  // The write-back of the last records hides behind a long enough forward.
  so.forward_s = 1.0;
  auto r_fwd = simulate_step(hw, shape, exact, so);
  ASSERT_TRUE(r_fwd.ok());
  EXPECT_NEAR(r_fwd->exposed_s, r_fwd->updates_done_s, 1e-12);
  EXPECT_GT(r_fwd->step_s, r_fwd->updates_done_s);
}

TEST(Simulator, StreamedGpuSubGroupsCrossPcieAfterBackward) {
  HardwareProfile hw = machine();
  hw.gpu_update_params_per_s = 10e9;
  hw.h2d_bytes_per_s = hw.d2h_bytes_per_s = 25e9;
  hw.gpu_free_bytes = uint64_t(4) << 30;
  const StepShape shape = shape_of(6, 10'000'000, TierKind::kNvme);
  Schedule s = interleave_schedule(6, 2, true);  // sub-groups 1, 3, 5 on the GPU
  s.overlap = OverlapMode::kEager;
  SimOptions so;
  so.backward_s = 1.0;
  auto r = simulate_step(hw, shape, s, so);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  Events ev(r.value());
  for (int sg = 0; sg < 6; ++sg) {
    if (sg % 2 == 1) {
      const SimEvent* h = ev.find(sg, EventKind::kH2D);
      const SimEvent* g = ev.find(sg, EventKind::kUpdate, "gpu");
      const SimEvent* d = ev.find(sg, EventKind::kD2H);
      const SimEvent* st = ev.find(sg, EventKind::kStore);
      ASSERT_TRUE(h && g && d && st) << sg;
      EXPECT_GE(g->start_s, 1.0);  // the GPU runs backward until then
      EXPECT_LE(h->end_s, g->start_s + 1e-12);
      EXPECT_LE(g->end_s, d->start_s + 1e-12);
      EXPECT_GE(st->start_s, d->end_s - 1e-12);  // stored after the D2H
      EXPECT_EQ(ev.find(sg, EventKind::kUpdate, "cpu"), nullptr);
    } else {
      EXPECT_NE(ev.find(sg, EventKind::kUpdate, "cpu"), nullptr);
      EXPECT_EQ(ev.find(sg, EventKind::kH2D), nullptr);
    }
  }
}

TEST(Simulator, ResidentStateOnlyUpdates) {
  const HardwareProfile hw = machine();
  const StepShape shape = shape_of(5, 10'000'000, TierKind::kHost);
  auto r = simulate_step(hw, shape, all_cpu_schedule(5));
  ASSERT_TRUE(r.ok());
  EXPECT_NEAR(r->step_s, 5 * 0.01, 1e-9);
  EXPECT_EQ(r->io_requests, 0u);
}

TEST(Simulator, RefusesWhatTheProfileCannotRun) {
  const HardwareProfile hw = machine();
  const StepShape shape = shape_of(4, 10'000'000, TierKind::kNvme);
  auto gpu = simulate_step(hw, shape, interleave_schedule(4, 2, true));
  ASSERT_FALSE(gpu.ok());
  EXPECT_EQ(gpu.status().code(), StatusCode::kInvalidArgument);
  Schedule wrong = all_cpu_schedule(3);
  EXPECT_FALSE(simulate_step(hw, shape, wrong).ok());
  HardwareProfile no_nvme = hw;
  no_nvme.nvme_read_bytes_per_s = 0;
  EXPECT_FALSE(simulate_step(no_nvme, shape, all_cpu_schedule(4)).ok());
}

TEST(Simulator, JsonCarriesTimesAndEvents) {
  const HardwareProfile hw = machine();
  const StepShape shape = shape_of(2, 1'000'000, TierKind::kNvme);
  auto r = simulate_step(hw, shape, all_cpu_schedule(2));
  ASSERT_TRUE(r.ok());
  const auto j = r->to_json(true);
  EXPECT_DOUBLE_EQ(j["step_s"].get<double>(), r->step_s);
  EXPECT_EQ(j["events"].size(), r->events.size());
  EXPECT_EQ(j["events"][0]["kind"], "fetch");
  EXPECT_FALSE(r->to_json(false).contains("events"));
}

}  // namespace
}  // namespace strata::engine
