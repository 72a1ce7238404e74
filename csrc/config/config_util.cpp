// Helpers for the config schema: naming, formatting, fuzzy matching.
#include "config/config_internal.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace strata::config_detail {

using json = nlohmann::json;

const SchemaIndex& schema_index() {
  static const SchemaIndex index = [] {
    SchemaIndex idx;
    for (const ConfigKey& key : config_schema()) {
      idx.by_path.emplace(key.path, &key);
      idx.children[parent_of(key.path)].push_back(&key);
      idx.by_leaf[leaf_of(key.path)].push_back(&key);
    }
    return idx;
  }();
  return index;
}

std::string parent_of(std::string_view path) {
  const size_t dot = path.rfind('.');
  return dot == std::string_view::npos ? std::string() : std::string(path.substr(0, dot));
}

std::string leaf_of(std::string_view path) {
  const size_t dot = path.rfind('.');
  return std::string(dot == std::string_view::npos ? path : path.substr(dot + 1));
}

std::string section_of(std::string_view path) {
  const size_t dot = path.find('.');
  return std::string(dot == std::string_view::npos ? path : path.substr(0, dot));
}

std::string show(const json& value) {
  // error_handler_t::replace: a value built in C++ or Python may hold invalid
  // UTF-8, and dump() would otherwise throw.
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  constexpr size_t kMax = 80;
  if (text.size() > kMax) {
    size_t cut = kMax;
    // Do not cut inside a UTF-8 sequence.
    while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) {
      --cut;
    }
    text.resize(cut);
    text += "...";
  }
  return text;
}

const char* json_type_word(const json& value) {
  switch (value.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "integer";
    case json::value_t::number_float:
      return "number";
    case json::value_t::string:
      return "string";
    case json::value_t::object:
      return "object";
    case json::value_t::array:
      return "array";
    case json::value_t::binary:
      return "binary";
    case json::value_t::discarded:
      return "discarded";
  }
  return "unknown";
}

std::string fmt_number(double value) {
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 1e15) {
    return std::to_string(static_cast<long long>(value));
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.15g", value);
  return buf;
}

namespace {

std::string range_phrase(const ConfigKey& key, bool integer) {
  const bool has_min = key.min.has_value();
  const bool has_max = key.max.has_value();
  std::string out;
  if (integer) {
    if (has_min && has_max) {
      out = "from " + fmt_number(*key.min) + " to " + fmt_number(*key.max);
    } else if (has_min) {
      out = ">= " + fmt_number(*key.min);
    } else if (has_max) {
      out = "<= " + fmt_number(*key.max);
    }
  } else {
    if (has_min && has_max) {
      out = "in [" + fmt_number(*key.min) + ", " + fmt_number(*key.max) +
            (key.max_exclusive ? ")" : "]");
    } else if (has_min) {
      out = ">= " + fmt_number(*key.min);
    } else if (has_max) {
      out = (key.max_exclusive ? "< " : "<= ") + fmt_number(*key.max);
    }
  }
  if (integer && key.multiple_of) {
    out += std::string(out.empty() ? "" : " and ") + "a multiple of " +
           std::to_string(*key.multiple_of);
  }
  return out;
}

std::string with_space(const std::string& s) { return s.empty() ? s : " " + s; }

}  // namespace

std::string describe_allowed(const ConfigKey& key) {
  std::string out;
  switch (key.type) {
    case KeyType::kBool:
      out = "true or false";
      break;
    case KeyType::kInt:
      out = "an integer" + with_space(range_phrase(key, true));
      break;
    case KeyType::kNumber:
      out = "a number" + with_space(range_phrase(key, false));
      break;
    case KeyType::kString:
      out = key.allowed.empty() ? "a string" : "one of " + join(key.allowed, ", ");
      break;
    case KeyType::kObject:
      out = "an object";
      break;
    case KeyType::kArray: {
      const bool integer = key.element_type == KeyType::kInt;
      std::string elem = integer                                ? "integers"
                         : key.element_type == KeyType::kNumber ? "numbers"
                                                                : "values";
      const std::string range = (integer || key.element_type == KeyType::kNumber)
                                    ? range_phrase(key, integer)
                                    : std::string();
      out = "an array of " + (key.array_len >= 0 ? std::to_string(key.array_len) + " " : "") +
            elem + with_space(range);
      break;
    }
    case KeyType::kAny:
      out = "any value";
      break;
  }
  if (key.allow_auto) {
    out += " or \"auto\"";
  }
  return out;
}

std::string describe_constraint(const ConfigKey& key) {
  switch (key.type) {
    case KeyType::kInt:
      return range_phrase(key, true);
    case KeyType::kNumber:
      return range_phrase(key, false);
    case KeyType::kString:
      return key.allowed.empty() ? "" : "one of " + join(key.allowed, ", ");
    case KeyType::kArray:
      return describe_allowed(key);
    default:
      return "";
  }
}

