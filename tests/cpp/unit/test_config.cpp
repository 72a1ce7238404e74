// Config schema: defaults, aliases, "auto", DeepSpeed's batch rule, warnings,
// file loading. Invalid configs are in test_config_invalid.cpp, real-world
// shapes in test_config_shapes.cpp.
#include <strata/config.h>

#include <gtest/gtest.h>

#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

namespace {

using nlohmann::json;
using strata::ClipMode;
using strata::Config;
using strata::OffloadDevice;
using strata::ParseOptions;

// A private temporary directory, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/strata-config-test-XXXXXX";
    const char* p = ::mkdtemp(tmpl);
    path_ = p != nullptr ? p : "";
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

Config must_parse(const json& j, const ParseOptions& opt = {}) {
  auto r = Config::parse(j, opt);
  EXPECT_TRUE(r.ok()) << r.status().to_string() << "\nconfig: " << j.dump();
  return r.ok() ? r.value() : Config();
}

// A copy, so that operator[] on a missing key inserts null and fails the
// expectation instead of asserting inside nlohmann on a const object.
json jv(const Config& c) { return c.json(); }

std::string parse_error(const json& j, const ParseOptions& opt = {}) {
  auto r = Config::parse(j, opt);
  EXPECT_FALSE(r.ok()) << "parsed unexpectedly: " << j.dump();
  return r.ok() ? std::string() : r.status().message();
}

int count_warnings_containing(const Config& c, const std::string& needle) {
  return static_cast<int>(
      std::count_if(c.warnings().begin(), c.warnings().end(),
                    [&](const std::string& w) { return w.find(needle) != std::string::npos; }));
}

std::string all_warnings(const Config& c) {
  std::string out;
  for (const auto& w : c.warnings()) {
    out += "  " + w + "\n";
  }
  return out;
}

TEST(ConfigSchema, PathsAreUniqueAndParentsExist) {
  const auto& schema = strata::config_schema();
  ASSERT_GT(schema.size(), 50u);
  for (const auto& key : schema) {
    EXPECT_EQ(strata::find_config_key(key.path), &key) << key.path << " is duplicated";
    const size_t dot = key.path.rfind('.');
    if (dot != std::string::npos) {
      const auto* parent = strata::find_config_key(key.path.substr(0, dot));
      ASSERT_NE(parent, nullptr) << key.path << " has no parent row";
      EXPECT_EQ(parent->type, strata::KeyType::kObject) << key.path;
    }
    if (key.support == strata::KeySupport::kDeprecatedAlias) {
      // The target is a row, or lies inside an accepted-but-ignored object
      // (offload_param.device), whose children are not rows.
      std::string target = key.alias_of;
      const strata::ConfigKey* row = strata::find_config_key(target);
      while (row == nullptr && target.find('.') != std::string::npos) {
        target = target.substr(0, target.rfind('.'));
        row = strata::find_config_key(target);
        if (row != nullptr) {
          EXPECT_EQ(row->support, strata::KeySupport::kAcceptedIgnored) << key.path;
        }
      }
      EXPECT_NE(row, nullptr) << key.path << " aliases unknown " << key.alias_of;
    }
    if (key.support == strata::KeySupport::kAcceptedIgnored) {
      EXPECT_FALSE(key.note.empty()) << key.path << " needs a note saying what happens instead";
    }
    EXPECT_FALSE(key.description.empty()) << key.path;
  }
  EXPECT_EQ(strata::find_config_key("no.such.key"), nullptr);
  EXPECT_EQ(strata::config_schema_json().size(), schema.size());
}

TEST(ConfigSchema, DefaultsSatisfyTheirOwnRows) {
  // Every default must be a value the parser itself accepts: parse a config
  // that writes each honoured default explicitly and expect no error.
  json j = json::object();
  // One JSON pointer per path ("a.b" -> "/a/b").
  for (const auto& key : strata::config_schema()) {
    const auto* section = strata::find_config_key(key.path.substr(0, key.path.find('.')));
    if (key.support != strata::KeySupport::kHonoured || key.default_value.is_null() ||
        key.type == strata::KeyType::kObject || section->default_value.is_null()) {
      continue;  // typed sections (optimizer, scheduler) are covered per type below
    }
    std::string ptr = "/" + key.path;
    std::replace(ptr.begin(), ptr.end(), '.', '/');
    j[json::json_pointer(ptr)] = key.default_value;
  }
  Config c = must_parse(j);
  EXPECT_EQ(c.typed().aio.block_size, 1048576);
  // Per type: the filled defaults of each optimizer and scheduler re-parse.
  for (const char* type : {"Adam", "AdamW", "SGD", "Adagrad"}) {
    Config o = must_parse({{"optimizer", {{"type", type}}}});
    Config again = must_parse(o.json());
    EXPECT_EQ(o.json(), again.json()) << type;
  }
  for (const char* type :
       {"LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"}) {
    json params = json::object();
    if (std::string(type) == "WarmupDecayLR" || std::string(type) == "WarmupCosineLR") {
      params["total_num_steps"] = 10;
    }
    if (std::string(type) == "OneCycle") {
      params["cycle_min_lr"] = 0.001;
      params["cycle_max_lr"] = 0.01;
    }
    Config s = must_parse({{"scheduler", {{"type", type}, {"params", params}}}});
    Config again = must_parse(s.json());
    EXPECT_EQ(s.json(), again.json()) << type;
  }
}

TEST(Config, EmptyConfigGetsEveryDefault) {
  Config c = must_parse(json::object());
  json j = c.json();
  EXPECT_EQ(j["train_batch_size"], 1);
  EXPECT_EQ(j["train_micro_batch_size_per_gpu"], 1);
  EXPECT_EQ(j["gradient_accumulation_steps"], 1);
  EXPECT_EQ(j["steps_per_print"], 10);
  EXPECT_EQ(j["gradient_clipping"], 0.0);
  EXPECT_EQ(j["zero_optimization"]["stage"], 0);
  EXPECT_EQ(j["zero_optimization"]["sub_group_size"], 1000000000);
  EXPECT_EQ(j["zero_optimization"]["offload_optimizer"]["device"], "none");
  EXPECT_EQ(j["zero_optimization"]["offload_optimizer"]["buffer_count"], 4);
  EXPECT_EQ(j["zero_optimization"]["offload_optimizer"]["ratio"], 1.0);
  EXPECT_FALSE(j["zero_optimization"]["offload_optimizer"].contains("nvme_path"));
  EXPECT_EQ(j["aio"]["block_size"], 1048576);
  EXPECT_EQ(j["aio"]["queue_depth"], 8);
  EXPECT_EQ(j["aio"]["intra_op_parallelism"], 1);
  EXPECT_EQ(j["aio"]["single_submit"], false);
  EXPECT_EQ(j["aio"]["overlap_events"], true);
  EXPECT_EQ(j["fp16"]["enabled"], false);
  EXPECT_EQ(j["fp16"]["initial_scale_power"], 16);
  EXPECT_EQ(j["fp16"]["loss_scale_window"], 1000);
  EXPECT_EQ(j["fp16"]["hysteresis"], 2);
  EXPECT_EQ(j["fp16"]["min_loss_scale"], 1.0);
  EXPECT_EQ(j["bf16"]["enabled"], false);
  EXPECT_EQ(j["strata"]["verify_checksums"], true);
  EXPECT_EQ(j["strata"]["overlap_backward"], true);
  EXPECT_EQ(j["strata"]["clip_mode"], "exact");
  EXPECT_EQ(j["strata"]["dram_cache_bytes"], 0);
  EXPECT_EQ(j["strata"]["threads"], 0);
  EXPECT_EQ(j["strata"]["progress"], "auto");
  EXPECT_EQ(j["strata"]["trace"]["steps"], 1);
  EXPECT_FALSE(j["strata"].contains("schedule"));     // machine-dependent: absent
  EXPECT_FALSE(j["strata"].contains("dram_budget"));  // auto fraction: absent
  EXPECT_FALSE(j["data_types"].contains("grad_accum_dtype"));
  // Optional sections are not invented.
  EXPECT_FALSE(j.contains("optimizer"));
  EXPECT_FALSE(j.contains("scheduler"));
  EXPECT_EQ(j["zero_optimization"]["offload_param"]["device"], "none");
  EXPECT_TRUE(c.warnings().empty()) << all_warnings(c);
}

TEST(Config, TypedAccessorsAndDefaultsForAbsentKeys) {
  Config c = must_parse({{"aio", {{"queue_depth", 64}}}, {"gradient_clipping", 1.5}});
  EXPECT_EQ(c.typed().aio.queue_depth, 64);
  EXPECT_DOUBLE_EQ(c.typed().training.gradient_clipping, 1.5);
  EXPECT_TRUE(c.typed().strata.verify_checksums);
  EXPECT_EQ(c.typed().zero.offload.device, OffloadDevice::kNone);
  EXPECT_TRUE(c.has("aio.block_size"));
  EXPECT_FALSE(c.has("zero_optimization.offload_optimizer.nvme_path"));
  EXPECT_EQ(c.find("zero_optimization.offload_optimizer.nvme_path"), nullptr);
  ASSERT_NE(c.find("aio"), nullptr);
  EXPECT_TRUE(c.find("aio")->is_object());
  // An absent key falls back to the schema default; a default-constructed
  // Config has nothing but the schema.
  Config empty;
  EXPECT_EQ(empty.typed().aio.queue_depth, 8);
  EXPECT_EQ(empty.typed().strata.clip_mode, ClipMode::kExact);
  EXPECT_FALSE(empty.typed().precision.fp16_enabled);
}

TEST(Config, IntegralFloatsBecomeIntegers) {
  Config c = must_parse({{"zero_optimization", {{"sub_group_size", 1e8}}},
                         {"aio", {{"block_size", 262144.0}}},
                         {"strata", {{"dram_budget", 8e9}}}});
  json z = jv(c)["zero_optimization"]["sub_group_size"];
  EXPECT_TRUE(z.is_number_integer()) << z.dump();
  EXPECT_EQ(z.get<int64_t>(), 100000000);
  EXPECT_TRUE(jv(c)["aio"]["block_size"].is_number_integer());
  EXPECT_EQ(c.typed().strata.dram_budget.value_or(0), 8000000000LL);
}

TEST(Config, NullMeansNotGiven) {
  Config c = must_parse({{"aio", {{"queue_depth", nullptr}}},
                         {"zero_optimization", {{"offload_optimizer", {{"nvme_path", nullptr}}}}},
                         {"optimizer", nullptr}});
  EXPECT_EQ(jv(c)["aio"]["queue_depth"], 8);
  EXPECT_FALSE(jv(c)["zero_optimization"]["offload_optimizer"].contains("nvme_path"));
  EXPECT_FALSE(c.json().contains("optimizer"));
}

TEST(Config, OptimizerDefaultsDependOnType) {
  {
    Config c = must_parse({{"optimizer", {{"type", "adamw"}}}});
    json o = jv(c)["optimizer"];
    EXPECT_EQ(o["type"], "AdamW");  // canonical case, as DeepSpeed matches it
    EXPECT_EQ(o["params"]["lr"], 1e-3);
    EXPECT_EQ(o["params"]["betas"], json::array({0.9, 0.999}));
    EXPECT_EQ(o["params"]["eps"], 1e-8);
    EXPECT_EQ(o["params"]["weight_decay"], 0.0);
    EXPECT_EQ(o["params"]["adam_w_mode"], true);
    EXPECT_EQ(o["params"]["bias_correction"], true);
    EXPECT_EQ(o["params"]["amsgrad"], false);
    EXPECT_FALSE(o["params"].contains("momentum"));
    EXPECT_FALSE(o["params"].contains("torch_adam"));  // accepted-ignored: no default
  }
  {
    Config c = must_parse({{"optimizer", {{"type", "SGD"}, {"params", {{"lr", 0.1}}}}}});
    json p = jv(c)["optimizer"]["params"];
    EXPECT_EQ(p["lr"], 0.1);
    EXPECT_EQ(p["momentum"], 0.0);
    EXPECT_EQ(p["nesterov"], false);
    EXPECT_FALSE(p.contains("betas"));
    EXPECT_FALSE(p.contains("eps"));
  }
  {
    Config c = must_parse({{"optimizer", {{"type", "ADAGRAD"}}}});
    json o = jv(c)["optimizer"];
    EXPECT_EQ(o["type"], "Adagrad");
    EXPECT_EQ(o["params"]["lr"], 1e-2);
    EXPECT_EQ(o["params"]["eps"], 1e-10);
    EXPECT_EQ(o["params"]["lr_decay"], 0.0);
    EXPECT_FALSE(o["params"].contains("betas"));
  }
}

TEST(Config, SchedulerDefaultsDependOnType) {
  {
    Config c = must_parse({{"scheduler", {{"type", "WarmupLR"}}}});
    json p = jv(c)["scheduler"]["params"];
    EXPECT_EQ(p["warmup_min_lr"], 0.0);
    EXPECT_FALSE(p.contains("warmup_max_lr"));  // WarmupLR: the optimizer's lr
    EXPECT_EQ(p["warmup_num_steps"], 1000);
    EXPECT_EQ(p["warmup_type"], "log");
    EXPECT_EQ(p["last_batch_iteration"], -1);
    EXPECT_FALSE(p.contains("total_num_steps"));
    EXPECT_FALSE(p.contains("cos_min_ratio"));
  }
  {
    Config c = must_parse(
        {{"scheduler", {{"type", "WarmupDecayLR"}, {"params", {{"total_num_steps", 500}}}}}});
    json p = jv(c)["scheduler"]["params"];
    EXPECT_EQ(p["warmup_max_lr"], 0.001);
    EXPECT_EQ(p["total_num_steps"], 500);
  }
  {
    Config c = must_parse(
        {{"scheduler", {{"type", "WarmupCosineLR"}, {"params", {{"total_num_steps", 500}}}}}});
    json p = jv(c)["scheduler"]["params"];
    EXPECT_EQ(p["cos_min_ratio"], 0.0001);
    EXPECT_EQ(p["warmup_min_ratio"], 0.0);
    EXPECT_FALSE(p.contains("warmup_min_lr"));
    EXPECT_FALSE(p.contains("warmup_max_lr"));
  }
  {
    // total shorter than warmup: DeepSpeed warns, so do we.
    Config c = must_parse({{"scheduler",
                            {{"type", "WarmupDecayLR"},
                             {"params", {{"total_num_steps", 10}, {"warmup_num_steps", 100}}}}}});
    EXPECT_EQ(count_warnings_containing(c, "never leaves warmup"), 1) << all_warnings(c);
  }
}

struct BatchCase {
  json given;
  int world;
  int64_t train, micro, accum;
};

TEST(Config, BatchRuleAnyTwoImplyTheThird) {
  const BatchCase cases[] = {
      {json::object(), 1, 1, 1, 1},
      {json::object(), 4, 4, 1, 1},
      {{{"train_batch_size", 32}}, 1, 32, 32, 1},
      {{{"train_batch_size", 32}}, 4, 32, 8, 1},
      {{{"train_micro_batch_size_per_gpu", 8}}, 2, 16, 8, 1},
      {{{"gradient_accumulation_steps", 4}}, 2, 8, 1, 4},
      {{{"train_batch_size", 32}, {"train_micro_batch_size_per_gpu", 4}}, 2, 32, 4, 4},
      {{{"train_batch_size", 32}, {"gradient_accumulation_steps", 2}}, 2, 32, 8, 2},
      {{{"train_micro_batch_size_per_gpu", 4}, {"gradient_accumulation_steps", 2}}, 3, 24, 4, 2},
      {{{"train_batch_size", 24},
        {"train_micro_batch_size_per_gpu", 4},
        {"gradient_accumulation_steps", 2}},
       3,
       24,
       4,
       2},
      {{{"train_batch_size", 1e3}, {"train_micro_batch_size_per_gpu", 10.0}}, 1, 1000, 10, 100},
  };
  for (const BatchCase& bc : cases) {
    ParseOptions opt;
    opt.world_size = bc.world;
    Config c = must_parse(bc.given, opt);
    EXPECT_EQ(c.typed().training.train_batch_size.value_or(0), bc.train)
        << bc.given.dump() << " world " << bc.world;
    EXPECT_EQ(c.typed().training.train_micro_batch_size_per_gpu.value_or(0), bc.micro)
        << bc.given.dump();
    EXPECT_EQ(c.typed().training.gradient_accumulation_steps.value_or(0), bc.accum)
        << bc.given.dump();
  }
}

TEST(Config, BatchRuleMismatchNamesTheThreeNumbers) {
  ParseOptions opt;
  opt.world_size = 2;
  const std::string msg = parse_error({{"train_batch_size", 32},
                                       {"train_micro_batch_size_per_gpu", 4},
                                       {"gradient_accumulation_steps", 2}},
                                      opt);
  EXPECT_NE(msg.find("train_batch_size: 32 does not equal"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(4)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(2)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("= 16"), std::string::npos) << msg;
  // Not divisible by the world size.
  opt.world_size = 3;
  const std::string msg2 = parse_error({{"train_batch_size", 32}}, opt);
  EXPECT_NE(msg2.find("not divisible by the world size (3)"), std::string::npos) << msg2;
  // Overflow is an error, not undefined behaviour.
  const std::string msg3 = parse_error({{"train_micro_batch_size_per_gpu", 4611686018427387904LL},
                                        {"gradient_accumulation_steps", 4}});
  EXPECT_NE(msg3.find("overflows"), std::string::npos) << msg3;
}

TEST(Config, AutoResolvedFromAutoValues) {
  ParseOptions opt;
  opt.auto_values = {{"optimizer.params.lr", 3e-4},
                     {"optimizer.params.betas", {0.9, 0.95}},
                     {"train_micro_batch_size_per_gpu", 8},
                     {"gradient_accumulation_steps", 2},
                     {"gradient_clipping", 1.0},
                     {"fp16.enabled", false},
                     {"bf16.enabled", true},
                     {"zero_optimization.reduce_bucket_size", 5e8}};
  opt.world_size = 2;
  Config c = must_parse(
      {{"optimizer", {{"type", "AdamW"}, {"params", {{"lr", "auto"}, {"betas", "auto"}}}}},
       {"train_micro_batch_size_per_gpu", "auto"},
       {"gradient_accumulation_steps", "auto"},
       {"train_batch_size", "auto"},
       {"gradient_clipping", "auto"},
       {"fp16", {{"enabled", "auto"}}},
       {"bf16", {{"enabled", "auto"}}},
       {"zero_optimization", {{"reduce_bucket_size", "auto"}}}},
      opt);
  EXPECT_EQ(jv(c)["optimizer"]["params"]["lr"], 3e-4);
  EXPECT_EQ(jv(c)["optimizer"]["params"]["betas"], json::array({0.9, 0.95}));
  EXPECT_EQ(c.typed().training.train_micro_batch_size_per_gpu.value_or(0), 8);
  EXPECT_EQ(c.typed().training.gradient_accumulation_steps.value_or(0), 2);
  EXPECT_EQ(c.typed().training.train_batch_size.value_or(0), 32);  // implied: 8 x 2 x world 2
  EXPECT_DOUBLE_EQ(c.typed().training.gradient_clipping, 1.0);
  EXPECT_FALSE(c.typed().precision.fp16_enabled);
  EXPECT_TRUE(c.typed().precision.bf16_enabled);
  // Resolved integer from a float auto value.
  EXPECT_EQ(jv(c)["zero_optimization"]["reduce_bucket_size"], 500000000);
}

TEST(Config, AutoBatchKeyImpliedByTheOtherTwo) {
  Config c = must_parse({{"train_batch_size", "auto"},
                         {"train_micro_batch_size_per_gpu", 4},
                         {"gradient_accumulation_steps", 8}});
  EXPECT_EQ(c.typed().training.train_batch_size.value_or(0), 32);
  Config d = must_parse({{"train_batch_size", 64},
                         {"train_micro_batch_size_per_gpu", "auto"},
                         {"gradient_accumulation_steps", 8}});
  EXPECT_EQ(d.typed().training.train_micro_batch_size_per_gpu.value_or(0), 8);
}

TEST(Config, AutoWithoutValueNamesTheKey) {
  std::string msg = parse_error({{"optimizer", {{"type", "AdamW"}, {"params", {{"lr", "auto"}}}}}});
  EXPECT_NE(msg.find("optimizer.params.lr: \"auto\" has no value to resolve to; write a number"),
            std::string::npos)
      << msg;
  msg = parse_error({{"train_batch_size", "auto"}, {"train_micro_batch_size_per_gpu", "auto"}});
  EXPECT_NE(msg.find("train_batch_size: \"auto\" has no value"), std::string::npos) << msg;
  msg = parse_error({{"gradient_clipping", "auto"}});
  EXPECT_NE(msg.find("gradient_clipping: \"auto\""), std::string::npos) << msg;
  // An auto value of the wrong type says where it came from.
  ParseOptions opt;
  opt.auto_values = {{"gradient_clipping", "high"}};
  msg = parse_error({{"gradient_clipping", "auto"}}, opt);
  EXPECT_NE(msg.find("gradient_clipping: \"high\" has type string"), std::string::npos) << msg;
  EXPECT_NE(msg.find("came from auto_values"), std::string::npos) << msg;
  // Keys accepted but not acted on may stay "auto".
  Config c = must_parse({{"zero_optimization", {{"stage3_module_granularity_threshold", "auto"}}}});
  EXPECT_EQ(jv(c)["zero_optimization"]["stage3_module_granularity_threshold"], "auto");
  // The stage-3 window's knobs Hugging Face writes as "auto": the schema's default when
  // nothing resolves them.
  Config d = must_parse({{"zero_optimization", {{"stage3_prefetch_bucket_size", "auto"}}}});
  EXPECT_EQ(jv(d)["zero_optimization"]["stage3_prefetch_bucket_size"], 50000000);
  EXPECT_EQ(d.typed().zero.stage3.prefetch_bucket_size, 50000000);
}

TEST(Config, DeprecatedAliasesAreRewrittenWithAWarning) {
  Config c =
      must_parse({{"zero_optimization",
                   {{"stage", 2}, {"cpu_offload", true}, {"cpu_offload_use_pin_memory", true}}},
                  {"aio", {{"thread_count", 3}}},
                  {"bfloat16", {{"enabled", true}}}});
  json j = c.json();
  EXPECT_EQ(j["zero_optimization"]["offload_optimizer"]["device"], "cpu");
  EXPECT_EQ(j["zero_optimization"]["offload_optimizer"]["pin_memory"], true);
  EXPECT_FALSE(j["zero_optimization"].contains("cpu_offload"));
  EXPECT_EQ(j["aio"]["intra_op_parallelism"], 3);
  EXPECT_FALSE(j["aio"].contains("thread_count"));
  EXPECT_TRUE(j["bf16"]["enabled"].get<bool>());
  EXPECT_FALSE(j.contains("bfloat16"));
  EXPECT_EQ(count_warnings_containing(c, "zero_optimization.cpu_offload is deprecated"), 1)
      << all_warnings(c);
  EXPECT_EQ(count_warnings_containing(c, "aio.thread_count is deprecated"), 1);
  EXPECT_EQ(count_warnings_containing(c, "bfloat16 is deprecated"), 1);
  EXPECT_EQ(count_warnings_containing(c, "cpu_offload_use_pin_memory is deprecated"), 1);
}

TEST(Config, AliasEdgeCases) {
  // false has no effect (the default device stays), and says so.
  Config c = must_parse({{"zero_optimization", {{"cpu_offload", false}}}});
  EXPECT_EQ(c.typed().zero.offload.device, OffloadDevice::kNone);
  EXPECT_EQ(count_warnings_containing(c, "has no effect"), 1) << all_warnings(c);
  // Old and new name agreeing: accepted, the old one dropped.
  Config d = must_parse(
      {{"zero_optimization", {{"cpu_offload", true}, {"offload_optimizer", {{"device", "cpu"}}}}}});
  EXPECT_EQ(count_warnings_containing(d, "repeats"), 1) << all_warnings(d);
  // cpu_offload_param: parameter offload, which is accepted but not acted on.
  Config e = must_parse({{"zero_optimization", {{"stage", 2}, {"cpu_offload_param", true}}}});
  EXPECT_EQ(jv(e)["zero_optimization"]["offload_param"]["device"], "cpu");
  EXPECT_EQ(count_warnings_containing(e, "zero_optimization.offload_param"), 2)
      << all_warnings(e);  // the alias warning and the not-acted-on warning
  // The oldest form of the ZeRO section.
  Config f = must_parse({{"zero_optimization", true}});
  EXPECT_EQ(f.typed().zero.stage, 1);
  EXPECT_EQ(count_warnings_containing(f, "true/false is deprecated"), 1);
  Config g = must_parse({{"zero_optimization", false}});
  EXPECT_EQ(g.typed().zero.stage, 0);
  // Errors inside a renamed section name both spellings.
  const std::string msg = parse_error({{"bfloat16", {{"enabled", "yes"}}}});
  EXPECT_NE(msg.find("bf16.enabled (given as bfloat16.enabled): \"yes\" has type string"),
            std::string::npos)
      << msg;
}

TEST(Config, Stage3IsHonouredInOneProcessAndAcrossRanks) {
  const json z = {{"zero_optimization",
                   {{"stage", 3},
                    {"offload_param", {{"device", "cpu"}}},
                    {"stage3_max_live_parameters", 1e9},
                    {"stage3_prefetch_bucket_size", "auto"},
                    {"stage3_allgather_sequential", true},
                    {"overlap_comm", true}}}};
  // One process: the window's keys are acted on (no warning); keys with no counterpart
  // and the communication knobs get their own.
  Config c = must_parse(z);
  EXPECT_EQ(count_warnings_containing(c, "parameter partitioning"), 0) << all_warnings(c);
  EXPECT_EQ(count_warnings_containing(c, "stage3_max_live_parameters ="), 0) << all_warnings(c);
  EXPECT_EQ(count_warnings_containing(c, "zero_optimization.stage3_allgather_sequential"), 1);
  EXPECT_EQ(count_warnings_containing(c, "zero_optimization.overlap_comm = true"), 1);
  EXPECT_EQ(c.warnings().size(), 2u) << all_warnings(c);
  EXPECT_EQ(c.typed().zero.offload_param.device, OffloadDevice::kCpu);
  EXPECT_EQ(c.typed().zero.stage3.max_live_parameters, 1000000000);
  // Several ranks: stage 3 partitions the parameters; only the keys strata does not act on
  // are warned about, as in one process.
  ParseOptions two;
  two.world_size = 2;
  Config r = must_parse(z, two);
  EXPECT_EQ(count_warnings_containing(r, "parameter partitioning"), 0) << all_warnings(r);
  EXPECT_EQ(count_warnings_containing(r, "runs as stage 2"), 0) << all_warnings(r);
  EXPECT_EQ(count_warnings_containing(r, "stage3_max_live_parameters ="), 0) << all_warnings(r);
  EXPECT_EQ(count_warnings_containing(r, "stage3_allgather_sequential"), 1) << all_warnings(r);
  // Stage 2 with offload_param: warned about (DeepSpeed: valid only with stage 3).
  Config d = must_parse(
      {{"zero_optimization",
        {{"stage", 2}, {"offload_param", {{"device", "nvme"}, {"nvme_path", "/tmp"}}}}}});
  EXPECT_EQ(count_warnings_containing(d,
                                      "offload_param.device: \"nvme\" is not acted on at "
                                      "zero_optimization.stage 2"),
            1)
      << all_warnings(d);
  // offload_param nvme without a folder is an error naming the key.
  auto bad = Config::parse(
      json{{"zero_optimization", {{"stage", 3}, {"offload_param", {{"device", "nvme"}}}}}});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("zero_optimization.offload_param.nvme_path: missing"),
            std::string::npos)
      << bad.status().to_string();
}

TEST(Config, UnknownKeysWarnOnceUnlessCloseToAKnownKey) {
  Config c = must_parse({{"some_future_key", 1},
                         {"another_future_key", {{"a", 1}}},
                         {"aio", {{"new_aio_knob", true}}}});
  EXPECT_EQ(count_warnings_containing(c, "some_future_key: unknown key ignored"), 1)
      << all_warnings(c);
  EXPECT_EQ(count_warnings_containing(c, "another_future_key: unknown key ignored"), 1);
  EXPECT_EQ(count_warnings_containing(c, "aio.new_aio_knob: unknown key ignored"), 1);
  EXPECT_EQ(c.warnings().size(), 3u) << all_warnings(c);
  EXPECT_EQ(jv(c)["some_future_key"], 1);  // kept in json()
  // A known key in the wrong place: a warning that says where it belongs.
  Config d = must_parse({{"stage", 2}});
  EXPECT_EQ(count_warnings_containing(d, "exists at zero_optimization.stage"), 1)
      << all_warnings(d);
  // Close to a known key: an error with "did you mean".
  std::string msg =
      parse_error({{"zero_optimization", {{"offload_optimzer", {{"device", "cpu"}}}}}});
  EXPECT_EQ(msg,
            "zero_optimization.offload_optimzer: unknown key; did you mean \"offload_optimizer\"?");
  msg = parse_error({{"Train_Batch_Size", 8}});
  EXPECT_NE(msg.find("did you mean \"train_batch_size\""), std::string::npos) << msg;
}

TEST(Config, AcceptedButIgnoredKeysWarnOnlyWhenTheyWouldChangeSomething) {
  Config c = must_parse({{"zero_optimization",
                          {{"overlap_comm", false},
                           {"contiguous_gradients", true},
                           {"reduce_scatter", true},
                           {"offload_param", {{"device", "none"}}}}},
                         {"tensorboard", {{"enabled", false}, {"output_path", "x"}}},
                         {"aio", {{"use_gds", false}}}});
  EXPECT_EQ(c.warnings().size(), 1u) << all_warnings(c);
  EXPECT_EQ(count_warnings_containing(c,
                                      "zero_optimization.reduce_scatter = true is accepted but "
                                      "not acted on"),
            1)
      << all_warnings(c);
  Config d = must_parse({{"tensorboard", {{"enabled", true}}}, {"aio", {{"use_gds", true}}}});
  EXPECT_EQ(d.warnings().size(), 2u) << all_warnings(d);
  EXPECT_EQ(count_warnings_containing(d, "aio.use_gds = true is accepted but not acted on"), 1);
}

TEST(Config, NvmePathMustBeAWritableDirectory) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  json j = {{"zero_optimization",
             {{"offload_optimizer", {{"device", "nvme"}, {"nvme_path", dir.path()}}}}}};
  Config c = must_parse(j);
  EXPECT_EQ(c.typed().zero.offload.nvme_path.value_or(""), dir.path());
  EXPECT_EQ(count_warnings_containing(c, "created the folder"), 0) << all_warnings(c);

