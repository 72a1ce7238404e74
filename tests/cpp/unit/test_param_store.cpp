// The param tier (tiers/param_store.h) and the engine over it: records on
// host, NVMe (several growing swap files); owned writes seen by later
// fetches; an engine whose weights live in the store gives the same weights
// as one over the model's memory, writes each parameter back once per step
// and reads each once at creation; release_grads frees the gradient pages.
#include <gtest/gtest.h>

#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include <strata/engine/engine.h>
#include <strata/engine/trace.h>
#include <strata/platform/vm.h>
#include <strata/tiers/param_store.h>

#include <nlohmann/json.hpp>
#include "unit/test_io_common.h"

using namespace strata;
using namespace strata::engine;
using strata::tiers::ParamStore;
using strata::tiers::ParamStoreOptions;
using strata::tiers::TierKind;

namespace {

using io::test::TempDir;

std::unique_ptr<ParamStore> make_store(TierKind kind, const std::string& dir,
                                       uint64_t chunk = uint64_t(1) << 30) {
  ParamStoreOptions o;
  o.kind = kind;
  o.nvme_path = dir;
  o.chunk_bytes = chunk;
  o.io.block_size = 65536;
  o.io.queue_depth = 8;
  auto r = ParamStore::create(o);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

std::vector<float> ramp(size_t n, float base) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = base + float(i) * 0.25f;
  return v;
}

TEST(ParamStore, RecordsRoundTripOnEveryTier) {
  TempDir dir;
  for (TierKind kind : {TierKind::kHost, TierKind::kNvme}) {
    auto s = make_store(kind, dir.path());
    ASSERT_TRUE(s);
    std::vector<std::vector<float>> vals;
    for (int i = 0; i < 5; ++i) {
      vals.push_back(ramp(1000 + 777 * size_t(i), float(i)));
      auto id = s->add(vals.back().size() * 4, vals.back().data());
      ASSERT_TRUE(id.ok()) << id.status().to_string();
      EXPECT_EQ(id.value(), uint32_t(i));
      EXPECT_EQ(s->record_bytes(id.value()) % 4096, 0u);
    }
    for (uint32_t i = 0; i < 5; ++i) {
      auto b = s->staging(s->record_bytes(i));
      ASSERT_TRUE(b.ok());
      ASSERT_TRUE(s->fetch(i, b.value().data()).ok());
      EXPECT_EQ(std::memcmp(b.value().data(), vals[i].data(), vals[i].size() * 4), 0)
          << tiers::tier_name(kind) << " record " << i;
      if (kind == TierKind::kHost) {
        EXPECT_EQ(std::memcmp(s->data(i), vals[i].data(), vals[i].size() * 4), 0);
      } else {
        EXPECT_EQ(s->data(i), nullptr);
      }
    }
    auto st = s->stats();
    EXPECT_EQ(st.records, 5u);
    EXPECT_EQ(st.fetches, 5u);
    EXPECT_EQ(st.bytes_fetched, st.record_bytes);
  }
}

TEST(ParamStore, PollSaysWhenAFetchCompletedWithoutWaitingForIt) {
  TempDir dir;
  for (TierKind kind : {TierKind::kHost, TierKind::kNvme}) {
    auto s = make_store(kind, dir.path());
    ASSERT_TRUE(s);
    std::vector<float> v = ramp(300000, 2.f);  // 1.2 MB: several blocks of 64 KiB
    ASSERT_TRUE(s->add(v.size() * 4, v.data()).ok());
    auto b = s->staging(s->record_bytes(0));
    ASSERT_TRUE(b.ok());
    auto t = s->submit_fetch(0, b.value().data());
    ASSERT_TRUE(t.ok()) << t.status().to_string();
    bool done = false;
    for (int spins = 0; spins < 2000000 && !done; ++spins) {
      auto p = s->poll(t.value());
      ASSERT_TRUE(p.ok()) << p.status().to_string();
      done = p.value();
    }
    ASSERT_TRUE(done) << tiers::tier_name(kind);
    // Completed, and still the caller's to wait: the bytes are verified there.
    ASSERT_TRUE(s->wait(t.value()).ok());
    EXPECT_EQ(std::memcmp(b.value().data(), v.data(), v.size() * 4), 0);
    if (kind == TierKind::kNvme) {
      EXPECT_NE(t.value(), 0u);
      // Waited: the ticket is gone.
      auto again = s->poll(t.value());
      ASSERT_FALSE(again.ok());
      EXPECT_NE(again.status().to_string().find("unknown ticket"), std::string::npos);
    }
  }
}

TEST(ParamStore, NvmeGrowsByFilesAndOwnedWritesAreSeenByTheNextFetch) {
  TempDir dir;
  auto s = make_store(TierKind::kNvme, dir.path(), /*chunk=*/64 << 10);
  ASSERT_TRUE(s);
  std::vector<float> a = ramp(10000, 1.f);  // 40000 bytes: one record per 64 KiB file
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(s->add(a.size() * 4, a.data()).ok());
  }
  EXPECT_GE(s->stats().files, 2u);
  std::vector<float> b = ramp(10000, -7.f);
  for (int round = 0; round < 3; ++round) {
    for (uint32_t i = 0; i < 4; ++i) {
      auto buf = s->staging(s->record_bytes(i));
      ASSERT_TRUE(buf.ok());
      std::memcpy(buf.value().data(), b.data(), b.size() * 4);
      ASSERT_TRUE(s->store_owned(i, std::move(buf).value()).ok());
    }
    for (uint32_t i = 0; i < 4; ++i) {
      auto got = s->staging(s->record_bytes(i));
      ASSERT_TRUE(got.ok());
      ASSERT_TRUE(s->fetch(i, got.value().data()).ok());
      EXPECT_EQ(std::memcmp(got.value().data(), b.data(), b.size() * 4), 0) << i;
    }
    b[round] += 1.f;
  }
  ASSERT_TRUE(s->flush().ok());
  EXPECT_EQ(s->stats().staging_in_use, 0u);  // owned buffers went back
}

