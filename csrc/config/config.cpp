// Config::parse / Config::load: validate a DeepSpeed-style JSON against the
// schema table, rewrite aliases, resolve "auto", apply DeepSpeed's batch rule
// and the cross-key checks, fill defaults.
//
// Order matters and is fixed: legacy forms and aliases are rewritten first
// (so the rest sees only current names), then every given key is validated
// (a section's "type" before its other keys, since params depend on it), then
// the checks that need several keys, then defaults, so a default never hides
// a missing required key.
#include <strata/config.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>

#include "config/config_internal.h"

namespace strata {

using json = nlohmann::json;
using namespace config_detail;  // NOLINT: private helpers of this layer

namespace {

constexpr const char* kBatchKeys[] = {"train_batch_size", "train_micro_batch_size_per_gpu",
                                      "gradient_accumulation_steps"};

bool is_batch_key(const std::string& path) {
  for (const char* k : kBatchKeys) {
    if (path == k) {
      return true;
    }
  }
  return false;
}

// Keys whose only purpose is ZeRO-3 parameter partitioning: "auto" for one of
// them (Hugging Face's configs) leaves its default standing.
bool is_stage3_key(const std::string& path) {
  static const std::set<std::string> kNames = {"offload_param",
                                               "prefetch_bucket_size",
                                               "param_persistence_threshold",
                                               "model_persistence_threshold",
                                               "max_live_parameters",
                                               "max_reuse_distance",
                                               "gather_16bit_weights_on_model_save",
                                               "memory_efficient_linear",
                                               "leaf_module"};
  const std::string prefix = "zero_optimization.";
  if (path.rfind(prefix, 0) != 0) {
    return false;
  }
  const std::string name = path.substr(prefix.size());
  return name.rfind("stage3_", 0) == 0 || kNames.count(name) > 0;
}

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    parts.push_back(path.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) {
      break;
    }
    start = dot + 1;
  }
  return parts;
}

// Read-only navigation through objects only; "" is the root.
const json* find_in(const json& root, const std::string& path) {
  const json* cur = &root;
  if (path.empty()) {
    return cur;
  }
  for (const std::string& part : split_path(path)) {
    if (!cur->is_object()) {
      return nullptr;
    }
    auto it = cur->find(part);
    if (it == cur->end()) {
      return nullptr;
    }
    cur = &*it;
  }
  return cur;
}

json* find_in(json& root, const std::string& path) {
  return const_cast<json*>(find_in(static_cast<const json&>(root), path));
}

// Configs are a few levels deep; anything past this is not a config, and
// nlohmann's copy and dump recurse, so a hostile input could exhaust the stack.
constexpr size_t kMaxDepth = 64;

bool deeper_than(const json& root, size_t limit) {
  std::vector<std::pair<const json*, size_t>> stack{{&root, 1}};
  while (!stack.empty()) {
    auto [node, depth] = stack.back();
    stack.pop_back();
    if (depth > limit) {
      return true;
    }
    if (node->is_structured()) {
      for (const json& child : *node) {
        if (child.is_structured()) {
          stack.emplace_back(&child, depth + 1);
        }
      }
    }
  }
  return false;
}

ConfigKey without_auto(const ConfigKey& key) {
  ConfigKey copy = key;
  copy.allow_auto = false;
  return copy;
}

bool is_auto(const json& v) { return v.is_string() && v.get_ref<const std::string&>() == "auto"; }

std::string lower(std::string s) {
  for (char& c : s) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return s;
}

}  // namespace

// The parser's state for one parse() call.
class ConfigParser {
 public:
  ConfigParser(const json& user, const ParseOptions& options) : user_(user), opt_(options) {}

  Result<Config> run() {
    if (deeper_than(user_, kMaxDepth)) {
      return invalid_argument("config: nested deeper than " + std::to_string(kMaxDepth) +
                              " levels; a DeepSpeed-style config is a few levels deep");
    }
    if (!user_.is_object()) {
      return invalid_argument(std::string("config: expected a JSON object at the top level, got ") +
                              json_type_word(user_) + " " + show(user_));
    }
    if (opt_.world_size < 1) {
      return invalid_argument("world_size: " + std::to_string(opt_.world_size) +
                              " is out of range; expected an integer >= 1");
    }
    if (!opt_.auto_values.is_object()) {
      return invalid_argument(std::string("auto_values: expected an object of dotted paths, got ") +
                              json_type_word(opt_.auto_values));
    }
    cfg_.json_ = user_;
    STRATA_RETURN_IF_ERROR(rewrite_legacy_zero());
    STRATA_RETURN_IF_ERROR(rewrite_aliases());
    STRATA_RETURN_IF_ERROR(walk(cfg_.json_, ""));
    STRATA_RETURN_IF_ERROR(check_sections());
    STRATA_RETURN_IF_ERROR(apply_batch_rule());
    STRATA_RETURN_IF_ERROR(check_precision());
    STRATA_RETURN_IF_ERROR(check_scheduler());
    fill_defaults();
    STRATA_RETURN_IF_ERROR(check_offload());
    emit_ignored_warnings();
    // The typed configuration, filled once by the schema's rows.
    STRATA_RETURN_IF_ERROR(fill_engine_config(cfg_.json_, &cfg_.typed_));
    return std::move(cfg_);
  }

