// The typed configuration (issue 18, item 7): every schema key strata acts on
// reaches a field of EngineConfig through its own row, every default lives in
// the schema only, and the core reads fields, not "a.b" strings.
//
// What broke: aio.queue_depth had four defaults (schema 8, IoOptions 32,
// CalibrationOptions 8, StepShape 8), and ~40 cfg.get_int("...") reads in the
// core returned 0 for a mistyped path. The grep tests below fail on the base
// commit (IoOptions' `queue_depth = 32` names aio.queue_depth; engine.cpp reads
// cfg.get_int("aio.block_size")); IoDefaultsAreTheSchemas fails there too
// (32 != 8).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <strata/config.h>
#include <strata/engine/calibrate.h>
#include <strata/engine/perf_model.h>
#include <strata/io/io_engine.h>

#include "config/config_internal.h"

namespace fs = std::filesystem;
using nlohmann::json;
using strata::Config;
using strata::ConfigKey;
using strata::KeySupport;
using strata::KeyType;

namespace {

fs::path repo_root() {  // tests/cpp/unit/<this file> -> <repo>
  return fs::path(__FILE__).parent_path().parent_path().parent_path().parent_path();
}

bool has_children(const ConfigKey& key) {
  const auto& children = strata::config_detail::schema_index().children;
  auto it = children.find(key.path);
  return it != children.end() && !it->second.empty();
}

void set_path(json& root, const std::string& path, json value) {
  json* node = &root;
  std::stringstream ss(path);
  std::string part;
  std::vector<std::string> parts;
  while (std::getline(ss, part, '.')) {
    parts.push_back(part);
  }
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    node = &(*node)[parts[i]];
  }
  (*node)[parts.back()] = std::move(value);
}

// A value the row accepts that differs from its default where it can.
json other_value(const ConfigKey& key) {
  const json def = key.default_value;
  switch (key.type) {
    case KeyType::kBool:
      return def.is_boolean() ? json(!def.get<bool>()) : json(true);
    case KeyType::kInt: {
      const int64_t step = key.multiple_of.value_or(1);
      int64_t base = def.is_number() ? def.get<int64_t>() : int64_t(key.min.value_or(1));
      int64_t v = base + step;
      if (key.max && double(v) > *key.max) {
        v = base - step;
      }
      return v;
    }
    case KeyType::kNumber: {
      double base = def.is_number() ? def.get<double>() : key.min.value_or(0.0);
      double v = base + 0.5;
      if (key.max && v > *key.max) {
        v = base - 0.5;
      }
      return v;
    }
    case KeyType::kString: {
      if (key.allowed.empty()) {
        return "/tmp/strata-test-" + strata::config_detail::leaf_of(key.path);
      }
      for (const auto& a : key.allowed) {
        if (json(a) != def && a != "WarmupDecayLR" && a != "WarmupCosineLR") {
          return a;
        }
      }
      return key.allowed.front();
    }
    case KeyType::kArray:
      return key.element_type == KeyType::kInt ? json::array({1, 2}) : json::array({0.8, 0.99});
    default:
      return nullptr;
  }
}

std::vector<fs::path> sources(const std::vector<std::string>& dirs,
                              const std::vector<std::string>& exts) {
  std::vector<fs::path> out;
  for (const auto& d : dirs) {
    for (const auto& entry : fs::recursive_directory_iterator(repo_root() / d)) {
      if (!entry.is_regular_file()) {
        continue;
      }
      const std::string ext = entry.path().extension().string();
      if (std::find(exts.begin(), exts.end(), ext) != exts.end()) {
        out.push_back(entry.path());
      }
    }
  }
  return out;
}

std::vector<std::string> lines_of(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    out.push_back(line);
  }
  return out;
}

std::string rel_path(const fs::path& p) { return fs::relative(p, repo_root()).string(); }

}  // namespace

// Every honoured key (not a section) is bound to a field; keys accepted but
// not acted on, and aliases, are bound to nothing.
TEST(ConfigFields, EveryHonouredKeyIsBoundAndNoIgnoredKeyIs) {
  for (const ConfigKey& key : strata::config_schema()) {
    const bool section = key.type == KeyType::kObject && has_children(key);
    if (key.support == KeySupport::kHonoured && !section) {
      EXPECT_TRUE(key.fill && key.read) << key.path << ": honoured but reaches no field";
    } else {
      EXPECT_FALSE(key.fill || key.read) << key.path << ": not acted on, yet bound to a field";
    }
  }
}