TEST(ParamStore, ConcurrentFetchesAndOwnedWritesOfDistinctRecords) {
  TempDir dir;
  auto s = make_store(TierKind::kNvme, dir.path());
  ASSERT_TRUE(s);
  std::vector<float> v = ramp(5000, 0.f);
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(s->add(v.size() * 4, v.data()).ok());
  std::thread writer([&] {
    for (int r = 0; r < 20; ++r) {
      for (uint32_t i = 8; i < 16; ++i) {
        auto b = s->staging(s->record_bytes(i));
        ASSERT_TRUE(b.ok());
        std::memcpy(b.value().data(), v.data(), v.size() * 4);
        ASSERT_TRUE(s->store_owned(i, std::move(b).value()).ok());
      }
    }
  });
  for (int r = 0; r < 20; ++r) {
    for (uint32_t i = 0; i < 8; ++i) {
      auto b = s->staging(s->record_bytes(i));
      ASSERT_TRUE(b.ok());
      ASSERT_TRUE(s->fetch(i, b.value().data()).ok());
      ASSERT_EQ(std::memcmp(b.value().data(), v.data(), v.size() * 4), 0);
    }
  }
  writer.join();
  EXPECT_TRUE(s->flush().ok());
}

TEST(ParamStore, BadInputIsRefusedWithContext) {
  TempDir dir;
  auto s = make_store(TierKind::kNvme, dir.path());
  ASSERT_TRUE(s);
  EXPECT_FALSE(s->add(0, nullptr).ok());
  auto b = s->staging(4096);
  ASSERT_TRUE(b.ok());
  auto f = s->submit_fetch(3, b.value().data());
  ASSERT_FALSE(f.ok());
  EXPECT_NE(f.status().message().find("no record 3"), std::string::npos);
  ParamStoreOptions o;
  o.kind = TierKind::kNvme;  // no nvme_path
  EXPECT_FALSE(ParamStore::create(o).ok());
  auto cfg = Config::parse(nlohmann::json{{"zero_optimization", {{"stage", 3}}}});
  ASSERT_TRUE(cfg.ok());
  auto none = tiers::param_store_options(cfg.value(), "x");
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("offload_param.device"), std::string::npos);
}
TEST(ParamStore, TransferLogRecordsEachNvmeTransferOnceWhenEnabled) {
  TempDir dir;
  auto store = make_store(TierKind::kNvme, dir.path());
  ASSERT_TRUE(store);
  auto v = ramp(3000, 1.f);
  ASSERT_TRUE(store->add(v.size() * 4, v.data()).ok());
  ASSERT_TRUE(store->add(v.size() * 4, v.data()).ok());
  auto b = store->staging(store->record_bytes(0));
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(store->fetch(0, b.value().data()).ok());
  EXPECT_TRUE(store->take_transfers().empty());  // off by default
  store->record_transfers(true);
  ASSERT_TRUE(store->fetch(0, b.value().data()).ok());
  ASSERT_TRUE(store->store(1, b.value().data()).ok());
  auto owned = store->staging(store->record_bytes(1));
  ASSERT_TRUE(owned.ok());
  std::memcpy(owned.value().data(), v.data(), v.size() * 4);
  ASSERT_TRUE(store->store_owned(1, std::move(owned).value()).ok());
  ASSERT_TRUE(store->flush().ok());
  auto log = store->take_transfers();
  ASSERT_EQ(log.size(), 3u);
  EXPECT_TRUE(log[0].read);
  EXPECT_EQ(log[0].id, 0u);
  EXPECT_FALSE(log[1].read);
  EXPECT_FALSE(log[2].read);
  EXPECT_EQ(log[2].id, 1u);
  for (const auto& t : log) {
    EXPECT_EQ(t.bytes, store->record_bytes(t.id));
    EXPECT_GT(t.start_ns, 0);
    EXPECT_LE(t.start_ns, t.end_ns);
  }
  EXPECT_TRUE(store->take_transfers().empty());  // handed over once
}

