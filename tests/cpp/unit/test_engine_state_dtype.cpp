// Compressed optimizer state in the engine: the config keys that choose it,
// the record layout and the bytes a step moves, the update against the
// kernel on the same format, and state access that round-trips the stored
// bits (what makes a checkpoint of decoded fp32 resume exactly).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <strata/engine/engine.h>
#include <strata/engine/plan.h>

#include <nlohmann/json.hpp>
#include "unit/test_io_common.h"

using namespace strata;
using namespace strata::engine;
using kernels::SlotDType;

namespace {

using io::test::TempDir;

Result<Config> parse(nlohmann::json j) { return Config::parse(j); }

nlohmann::json base(const std::string& device, const std::string& dir, int64_t sgs) {
  nlohmann::json off = {{"device", device}, {"buffer_count", 3}};
  if (!dir.empty()) {
    off["nvme_path"] = dir;
  }
  return {
      {"zero_optimization", {{"stage", 2}, {"sub_group_size", sgs}, {"offload_optimizer", off}}},
      {"aio", {{"block_size", 65536}, {"queue_depth", 8}}},
      {"strata", {{"threads", 2}}}};
}

Config config_with(const std::string& state, bool bf16_master, const std::string& device = "cpu",
                   const std::string& dir = "", int64_t sgs = 30000) {
  nlohmann::json j = base(device, dir, sgs);
  if (!state.empty()) {
    j["strata"]["optimizer_state_dtype"] = state;
  }
  if (bf16_master) {
    j["bf16"] = {{"enabled", true}, {"bf16_master_weights_and_grads", true}};
  }
  auto c = parse(j);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  return c.value();
}

kernels::OptimizerHyper adamw() {
  kernels::OptimizerHyper h;
  h.kind = kernels::OptimizerKind::kAdamW;
  h.lr = 1e-2;
  h.weight_decay = 0.01;
  return h;
}

// Many tensors per sub-group and one split across three sub-groups.
struct Model {
  std::vector<std::vector<float>> params;
  explicit Model(int count = 40) {
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.f, 0.5f);
    for (int i = 0; i < count; ++i) {
      size_t n = i == 13 ? 70001 : size_t(251 + 97 * i);
      std::vector<float> p(n);
      for (auto& x : p) x = nd(rng);
      params.push_back(std::move(p));
    }
  }
  std::vector<ParamInfo> infos() {
    std::vector<ParamInfo> out;
    for (size_t i = 0; i < params.size(); ++i) {
      out.push_back(ParamInfo{"p" + std::to_string(i), int64_t(params[i].size()),
                              kernels::DType::kF32, 0, params[i].data()});
    }
    return out;
  }
};

std::unique_ptr<Engine> make(Model& m, Config c) {
  EngineOptions o;
  o.config = std::move(c);
  o.params = m.infos();
  o.groups = {adamw()};
  auto r = Engine::create(std::move(o));
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

float grad_at(size_t k, int step) { return std::sin(float(k) * 0.37f + float(step)) * 0.2f; }

void step(Engine& e, int s) {
  float* g = static_cast<float*>(e.grad_arenas()[0].data);
  for (size_t k = 0; k < e.grad_arenas()[0].numel; ++k) {
    g[k] = grad_at(k, s);
  }
  ASSERT_TRUE(e.step().ok());
  ASSERT_TRUE(e.sync().ok());
}

std::vector<char> raw(Engine& e, const SubGroup& sg) {
  std::vector<float> buf(sg.record_bytes / 4);
  EXPECT_TRUE(e.read_record(sg.id, buf.data()).ok());
  std::vector<char> out(sg.record_bytes);
  std::memcpy(out.data(), buf.data(), sg.record_bytes);
  return out;
}

}  // namespace