// The typed defaults are the schema's (a null default is an empty optional).
TEST(ConfigFields, DefaultsAreTheSchemas) {
  const strata::EngineConfig& d = strata::default_engine_config();
  for (const ConfigKey& key : strata::config_schema()) {
    if (key.read) {
      EXPECT_EQ(key.read(d), strata::config_detail::effective_default(key, "")) << key.path;
    }
  }
  auto parsed = Config::parse(json::object());
  ASSERT_TRUE(parsed.ok());
  for (const ConfigKey& key : strata::config_schema()) {
    // The batch sizes are derived by parse() (micro 1 x accumulation 1): they
    // have no default to compare.
    if (key.read && key.path != "train_batch_size" &&
        key.path != "train_micro_batch_size_per_gpu" && key.path != "gradient_accumulation_steps") {
      EXPECT_EQ(key.read(parsed->typed()), key.read(d)) << key.path;
    }
  }
}

// Each bound key, set to a non-default value, lands in its own field.
TEST(ConfigFields, EveryKeyReachesItsField) {
  strata::ParseOptions po;
  po.check_paths = false;
  for (const ConfigKey& key : strata::config_schema()) {
    if (!key.read) {
      continue;
    }
    json user = json::object();
    const json value = other_value(key);
    set_path(user, key.path, value);
    if (key.path.rfind("optimizer.params.", 0) == 0) {
      user["optimizer"]["type"] = key.applies_to.empty() ? "AdamW" : key.applies_to.front();
    }
    if (key.path.rfind("scheduler.params.", 0) == 0) {
      std::string type = key.applies_to.empty() ? "WarmupLR" : key.applies_to.front();
      user["scheduler"]["type"] = type;
      // Each type's required parameters, unless the key under test is one.
      json& params = user["scheduler"]["params"];
      const auto require = [&](const std::string& name, const json& v) {
        if (key.path != "scheduler.params." + name) {
          params[name] = v;
        }
      };
      if (type == "WarmupDecayLR" || type == "WarmupCosineLR") {
        require("total_num_steps", 100);
      }
      if (type == "OneCycle") {
        require("cycle_min_lr", 1e-4);
        require("cycle_max_lr", 1e-3);
      }
    }
    // The bf16 state keys' prerequisites (DeepSpeed's support matrix).
    if (key.path == "bf16.bf16_master_weights_and_grads" ||
        key.path == "bf16.bf16_optimizer_states") {
      user["bf16"]["enabled"] = true;
      user["bf16"]["bf16_master_weights_and_grads"] = true;
      user["zero_optimization"]["stage"] = 2;
    }
    auto c = Config::parse(user, po);
    ASSERT_TRUE(c.ok()) << key.path << " = " << value.dump() << ": " << c.status().to_string();
    EXPECT_EQ(key.read(c->typed()), value) << key.path;
  }
}

TEST(ConfigFields, WithDefaultResetsJsonAndField) {
  auto c = Config::parse(
      {{"data_types", {{"grad_accum_dtype", "fp32"}}}, {"aio", {{"queue_depth", 64}}}});
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->typed().precision.grad_accum_dtype.has_value());
  auto d = c->with_default("data_types.grad_accum_dtype");
  ASSERT_TRUE(d.ok()) << d.status().to_string();
  EXPECT_FALSE(d->typed().precision.grad_accum_dtype.has_value());
  EXPECT_FALSE(d->has("data_types.grad_accum_dtype"));
  auto q = c->with_default("aio.queue_depth");
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->typed().aio.queue_depth, strata::default_engine_config().aio.queue_depth);
  EXPECT_EQ(q->json()["aio"]["queue_depth"], strata::default_engine_config().aio.queue_depth);
  EXPECT_FALSE(c->with_default("aio.use_gds").ok());  // accepted, not acted on: no field
}