// Events recorded before a step begins (its forward) belong to it; events of
// a later step recorded before this one ends stay for that step.
TEST(Trace, EventsOutsideAStepGoToTheStepTheyNameAndTheWeightLanesAreNamed) {
  Trace t(4);
  t.record({EventKind::kForward, 1, -1, "", 0, 10, 20});
  t.record({EventKind::kWeightFetch, 1, 7, "param", 4096, 12, 18});
  t.begin_step(1);
  t.record({EventKind::kStep, 1, -1, "", 0, 25, 40});
  t.record({EventKind::kForward, 2, -1, "", 0, 35, 45});
  t.end_step();
  t.begin_step(2);
  t.record({EventKind::kStep, 2, -1, "", 0, 50, 60});
  t.end_step();
  auto ev = t.events();
  ASSERT_EQ(ev.size(), 5u);
  EXPECT_EQ(ev[0].kind, EventKind::kForward);
  EXPECT_EQ(ev[0].step, 1);
  EXPECT_EQ(ev[3].kind, EventKind::kForward);  // kept for step 2, before its step event
  EXPECT_EQ(ev[3].step, 2);
  std::string json = t.chrome_json().dump();
  EXPECT_NE(json.find("weight read"), std::string::npos);
  EXPECT_NE(json.find("weight fetch p7"), std::string::npos);
}

// ---- the engine over a store ----------------------------------------------

struct Weights {
  std::vector<std::vector<float>> p;
  Weights() {
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.f, 0.5f);
    for (int i = 0; i < 12; ++i) {
      std::vector<float> v(i == 5 ? 50000 : size_t(700 + 311 * i));  // 5 spans sub-groups
      for (auto& x : v) x = nd(rng);
      p.push_back(std::move(v));
    }
  }
};

