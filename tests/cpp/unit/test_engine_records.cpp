// State access by record: read_records / write_records / copy_state_from
// visit every record once and move the state's bytes once — for a model of
// many tensors per sub-group and a tensor split across sub-groups.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>

#include <strata/engine/engine.h>

#include <nlohmann/json.hpp>
#include "unit/test_io_common.h"

using namespace strata;
using namespace strata::engine;

namespace {

using io::test::TempDir;  // the I/O tests' temp folder (under /tmp: O_DIRECT works)

Config nvme_config(const std::string& dir, int64_t sub_group_size, int buffer_count = 3) {
  nlohmann::json j = {
      {"zero_optimization",
       {{"sub_group_size", sub_group_size},
        {"offload_optimizer",
         {{"device", "nvme"}, {"nvme_path", dir}, {"buffer_count", buffer_count}}}}},
      {"aio", {{"block_size", 65536}, {"queue_depth", 8}}},
      {"strata", {{"threads", 2}}}};
  auto c = Config::parse(j);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  return c.value();
}

// 48 small tensors (many per sub-group; two param groups) and one of 70000
// elements split across three sub-groups of 30000.
struct Model {
  std::vector<std::vector<float>> params;
  Model() {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 0.5f);
    for (int i = 0; i < 49; ++i) {
      size_t n = i == 20 ? 70000 : size_t(300 + 97 * i);
      std::vector<float> p(n);
      for (auto& x : p) x = nd(rng);
      params.push_back(std::move(p));
    }
  }
  std::vector<ParamInfo> infos() {
    std::vector<ParamInfo> out;
    for (size_t i = 0; i < params.size(); ++i) {
      out.push_back(ParamInfo{"p" + std::to_string(i), int64_t(params[i].size()),
                              kernels::DType::kF32, i < 40 ? 0 : 1, params[i].data()});
    }
    return out;
  }
};

std::vector<kernels::OptimizerHyper> hypers() {
  kernels::OptimizerHyper a;
  a.kind = kernels::OptimizerKind::kAdamW;
  a.lr = 1e-2f;
  kernels::OptimizerHyper b = a;
  b.lr = 3e-3f;
  return {a, b};
}

std::unique_ptr<Engine> make(Model& m, const std::string& dir, int buffer_count = 3) {
  EngineOptions o;
  o.config = nvme_config(dir, 30000, buffer_count);
  o.params = m.infos();
  o.groups = hypers();
  auto r = Engine::create(std::move(o));
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

void step_once(Engine& e) {
  float* g = static_cast<float*>(e.grad_arenas()[0].data);
  for (size_t k = 0; k < e.grad_arenas()[0].numel; ++k) {
    g[k] = std::sin(float(k) * 0.37f) * 0.2f;
  }
  ASSERT_TRUE(e.step().ok());
  ASSERT_TRUE(e.sync().ok());
}

uint64_t state_bytes(const Engine& e) {
  uint64_t b = 0;
  for (const auto& sg : e.subgroups()) b += sg.record_bytes;
  return b;
}

// Every slot of every parameter, through the per-parameter call (the reference).
std::vector<std::vector<std::vector<float>>> dump(Engine& e) {
  std::vector<std::vector<std::vector<float>>> out(e.param_count());
  for (size_t p = 0; p < e.param_count(); ++p) {
    out[p].assign(size_t(e.param_slots(p)), std::vector<float>(e.param_numel(p)));
    std::vector<float*> bufs;
    for (auto& s : out[p]) bufs.push_back(s.data());
    EXPECT_TRUE(e.read_param_states(p, bufs).ok());
  }
  return out;
}

float pattern(size_t p, int k, size_t i) { return float(p) * 1000.f + float(k) * 0.5f + float(i); }

}  // namespace