// The option structs of the lower layers start from the schema's defaults.
TEST(ConfigFields, LayerDefaultsAreTheSchemas) {
  const auto& d = strata::default_engine_config();
  const strata::io::IoOptions io;
  EXPECT_EQ(int64_t(io.queue_depth), d.aio.queue_depth);
  EXPECT_EQ(int64_t(io.block_size), d.aio.block_size);
  EXPECT_EQ(int64_t(io.intra_op_parallelism), d.aio.intra_op_parallelism);
  EXPECT_EQ(io.single_submit, d.aio.single_submit);
  EXPECT_EQ(io.overlap_events, d.aio.overlap_events);
  const strata::engine::CalibrationOptions cal;
  EXPECT_EQ(int64_t(cal.queue_depth), d.aio.queue_depth);
  EXPECT_EQ(int64_t(cal.block_size), d.aio.block_size);
  EXPECT_EQ(int64_t(cal.threads), d.strata.threads);
  const strata::engine::StepShape shape;
  EXPECT_EQ(int64_t(shape.buffer_count), d.zero.offload.buffer_count);
  EXPECT_EQ(int64_t(shape.io_queue_depth), d.aio.queue_depth);
  EXPECT_EQ(int64_t(shape.io_block_bytes), d.aio.block_size);
  EXPECT_EQ(shape.checksums, d.strata.verify_checksums);
}

// strata.schedule's "not given" has one rule (issue 18 item 8: engine.cpp said
// auto, perf_model.cpp said auto only with a GPU): auto where a GPU can update.
TEST(ConfigFields, ScheduleNotGivenHasOneRule) {
  const Config none;
  strata::engine::HardwareProfile cpu_only;
  strata::engine::HardwareProfile gpu = cpu_only;
  gpu.gpu_update_params_per_s = 1e9;
  gpu.h2d_bytes_per_s = gpu.d2h_bytes_per_s = 1e10;
  EXPECT_FALSE(strata::engine::choose_options_from_config(none, cpu_only).auto_schedule);
  EXPECT_TRUE(strata::engine::choose_options_from_config(none, gpu).auto_schedule);
  EXPECT_EQ(strata::schedule_is_auto(none.typed().strata, false), false);
  EXPECT_EQ(strata::schedule_is_auto(none.typed().strata, true), true);
  auto st = Config::parse({{"strata", {{"schedule", "static"}}}});
  ASSERT_TRUE(st.ok());
  EXPECT_FALSE(strata::engine::choose_options_from_config(*st, gpu).auto_schedule);
}

// Grep-style: outside the schema, no field named after a key the core reads
// from the config is initialised with a literal, and no declaration whose
// comment names a key path is (the schema's default is the only default).
// Scope: the keys of aio.*, zero_optimization.*, strata.* and
// gradient_clipping. optimizer.params.* keys are excluded: the kernels'
// OptimizerHyper and python's OffloadAdamW(lr=1e-3, ...) carry torch's
// constructor defaults, an API of their own, not defaults of the config.
TEST(ConfigFields, NoSecondDefaultInTheSources) {
  std::vector<std::string> hits;
  for (const fs::path& file : sources({"csrc", "include"}, {".h", ".cpp", ".cu"})) {
    const std::string rel = rel_path(file);
    if (rel == "csrc/config/schema.cpp") {
      continue;
    }
    const std::vector<std::string> lines = lines_of(file);
    for (const ConfigKey& key : strata::config_schema()) {
      if (!key.read) {
        continue;
      }
      const std::string& p = key.path;
      const bool core_section = p.rfind("aio.", 0) == 0 || p.rfind("zero_optimization.", 0) == 0 ||
                                p.rfind("strata.", 0) == 0 || p == "gradient_clipping";
      if (!core_section) {
        continue;
      }
      const std::string leaf = strata::config_detail::leaf_of(p);
      // The path as comments write it: "aio.queue_depth", "offload_optimizer.pin_memory".
      const std::string parent_leaf =
          strata::config_detail::leaf_of(strata::config_detail::parent_of(p));
      const std::string short_path = parent_leaf.empty() ? p : parent_leaf + "." + leaf;
      const bool distinctive = leaf.find('_') != std::string::npos;
      // `leaf = <literal>` / `leaf{<literal>}`, not `x.leaf=false` inside a message.
      const std::regex decl("(^|[^.\\w])" + leaf +
                            R"re(\s*(=|\{)\s*([-+]?[0-9][0-9.a-zA-Z']*|true\b|false\b|"))re");
      // A zero is a placeholder for "unset" (an output field, a count filled
      // later), not a default, unless the schema's default is zero itself.
      const bool zero_is_default =
          key.default_value.is_number() && key.default_value.get<double>() == 0.0;
      for (size_t i = 0; i < lines.size(); ++i) {
        const std::string& line = lines[i];
        std::smatch m;
        if (!std::regex_search(line, m, decl) || line.find("==") != std::string::npos) {
          continue;
        }
        const std::string lit = m[3].str();
        if (!zero_is_default && (lit == "0" || lit == "0.0" || lit == "0u")) {
          continue;
        }
        bool tagged = line.find(short_path) != std::string::npos;
        for (size_t j = i; !tagged && j > 0; --j) {  // the comment block right above
          const std::string& above = lines[j - 1];
          const size_t first = above.find_first_not_of(' ');
          if (first == std::string::npos || above.compare(first, 2, "//") != 0) {
            break;
          }
          tagged = above.find(short_path) != std::string::npos;
        }
        if (tagged || distinctive) {
          hits.push_back(rel + ":" + std::to_string(i + 1) + ": " + p + ": " + line);
        }
      }
    }
  }
  // Python: _config.get(cfg, "<path>", <literal>) restates a default.
  for (const fs::path& file : sources({"python/strata"}, {".py"})) {
    const std::vector<std::string> lines = lines_of(file);
    for (size_t i = 0; i < lines.size(); ++i) {
      static const std::regex get_with_default(
          R"re(get\([^,()]+,\s*"([A-Za-z0-9_.]+)"\s*,\s*([^N)\s][^)]*)\))re");
      std::smatch m;
      if (std::regex_search(lines[i], m, get_with_default) &&
          strata::find_config_key(m[1].str()) != nullptr) {
        const std::string dflt = m[2].str();
        if (dflt != "{}" && dflt != "None") {
          hits.push_back(rel_path(file) + ":" + std::to_string(i + 1) + ": " + lines[i]);
        }
      }
    }
  }
  std::string all;
  for (const auto& h : hits) {
    all += "\n  " + h;
  }
  EXPECT_TRUE(hits.empty()) << "a second default for a schema key:" << all;
}

