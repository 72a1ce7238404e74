// strata/config.h — the one DeepSpeed-style configuration schema.
//
// Every key strata reads is a row of config_schema(): its JSON path, type,
// default, allowed values or range, whether strata acts on it, and a
// description. Config::parse() validates a user's JSON against the table,
// fills defaults, resolves aliases and "auto" values it can, and returns
// errors that name the JSON path, the bad value and what is allowed:
//   zero_optimization.offload_optimizer.device: "ssd" is not one of none, cpu, nvme, cxl
// Unknown keys close to a known key are an error with "did you mean";
// others are one warning. Keys accepted but not acted on produce one warning.
//
// Thread-safety: config_schema() is immutable after first use; a Config is a
// value.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <strata/status.h>

namespace strata {

enum class KeyType { kBool, kInt, kNumber, kString, kObject, kArray, kAny };
const char* key_type_name(KeyType type);

enum class KeySupport {
  kHonoured,          // strata acts on it
  kAcceptedIgnored,   // accepted, not acted on yet: warned once, listed in docs/config.md
  kDeprecatedAlias,   // old name of another key (alias_of): accepted with a warning
};

struct ConfigKey {
  std::string path;               // dotted JSON path, e.g. "aio.block_size"
  KeyType type = KeyType::kAny;
  nlohmann::json default_value;   // null: no default (absent unless given)
  std::string description;
  std::vector<std::string> allowed;  // for strings: the allowed values
  std::optional<double> min, max;    // for numbers, inclusive
  bool allow_auto = false;           // "auto" accepted (Hugging Face style)
  KeySupport support = KeySupport::kHonoured;
  std::string alias_of;              // for kDeprecatedAlias
  std::string note;                  // why it is not acted on / what happens instead
};

// The table, in documentation order.
const std::vector<ConfigKey>& config_schema();
const ConfigKey* find_config_key(const std::string& path);

struct ParseOptions {
  // Values that resolve "auto" keys (e.g. {"train_micro_batch_size_per_gpu": 8,
  // "optimizer.params.lr": 1e-4}); keys still "auto" after that are an error.
  nlohmann::json auto_values = nlohmann::json::object();
  int world_size = 1;
};

class Config {
 public:
  Config() = default;
  // Validates and fills defaults. Errors are InvalidArgument with the path.
  static Result<Config> parse(const nlohmann::json& user, const ParseOptions& options = {});
  // Reads a file; a syntax error names the file, line and column.
  static Result<Config> load(const std::string& path, const ParseOptions& options = {});

  // The user's config with defaults filled in (aliases resolved to their
  // new names).
  const nlohmann::json& json() const { return json_; }
  // Warnings to show once (unknown keys, keys accepted but not acted on,
  // deprecated aliases, implied changes such as stage 3).
  const std::vector<std::string>& warnings() const { return warnings_; }

  // Typed access by dotted path; the key must exist in the schema.
  bool get_bool(const std::string& path) const;
  int64_t get_int(const std::string& path) const;
  double get_number(const std::string& path) const;
  std::string get_string(const std::string& path) const;
  bool has(const std::string& path) const;  // present (given or defaulted) and not null
  const nlohmann::json* find(const std::string& path) const;

 private:
  nlohmann::json json_ = nlohmann::json::object();
  std::vector<std::string> warnings_;
};

}  // namespace strata