  // check_paths=false is for tools that inspect a config meant for another
  // machine: it neither checks nor creates.
  j["zero_optimization"]["offload_optimizer"]["nvme_path"] = dir.path() + "/missing";
  ParseOptions no_check;
  no_check.check_paths = false;
  must_parse(j, no_check);
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/missing"));
}

// Regression: `make demo` on a clean clone failed because the demo config's
// nvme_path ("strata_swap", git-ignored) did not exist there. A missing
// folder is now made like `mkdir -p`, and said once.
TEST(Config, MissingNvmePathIsCreatedAndSaidOnce) {
  TempDir dir;
  const std::string target = dir.path() + "/swap/rank0/";
  const json j = {
      {"zero_optimization", {{"offload_optimizer", {{"device", "nvme"}, {"nvme_path", target}}}}}};
  Config c = must_parse(j);
  EXPECT_TRUE(std::filesystem::is_directory(target));
  EXPECT_EQ(count_warnings_containing(c,
                                      "zero_optimization.offload_optimizer.nvme_path: created "
                                      "the folder \"" +
                                          dir.path() + "/swap\""),
            1)
      << all_warnings(c);
  // The second parse finds the folder and says nothing more.
  Config again = must_parse(j);
  EXPECT_EQ(count_warnings_containing(again, "created the folder"), 0) << all_warnings(again);
  // The spill folder of device cpu is made the same way.
  const std::string spill = dir.path() + "/spill";
  Config cpu = must_parse(
      {{"zero_optimization", {{"offload_optimizer", {{"device", "cpu"}, {"nvme_path", spill}}}}}});
  EXPECT_TRUE(std::filesystem::is_directory(spill));
  EXPECT_EQ(count_warnings_containing(cpu, "created the folder"), 1) << all_warnings(cpu);
}

