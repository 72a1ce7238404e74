// libFuzzer target for the config parser: arbitrary bytes go through
// Config::parse_text (BOM, comments, syntax errors, the whole schema).
// Beyond "never crash" (ASan/UBSan catch memory errors and UB) it checks:
//   - a refused config is InvalidArgument with a message, never Internal
//     (Internal means an nlohmann exception or a broken invariant escaped);
//   - an accepted config's json() is itself accepted and parses to itself;
//   - the typed accessors work on every schema path.
// Build: CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DSTRATA_FUZZ=ON ...
// Run:   build-fuzz/bin/fuzz_config -dict=tests/cpp/fuzz/fuzz_config.dict
//          -max_total_time=600 <scratch corpus dir> tests/cpp/fuzz/corpus_config
#include <strata/config.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace {

[[noreturn]] void fail() { __builtin_trap(); }

strata::ParseOptions options_for(size_t size) {
  // Vary the options with the input so both paths are explored, while each
  // input stays reproducible.
  strata::ParseOptions opt;
  opt.world_size = 1 + static_cast<int>(size % 4);
  if (size % 2 == 1) {
    opt.auto_values = {{"train_micro_batch_size_per_gpu", 2},
                       {"gradient_accumulation_steps", 3},
                       {"optimizer.params.lr", 1e-4},
                       {"optimizer.params.betas", {0.9, 0.999}},
                       {"optimizer.params.eps", 1e-8},
                       {"optimizer.params.weight_decay", 0.0},
                       {"scheduler.params.total_num_steps", 100},
                       {"scheduler.params.warmup_num_steps", 10},
                       {"scheduler.params.warmup_max_lr", 1e-4},
                       {"scheduler.params.warmup_min_lr", 0},
                       {"gradient_clipping", 1.0},
                       {"fp16.enabled", false},
                       {"bf16.enabled", true}};
  }
  return opt;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const strata::ParseOptions opt = options_for(size);
  auto r = strata::Config::parse_text(text, "fuzz.json", opt);
  if (!r.ok()) {
    if (r.status().code() != strata::StatusCode::kInvalidArgument || r.status().message().empty()) {
      fail();
    }
    return 0;
  }
  auto again = strata::Config::parse(r->json(), opt);
  if (!again.ok() || again->json() != r->json()) {
    fail();
  }
  // Every bound field reads back what the filled JSON holds.
  for (const strata::ConfigKey& key : strata::config_schema()) {
    (void)r->has(key.path);
    if (key.read) {
      const nlohmann::json* v = r->find(key.path);
      if (v != nullptr && !v->is_null() && key.read(r->typed()) != *v) {
        fail();
      }
    }
  }
  return 0;
}