Config engine_config(const std::string& dir) {
  nlohmann::json j = {{"zero_optimization",
                       {{"stage", 3},
                        {"sub_group_size", 20000},
                        {"offload_optimizer", {{"device", "nvme"}, {"nvme_path", dir}}}}},
                      {"aio", {{"block_size", 65536}, {"queue_depth", 8}}},
                      {"strata", {{"threads", 2}}}};
  auto c = Config::parse(j);
  EXPECT_TRUE(c.ok()) << c.status().to_string();
  return c.value();
}

std::vector<kernels::OptimizerHyper> adamw() {
  kernels::OptimizerHyper h;
  h.kind = kernels::OptimizerKind::kAdamW;
  h.lr = 1e-2f;
  return {h};
}

// Runs 3 steps with gradient g_k = sin(k * i) and returns the weights.
std::vector<std::vector<float>> train(Weights w, const std::string& dir, ParamStore* store,
                                      bool release_grads, EngineStats* stats_out = nullptr) {
  EngineOptions o;
  o.config = engine_config(dir);
  o.groups = adamw();
  o.param_store = store;
  o.release_grads = release_grads;
  for (size_t i = 0; i < w.p.size(); ++i) {
    ParamInfo pi{"p" + std::to_string(i), int64_t(w.p[i].size()), kernels::DType::kF32, 0, nullptr};
    if (store != nullptr) {
      pi.store_id = int64_t(store->add(w.p[i].size() * 4, w.p[i].data()).value());
    } else {
      pi.data = w.p[i].data();
    }
    o.params.push_back(pi);
  }
  auto r = Engine::create(std::move(o));
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  if (!r.ok()) return {};
  auto e = std::move(r).value();
  for (int k = 1; k <= 3; ++k) {
    for (size_t i = 0; i < w.p.size(); ++i) {
      const GradSpan& a = e->grad_arenas()[0];
      float* g = static_cast<float*>(a.data) + e->grad_offset(i);
      for (size_t j = 0; j < w.p[i].size(); ++j) g[j] = std::sin(float(k * (j + i)));
    }
    EXPECT_TRUE(e->step().ok());
    if (release_grads) {
      // After the step every gradient reads as zero.
      const GradSpan& a = e->grad_arenas()[0];
      const float* g = static_cast<const float*>(a.data);
      size_t nonzero = 0;
      for (size_t j = 0; j < a.numel; ++j) nonzero += g[j] != 0.f;
      EXPECT_EQ(nonzero, 0u);
    }
  }
  EXPECT_TRUE(e->sync().ok());
  if (stats_out) *stats_out = e->stats();
  std::vector<std::vector<float>> out;
  for (size_t i = 0; i < w.p.size(); ++i) {
    if (store == nullptr) {
      out.push_back(w.p[i]);
      continue;
    }
    auto b = store->staging(store->record_bytes(uint32_t(i)));
    EXPECT_TRUE(store->fetch(uint32_t(i), b.value().data()).ok());
    std::vector<float> v(w.p[i].size());
    std::memcpy(v.data(), b.value().data(), v.size() * 4);
    out.push_back(std::move(v));
  }
  EXPECT_TRUE(e->close().ok());
  return out;
}

TEST(EngineParamStore, WeightsInTheStoreMatchWeightsInTheModelBitForBit) {
  TempDir dir;
  Weights w;
  auto ref = train(w, dir.path(), nullptr, false);
  for (TierKind kind : {TierKind::kHost, TierKind::kNvme}) {
    auto store = make_store(kind, dir.path());
    ASSERT_TRUE(store);
    auto got = train(w, dir.path(), store.get(), /*release_grads=*/true);
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) {
      EXPECT_EQ(std::memcmp(got[i].data(), ref[i].data(), ref[i].size() * 4), 0)
          << tiers::tier_name(kind) << " parameter " << i;
    }
    auto st = store->stats();
    if (kind == TierKind::kNvme) {
      // Bytes moved: each parameter added once, read once at creation (its
      // pieces in several sub-groups share one fetch), written once per step
      // and read once here.
      EXPECT_EQ(st.stores, w.p.size() * 4);
      EXPECT_EQ(st.fetches, w.p.size() * 2);
      EXPECT_EQ(st.bytes_stored, st.record_bytes * 4);
    }
  }
}