TEST(Config, MissingNvmePathBelowAFileIsAnError) {
  TempDir dir;
  const std::string file = dir.path() + "/file";
  std::FILE* f = std::fopen(file.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  const std::string target = file + "/swap";
  const std::string msg =
      parse_error({{"zero_optimization",
                    {{"offload_optimizer", {{"device", "nvme"}, {"nvme_path", target}}}}}});
  EXPECT_NE(msg.find("zero_optimization.offload_optimizer.nvme_path: \"" + target +
                     "\" does not exist and cannot be created: \"" + file +
                     "\" is in the way and is not a directory"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("point nvme_path at an existing, writable directory"), std::string::npos)
      << msg;
}

// Marks a directory immutable (chattr +i) for the lifetime of the object:
// the one way to make a directory non-writable for root, who bypasses
// permission bits. Needs CAP_LINUX_IMMUTABLE and a file system with the flag.
class ImmutableDir {
 public:
  explicit ImmutableDir(const std::string& path) : path_(path) { ok_ = set(true); }
  ~ImmutableDir() {
    if (ok_) {
      set(false);
    }
  }
  bool ok() const { return ok_; }

 private:
  bool set(bool on) {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
      return false;
    }
    int flags = 0;
    bool done = ::ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0;
    if (done) {
      flags = on ? (flags | FS_IMMUTABLE_FL) : (flags & ~FS_IMMUTABLE_FL);
      done = ::ioctl(fd, FS_IOC_SETFLAGS, &flags) == 0;
    }
    ::close(fd);
    return done;
  }
  std::string path_;
  bool ok_ = false;
};

TEST(Config, NonWritableNvmePathIsRefused) {
  TempDir dir;
  const std::string target = dir.path() + "/ro";
  std::filesystem::create_directory(target);
  std::filesystem::permissions(
      target, std::filesystem::perms::owner_read | std::filesystem::perms::owner_exec);
  // Root ignores the mode bits above; an immutable directory stops root too.
  std::unique_ptr<ImmutableDir> immutable;
  if (::access(target.c_str(), W_OK) == 0) {
    immutable = std::make_unique<ImmutableDir>(target);
  }
  if (::access(target.c_str(), W_OK) == 0) {
    std::filesystem::permissions(target, std::filesystem::perms::owner_all);
    GTEST_SKIP() << "cannot make a directory non-writable here (root without "
                    "CAP_LINUX_IMMUTABLE or a file system without the immutable flag)";
  }
  const std::string msg =
      parse_error({{"zero_optimization",
                    {{"offload_optimizer", {{"device", "nvme"}, {"nvme_path", target}}}}}});
  EXPECT_NE(msg.find("zero_optimization.offload_optimizer.nvme_path: \"" + target +
                     "\" is not writable by this process"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("choose another directory"), std::string::npos) << msg;
  immutable.reset();
  std::filesystem::permissions(target, std::filesystem::perms::owner_all);
}

TEST(Config, MissingNvmePathUnderAReadOnlyFolderIsAnError) {
  TempDir dir;
  const std::string ro = dir.path() + "/ro";
  std::filesystem::create_directory(ro);
  std::filesystem::permissions(
      ro, std::filesystem::perms::owner_read | std::filesystem::perms::owner_exec);
  // Root ignores the mode bits above; an immutable directory stops root too.
  std::unique_ptr<ImmutableDir> immutable;
  if (::access(ro.c_str(), W_OK) == 0) {
    immutable = std::make_unique<ImmutableDir>(ro);
  }
  if (::access(ro.c_str(), W_OK) == 0) {
    std::filesystem::permissions(ro, std::filesystem::perms::owner_all);
    GTEST_SKIP() << "cannot make a directory non-writable here (root without "
                    "CAP_LINUX_IMMUTABLE or a file system without the immutable flag)";
  }
  const std::string target = ro + "/swap/rank0";
  const std::string msg =
      parse_error({{"zero_optimization",
                    {{"offload_optimizer", {{"device", "nvme"}, {"nvme_path", target}}}}}});
  immutable.reset();
  std::filesystem::permissions(ro, std::filesystem::perms::owner_all);
  EXPECT_NE(msg.find("zero_optimization.offload_optimizer.nvme_path: \"" + target +
                     "\" does not exist and cannot be created: its nearest existing folder \"" +
                     ro + "\" is not writable by this process"),
            std::string::npos)
      << msg;
  EXPECT_FALSE(std::filesystem::exists(ro + "/swap"));
}

TEST(Config, DramCacheWithoutNvmeWarns) {
  Config c = must_parse({{"strata", {{"dram_cache_bytes", 1 << 20}}}});
  EXPECT_EQ(count_warnings_containing(c, "strata.dram_cache_bytes"), 1) << all_warnings(c);
}

// The communication keys the data-parallel optimizer acts on are warned about
// as "not acted on" for one process only.
TEST(Config, CommunicationKeysWarnForOneProcessOnly) {
  const json user = {{"zero_optimization",
                      {{"stage", 2},
                       {"overlap_comm", true},
                       {"reduce_bucket_size", 500000000},
                       {"allgather_bucket_size", 500000000},
                       {"reduce_scatter", true},
                       {"round_robin_gradients", true}}}};
  Config one = must_parse(user);
  // Warnings list "<path> = <value>"; the note itself names the keys too.
  for (const char* k : {"overlap_comm =", "reduce_bucket_size =", "allgather_bucket_size =",
                        "reduce_scatter =", "round_robin_gradients ="}) {
    EXPECT_EQ(count_warnings_containing(one, k), 1) << k << "\n" << all_warnings(one);
  }
  ParseOptions opt;
  opt.world_size = 2;
  Config two = must_parse(user, opt);
  for (const char* k :
       {"overlap_comm =", "reduce_bucket_size =", "allgather_bucket_size =", "reduce_scatter ="}) {
    EXPECT_EQ(count_warnings_containing(two, k), 0) << k << "\n" << all_warnings(two);
  }
  EXPECT_EQ(count_warnings_containing(two, "round_robin_gradients ="), 1) << all_warnings(two);
}

TEST(Config, ParsingTheResultAgainGivesTheSameResult) {
  TempDir dir;
  ParseOptions opt;
  opt.world_size = 2;
  opt.auto_values = {{"optimizer.params.lr", 1e-4}, {"train_micro_batch_size_per_gpu", 2}};
  const json user = {
      {"train_micro_batch_size_per_gpu", "auto"},
      {"optimizer", {{"type", "adam"}, {"params", {{"lr", "auto"}}}}},
      {"scheduler", {{"type", "WarmupCosineLR"}, {"params", {{"total_num_steps", 1e3}}}}},
      {"zero_optimization",
       {{"stage", 3},
        {"cpu_offload", true},
        {"stage3_prefetch_bucket_size", "auto"},
        {"offload_optimizer", {{"nvme_path", dir.path()}}}}},
      {"bfloat16", {{"enabled", true}}},
      {"unknown_thing", 1}};
  Config first = must_parse(user, opt);
  Config second = must_parse(first.json(), opt);
  EXPECT_EQ(first.json(), second.json());
}

TEST(Config, ErrorsAreInvalidArgumentAndNothingThrows) {
  for (const json& bad : {json::array(), json(3), json("x"), json(nullptr), json(true)}) {
    auto r = Config::parse(bad);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), strata::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("expected a JSON object at the top level"),
              std::string::npos)
        << r.status().message();
  }
  ParseOptions opt;
  opt.world_size = 0;
  EXPECT_FALSE(Config::parse(json::object(), opt).ok());
  opt.world_size = 1;
  opt.auto_values = json::array();
  EXPECT_FALSE(Config::parse(json::object(), opt).ok());
  // Invalid UTF-8 in a value built in C++ must not make the error path throw.
  auto r = Config::parse({{"aio", {{"queue_depth", std::string("\xff\xfe")}}}});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("aio.queue_depth"), std::string::npos);
  // Deep nesting is refused before anything recurses over it (kept small
  // here because building it with nlohmann recurses in this test itself).
  json deep = json::array();
  for (int i = 0; i < 200; ++i) {
    deep = json::array({std::move(deep)});
  }
  auto d = Config::parse({{"unknown", deep}});
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("nested deeper than"), std::string::npos);
}