// The core (everything but csrc/config and the binding) reads typed fields:
// no string-keyed config access, where a typo silently gave 0.
TEST(ConfigFields, TheCoreReadsNoKeyStrings) {
  const std::regex string_read(
      R"re((get_(int|bool|number|string)|\.has|\.find)\(\s*"[a-z0-9_]+\.)re");
  std::vector<std::string> hits;
  for (const fs::path& file : sources({"csrc", "include", "benchmarks"}, {".h", ".cpp", ".cu"})) {
    const std::string rel = rel_path(file);
    if (rel.rfind("csrc/config/", 0) == 0 || rel.rfind("csrc/torch/", 0) == 0) {
      continue;
    }
    const std::vector<std::string> lines = lines_of(file);
    for (size_t i = 0; i < lines.size(); ++i) {
      if (std::regex_search(lines[i], string_read) ||
          lines[i].find(".get_int(") != std::string::npos ||
          lines[i].find(".get_string(") != std::string::npos) {
        hits.push_back(rel + ":" + std::to_string(i + 1) + ": " + lines[i]);
      }
    }
  }
  std::string all;
  for (const auto& h : hits) {
    all += "\n  " + h;
  }
  EXPECT_TRUE(hits.empty()) << "string-keyed config reads in the core:" << all;
}

// Issue 18 item 8: pipeline_read/pipeline_write were documented as honoured and
// read by nothing. They are accepted and said to be not acted on: strata always
// pipelines, so true is quiet and false is warned about once.
TEST(ConfigFields, PipelineKeysSayStrataAlwaysPipelines) {
  for (const char* path : {"zero_optimization.offload_optimizer.pipeline_read",
                           "zero_optimization.offload_optimizer.pipeline_write"}) {
    const ConfigKey* key = strata::find_config_key(path);
    ASSERT_NE(key, nullptr);
    EXPECT_EQ(key->support, KeySupport::kAcceptedIgnored) << path;
    EXPECT_NE(key->note.find("strata always pipelines reads and writes"), std::string::npos);
  }
  auto on = Config::parse(
      {{"zero_optimization",
        {{"offload_optimizer", {{"pipeline_read", true}, {"pipeline_write", true}}}}}});
  ASSERT_TRUE(on.ok());
  for (const auto& w : on->warnings()) {
    EXPECT_EQ(w.find("pipeline_"), std::string::npos) << w;
  }
  auto off =
      Config::parse({{"zero_optimization", {{"offload_optimizer", {{"pipeline_read", false}}}}}});
  ASSERT_TRUE(off.ok());
  bool warned = false;
  for (const auto& w : off->warnings()) {
    warned = warned || (w.find("pipeline_read = false") != std::string::npos &&
                        w.find("strata always pipelines") != std::string::npos);
  }
  EXPECT_TRUE(warned);
  const std::string md = strata::config_schema_markdown();
  EXPECT_NE(md.find("strata always pipelines reads and writes"), std::string::npos);
}