std::string normalize_name(std::string_view name) {
  std::string out;
  out.reserve(name.size());
  for (char c : name) {
    if (c == '_' || c == '-' || c == ' ') {
      continue;
    }
    out.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  }
  return out;
}

int edit_distance(std::string_view a, std::string_view b) {
  const size_t n = a.size();
  const size_t m = b.size();
  // Three rows are enough for the transposition case.
  std::vector<int> prev2(m + 1), prev(m + 1), cur(m + 1);
  for (size_t j = 0; j <= m; ++j) {
    prev[j] = static_cast<int>(j);
  }
  for (size_t i = 1; i <= n; ++i) {
    cur[0] = static_cast<int>(i);
    for (size_t j = 1; j <= m; ++j) {
      const int cost = a[i - 1] == b[j - 1] ? 0 : 1;
      int d = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d = std::min(d, prev2[j - 2] + 1);
      }
      cur[j] = d;
    }
    std::swap(prev2, prev);
    std::swap(prev, cur);
  }
  return prev[m];
}

std::string closest_name(std::string_view name, const std::vector<std::string>& candidates) {
  // Very long inputs (fuzzers, pasted garbage) cannot be a typo of a key.
  if (name.empty() || name.size() > 128) {
    return "";
  }
  const std::string norm = normalize_name(name);
  std::string best;
  int best_distance = 1 << 30;
  for (const std::string& cand : candidates) {
    if (cand == name) {
      continue;
    }
    const std::string cnorm = normalize_name(cand);
    if (!norm.empty() && cnorm == norm) {
      return cand;  // a case or underscore variant: certainly meant
    }
    // Short names tolerate fewer edits: "lr" vs "l2" would be noise.
    const size_t len = cand.size();
    const int allowed = len <= 2 ? 0 : len <= 5 ? 1 : 2;
    if (allowed == 0) {
      continue;
    }
    const size_t diff =
        cnorm.size() > norm.size() ? cnorm.size() - norm.size() : norm.size() - cnorm.size();
    if (diff > static_cast<size_t>(allowed)) {
      continue;
    }
    const int d = edit_distance(norm, cnorm);
    if (d <= allowed && d < best_distance) {
      best_distance = d;
      best = cand;
    }
  }
  return best;
}

json effective_default(const ConfigKey& key, const std::string& section_type) {
  if (!section_type.empty() && key.default_by_type.is_object()) {
    auto it = key.default_by_type.find(section_type);
    if (it != key.default_by_type.end()) {
      return *it;
    }
  }
  return key.default_value;
}

std::string join(const std::vector<std::string>& items, std::string_view sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) {
      out += sep;
    }
    out += items[i];
  }
  return out;
}

namespace {

std::string quote_path(const std::string& path) { return "\"" + path + "\""; }

// "a/b/" -> "a/b"; "/" stays "/".
std::string without_trailing_slashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') {
    path.pop_back();
  }
  return path;
}

// The folder holding `path` as it is written: "a/b" -> "a", "a" -> ".",
// "/a" -> "/".
std::string lexical_parent(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) {
    return ".";
  }
  return slash == 0 ? std::string("/") : without_trailing_slashes(path.substr(0, slash));
}

}  // namespace

MakeDirsResult make_directories(const std::string& dir) {
  MakeDirsResult out;
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) {
      out.error = "is not a directory";
    }
    return out;
  }
  // The missing folders, from `dir` up to (not including) the nearest one
  // that exists.
  std::vector<std::string> missing;
  std::string cur = without_trailing_slashes(dir);
  for (;;) {
    if (::stat(cur.c_str(), &st) == 0) {
      break;
    }
    const int err = errno;
    // ENOTDIR: a file in the way above; the walk up finds it and says so.
    if (err != ENOENT && err != ENOTDIR) {
      out.error = "cannot be created: " + quote_path(cur) + ": " + std::strerror(err);
      return out;
    }
    missing.push_back(cur);
    const std::string up = lexical_parent(cur);
    if (up == cur) {  // "/" or "." missing: nothing to create from
      out.error = "cannot be created: " + quote_path(cur) + " does not exist";
      return out;
    }
    cur = up;
  }
  if (!S_ISDIR(st.st_mode)) {
    out.error = "cannot be created: " + quote_path(cur) + " is in the way and is not a directory";
    return out;
  }
  if (::access(cur.c_str(), W_OK | X_OK) != 0) {
    const int err = errno;
    out.error = "cannot be created: its nearest existing folder " + quote_path(cur) +
                " is not writable by this process (" + std::strerror(err) + ")";
    return out;
  }
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    if (::mkdir(it->c_str(), 0777) != 0 && errno != EEXIST) {
      const int err = errno;
      out.error = "cannot be created: mkdir " + quote_path(*it) + ": " + std::strerror(err);
      return out;
    }
    if (out.created.empty()) {
      out.created = *it;
    }
  }
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    out.error = "cannot be created: it is still not a directory after mkdir";
  }
  return out;
}

}  // namespace strata::config_detail
