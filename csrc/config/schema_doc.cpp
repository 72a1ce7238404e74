// docs/config.md, generated from the schema table so the two cannot drift:
// the committed file must equal config_schema_markdown() (checked by
// tests/cpp/unit/test_config_docs.cpp; STRATA_UPDATE_DOCS=1 rewrites it).
#include <strata/config.h>

#include "config/config_internal.h"

namespace strata {

namespace {

using json = nlohmann::json;
using config_detail::describe_allowed;
using config_detail::join;
using config_detail::show;

// Markdown table cells: '|' would end the cell, newlines the row.
std::string cell(std::string text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '|') {
      out += "\\|";
    } else if (c == '\n') {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out;
}

std::string code(const std::string& text) { return "`" + text + "`"; }

std::string default_text(const ConfigKey& key) {
  if (key.default_by_type.is_object() && !key.default_by_type.empty()) {
    std::vector<std::string> parts;
    for (auto it = key.default_by_type.begin(); it != key.default_by_type.end(); ++it) {
      parts.push_back(it.key() + ": " + code(show(it.value())));
    }
    std::string out = join(parts, ", ");
    if (!key.default_value.is_null()) {
      out += "; otherwise " + code(show(key.default_value));
    }
    return out;
  }
  if (key.path == "train_batch_size" || key.path == "train_micro_batch_size_per_gpu" ||
      key.path == "gradient_accumulation_steps") {
    return "derived";
  }
  if (key.default_value.is_null()) {
    return key.type == KeyType::kObject ? "optional section" : "not set";
  }
  if (key.default_value.is_object()) {
    return "created";
  }
  return code(show(key.default_value));
}

std::string applies_text(const ConfigKey& key) {
  return key.applies_to.empty() ? "" : " Applies to: " + join(key.applies_to, ", ") + ".";
}

// The documentation group of a row: its top-level section, or "" for the
// top-level scalars (train_batch_size, gradient_clipping, ...).
std::string group_of(const ConfigKey& key) {
  if (key.path.find('.') == std::string::npos && key.type != KeyType::kObject) {
    return "";
  }
  return config_detail::section_of(key.path);
}

// Groups in the order of the table (first row of each).
std::vector<std::string> sections() {
  std::vector<std::string> out;
  for (const ConfigKey& key : config_schema()) {
    if (key.support != KeySupport::kHonoured) {
      continue;
    }
    const std::string s = group_of(key);
    bool seen = false;
    for (const std::string& o : out) {
      seen = seen || o == s;
    }
    if (!seen) {
      out.push_back(s);
    }
  }
  return out;
}

}  // namespace

std::string config_schema_markdown() {
  std::string md;
  md += "# Configuration reference\n\n";
  md +=
      "<!-- Generated from csrc/config/schema.cpp by strata::config_schema_markdown(); do not "
      "edit by hand. Regenerate with: STRATA_UPDATE_DOCS=1 <build>/bin/test_config_docs -->\n\n";
  md +=
      "strata reads DeepSpeed-style JSON (`ds_config.json`). DeepSpeed's keys keep DeepSpeed's "
      "meaning and defaults; strata's own keys live in the `strata` section. The same schema "
      "serves `strata.initialize`, `strata.optim.OffloadAdamW`, the C++ API and the bench "
      "binaries; `python -m strata info --config FILE` prints the parsed result.\n\n";
  md += "## How a config is read\n\n";
  md +=
      "- **Errors** name the JSON path, the bad value and what is allowed, e.g.\n"
      "  `zero_optimization.offload_optimizer.device: \"ssd\" is not one of none, cpu, nvme, "
      "cxl`.\n"
      "- **Types** are checked. Integer keys accept integral numbers written as floats (`1e9`); "
      "`1.5` is an error. `null` for any key means \"not given\": the default applies.\n"
      "- **Defaults** are filled for every key that has one, creating sections as needed. The "
      "optional sections `optimizer` and `scheduler` get their parameters' defaults only when "
      "given; their parameters depend on `type`, and a parameter the type does not take is an "
      "error.\n"
      "- **`\"auto\"`** (as Hugging Face's integration writes it) is allowed where the tables "
      "say so. `strata.initialize` resolves it from the model, optimizer and batch arguments; "
      "a batch-size key may also follow from the other two. A key still `\"auto\"` after that "
      "is an error naming it. Keys accepted but not acted on may stay `\"auto\"`.\n"
      "- **Batch sizes** follow DeepSpeed's rule `train_batch_size = "
      "train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size`: any two "
      "imply the third, three given must agree, none given means 1 and 1.\n"
      "- **Unknown keys**: a key close to a known one at the same level (a typo, or a case or "
      "underscore variant) is an error with \"did you mean\"; any other unknown key is one "
      "warning, since DeepSpeed keeps adding keys. Under `optimizer.params` and "
      "`scheduler.params` an unknown key is an error (they are constructor arguments).\n"
      "- **Accepted but not acted on**: the keys in the table below are accepted and warned "
      "about once each, saying what happens instead. No warning is given when the value "
      "changes nothing (a feature switched off: `false`, `{\"enabled\": false}`, "
      "`{\"device\": \"none\"}`, or the values listed as quiet). At ZeRO stage 3 the "
      "stage-3-only keys are named in the single stage-3 warning instead.\n"
      "- **Deprecated names** are read as their new names with a warning; giving both with "
      "different values is an error.\n"
      "- **Files** may start with a UTF-8 byte-order mark and may contain `//` and `/* */` "
      "comments; a syntax error names the file, line and column.\n"
      "- **Parsed once, typed**: every key in the first table is bound by its row to one field "
      "of `strata::EngineConfig` (`include/strata/engine_config.h`), filled when the config is "
      "parsed; the engine, the plan, the I/O layer and the performance model read those "
      "fields. Python parses once (`strata.load_config`) and hands the parsed handle "
      "(`strata._C.Config`) to the engine. The defaults in these tables are the only ones.\n"
      "- `fp16.enabled` and `bf16.enabled` cannot both be true. With "
      "`offload_optimizer.device: nvme`, `nvme_path` is required; whenever `nvme_path` is "
      "given it must be a writable directory, which is created (like `mkdir -p`, said once) "
      "when it is missing and the nearest existing folder above it is writable.\n\n";

  md += "## Keys strata acts on\n\n";
  for (const std::string& section : sections()) {
    std::vector<const ConfigKey*> rows;
    for (const ConfigKey& key : config_schema()) {
      if (key.support == KeySupport::kHonoured && group_of(key) == section) {
        rows.push_back(&key);
      }
    }
    md += "### " + (section.empty() ? std::string("Top level") : code(section)) + "\n\n";
    md += "| key | type | default | accepts | description |\n";
    md += "|---|---|---|---|---|\n";
    for (const ConfigKey* key : rows) {
      md += "| " + code(key->path) + " | " + key_type_name(key->type) + " | " +
            cell(default_text(*key)) + " | " + cell(describe_allowed(*key)) + " | " +
            cell(key->description + applies_text(*key)) + " |\n";
    }
    md += "\n";
  }

  md += "## Accepted but not acted on\n\n";
  md += "| key | type | accepts | quiet values | what happens instead |\n";
  md += "|---|---|---|---|---|\n";
  for (const ConfigKey& key : config_schema()) {
    if (key.support != KeySupport::kAcceptedIgnored) {
      continue;
    }
    std::vector<std::string> quiet;
    for (const json& q : key.quiet_values) {
      quiet.push_back(code(show(q)));
    }
    md += "| " + code(key.path) + " | " + key_type_name(key.type) + " | " +
          cell(describe_allowed(key)) + " | " + cell(join(quiet, ", ")) + " | " +
          cell(key.description + " " + key.note) + " |\n";
  }
  md += "\n";

  md += "## Deprecated names\n\n";
  md += "| old key | read as | description |\n";
  md += "|---|---|---|\n";
  for (const ConfigKey& key : config_schema()) {
    if (key.support != KeySupport::kDeprecatedAlias) {
      continue;
    }
    std::string target = code(key.alias_of);
    if (key.alias_values.is_object()) {
      std::vector<std::string> maps;
      for (auto it = key.alias_values.begin(); it != key.alias_values.end(); ++it) {
        maps.push_back(code(it.key()) + " -> " +
                       (it.value().is_null() ? std::string("no effect") : code(show(it.value()))));
      }
      target += " (" + join(maps, ", ") + ")";
    }
    md += "| " + code(key.path) + " | " + cell(target) + " | " + cell(key.description) + " |\n";
  }
  md +=
      "| `zero_optimization: true` / `false` | `zero_optimization.stage` 1 / 0 | The oldest "
      "form of the ZeRO section. |\n";
  return md;
}

}  // namespace strata