TEST(ConfigLoad, ReadsFilesWithBomAndComments) {
  TempDir dir;
  const std::string path = dir.path() + "/ds.json";
  {
    std::ofstream f(path, std::ios::binary);
    f << "\xEF\xBB\xBF// a DeepSpeed config\n{\n  \"aio\": {\"queue_depth\": 16}, /* block */\n"
         "  \"train_batch_size\": 4\n}\n";
  }
  auto r = Config::load(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->typed().aio.queue_depth, 16);
  EXPECT_EQ(r->typed().training.train_batch_size.value_or(0), 4);
}

TEST(ConfigLoad, SyntaxErrorNamesFileLineAndColumn) {
  TempDir dir;
  const std::string path = dir.path() + "/broken.json";
  {
    std::ofstream f(path);
    f << "{\n  \"aio\": {\n    \"queue_depth\" 16\n  }\n}\n";
  }
  auto r = Config::load(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), strata::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(path + ":3:20: invalid JSON: syntax error"),
            std::string::npos)
      << r.status().message();
}

TEST(ConfigLoad, SchemaErrorsNameTheFile) {
  TempDir dir;
  const std::string path = dir.path() + "/bad.json";
  {
    std::ofstream f(path);
    f << R"({"aio": {"queue_depth": "32"}})";
  }
  auto r = Config::load(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(),
            path + ": aio.queue_depth: \"32\" has type string, expected integer (from 1 to 4096)");
}