 private:
  void warn(std::string message) {
    if (std::find(cfg_.warnings_.begin(), cfg_.warnings_.end(), message) == cfg_.warnings_.end()) {
      cfg_.warnings_.push_back(std::move(message));
    }
  }

  // The path as the user wrote it, when an alias renamed it.
  std::string shown(const std::string& path) const {
    for (const auto& [now, before] : renamed_) {
      if (path == now) {
        return path + " (given as " + before + ")";
      }
      if (path.size() > now.size() && path.compare(0, now.size(), now) == 0 &&
          path[now.size()] == '.') {
        return path + " (given as " + before + path.substr(now.size()) + ")";
      }
    }
    return path;
  }

  Status error(const std::string& path, const std::string& what) const {
    return invalid_argument(shown(path) + ": " + what);
  }

  // ---- legacy forms and aliases ----------------------------------------------

  Status rewrite_legacy_zero() {
    json& root = cfg_.json_;
    auto it = root.find("zero_optimization");
    if (it != root.end() && it->is_boolean()) {
      const bool on = it->get<bool>();
      *it = json{{"stage", on ? 1 : 0}};
      warn(std::string("zero_optimization: the form true/false is deprecated; rewritten to "
                       "{\"stage\": ") +
           (on ? "1" : "0") + "}");
    }
    return Status::Ok();
  }