TEST(EngineStateDType, ConfigFollowsDeepSpeedsSupportMatrix) {
  auto bad = [](nlohmann::json j, const std::string& want) {
    auto c = Config::parse(j);
    ASSERT_FALSE(c.ok()) << j.dump();
    EXPECT_NE(c.status().message().find(want), std::string::npos) << c.status().message();
  };
  nlohmann::json z = {{"stage", 2}};
  bad({{"bf16", {{"enabled", true}, {"bf16_optimizer_states", true}}}, {"zero_optimization", z}},
      "bf16.bf16_optimizer_states: true needs bf16.bf16_master_weights_and_grads");
  bad({{"bf16", {{"bf16_master_weights_and_grads", true}}}, {"zero_optimization", z}},
      "needs bf16.enabled");
  bad({{"bf16", {{"enabled", true}, {"bf16_master_weights_and_grads", true}}}},
      "zero_optimization.stage 1, 2 or 3");
  bad({{"bf16",
        {{"enabled", true},
         {"bf16_master_weights_and_grads", true},
         {"bf16_optimizer_states", true}}},
       {"zero_optimization", z},
       {"strata", {{"optimizer_state_dtype", "int8_blockwise"}}}},
      "contradicts bf16.bf16_optimizer_states");
  bad({{"strata", {{"optimizer_state_dtype", "fp8"}}}}, "strata.optimizer_state_dtype");

  auto ok = Config::parse({{"bf16",
                            {{"enabled", true},
                             {"bf16_master_weights_and_grads", true},
                             {"bf16_optimizer_states", true}}},
                           {"zero_optimization", z}});
  ASSERT_TRUE(ok.ok()) << ok.status().to_string();
  EXPECT_EQ(optimizer_state_dtype(ok.value().typed()), OptimizerStateDType::kBF16);
  EXPECT_TRUE(ok.value().typed().precision.bf16_master_weights_and_grads);
  auto dflt = Config::parse(nlohmann::json::object());
  ASSERT_TRUE(dflt.ok());
  EXPECT_EQ(optimizer_state_dtype(dflt.value().typed()), OptimizerStateDType::kF32);
}

TEST(EngineStateDType, PlanCountsTheStoredBytes) {
  struct Case {
    std::string state;
    bool bf16_master;
    double want;  // bytes per element of an AdamW record
  };
  const size_t n = size_t(1) << 22;
  for (const Case& c :
       {Case{"", false, 12.0}, Case{"fp32", false, 12.0}, Case{"bf16", false, 8.0},
        Case{"int8_blockwise", false, 4.0 + 2.0 * (1.0 + 4.0 / 256)}, Case{"bf16", true, 6.0}}) {
    Config cfg = config_with(c.state, c.bf16_master, "cpu", "", int64_t(n));
    PlanInputs in;
    in.params.push_back(PlanParam{int64_t(n), kernels::DType::kBF16, 0, false});
    in.slots = {3};
    in.mem_available = uint64_t(64) << 30;
    auto plan = build_plan(cfg, in);
    ASSERT_TRUE(plan.ok()) << plan.status().to_string();
    ASSERT_EQ(plan.value().subgroups.size(), 1u);
    const SubGroup& sg = plan.value().subgroups[0];
    const double per = double(sg.record_bytes) / double(n);
    EXPECT_GE(per, c.want) << c.state;
    EXPECT_LT(per, c.want + 0.01) << c.state;
    EXPECT_EQ(sg.record_bytes % 4096, 0u);
    EXPECT_EQ(sg.compressed, c.want < 12.0) << c.state;
    for (int k = 0; k < 3; ++k) {
      EXPECT_EQ(sg.slot_offset[size_t(k)] % 64, 0u);
    }
    EXPECT_NEAR(plan.value().state_bytes_per_element, c.want, 1e-9) << c.state;
  }
}

// The DRAM tier holds as much more state before it spills as the records
// are smaller: the same strata.dram_budget, device cpu with an nvme_path to
// spill to, 32M elements (sub_group_size 1M, capped by the plan to fit its
// working buffers in the budget).
TEST(EngineStateDType, DramTierHoldsMoreCompressedStateBeforeItSpills) {
  const int64_t sgs = int64_t(1) << 20;
  const uint64_t budget = uint64_t(128) << 20;  // 128 MiB: working buffers + some records
  struct Case {
    std::string state;
    double bytes_per_elem;
  };
  double host_fp32 = 0;
  for (const Case& c : {Case{"fp32", 12.0}, Case{"bf16", 8.0},
                        Case{"int8_blockwise", 4.0 + 2.0 * (1.0 + 4.0 / 256)}}) {
    nlohmann::json j = base("cpu", "/tmp/strata-plan-only", sgs);
    j["strata"]["optimizer_state_dtype"] = c.state;
    j["strata"]["dram_budget"] = budget;
    auto cfg = parse(j);
    ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
    PlanInputs in;
    for (int k = 0; k < 32; ++k) {
      in.params.push_back(PlanParam{sgs, kernels::DType::kBF16, 0, false});
    }
    in.slots = {3};
    in.mem_available = uint64_t(64) << 30;
    auto plan = build_plan(cfg.value(), in);
    ASSERT_TRUE(plan.ok()) << plan.status().to_string();
    double host = 0, nvme = 0;  // elements
    uint64_t host_bytes = 0;
    for (const SubGroup& sg : plan.value().subgroups) {
      if (sg.tier == tiers::TierKind::kHost) {
        host += double(sg.numel);
        host_bytes += sg.record_bytes;
      } else {
        EXPECT_EQ(sg.tier, tiers::TierKind::kNvme);
        nvme += double(sg.numel);
      }
    }
    EXPECT_LE(host_bytes, budget) << c.state;
    EXPECT_GT(nvme, 0) << c.state << ": the budget is meant to spill every dtype";
    std::printf("%-15s %5.1fM elements in DRAM (%s MiB), %5.1fM spilled to NVMe\n", c.state.c_str(),
                host / 1048576.0, std::to_string(host_bytes >> 20).c_str(), nvme / 1048576.0);
    if (c.state == "fp32") {
      host_fp32 = host;
      EXPECT_GT(host, 0);
    } else {
      // Same DRAM bytes, records 12 / bytes_per_elem times smaller: that many
      // times the elements in DRAM, less the working buffers' share and the
      // rounding to whole sub-groups (10%).
      EXPECT_GE(host, 0.9 * host_fp32 * 12.0 / c.bytes_per_elem) << c.state;
    }
  }
}