TEST(ConfigLoad, DeeplyNestedTextIsRefusedWithoutRecursing) {
  // nlohmann parses and destroys iteratively; the depth check is iterative
  // too, so 100000 levels must come back as an error, not a stack overflow.
  const int depth = 100000;
  const std::string text = "{\"x\": " + std::string(depth, '[') + std::string(depth, ']') + "}";
  auto r = Config::parse_text(text, "deep.json");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("deep.json: config: nested deeper than 64 levels"),
            std::string::npos)
      << r.status().message();
}

TEST(ConfigLoad, NumberTooLargeForADoubleIsInvalidJson) {
  // Regression (found by fuzz_config): nlohmann reports "1e90000" as
  // out_of_range.406, not parse_error, and it escaped as an Internal error
  // without a position instead of an input error naming file, line, column.
  auto r = Config::parse_text("{\n  \"gradient_clipping\": 1e90000\n}", "big.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), strata::StatusCode::kInvalidArgument) << r.status().to_string();
  EXPECT_NE(r.status().message().find("big.json:2:24: invalid JSON: number overflow parsing "
                                      "'1e90000'"),
            std::string::npos)
      << r.status().message();
}

TEST(ConfigLoad, MissingFileAndEmptyFile) {
  TempDir dir;
  auto r = Config::load(dir.path() + "/nope.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), strata::StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find(dir.path() + "/nope.json"), std::string::npos);
  const std::string empty = dir.path() + "/empty.json";
  { std::ofstream f(empty); }
  auto e = Config::load(empty);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find(empty + ":1:1: invalid JSON"), std::string::npos)
      << e.status().message();
  auto d = Config::load(dir.path());  // a directory
  EXPECT_FALSE(d.ok());
}

}  // namespace
