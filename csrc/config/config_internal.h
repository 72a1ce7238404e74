// config_internal.h — helpers shared by the schema table, the parser and the
// markdown generator (private to csrc/config/).
//
// Thread-safety: the index is built once (function-local static) and is
// read-only afterwards; the other helpers are pure functions.
#pragma once

#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <strata/config.h>

namespace strata::config_detail {

// Lookup structures over config_schema(), built once.
struct SchemaIndex {
  std::unordered_map<std::string, const ConfigKey*> by_path;
  // parent path ("" for the top level) -> rows directly under it, table order
  std::unordered_map<std::string, std::vector<const ConfigKey*>> children;
  // last path component -> rows with that name anywhere (for misplaced keys)
  std::unordered_map<std::string, std::vector<const ConfigKey*>> by_leaf;
};
const SchemaIndex& schema_index();

std::string parent_of(std::string_view path);   // "a.b.c" -> "a.b"; "a" -> ""
std::string leaf_of(std::string_view path);     // "a.b.c" -> "c"
std::string section_of(std::string_view path);  // "a.b.c" -> "a"

// A JSON value as it appears in messages: compact, invalid UTF-8 replaced,
// cut to about 80 characters.
std::string show(const nlohmann::json& value);
// "string", "integer", "number", "boolean", "object", "array", "null".
const char* json_type_word(const nlohmann::json& value);
// 4096 -> "4096", 0.001 -> "0.001", 1e9 -> "1000000000".
std::string fmt_number(double value);

// What a row accepts, as a phrase: "an integer from 1 to 4096",
// "one of none, cpu, nvme, cxl", "true or false", with ` or "auto"` when
// allowed. Used in error messages and docs.
std::string describe_allowed(const ConfigKey& key);
// The range/values part only (for "expected integer (1 to 4096)"); "" if none.
std::string describe_constraint(const ConfigKey& key);

// Lower-case, without '_' and '-': "Offload_Optimizer" -> "offloadoptimizer".
std::string normalize_name(std::string_view name);
// Optimal-string-alignment distance (insert, delete, substitute, transpose).
int edit_distance(std::string_view a, std::string_view b);
// The candidate a misspelled `name` most likely meant, or "" when none is
// close enough (case/underscore variant, or within 1-2 edits by length).
std::string closest_name(std::string_view name, const std::vector<std::string>& candidates);

// The default of `key` for the given section type ("" when the section has no
// type): default_by_type[type] when present, else default_value.
nlohmann::json effective_default(const ConfigKey& key, const std::string& section_type);

std::string join(const std::vector<std::string>& items, std::string_view sep);

// Makes the folder `dir` and its missing ancestors, as `mkdir -p` does (mode
// 0777 less the umask), when the nearest ancestor that exists is a directory
// this process may write into. `created` is the top-most folder it made
// ("" when `dir` already was a directory); on failure `error` says why as a
// phrase without the config key (the caller adds it) and nothing is left
// half-made beyond folders that were created before a later mkdir failed.
// Relative paths are taken from the working directory.
struct MakeDirsResult {
  std::string created;
  std::string error;
};
MakeDirsResult make_directories(const std::string& dir);

}  // namespace strata::config_detail