  // Sets root[path] = value, creating missing objects. False when a parent on
  // the way exists but is not an object (the walk reports that one).
  static bool set_path(json& root, const std::string& path, json value) {
    json* cur = &root;
    const std::vector<std::string> parts = split_path(path);
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      auto it = cur->find(parts[i]);
      if (it == cur->end() || it->is_null()) {
        (*cur)[parts[i]] = json::object();
        it = cur->find(parts[i]);
      }
      if (!it->is_object()) {
        return false;
      }
      cur = &*it;
    }
    (*cur)[parts.back()] = std::move(value);
    return true;
  }

  Status rewrite_aliases() {
    for (const ConfigKey& key : config_schema()) {
      if (key.support != KeySupport::kDeprecatedAlias) {
        continue;
      }
      json* parent = find_in(cfg_.json_, parent_of(key.path));
      if (parent == nullptr || !parent->is_object()) {
        continue;
      }
      const std::string name = leaf_of(key.path);
      auto it = parent->find(name);
      if (it == parent->end()) {
        continue;
      }
      json value = *it;
      parent->erase(it);
      if (value.is_null()) {
        continue;
      }
      STRATA_RETURN_IF_ERROR(check_value(key, key.path, value, /*from_auto=*/false));
      json mapped = value;
      if (key.alias_values.is_object()) {
        auto m = key.alias_values.find(value.dump());
        mapped = m == key.alias_values.end() ? json(nullptr) : *m;
      }
      if (mapped.is_null()) {
        warn(key.path + " is deprecated (old name of " + key.alias_of + "); " + show(value) +
             " has no effect");
        continue;
      }
      const json* existing = find_in(cfg_.json_, key.alias_of);
      if (existing != nullptr && !existing->is_null()) {
        if (*existing != mapped) {
          return error(key.path, show(value) + " conflicts with " + key.alias_of + " = " +
                                     show(*existing) + " (" + key.path +
                                     " is the deprecated old name of " + key.alias_of +
                                     "); remove " + key.path);
        }
        warn(key.path + " is deprecated (old name of " + key.alias_of + "); it repeats " +
             key.alias_of + " and was dropped");
        continue;
      }
      if (set_path(cfg_.json_, key.alias_of, mapped)) {
        renamed_[key.alias_of] = key.path;
        warn(key.path + " is deprecated: use " + key.alias_of + " (read as " + key.alias_of +
             " = " + show(mapped) + ")");
      }
    }
    return Status::Ok();
  }

  // ---- per-key validation ------------------------------------------------------

  std::string type_expectation(const ConfigKey& key) const {
    std::string out = key_type_name(key.type);
    if (key.type == KeyType::kArray) {
      out = describe_allowed(key);
      out.erase(0, 3);  // "an array of ..." -> "array of ..."
      return out;
    }
    if (key.allow_auto) {
      out += " or \"auto\"";
    }
    const std::string c = describe_constraint(key);
    if (!c.empty()) {
      out += " (" + c + ")";
    }
    return out;
  }

  Status type_error(const ConfigKey& key, const std::string& path, const json& value) const {
    return error(path, show(value) + " has type " + json_type_word(value) + ", expected " +
                           type_expectation(key));
  }

  // Checks an integer-valued JSON number and returns it; integral doubles
  // (1e9) are accepted since DeepSpeed configs write them.
  Status as_int(const ConfigKey& key, const std::string& path, const json& value,
                int64_t* out) const {
    const std::string expected = "; expected " + describe_allowed(without_auto(key));
    if (value.is_number_integer()) {
      *out = value.get<int64_t>();
      return Status::Ok();
    }
    if (value.is_number_unsigned()) {
      const uint64_t u = value.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) {
        return error(path, show(value) + " is too large" + expected);
      }
      *out = static_cast<int64_t>(u);
      return Status::Ok();
    }
    const double d = value.get<double>();
    if (!std::isfinite(d) || d != std::floor(d)) {
      return error(path, show(value) + " is not an integer" + expected);
    }
    // 2^63 exactly is not representable as int64; casting it would be UB.
    if (d >= 9223372036854775808.0 || d < -9223372036854775808.0) {
      return error(path, show(value) + " is too large" + expected);
    }
    *out = static_cast<int64_t>(d);
    return Status::Ok();
  }

  Status check_range(const ConfigKey& key, const std::string& path, const json& shown_value,
                     double v, bool integer) const {
    const bool low = key.min && v < *key.min;
    const bool high = key.max && (key.max_exclusive ? v >= *key.max : v > *key.max);
    if (low || high) {
      ConfigKey scalar = key;
      scalar.type = integer ? KeyType::kInt : KeyType::kNumber;
      scalar.allow_auto = false;
      scalar.multiple_of.reset();
      return error(path,
                   show(shown_value) + " is out of range; expected " + describe_allowed(scalar));
    }
    return Status::Ok();
  }

  // Validates one scalar/array/object value against its row; normalises it in
  // place (integral doubles to integers, canonical case of enum strings).
  Status check_value(const ConfigKey& key, const std::string& path, json& value, bool from_auto) {
    Status st = check_value_inner(key, path, value);
    if (!st.ok() && from_auto) {
      return Status(st.code(), st.message() +
                                   " (the value came from auto_values, replacing "
                                   "\"auto\")");
    }
    return st;
  }

  Status check_value_inner(const ConfigKey& key, const std::string& path, json& value) {
    switch (key.type) {
      case KeyType::kAny:
        return Status::Ok();
      case KeyType::kBool:
        return value.is_boolean() ? Status::Ok() : type_error(key, path, value);
      case KeyType::kObject:
        return value.is_object() ? Status::Ok() : type_error(key, path, value);
      case KeyType::kInt: {
        if (!value.is_number()) {
          return type_error(key, path, value);
        }
        int64_t v = 0;
        STRATA_RETURN_IF_ERROR(as_int(key, path, value, &v));
        STRATA_RETURN_IF_ERROR(check_range(key, path, value, static_cast<double>(v), true));
        if (key.multiple_of && *key.multiple_of > 0 && v % *key.multiple_of != 0) {
          return error(path, show(value) + " is not a multiple of " +
                                 std::to_string(*key.multiple_of) + "; expected " +
                                 describe_allowed(key));
        }
        value = v;
        return Status::Ok();
      }
      case KeyType::kNumber: {
        if (!value.is_number()) {
          return type_error(key, path, value);
        }
        const double v = value.get<double>();
        if (!std::isfinite(v)) {
          return error(path, show(value) + " is not a finite number");
        }
        return check_range(key, path, value, v, false);
      }
      case KeyType::kString: {
        if (!value.is_string()) {
          return type_error(key, path, value);
        }
        if (key.allowed.empty()) {
          return Status::Ok();
        }
        const std::string& s = value.get_ref<const std::string&>();
        for (const std::string& a : key.allowed) {
          if (a == s) {
            return Status::Ok();
          }
        }
        if (key.case_insensitive) {
          const std::string ls = lower(s);
          for (const std::string& a : key.allowed) {
            if (lower(a) == ls) {
              value = a;
              return Status::Ok();
            }
          }
        }
        for (const auto& [gone, why] : key.removed_values) {
          if (s == gone) {
            return error(path, show(value) + " is no longer accepted (" + why +
                                   "); allowed: " + join(key.allowed, ", "));
          }
        }
        std::string msg =
            key.allowed_is_support_list
                ? show(value) + " is not supported by strata; supported: " + join(key.allowed, ", ")
                : show(value) + " is not one of " + join(key.allowed, ", ");
        const std::string near = closest_name(s, key.allowed);
        if (!near.empty()) {
          msg += "; did you mean \"" + near + "\"?";
        }
        return error(path, msg);
      }
      case KeyType::kArray: {
        if (!value.is_array()) {
          return type_error(key, path, value);
        }
        if (key.array_len >= 0 && value.size() != static_cast<size_t>(key.array_len)) {
          return error(path, show(value) + " has " + std::to_string(value.size()) +
                                 " elements; expected " + describe_allowed(key));
        }
        if (key.element_type == KeyType::kInt || key.element_type == KeyType::kNumber) {
          ConfigKey elem = key;
          elem.type = key.element_type;
          elem.allow_auto = false;
          for (size_t i = 0; i < value.size(); ++i) {
            STRATA_RETURN_IF_ERROR(
                check_value_inner(elem, path + "[" + std::to_string(i) + "]", value[i]));
          }
        }
        return Status::Ok();
      }
    }
    return Status::Ok();
  }

  // Children of optimizer.params / scheduler.params are constructor arguments
  // of the chosen type: an unknown one is an error, not a warning.
  bool is_typed_params(const std::string& prefix) const {
    const std::string section = section_of(prefix);
    return prefix == section + ".params" && find_config_key(section + ".type") != nullptr;
  }

  std::vector<std::string> params_of(const std::string& prefix, const std::string& type) const {
    std::vector<std::string> names;
    const auto& index = schema_index();
    auto it = index.children.find(prefix);
    if (it == index.children.end()) {
      return names;
    }
    for (const ConfigKey* k : it->second) {
      if (k->applies_to.empty() || type.empty() ||
          std::find(k->applies_to.begin(), k->applies_to.end(), type) != k->applies_to.end()) {
        names.push_back(leaf_of(k->path));
      }
    }
    return names;
  }

  Status unknown_key(const std::string& prefix, const std::string& name, const std::string& path) {
    const auto& index = schema_index();
    std::vector<std::string> siblings;
    auto it = index.children.find(prefix);
    if (it != index.children.end()) {
      for (const ConfigKey* k : it->second) {
        siblings.push_back(leaf_of(k->path));
      }
    }
    const std::string near = closest_name(name, siblings);
    if (!near.empty()) {
      return error(path, "unknown key; did you mean \"" + near + "\"?");
    }
    if (is_typed_params(prefix)) {
      const std::string type = section_types_.count(section_of(prefix))
                                   ? section_types_.at(section_of(prefix))
                                   : std::string();
      return error(path, "unknown parameter" + (type.empty() ? "" : " of " + type) +
                             "; expected one of " + join(params_of(prefix, type), ", "));
    }
    std::string hint;
    auto leaf = index.by_leaf.find(name);
    if (leaf != index.by_leaf.end()) {
      std::vector<std::string> places;
      for (const ConfigKey* k : leaf->second) {
        places.push_back(k->path);
      }
      hint = " (a key of this name exists at " + join(places, ", ") + ")";
    }
    warn(path + ": unknown key ignored" + hint);
    return Status::Ok();
  }

  Status walk(json& obj, const std::string& prefix) {
    // A section's "type" first: its params are checked against it.
    std::vector<std::string> names;
    names.reserve(obj.size());
    auto type_it = obj.find("type");
    if (type_it != obj.end()) {
      names.push_back("type");
    }
    for (auto it = obj.begin(); it != obj.end(); ++it) {
      if (it.key() != "type") {
        names.push_back(it.key());
      }
    }
    std::vector<std::string> erase;
    for (const std::string& name : names) {
      json& value = obj[name];
      const std::string path = prefix.empty() ? name : prefix + "." + name;
      const ConfigKey* key = find_config_key(path);
      if (key == nullptr) {
        STRATA_RETURN_IF_ERROR(unknown_key(prefix, name, path));
        continue;
      }
      if (value.is_null()) {
        erase.push_back(name);  // null means "not given": the default applies
        continue;
      }
      bool from_auto = false;
      // "auto" is a placeholder, except where it is one of the key's own
      // values (strata.progress, strata.schedule).
      const bool auto_is_a_value =
          std::find(key->allowed.begin(), key->allowed.end(), "auto") != key->allowed.end();
      if (is_auto(value) && !auto_is_a_value) {
        if (!key->allow_auto) {
          return error(path, "\"auto\" is not accepted here; expected " + describe_allowed(*key));
        }
        auto av = opt_.auto_values.find(path);
        if (av != opt_.auto_values.end() && !av->is_null() && !is_auto(*av)) {
          value = *av;
          from_auto = true;
        } else if (key->support == KeySupport::kAcceptedIgnored) {
          ignored_.emplace_back(key, value);
          continue;
        } else if (is_batch_key(path)) {
          unresolved_batch_.insert(path);
          continue;
        } else if (is_stage3_key(path) && !key->default_value.is_null()) {
          // Hugging Face writes "auto" for these and fills them from the
          // model's hidden size; without that value the default stands.
          erase.push_back(name);
          continue;
        } else {
          return error(path, "\"auto\" has no value to resolve to; write " +
                                 describe_allowed(without_auto(*key)) +
                                 ", or pass it in auto_values (strata.initialize fills it from "
                                 "the model, optimizer or batch arguments when it can)");
        }
      }
      STRATA_RETURN_IF_ERROR(check_value(*key, path, value, from_auto));
      if (key->support == KeySupport::kAcceptedIgnored) {
        ignored_.emplace_back(key, value);
        continue;  // opaque: its children are not ours to judge
      }
      if (!key->applies_to.empty()) {
        const std::string section = section_of(path);
        auto st = section_types_.find(section);
        if (st != section_types_.end() && std::find(key->applies_to.begin(), key->applies_to.end(),
                                                    st->second) == key->applies_to.end()) {
          return error(path, show(value) + ": not a parameter of " + st->second + "; " +
                                 st->second + " takes " +
                                 join(params_of(parent_of(path), st->second), ", "));
        }
      }
      if (name == "type" && value.is_string() && find_config_key(path) != nullptr &&
          prefix == section_of(path)) {
        section_types_[prefix] = value.get<std::string>();
      }
      if (value.is_object()) {
        STRATA_RETURN_IF_ERROR(walk(value, path));
      }
    }
    for (const std::string& name : erase) {
      obj.erase(name);
    }
    return Status::Ok();
  }

  // ---- checks across keys --------------------------------------------------------

  Status check_sections() {
    // A typed section given without its type cannot be built.
    for (const char* section : {"optimizer", "scheduler"}) {
      const json* s = find_in(cfg_.json_, section);
      if (s == nullptr || !s->is_object()) {
        continue;
      }
      const std::string type_path = std::string(section) + ".type";
      if (s->find("type") == s->end()) {
        const ConfigKey* key = find_config_key(type_path);
        return error(type_path, "missing; " + std::string(section) + " needs a type, one of " +
                                    join(key->allowed, ", "));
      }
    }
    return Status::Ok();
  }

  const json* number_at(const std::string& path) const {
    const json* v = find_in(cfg_.json_, path);
    return (v != nullptr && v->is_number()) ? v : nullptr;
  }

  Status apply_batch_rule() {
    const int64_t world = opt_.world_size;
    std::optional<int64_t> t, m, a;
    if (const json* v = number_at(kBatchKeys[0])) t = v->get<int64_t>();
    if (const json* v = number_at(kBatchKeys[1])) m = v->get<int64_t>();
    if (const json* v = number_at(kBatchKeys[2])) a = v->get<int64_t>();
    const int given = (t ? 1 : 0) + (m ? 1 : 0) + (a ? 1 : 0);

    // "auto" left unresolved may be implied by the other two, nothing less.
    if (!unresolved_batch_.empty() && !(given == 2 && unresolved_batch_.size() == 1)) {
      std::string first;
      for (const char* k : kBatchKeys) {
        if (unresolved_batch_.count(k)) {
          first = k;
          break;
        }
      }
      return error(first,
                   "\"auto\" has no value to resolve to; pass it in auto_values, or give "
                   "two of train_batch_size, train_micro_batch_size_per_gpu, "
                   "gradient_accumulation_steps as numbers so the third follows");
    }

    const std::string rule =
        " (DeepSpeed's rule: train_batch_size = train_micro_batch_size_per_gpu x "
        "gradient_accumulation_steps x world size)";
    auto product = [](int64_t x, int64_t y, int64_t* out) {
      return !__builtin_mul_overflow(x, y, out);
    };
    int64_t mw = 0, aw = 0, full = 0;
    if (t && m && a) {
      const bool fits = product(*m, *a, &full) && product(full, world, &full);
      if (!fits || full != *t) {
        return invalid_argument(
            "train_batch_size: " + std::to_string(*t) +
            " does not equal train_micro_batch_size_per_gpu (" + std::to_string(*m) +
            ") x gradient_accumulation_steps (" + std::to_string(*a) + ") x world size (" +
            std::to_string(world) +
            ") = " + (fits ? std::to_string(full) : std::string("more than 2^63")) +
            "; fix one of them" + rule);
      }
    } else if (t && m) {
      if (!product(*m, world, &mw) || *t % mw != 0) {
        return invalid_argument("train_batch_size: " + std::to_string(*t) +
                                " is not divisible by train_micro_batch_size_per_gpu (" +
                                std::to_string(*m) + ") x world size (" + std::to_string(world) +
                                "); no whole number of accumulation "
                                "steps fits" +
                                rule);
      }
      a = *t / mw;
    } else if (t && a) {
      if (!product(*a, world, &aw) || *t % aw != 0) {
        return invalid_argument("train_batch_size: " + std::to_string(*t) +
                                " is not divisible by gradient_accumulation_steps (" +
                                std::to_string(*a) + ") x world size (" + std::to_string(world) +
                                "); no whole micro batch fits" + rule);
      }
      m = *t / aw;
    } else if (m && a) {
      if (!product(*m, *a, &full) || !product(full, world, &full)) {
        return error("train_micro_batch_size_per_gpu",
                     "x gradient_accumulation_steps x world size overflows a 64-bit integer");
      }
      t = full;
    } else if (t) {
      if (*t % world != 0) {
        return invalid_argument("train_batch_size: " + std::to_string(*t) +
                                " is not divisible by the world size (" + std::to_string(world) +
                                ")" + rule);
      }
      a = 1;
      m = *t / world;
    } else if (m) {
      a = 1;
      if (!product(*m, world, &full)) {
        return error("train_micro_batch_size_per_gpu", "x world size overflows a 64-bit integer");
      }
      t = full;
    } else if (a) {
      m = 1;
      if (!product(*a, world, &full)) {
        return error("gradient_accumulation_steps", "x world size overflows a 64-bit integer");
      }
      t = full;
    } else {
      m = 1;
      a = 1;
      t = world;
    }
    cfg_.json_[kBatchKeys[0]] = *t;
    cfg_.json_[kBatchKeys[1]] = *m;
    cfg_.json_[kBatchKeys[2]] = *a;
    return Status::Ok();
  }

  bool flag(const std::string& path) const {
    const json* v = find_in(cfg_.json_, path);
    return v != nullptr && v->is_boolean() && v->get<bool>();
  }

  Status check_precision() {
    if (flag("fp16.enabled") && flag("bf16.enabled")) {
      return invalid_argument("fp16.enabled: true together with " + shown("bf16.enabled") +
                              ": true; enable at most one of fp16 and bf16");
    }
    // DeepSpeed's support matrix for bf16 master weights and optimizer states
    // (config-json.md): both need bf16 and ZeRO stage 1-3; bf16 optimizer
    // states need bf16 master weights.
    for (const char* key : {"bf16.bf16_master_weights_and_grads", "bf16.bf16_optimizer_states"}) {
      if (!flag(key)) {
        continue;
      }
      if (!flag("bf16.enabled")) {
        return error(key, "true needs bf16.enabled: true (bf16 model parameters)");
      }
      const json* stage = number_at("zero_optimization.stage");
      if (stage == nullptr || stage->get<double>() < 1) {
        return error(key,
                     "true needs zero_optimization.stage 1, 2 or 3 (DeepSpeed's support "
                     "matrix: not supported without ZeRO)");
      }
    }
    if (flag("bf16.bf16_optimizer_states") && !flag("bf16.bf16_master_weights_and_grads")) {
      return error("bf16.bf16_optimizer_states",
                   "true needs bf16.bf16_master_weights_and_grads: true, as in DeepSpeed; for "
                   "bf16 moments with fp32 master weights set strata.optimizer_state_dtype: "
                   "\"bf16\" instead");
    }
    const json* sd = find_in(cfg_.json_, "strata.optimizer_state_dtype");
    if (flag("bf16.bf16_optimizer_states") && sd != nullptr && sd->is_string() &&
        sd->get<std::string>() != "bf16") {
      return error("strata.optimizer_state_dtype",
                   "\"" + sd->get<std::string>() +
                       "\" contradicts bf16.bf16_optimizer_states: true (bf16 moments); drop "
                       "one of them");
    }
    return Status::Ok();
  }

  Status check_scheduler() {
    auto it = section_types_.find("scheduler");
    if (it == section_types_.end()) {
      return Status::Ok();
    }
    const std::string& type = it->second;
    const json* total = number_at("scheduler.params.total_num_steps");
    if ((type == "WarmupDecayLR" || type == "WarmupCosineLR") && total == nullptr) {
      return error("scheduler.params.total_num_steps",
                   "missing; " + type +
                       " needs the total number of training steps (an integer "
                       ">= 1, or \"auto\" with a value in auto_values)");
    }
    const json* warmup = number_at("scheduler.params.warmup_num_steps");
    if (total != nullptr && warmup != nullptr && total->get<int64_t>() < warmup->get<int64_t>()) {
      warn("scheduler.params.total_num_steps: " + show(*total) + " is less than warmup_num_steps " +
           show(*warmup) + "; the schedule never leaves warmup");
    }
    return Status::Ok();
  }

  // device / nvme_path of one offload section (offload_optimizer or
  // offload_param): nvme needs the folder, which is made like mkdir -p.
  Status check_nvme_section(const std::string& section, const std::string& holds) {
    const std::string dev_path = section + ".device";
    const std::string nvme_key = section + ".nvme_path";
    const json* dev = find_in(cfg_.json_, dev_path);
    const std::string device =
        (dev != nullptr && dev->is_string()) ? dev->get<std::string>() : "none";
    const json* nvme = find_in(cfg_.json_, nvme_key);
    if (device == "nvme" && nvme == nullptr) {
      return error(nvme_key, "missing; " + shown(dev_path) + " \"nvme\" needs a directory for " +
                                 holds +
                                 ": set nvme_path to an existing, writable directory on a local "
                                 "NVMe drive");
    }
    if (nvme != nullptr && opt_.check_paths) {
      const std::string dir = nvme->get<std::string>();
      const std::string use =
          device == "nvme" ? "it holds " + holds
          : section.find("offload_optimizer") != std::string::npos
              ? "with device \"" + device + "\" it holds state that does not fit strata.dram_budget"
              : "used with device nvme";
      if (dir.empty()) {
        return error(nvme_key,
                     "\"\" is empty; set it to an existing, writable directory (" + use + ")");
      }
      // A missing folder is made like `mkdir -p` (said once), so a config
      // that names a fresh folder works on a clean machine.
      const MakeDirsResult made = make_directories(dir);
      if (!made.error.empty() && made.created.empty()) {
        struct stat st {};
        const bool exists = ::stat(dir.c_str(), &st) == 0;
        return error(nvme_key, show(*nvme) + (exists ? " " : " does not exist and ") + made.error +
                                   "; point nvme_path at an existing, writable directory (" + use +
                                   ")");
      }
      if (!made.error.empty()) {
        return error(nvme_key, show(*nvme) + " was only partly created (" +
                                   show(json(made.created)) + " was made): " + made.error +
                                   "; point nvme_path at an existing, writable directory (" + use +
                                   ")");
      }
      if (!made.created.empty()) {
        warn(nvme_key + ": created the folder " + show(json(made.created)) +
             " (it did not exist; " + use + ")");
      }
      struct stat st {};
      if (::stat(dir.c_str(), &st) != 0) {
        const int err = errno;
        return error(nvme_key, show(*nvme) + " cannot be used: " + std::strerror(err) +
                                   "; point nvme_path at an existing, writable directory (" + use +
                                   ")");
      }
      if (!S_ISDIR(st.st_mode)) {
        return error(nvme_key, show(*nvme) +
                                   " is not a directory; point nvme_path at an "
                                   "existing, writable directory (" +
                                   use + ")");
      }
      if (::access(dir.c_str(), W_OK | X_OK) != 0) {
        const int err = errno;
        return error(nvme_key, show(*nvme) + " is not writable by this process (" +
                                   std::strerror(err) +
                                   "); fix its permissions or mount, or choose another "
                                   "directory (" +
                                   use + ")");
      }
    }
    return Status::Ok();
  }

  Status check_offload() {
    STRATA_RETURN_IF_ERROR(
        check_nvme_section("zero_optimization.offload_optimizer", "the optimizer-state swap file"));
    STRATA_RETURN_IF_ERROR(
        check_nvme_section("zero_optimization.offload_param", "the model weights' swap file"));
    const json* pdev = find_in(cfg_.json_, "zero_optimization.offload_param.device");
    const json* stage = number_at("zero_optimization.stage");
    const int64_t stage_v = stage != nullptr ? stage->get<int64_t>() : 0;
    if (pdev != nullptr && pdev->is_string() && pdev->get<std::string>() != "none" && stage_v < 3) {
      // DeepSpeed documents offload_param as "valid only with stage 3" and
      // ignores it below; a shared config keeps working, loudly.
      warn("zero_optimization.offload_param.device: " + show(*pdev) +
           " is not acted on at zero_optimization.stage " + std::to_string(stage_v) +
           " (parameter offload needs stage 3, as in DeepSpeed); the weights stay in the model's "
           "memory");
    }
    const std::string dev_path = "zero_optimization.offload_optimizer.device";
    const json* dev = find_in(cfg_.json_, dev_path);
    const std::string device =
        (dev != nullptr && dev->is_string()) ? dev->get<std::string>() : "none";
    const json* cache = number_at("strata.dram_cache_bytes");
    if (cache != nullptr && cache->get<int64_t>() > 0 && device != "nvme") {
      warn("strata.dram_cache_bytes: " + show(*cache) + " has no effect with " + dev_path + " \"" +
           device + "\" (it applies to device \"nvme\")");
    }
    return Status::Ok();
  }

  // ---- defaults ----------------------------------------------------------------

  // Creates the missing ancestors of `path` whose rows default to an object;
  // false when an ancestor is absent and optional (or not an object).
  bool ensure_parents(const std::string& path) {
    const std::vector<std::string> parts = split_path(path);
    json* cur = &cfg_.json_;
    std::string sofar;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      sofar = sofar.empty() ? parts[i] : sofar + "." + parts[i];
      auto it = cur->find(parts[i]);
      if (it == cur->end()) {
        const ConfigKey* row = find_config_key(sofar);
        if (row == nullptr || !row->default_value.is_object() ||
            row->support != KeySupport::kHonoured) {
          return false;
        }
        (*cur)[parts[i]] = json::object();
        it = cur->find(parts[i]);
      }
      if (!it->is_object()) {
        return false;
      }
      cur = &*it;
    }
    return true;
  }

  void fill_defaults() {
    for (const ConfigKey& key : config_schema()) {
      if (key.support != KeySupport::kHonoured) {
        continue;
      }
      std::string type;
      if (!key.applies_to.empty() || key.default_by_type.is_object()) {
        auto it = section_types_.find(section_of(key.path));
        if (it == section_types_.end()) {
          continue;  // the section (and so its type) is absent
        }
        type = it->second;
        if (!key.applies_to.empty() &&
            std::find(key.applies_to.begin(), key.applies_to.end(), type) == key.applies_to.end()) {
          continue;
        }
      }
      json def = effective_default(key, type);
      if (def.is_null()) {
        continue;
      }
      if (find_in(cfg_.json_, key.path) != nullptr) {
        continue;
      }
      if (!ensure_parents(key.path)) {
        continue;
      }
      set_path(cfg_.json_, key.path, std::move(def));
    }
  }

  // ---- warnings for keys accepted but not acted on --------------------------------

  static bool quiet(const ConfigKey& key, const json& value) {
    for (const json& q : key.quiet_values) {
      if (q == value) {
        return true;
      }
    }
    // A DeepSpeed feature section switched off, or an offload to "none".
    if (value.is_object()) {
      auto en = value.find("enabled");
      if (en != value.end() && en->is_boolean() && !en->get<bool>()) {
        return true;
      }
      auto dev = value.find("device");
      if (dev != value.end() && dev->is_string() && dev->get<std::string>() == "none") {
        return true;
      }
    }
    return false;
  }

  // One warning per distinct note, naming every key it covers: a stock Hugging
  // Face ZeRO-2 config sets five communication knobs that share one reason.
  void emit_ignored_warnings() {
    // Stage 3 is honoured in one process (the param tier) and across ranks
    // (parameters partitioned, python/strata/param_tier.py): its keys are
    // judged one by one like the others.
    std::vector<std::pair<std::string, std::vector<std::string>>> by_note;
    for (const auto& entry : ignored_) {
      const ConfigKey* key = entry.first;
      const json& value = entry.second;
      if (quiet(*key, value) || (opt_.world_size > 1 && key->honoured_with_ranks)) {
        continue;
      }
      const std::string& note = key->note;
      auto it = std::find_if(by_note.begin(), by_note.end(),
                             [&note](const auto& e) { return e.first == note; });
      if (it == by_note.end()) {
        by_note.emplace_back(key->note, std::vector<std::string>{});
        it = by_note.end() - 1;
      }
      it->second.push_back(shown(key->path) + " = " + show(value));
    }
    for (const auto& [note, keys] : by_note) {
      warn(join(keys, ", ") + (keys.size() == 1 ? " is" : " are") +
           " accepted but not acted on: " + note);
    }
  }

  const json& user_;
  const ParseOptions& opt_;
  Config cfg_;
  std::map<std::string, std::string> renamed_;        // new path -> alias path the user wrote
  std::map<std::string, std::string> section_types_;  // "optimizer" -> "AdamW"
  std::set<std::string> unresolved_batch_;
  std::vector<std::pair<const ConfigKey*, json>> ignored_;
};