// On the CXL tier (a NUMA node's memory; planned only, node 0 here) a
// record takes the same compressed bytes as in DRAM.
TEST(EngineStateDType, CxlTierHoldsTheCompressedBytes) {
  const int64_t n = int64_t(1) << 22;
  for (const auto& [state, per] : {std::pair<std::string, double>{"fp32", 12.0},
                                   {"bf16", 8.0},
                                   {"int8_blockwise", 4.0 + 2.0 * (1.0 + 4.0 / 256)}}) {
    nlohmann::json j = base("cxl", "", n);
    j["strata"]["optimizer_state_dtype"] = state;
    j["strata"]["cxl_nodes"] = {0};
    auto cfg = parse(j);
    ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
    PlanInputs in;
    in.params.push_back(PlanParam{n, kernels::DType::kBF16, 0, false});
    in.slots = {3};
    in.mem_available = uint64_t(64) << 30;
    auto plan = build_plan(cfg.value(), in);
    ASSERT_TRUE(plan.ok()) << plan.status().to_string();
    const double got = double(plan.value().bytes_on(tiers::TierKind::kCxl)) / double(n);
    EXPECT_GE(got, per) << state;
    EXPECT_LT(got, per + 0.01) << state;
  }
}

TEST(EngineStateDType, AStepOnNvmeMovesTheCompressedBytes) {
  struct Case {
    std::string state;
    double max_per_param;  // bytes each way per parameter per step
  };
  for (const Case& c : {Case{"fp32", 12.05}, Case{"bf16", 8.05}, Case{"int8_blockwise", 6.1}}) {
    TempDir dir;
    Model m(40);
    m.params.resize(12);
    for (auto& p : m.params) p.resize(250001, 0.25f);  // 3M elements: sub-groups of 1M
    auto e = make(m, config_with(c.state, false, "nvme", dir.path(), 1 << 20));
    ASSERT_TRUE(e);
    uint64_t numel = 0;
    for (const auto& p : m.params) numel += p.size();
    step(*e, 1);
    const auto before = e->stats();
    step(*e, 2);
    const auto after = e->stats();
    const double fetched = double(after.bytes_fetched - before.bytes_fetched) / double(numel);
    const double stored = double(after.bytes_stored - before.bytes_stored) / double(numel);
    EXPECT_LE(fetched, c.max_per_param) << c.state;
    EXPECT_LE(stored, c.max_per_param) << c.state;
    EXPECT_GE(fetched, c.max_per_param - 0.5) << c.state << ": every record fetched once";
  }
}