// Back-pressure (wait_grad_room): with at most one sub-group ready and not
// yet updated, a hook that waited before writing sees only the gradients of
// the sub-group still filling (the rest were updated and released), however
// slow the updates; the weights match a plain step.
TEST(EngineParamStore, GradientHooksWaitForTheUpdatesSoFewGradientsAreHeld) {
  TempDir dir;
  Weights w;
  std::vector<std::vector<float>> ref_w = w.p, got_w = w.p;
  for (int run = 0; run < 2; ++run) {
    const bool overlap = run == 1;
    EngineOptions o;
    o.config = engine_config(dir.path());
    o.groups = adamw();
    o.release_grads = true;
    o.max_pending_subgroups = 1;
    auto& target = overlap ? got_w : ref_w;
    for (size_t i = 0; i < w.p.size(); ++i) {
      o.params.push_back(ParamInfo{"p" + std::to_string(i), int64_t(w.p[i].size()),
                                   kernels::DType::kF32, 0, target[i].data()});
    }
    auto r = Engine::create(std::move(o));
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    auto e = std::move(r).value();
    const GradSpan& a = e->grad_arenas()[0];
    float* arena = static_cast<float*>(a.data);
    size_t most_held = 0;
    for (int k = 1; k <= 2; ++k) {
      if (overlap) {
        ASSERT_TRUE(e->begin_backward({/*eager_update=*/true, 1.0f, 1}).ok());
      }
      for (size_t i = 0; i < w.p.size(); ++i) {
        if (overlap) {
          e->wait_grad_room();
          size_t held = 0;
          for (size_t j = 0; j < a.numel; ++j) held += arena[j] != 0.f;
          most_held = std::max(most_held, held);
        }
        float* g = arena + e->grad_offset(i);
        for (size_t j = 0; j < w.p[i].size(); ++j) g[j] = std::sin(float(k * (j + i)) + 0.5f);
        if (overlap) {
          e->mark_param_ready(i);
        }
      }
      if (overlap) {
        ASSERT_TRUE(e->end_backward().ok());
      }
      ASSERT_TRUE(e->step().ok());
    }
    ASSERT_TRUE(e->sync().ok());
    if (overlap) {
      // One sub-group's worth at most (sub_group_size 20000).
      EXPECT_LE(most_held, 20000u);
      EXPECT_GT(most_held, 0u);
    }
    ASSERT_TRUE(e->close().ok());
  }
  for (size_t i = 0; i < ref_w.size(); ++i) {
    EXPECT_EQ(std::memcmp(got_w[i].data(), ref_w[i].data(), ref_w[i].size() * 4), 0)
        << "parameter " << i;
  }
}

// An engine over w's weights (in memory) with release_grads on.
Result<std::unique_ptr<Engine>> releasing_engine(Weights& w, const std::string& dir) {
  EngineOptions o;
  o.config = engine_config(dir);
  o.groups = adamw();
  o.release_grads = true;
  for (size_t i = 0; i < w.p.size(); ++i) {
    o.params.push_back(ParamInfo{"p" + std::to_string(i), int64_t(w.p[i].size()),
                                 kernels::DType::kF32, 0, w.p[i].data()});
  }
  return Engine::create(std::move(o));
}