Result<Config> Config::parse(const nlohmann::json& user, const ParseOptions& options) {
  // Nothing may escape the core API: nlohmann throws on misuse and
  // allocation can fail; both become a Status here.
  try {
    return ConfigParser(user, options).run();
  } catch (const std::exception& e) {
    return internal_error(std::string("config: unexpected error while parsing: ") + e.what());
  }
}

namespace {

// "[json.exception.parse_error.101] parse error at line 3, column 15: syntax
// error while parsing ..." -> "syntax error while parsing ...".
std::string parse_error_reason(const std::string& what) {
  size_t pos = what.find("column ");
  if (pos != std::string::npos) {
    pos = what.find(": ", pos);
  } else {
    pos = what.find("] ");
  }
  return pos == std::string::npos ? what : what.substr(pos + 2);
}

}  // namespace

Result<Config> Config::parse_text(const std::string& text, const std::string& name,
                                  const ParseOptions& options) {
  std::string_view body(text);
  if (body.size() >= 3 && body.compare(0, 3, "\xEF\xBB\xBF") == 0) {
    body.remove_prefix(3);  // UTF-8 byte-order mark, as some editors write it
  }
  nlohmann::json parsed;
  // "name:line:col" for a byte offset (0-based) into body.
  auto where = [&](size_t offset) {
    size_t line = 1;
    size_t col = 1;
    for (size_t i = 0; i < offset && i < body.size(); ++i) {
      if (body[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    return name + ":" + std::to_string(line) + ":" + std::to_string(col);
  };
  try {
    parsed = nlohmann::json::parse(body.begin(), body.end(), /*cb=*/nullptr,
                                   /*allow_exceptions=*/true, /*ignore_comments=*/true);
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is the 1-based offset of the character that failed.
    const size_t offset = e.byte > 0 ? static_cast<size_t>(e.byte) - 1 : 0;
    return invalid_argument(where(offset) + ": invalid JSON: " + parse_error_reason(e.what()));
  } catch (const nlohmann::json::exception& e) {
    // Not a syntax error but still bad input: a number too large for a
    // double ("number overflow parsing '1e400'", out_of_range.406), which
    // carries no position; locate the quoted token instead.
    const std::string reason = parse_error_reason(e.what());
    size_t offset = std::string::npos;
    const size_t q1 = reason.find('\'');
    const size_t q2 = q1 == std::string::npos ? q1 : reason.find('\'', q1 + 1);
    if (q2 != std::string::npos && q2 > q1 + 1) {
      offset = body.find(reason.substr(q1 + 1, q2 - q1 - 1));
    }
    return invalid_argument((offset == std::string::npos ? name : where(offset)) +
                            ": invalid JSON: " + reason);
  } catch (const std::exception& e) {
    return internal_error(name + ": unexpected error while reading JSON: " + e.what());
  }
  Result<Config> cfg = parse(parsed, options);
  if (!cfg.ok()) {
    return cfg.status().with_context(name);
  }
  return cfg;
}

Result<Config> Config::load(const std::string& path, const ParseOptions& options) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return Status::from_errno(errno, "open config file " + path);
  }
  std::string text;
  char buf[65536];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) {
    text.append(buf, n);
  }
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (failed) {
    return Status::from_errno(err == 0 ? EIO : err, "read config file " + path);
  }
  return parse_text(text, path, options);
}