// The engine's update of a compressed record is the kernel's on the same
// format: run the kernel by hand on each sub-group's own record.
TEST(EngineStateDType, UpdateIsTheKernelsOnTheSameFormat) {
  for (const char* state : {"bf16", "int8_blockwise"}) {
    for (bool bf16_master : {false, true}) {
      Model m;
      Model ref = m;
      auto e = make(m, config_with(state, bf16_master));
      ASSERT_TRUE(e);
      const auto& sgs = e->subgroups();
      // Reference records, laid out by the engine's own plan.
      std::vector<std::vector<float>> recs;
      for (const auto& sg : sgs) {
        recs.emplace_back(sg.record_bytes / 4);
        ASSERT_TRUE(e->read_record(sg.id, recs.back().data()).ok());
      }
      for (int s = 1; s <= 3; ++s) {
        step(*e, s);
        for (size_t i = 0; i < sgs.size(); ++i) {
          const SubGroup& sg = sgs[i];
          char* base = reinterpret_cast<char*>(recs[i].data());
          kernels::StateView v;
          v.n = sg.numel;
          for (int k = 0; k < 3; ++k) {
            v.dtype[k] = sg.slot_dtype[size_t(k)];
            char* at = base + sg.slot_offset[size_t(k)];
            if (v.dtype[k] == SlotDType::kF32) {
              v.slot[k] = reinterpret_cast<float*>(at);
            } else {
              v.packed[k] = at;
              v.scales[k] = reinterpret_cast<float*>(at + kernels::q8_scales_offset(sg.numel));
            }
          }
          std::vector<float> g(sg.numel);
          for (size_t k = 0; k < sg.numel; ++k) g[k] = grad_at(sg.grad_offset + k, s);
          kernels::StepArgs args;
          args.step = s;
          ASSERT_TRUE(kernels::optimizer_step(adamw(), args, v, g.data(), kernels::DType::kF32, {},
                                              kernels::DType::kF32, nullptr)
                          .ok());
        }
      }
      for (size_t i = 0; i < sgs.size(); ++i) {
        std::vector<char> got = raw(*e, sgs[i]);
        ASSERT_EQ(0, std::memcmp(got.data(), recs[i].data(), got.size()))
            << state << (bf16_master ? " bf16 master" : "") << ", sub-group " << i;
      }
      // The model's weights are the (rounded) masters.
      for (size_t p = 0; p < m.params.size(); ++p) {
        std::vector<float> master(m.params[p].size());
        ASSERT_TRUE(e->read_param_state(p, 0, master.data()).ok());
        ASSERT_EQ(0, std::memcmp(master.data(), m.params[p].data(), master.size() * 4)) << p;
        EXPECT_NE(0, std::memcmp(ref.params[p].data(), m.params[p].data(), master.size() * 4));
      }
    }
  }
}

// Reading every slot as fp32 and writing it back (what a checkpoint's save
// and load do) reproduces every stored bit, on the host tier and on NVMe.
TEST(EngineStateDType, StateAccessRoundTripsTheStoredBits) {
  for (const char* device : {"cpu", "nvme"}) {
    for (const char* state : {"bf16", "int8_blockwise"}) {
      TempDir dir;
      Model m;
      auto e = make(m, config_with(state, false, device, dir.path()));
      ASSERT_TRUE(e);
      for (int s = 1; s <= 3; ++s) step(*e, s);
      std::vector<std::vector<char>> before;
      for (const auto& sg : e->subgroups()) before.push_back(raw(*e, sg));
      // fp32 copies of every slot, by record.
      std::vector<std::vector<std::vector<float>>> saved(e->param_count());
      for (size_t p = 0; p < saved.size(); ++p) {
        saved[p].assign(3, std::vector<float>(e->param_numel(p)));
      }
      ASSERT_TRUE(e->read_records({}, [&](const Engine::RecordView& v) {
                     for (const auto& s : v.slices) {
                       for (int k = 0; k < v.slots; ++k) {
                         std::memcpy(saved[s.param][size_t(k)].data() + s.param_offset,
                                     v.data + size_t(k) * v.slot_stride + s.record_offset,
                                     s.numel * 4);
                       }
                     }
                     return Status::Ok();
                   }).ok());
      // Overwrite everything with something else, then load the copies back.
      for (size_t p = 0; p < saved.size(); ++p) {
        std::vector<float> junk(e->param_numel(p), 0.125f);
        ASSERT_TRUE(e->write_param_states(p, {junk.data(), junk.data(), junk.data()}).ok());
      }
      ASSERT_TRUE(e->write_records({}, true, [&](const Engine::RecordView& v) {
                     for (const auto& s : v.slices) {
                       for (int k = 0; k < v.slots; ++k) {
                         std::memcpy(v.data + size_t(k) * v.slot_stride + s.record_offset,
                                     saved[s.param][size_t(k)].data() + s.param_offset,
                                     s.numel * 4);
                       }
                     }
                     return Status::Ok();
                   }).ok());
      for (size_t i = 0; i < e->subgroups().size(); ++i) {
        std::vector<char> after = raw(*e, e->subgroups()[i]);
        ASSERT_EQ(0, std::memcmp(after.data(), before[i].data(), after.size()))
            << device << " " << state << ", sub-group " << i;
      }
      // And the per-parameter calls agree with the walk.
      std::vector<float> v(e->param_numel(13));
      ASSERT_TRUE(e->read_param_state(13, 2, v.data()).ok());
      EXPECT_EQ(0, std::memcmp(v.data(), saved[13][2].data(), v.size() * 4));
    }
  }
}

TEST(EngineStateDType, CompressedStateIsNeverUpdatedOnTheGpu) {
  Model m(4);
  auto e = make(m, config_with("bf16", false));
  ASSERT_TRUE(e);
  for (const auto& sg : e->subgroups()) {
    EXPECT_TRUE(sg.compressed);
    EXPECT_FALSE(e->gpu_updated(sg.id));
  }
}