TEST(EngineRecords, ReadVisitsEachRecordOnceInTierOrder) {
  TempDir dir;
  Model m;
  auto e = make(m, dir.path());
  ASSERT_TRUE(e);
  ASSERT_GE(e->subgroups().size(), 4u);
  size_t most = 0;
  for (const auto& sg : e->subgroups()) most = std::max(most, sg.segments.size());
  ASSERT_GE(most, 10u) << "the model should have many tensors per sub-group";
  step_once(*e);
  auto want = dump(*e);
  auto before = e->stats();
  std::vector<std::vector<std::vector<float>>> got(e->param_count());
  for (size_t p = 0; p < got.size(); ++p) {
    got[p].assign(size_t(e->param_slots(p)), std::vector<float>(e->param_numel(p), NAN));
  }
  std::set<uint32_t> seen;
  uint64_t last_offset = 0;
  auto locs = e->record_locations();
  Status st = e->read_records({}, [&](const Engine::RecordView& v) {
    EXPECT_TRUE(seen.insert(v.subgroup).second) << "sub-group " << v.subgroup << " visited twice";
    EXPECT_GE(locs[v.subgroup].offset, last_offset) << "not in swap-file order";
    last_offset = locs[v.subgroup].offset;
    for (const auto& s : v.slices) {
      for (int k = 0; k < v.slots; ++k) {
        std::memcpy(got[s.param][size_t(k)].data() + s.param_offset,
                    v.data + size_t(k) * v.slot_stride + s.record_offset, s.numel * 4);
      }
    }
    return Status::Ok();
  });
  ASSERT_TRUE(st.ok()) << st.to_string();
  auto after = e->stats();
  EXPECT_EQ(seen.size(), e->subgroups().size());
  EXPECT_EQ(after.bytes_fetched - before.bytes_fetched, state_bytes(*e));
  EXPECT_EQ(after.bytes_stored, before.bytes_stored);
  EXPECT_EQ(got, want);
  ASSERT_TRUE(e->close().ok());
}

TEST(EngineRecords, ReadOfSomeParametersFetchesOnlyTheirRecords) {
  TempDir dir;
  Model m;
  auto e = make(m, dir.path());
  ASSERT_TRUE(e);
  // Parameter 20 is split across sub-groups: exactly those records are read.
  std::set<uint32_t> expect;
  uint64_t bytes = 0;
  for (const auto& sg : e->subgroups()) {
    for (const auto& seg : sg.segments) {
      if (seg.param == 20) {
        expect.insert(sg.id);
        bytes += sg.record_bytes;
        break;
      }
    }
  }
  ASSERT_GE(expect.size(), 2u);
  auto before = e->stats();
  std::set<uint32_t> seen;
  size_t covered = 0;
  ASSERT_TRUE(e->read_records({20}, [&](const Engine::RecordView& v) {
                 seen.insert(v.subgroup);
                 for (const auto& s : v.slices) {
                   EXPECT_EQ(s.param, 20u);
                   covered += s.numel;
                 }
                 return Status::Ok();
               }).ok());
  EXPECT_EQ(seen, expect);
  EXPECT_EQ(covered, m.params[20].size());
  EXPECT_EQ(e->stats().bytes_fetched - before.bytes_fetched, bytes);
  ASSERT_TRUE(e->close().ok());
}

TEST(EngineRecords, OverwriteStoresEachRecordOnceAndFetchesNone) {
  for (int buffers : {1, 2, 4}) {
    TempDir dir;
    Model m;
    auto e = make(m, dir.path(), buffers);
    ASSERT_TRUE(e);
    auto before = e->stats();
    Status st = e->write_records({}, true, [&](const Engine::RecordView& v) {
      for (const auto& s : v.slices) {
        for (int k = 0; k < v.slots; ++k) {
          float* d = v.data + size_t(k) * v.slot_stride + s.record_offset;
          for (size_t i = 0; i < s.numel; ++i) d[i] = pattern(s.param, k, s.param_offset + i);
        }
      }
      return Status::Ok();
    });
    ASSERT_TRUE(st.ok()) << st.to_string();
    auto after = e->stats();
    EXPECT_EQ(after.bytes_fetched, before.bytes_fetched) << buffers << " buffers";
    EXPECT_EQ(after.bytes_stored - before.bytes_stored, state_bytes(*e)) << buffers << " buffers";
    auto got = dump(*e);
    for (size_t p = 0; p < got.size(); ++p) {
      for (int k = 0; k < e->param_slots(p); ++k) {
        for (size_t i = 0; i < got[p][size_t(k)].size(); i += 97) {
          ASSERT_EQ(got[p][size_t(k)][i], pattern(p, k, i)) << p << " " << k << " " << i;
        }
      }
    }
    ASSERT_TRUE(e->close().ok());
  }
}