// ---- typed access ------------------------------------------------------------

const nlohmann::json* Config::find(const std::string& path) const { return find_in(json_, path); }

bool Config::has(const std::string& path) const {
  const nlohmann::json* v = find(path);
  return v != nullptr && !v->is_null();
}

// ---- the typed configuration ---------------------------------------------------

Status fill_engine_config(const nlohmann::json& filled, EngineConfig* out) {
  for (const ConfigKey& key : config_schema()) {
    if (!key.fill) {
      continue;
    }
    const nlohmann::json* v = find_in(filled, key.path);
    nlohmann::json value;
    if (v != nullptr && !v->is_null()) {
      value = *v;
    } else {
      // Absent (an optional section not given, or a default-less key): the
      // row's default for the section's type, or null ("not given").
      const std::string section = section_of(key.path);
      const nlohmann::json* type = find_in(filled, section + ".type");
      value = effective_default(
          key, type != nullptr && type->is_string() ? type->get<std::string>() : std::string());
    }
    STRATA_RETURN_IF_ERROR(key.fill(*out, value));
  }
  return Status::Ok();
}

Config::Config() {
  // The schema's own defaults; a schema whose rows do not bind is a bug the
  // unit tests catch (test_config_fields), so the status is not needed here.
  fill_engine_config(json_, &typed_).ignore();
}

const EngineConfig& default_engine_config() {
  static const EngineConfig defaults = Config().typed();
  return defaults;
}

Result<Config> Config::with_default(const std::string& path) const {
  const ConfigKey* key = find_config_key(path);
  if (key == nullptr || !key->fill) {
    return invalid_argument(path + ": not a key strata acts on");
  }
  Config out = *this;
  if (nlohmann::json* v = find_in(out.json_, path)) {
    *v = nlohmann::json(nullptr);
  }
  const nlohmann::json* type = find_in(out.json_, section_of(path) + ".type");
  nlohmann::json def = effective_default(
      *key, type != nullptr && type->is_string() ? type->get<std::string>() : std::string());
  if (!def.is_null()) {
    if (nlohmann::json* v = find_in(out.json_, path)) {
      *v = def;
    }
  } else if (nlohmann::json* parent = find_in(out.json_, parent_of(path));
             parent != nullptr && parent->is_object()) {
    parent->erase(leaf_of(path));
  }
  STRATA_RETURN_IF_ERROR(key->fill(out.typed_, def));
  return out;
}

}  // namespace strata