// Eager updates release each sub-group's gradient pages, so the gradient norm
// of an eager step is gathered as the gradients arrive, before any update of
// theirs: with some sub-groups updated during the "backward" and the rest made
// ready in a burst (later ones become ready while an earlier one's stats are
// read), the norm still covers every gradient.
TEST(EngineParamStore, EagerStepWithReleasedGradientsStillReportsTheWholeNorm) {
  TempDir dir;
  Weights w;
  auto r = releasing_engine(w, dir.path());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  auto e = std::move(r).value();
  float* arena = static_cast<float*>(e->grad_arenas()[0].data);
  for (int k = 1; k <= 3; ++k) {
    ASSERT_TRUE(e->begin_backward({/*eager_update=*/true, 1.0f, 1}).ok());
    double want = 0;  // plain double sum, apart from the kernels
    for (size_t i = 0; i < w.p.size(); ++i) {
      ASSERT_TRUE(e->populate_grad(i).ok());
      float* g = arena + e->grad_offset(i);
      for (size_t j = 0; j < w.p[i].size(); ++j) {
        g[j] = std::sin(float(k * (j + i)) + 0.25f);
        want += double(g[j]) * double(g[j]);
      }
    }
    for (size_t i = 0; i < w.p.size(); ++i) {
      e->mark_param_ready(i);
      if (i < w.p.size() / 2) {
        // The first half as a backward would: the updates run (and release
        // their pages) meanwhile. The rest in a burst.
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
    ASSERT_TRUE(e->end_backward().ok());
    auto got = e->grad_stats();
    ASSERT_TRUE(got.ok()) << got.status().to_string();
    EXPECT_NEAR(got.value().sum_sq, want, 1e-6 * want) << "step " << k;
    EXPECT_FALSE(got.value().nonfinite);
    ASSERT_TRUE(e->step().ok());
  }
  ASSERT_TRUE(e->close().ok());
}

// populate_grad maps a parameter's released gradient pages (they read as zero)
// and keeps a gradient already written; a bad index is an error naming it.
TEST(EngineParamStore, PopulateGradMapsReleasedPagesAndKeepsGradients) {
  TempDir dir;
  Weights w;
  auto r = releasing_engine(w, dir.path());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  auto e = std::move(r).value();
  float* arena = static_cast<float*>(e->grad_arenas()[0].data);
  const size_t last = w.p.size() - 1;
  float* g = arena + e->grad_offset(last);
  const size_t n = w.p[last].size();
  ASSERT_TRUE(e->step().ok());  // every gradient page released
  ASSERT_TRUE(e->sync().ok());
  ASSERT_TRUE(e->populate_grad(last).ok());
  std::vector<unsigned char> vec(1);
  // A whole page inside the parameter's slice is resident now, and zero.
  auto* page = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(g) + platform::kPageSize - 1) /
                                       platform::kPageSize * platform::kPageSize);
  ASSERT_LT(page + platform::kPageSize, reinterpret_cast<char*>(g + n));
  ASSERT_EQ(mincore(page, platform::kPageSize, vec.data()), 0);
  EXPECT_EQ(vec[0] & 1, 1);
  for (size_t j = 0; j < n; ++j) {
    ASSERT_EQ(g[j], 0.f) << j;
    g[j] = float(j) + 0.5f;
  }
  ASSERT_TRUE(e->populate_grad(last).ok());
  for (size_t j = 0; j < n; ++j) {
    ASSERT_EQ(g[j], float(j) + 0.5f) << j;
  }
  Status bad = e->populate_grad(w.p.size());
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.to_string().find("no such parameter"), std::string::npos) << bad.to_string();
  ASSERT_TRUE(e->close().ok());
}

TEST(EngineParamStore, RefusesARecordOfTheWrongSizeAndAMissingStore) {
  TempDir dir;
  auto store = make_store(TierKind::kNvme, dir.path());
  std::vector<float> v(1000, 1.f);
  ASSERT_TRUE(store->add(v.size() * 4, v.data()).ok());
  EngineOptions o;
  o.config = engine_config(dir.path());
  o.groups = adamw();
  ParamInfo pi{"w", 999, kernels::DType::kF32, 0, nullptr};
  pi.store_id = 0;
  o.params.push_back(pi);
  EngineOptions o2 = o;
  o.param_store = store.get();
  auto r = Engine::create(std::move(o));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("does not hold its 3996 bytes"), std::string::npos)
      << r.status().to_string();
  auto r2 = Engine::create(std::move(o2));
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.status().message().find("no param store"), std::string::npos);
}

}  // namespace