TEST(EngineRecords, PartialWriteKeepsTheRestOfTheRecord) {
  TempDir dir;
  Model m;
  auto e = make(m, dir.path());
  ASSERT_TRUE(e);
  step_once(*e);
  auto want = dump(*e);
  auto before = e->stats();
  // Parameter 3 only, with overwrite: its record holds other parameters, so
  // it is fetched first and they keep their state.
  ASSERT_TRUE(e->write_records({3}, true, [&](const Engine::RecordView& v) {
                 for (const auto& s : v.slices) {
                   for (int k = 0; k < v.slots; ++k) {
                     float* d = v.data + size_t(k) * v.slot_stride + s.record_offset;
                     for (size_t i = 0; i < s.numel; ++i) d[i] = pattern(3, k, i);
                   }
                 }
                 return Status::Ok();
               }).ok());
  auto after = e->stats();
  EXPECT_EQ(after.bytes_fetched - before.bytes_fetched, after.bytes_stored - before.bytes_stored);
  EXPECT_LT(after.bytes_stored - before.bytes_stored, state_bytes(*e));
  auto got = dump(*e);
  for (size_t k = 0; k < want[3].size(); ++k) {
    for (size_t i = 0; i < want[3][k].size(); ++i) want[3][k][i] = pattern(3, int(k), i);
  }
  EXPECT_EQ(got, want);
  ASSERT_TRUE(e->close().ok());
}

TEST(EngineRecords, VisitorErrorStopsTheWalkWithContext) {
  TempDir dir;
  Model m;
  auto e = make(m, dir.path());
  ASSERT_TRUE(e);
  int calls = 0;
  Status st = e->read_records({}, [&](const Engine::RecordView&) {
    return ++calls == 2 ? Status(StatusCode::kIoError, "disk full") : Status::Ok();
  });
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_NE(st.message().find("read_records, sub-group"), std::string::npos) << st.to_string();
  EXPECT_EQ(calls, 2);
  // The engine still works after a stopped walk.
  step_once(*e);
  EXPECT_FALSE(
      e->read_records({9999}, [](const Engine::RecordView&) { return Status::Ok(); }).ok());
  ASSERT_TRUE(e->close().ok());
}

TEST(EngineRecords, CopyStateReadsTheSourceOnceAndWritesEachRecordOnce) {
  TempDir a_dir, b_dir;
  Model ma, mb;
  auto a = make(ma, a_dir.path());
  auto b = make(mb, b_dir.path());
  ASSERT_TRUE(a && b);
  step_once(*a);
  step_once(*a);
  auto want = dump(*a);
  std::vector<Engine::StateCopy> copies;
  for (size_t p = 0; p < a->param_count(); ++p) copies.push_back({p, p, 0});
  auto a0 = a->stats(), b0 = b->stats();
  Status st = b->copy_state_from(*a, copies);
  ASSERT_TRUE(st.ok()) << st.to_string();
  auto a1 = a->stats(), b1 = b->stats();
  EXPECT_EQ(a1.bytes_fetched - a0.bytes_fetched, state_bytes(*a));
  EXPECT_EQ(b1.bytes_fetched, b0.bytes_fetched);
  EXPECT_EQ(b1.bytes_stored - b0.bytes_stored, state_bytes(*b));
  EXPECT_EQ(dump(*b), want);
  // Slots 1.. only (the master comes from the model): b's records are
  // fetched, and slot 0 keeps b's own values.
  for (auto& c : copies) c.first_slot = 1;
  ASSERT_TRUE(b->copy_state_from(*a, copies).ok());
  EXPECT_EQ(dump(*b), want);
  EXPECT_FALSE(b->copy_state_from(*b, copies).ok());
  ASSERT_TRUE(a->close().ok());
  ASSERT_TRUE(b->close().ok());
}
