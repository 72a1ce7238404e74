// The configuration schema: one table of ConfigKey rows in documentation
// order. DeepSpeed's keys keep DeepSpeed's meaning and defaults (checked
// against deepspeed/runtime/{config,zero/config,zero/offload_config,
// lr_schedules}.py and the DeepSpeed config-json docs); strata's own keys live
// under "strata". docs/config.md is generated from this table.
#include <strata/config.h>

#include <concepts>
#include <limits>
#include <type_traits>

#include "config/config_internal.h"

namespace strata {

const char* key_type_name(KeyType type) {
  switch (type) {
    case KeyType::kBool:
      return "boolean";
    case KeyType::kInt:
      return "integer";
    case KeyType::kNumber:
      return "number";
    case KeyType::kString:
      return "string";
    case KeyType::kObject:
      return "object";
    case KeyType::kArray:
      return "array";
    case KeyType::kAny:
      return "any";
  }
  return "unknown";
}

namespace {

using json = nlohmann::json;

// ---- binding a row to its typed field --------------------------------------
// A row's value (already validated against the row: type, range, allowed)
// is converted to the field's C++ type here and nowhere else.

template <typename T>
struct IsOptional : std::false_type {};
template <typename T>
struct IsOptional<std::optional<T>> : std::true_type {};
template <typename T>
struct IsVector : std::false_type {};
template <typename T>
struct IsVector<std::vector<T>> : std::true_type {};
template <typename T>
struct IsArray : std::false_type {};
template <typename T, size_t N>
struct IsArray<std::array<T, N>> : std::true_type {};

Status bind_error(const ConfigKey& key, const json& value, const char* want) {
  return Status(StatusCode::kInternal, key.path + ": the schema binds " +
                                           config_detail::show(value) + " to a field of type " +
                                           want);
}

template <typename T>
Status from_json(const ConfigKey& key, const json& v, T* out) {
  if constexpr (IsOptional<T>::value) {
    if (v.is_null()) {
      out->reset();
      return Status::Ok();
    }
    typename T::value_type inner{};
    STRATA_RETURN_IF_ERROR(from_json(key, v, &inner));
    *out = std::move(inner);
    return Status::Ok();
  } else if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) {
      return bind_error(key, v, "bool");
    }
    *out = v.get<bool>();
  } else if constexpr (std::is_enum_v<T>) {
    if (v.is_string()) {
      for (size_t i = 0; i < key.allowed.size(); ++i) {
        if (key.allowed[i] == v.get_ref<const std::string&>()) {
          *out = T(i);
          return Status::Ok();
        }
      }
    }
    return bind_error(key, v, "enum (one of the allowed values)");
  } else if constexpr (std::is_integral_v<T>) {
    if (!v.is_number_integer() && !v.is_number_unsigned()) {
      return bind_error(key, v, "integer");
    }
    const auto n = v.get<int64_t>();
    if (n < int64_t(std::numeric_limits<T>::min()) ||
        (n > 0 && uint64_t(n) > uint64_t(std::numeric_limits<T>::max()))) {
      return bind_error(key, v, "integer of a narrower range");
    }
    *out = T(n);
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) {
      return bind_error(key, v, "number");
    }
    *out = v.get<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!v.is_string()) {
      return bind_error(key, v, "string");
    }
    *out = v.get<std::string>();
  } else if constexpr (IsVector<T>::value || IsArray<T>::value) {
    if (!v.is_array()) {
      return bind_error(key, v, "array");
    }
    T arr{};
    if constexpr (IsVector<T>::value) {
      arr.resize(v.size());
    } else if (v.size() != std::tuple_size_v<T>) {
      return bind_error(key, v, "array of fixed length");
    }
    for (size_t i = 0; i < v.size(); ++i) {
      STRATA_RETURN_IF_ERROR(from_json(key, v[i], &arr[i]));
    }
    *out = std::move(arr);
  } else {
    static_assert(!sizeof(T*), "no conversion for this field type");
  }
  return Status::Ok();
}

template <typename T>
json to_json(const ConfigKey& key, const T& value) {
  if constexpr (IsOptional<T>::value) {
    return value ? to_json(key, *value) : json(nullptr);
  } else if constexpr (std::is_enum_v<T>) {
    const size_t i = size_t(value);
    return i < key.allowed.size() ? json(key.allowed[i]) : json(nullptr);
  } else if constexpr (IsVector<T>::value || IsArray<T>::value) {
    json a = json::array();
    for (const auto& e : value) {
      a.push_back(to_json(key, e));
    }
    return a;
  } else {
    return json(value);
  }
}

// The field a row binds, as an accessor: STRATA_FIELD(aio.queue_depth).
#define STRATA_FIELD(member) \
  [](EngineConfig & c) -> auto& { return c.member; }

// A fluent builder so each row of the table reads as one statement.
class Row {
 public:
  Row(std::string path, KeyType type, json def, std::string description) {
    key_.path = std::move(path);
    key_.type = type;
    key_.default_value = std::move(def);
    key_.description = std::move(description);
  }
  Row& allowed(std::vector<std::string> values) {
    key_.allowed = std::move(values);
    return *this;
  }
  Row& min(double lo) {
    key_.min = lo;
    return *this;
  }
  Row& range(double lo, double hi) {
    key_.min = lo;
    key_.max = hi;
    return *this;
  }
  Row& below(double lo, double hi) {  // [lo, hi)
    key_.min = lo;
    key_.max = hi;
    key_.max_exclusive = true;
    return *this;
  }
  Row& multiple_of(int64_t m) {
    key_.multiple_of = m;
    return *this;
  }
  Row& auto_ok() {
    key_.allow_auto = true;
    return *this;
  }
  Row& array_of(KeyType element, int len = -1) {
    key_.element_type = element;
    key_.array_len = len;
    return *this;
  }
  Row& any_case() {
    key_.case_insensitive = true;
    return *this;
  }
  Row& support_list() {
    key_.allowed_is_support_list = true;
    return *this;
  }
  Row& applies(std::vector<std::string> types) {
    key_.applies_to = std::move(types);
    return *this;
  }
  Row& by_type(json defaults) {
    key_.default_by_type = std::move(defaults);
    return *this;
  }
  // Accepted but not acted on. Booleans are quiet when false (switching off a
  // feature strata does not have is already honoured).
  Row& with_ranks() {
    key_.honoured_with_ranks = true;
    return *this;
  }
  Row& ignored(std::string note, std::vector<json> quiet = {}) {
    key_.support = KeySupport::kAcceptedIgnored;
    key_.note = std::move(note);
    if (quiet.empty() && key_.type == KeyType::kBool) {
      quiet.push_back(false);
    }
    key_.quiet_values = std::move(quiet);
    return *this;
  }
  Row& alias(std::string of, json values = nullptr) {
    key_.support = KeySupport::kDeprecatedAlias;
    key_.alias_of = std::move(of);
    key_.alias_values = std::move(values);
    return *this;
  }
  // Values once accepted and now refused (a parse error says why).
  Row& removed(std::string value, std::string why) {
    key_.removed_values.emplace_back(std::move(value), std::move(why));
    return *this;
  }
  // The typed field this (honoured) row lands in.
  template <typename Access>
  Row& field(Access access) {
    using T = std::remove_reference_t<decltype(access(std::declval<EngineConfig&>()))>;
    const std::string path = key_.path;
    key_.fill = [access, path](EngineConfig& c, const json& v) -> Status {
      const ConfigKey* key = find_config_key(path);
      return from_json<T>(*key, v, &access(c));
    };
    key_.read = [access, path](const EngineConfig& c) -> json {
      const ConfigKey* key = find_config_key(path);
      return to_json<T>(*key, access(const_cast<EngineConfig&>(c)));
    };
    return *this;
  }
  ConfigKey take() { return std::move(key_); }

 private:
  ConfigKey key_;
};

// Notes shared by several accepted-but-ignored keys.
const char* const kNoteComm =
    "DeepSpeed's gradient-communication tuning; a single process has no gradient communication, "
    "so the value has no effect there. With several ranks (torch.distributed) strata acts on "
    "overlap_comm, reduce_bucket_size, allgather_bucket_size, reduce_scatter and "
    "contiguous_gradients (docs/distributed.md), not on the others";
const char* const kNoteStage3 =
    "a DeepSpeed stage-3 tuning knob with no counterpart in strata's parameter window "
    "(stage3_prefetch_bucket_size, stage3_max_live_parameters and stage3_max_reuse_distance "
    "are the ones it acts on)";
const char* const kNoteMonitor =
    "strata reports progress and per-step timing itself (strata.progress, strata.trace, "
    "wall_clock_breakdown); this DeepSpeed feature is not available";
const char* const kNoteFeature = "this DeepSpeed feature is not implemented in strata";
const char* const kNotePipeline =
    "accepted; strata always pipelines reads and writes (offload_optimizer.buffer_count deep), "
    "so false is not honoured and true changes nothing";
const char* const kNoteNoEffect = "DeepSpeed-internal switch with no counterpart in strata";

std::vector<ConfigKey> build_schema() {
  std::vector<Row> rows;
  auto add = [&rows](std::string path, KeyType type, json def, std::string desc) -> Row& {
    rows.emplace_back(std::move(path), type, std::move(def), std::move(desc));
    return rows.back();
  };
  const json kNull = nullptr;
  using K = KeyType;
  const std::vector<std::string> kAdamLike = {"Adam", "AdamW"};

  // ---- batch, logging, clipping -------------------------------------------
  add("train_batch_size", K::kInt, kNull,
      "Samples per optimizer step over all ranks: train_micro_batch_size_per_gpu x "
      "gradient_accumulation_steps x world size (DeepSpeed's rule). Any two of the three imply "
      "the third; all three given must agree; none given means micro batch 1 and accumulation 1. "
      "Always present after parsing.")
      .min(1)
      .auto_ok()
      .field(STRATA_FIELD(training.train_batch_size));
  add("train_micro_batch_size_per_gpu", K::kInt, kNull,
      "Samples per forward/backward on one rank (the DataLoader batch size). Derived when not "
      "given (see train_batch_size).")
      .min(1)
      .auto_ok()
      .field(STRATA_FIELD(training.train_micro_batch_size_per_gpu));
  add("gradient_accumulation_steps", K::kInt, kNull,
      "Micro-batches accumulated before each optimizer step; backward scales the loss by its "
      "inverse and step() acts only at accumulation boundaries. Derived when not given.")
      .min(1)
      .auto_ok()
      .field(STRATA_FIELD(training.gradient_accumulation_steps));
  add("steps_per_print", K::kInt, 10,
      "Print progress (loss, learning rate, step time) every N "
      "optimizer steps, on rank 0 only.")
      .min(1)
      .field(STRATA_FIELD(training.steps_per_print));
  add("wall_clock_breakdown", K::kBool, false,
      "Print the per-step time breakdown (forward, backward, read, update, write-back) every "
      "steps_per_print steps.")
      .field(STRATA_FIELD(training.wall_clock_breakdown));
  add("gradient_clipping", K::kNumber, 0.0,
      "Clip gradients to this global L2 norm across all tiers and ranks; 0 turns clipping off.")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(training.gradient_clipping));
  add("gradient_allreduce_op", K::kString, "mean",
      "How data-parallel gradients combine across ranks: mean (averaged, the default) or sum. "
      "Refused with ZeRO stage 3, as in DeepSpeed.")
      .allowed({"mean", "sum"})
      .field(STRATA_FIELD(training.gradient_allreduce_op));
  add("prescale_gradients", K::kBool, kNull, "DeepSpeed: scale gradients before the allreduce.")
      .ignored(kNoteComm);
  add("gradient_predivide_factor", K::kNumber, kNull,
      "DeepSpeed: divide gradients by this factor before the allreduce.")
      .ignored(kNoteComm, {1.0, 1});
  add("sparse_gradients", K::kBool, kNull, "DeepSpeed: allreduce sparse gradients as sparse.")
      .ignored(
          "sparse gradients are refused with an error at the first step; dense gradients "
          "are unaffected");
  add("communication_data_type", K::kString, kNull, "DeepSpeed: dtype of gradient communication.")
      .ignored(kNoteComm);
  add("seq_parallel_communication_data_type", K::kString, kNull,
      "DeepSpeed: dtype of sequence-parallel communication.")
      .ignored(kNoteComm);

  // ---- optimizer -------------------------------------------------------------
  add("optimizer", K::kObject, kNull,
      "The optimizer strata builds when the script passes none. Optional: without it, the "
      "script's optimizer (or OffloadAdamW's arguments) is used.");
  add("optimizer.type", K::kString, kNull,
      "Optimizer name, case-insensitive as in DeepSpeed (stored in canonical case). \"Adam\" is "
      "AdamW unless params.adam_w_mode is false. Required when optimizer is given.")
      .allowed({"Adam", "AdamW", "SGD", "Adagrad"})
      .any_case()
      .support_list()
      .field(STRATA_FIELD(optimizer.type));
  add("optimizer.params", K::kObject, json::object(),
      "Constructor arguments of the optimizer; each applies to the types listed with it, and a "
      "parameter the type does not take is an error.");
  add("optimizer.params.lr", K::kNumber, kNull, "Learning rate.")
      .min(0)
      .auto_ok()
      .by_type({{"Adam", 1e-3}, {"AdamW", 1e-3}, {"SGD", 1e-3}, {"Adagrad", 1e-2}})
      .field(STRATA_FIELD(optimizer.lr));
  add("optimizer.params.betas", K::kArray, json::array({0.9, 0.999}),
      "Adam's coefficients for the running averages of the gradient and its square.")
      .array_of(K::kNumber, 2)
      .below(0, 1)
      .auto_ok()
      .applies(kAdamLike)
      .field(STRATA_FIELD(optimizer.betas));
  add("optimizer.params.eps", K::kNumber, kNull, "Term added to the denominator.")
      .min(0)
      .auto_ok()
      .applies({"Adam", "AdamW", "Adagrad"})
      .by_type({{"Adam", 1e-8}, {"AdamW", 1e-8}, {"Adagrad", 1e-10}})
      .field(STRATA_FIELD(optimizer.eps));
  add("optimizer.params.weight_decay", K::kNumber, 0.0,
      "Weight decay: decoupled (AdamW) in adam_w_mode, L2 added to the gradient otherwise.")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(optimizer.weight_decay));
  add("optimizer.params.adam_w_mode", K::kBool, true,
      "Decoupled weight decay (AdamW). DeepSpeed's default true makes \"type\": \"Adam\" an AdamW; "
      "ignored (always true) for \"AdamW\".")
      .applies(kAdamLike)
      .field(STRATA_FIELD(optimizer.adam_w_mode));
  add("optimizer.params.bias_correction", K::kBool, true, "Apply Adam's bias correction.")
      .applies(kAdamLike)
      .field(STRATA_FIELD(optimizer.bias_correction));
  add("optimizer.params.amsgrad", K::kBool, false,
      "AMSGrad variant: keeps the running maximum of v (one more fp32 slot per parameter).")
      .applies(kAdamLike)
      .field(STRATA_FIELD(optimizer.amsgrad));
  add("optimizer.params.torch_adam", K::kBool, kNull,
      "DeepSpeed: use torch.optim.Adam/AdamW instead of its fused kernel.")
      .applies(kAdamLike)
      .ignored("strata always runs its own kernels; they compute the same Adam/AdamW update");
  add("optimizer.params.momentum", K::kNumber, 0.0, "SGD momentum factor.")
      .min(0)
      .applies({"SGD"})
      .field(STRATA_FIELD(optimizer.momentum));
  add("optimizer.params.dampening", K::kNumber, 0.0, "SGD dampening for momentum.")
      .min(0)
      .applies({"SGD"})
      .field(STRATA_FIELD(optimizer.dampening));
  add("optimizer.params.nesterov", K::kBool, false, "SGD: Nesterov momentum.")
      .applies({"SGD"})
      .field(STRATA_FIELD(optimizer.nesterov));
  add("optimizer.params.lr_decay", K::kNumber, 0.0, "Adagrad learning-rate decay.")
      .min(0)
      .applies({"Adagrad"})
      .field(STRATA_FIELD(optimizer.lr_decay));
  add("optimizer.params.initial_accumulator_value", K::kNumber, 0.0,
      "Adagrad: initial value of the sum of squared gradients.")
      .min(0)
      .applies({"Adagrad"})
      .field(STRATA_FIELD(optimizer.initial_accumulator_value));

  // ---- scheduler -------------------------------------------------------------
  add("scheduler", K::kObject, kNull,
      "Learning-rate schedule built by strata.initialize (DeepSpeed's names and step "
      "semantics: the learning rate at init is the warmup start). Optional.");
  add("scheduler.type", K::kString, kNull,
      "Schedule name (case-sensitive, as in DeepSpeed). "
      "Required when scheduler is given.")
      .allowed({"LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"})
      .support_list()
      .field(STRATA_FIELD(scheduler.type));
  add("scheduler.params", K::kObject, json::object(),
      "Constructor arguments of the schedule; each applies to the types listed with it.");
  add("scheduler.params.warmup_min_lr", K::kNumber, 0.0, "Learning rate at the start of warmup.")
      .min(0)
      .auto_ok()
      .applies({"WarmupLR", "WarmupDecayLR"})
      .field(STRATA_FIELD(scheduler.warmup_min_lr));
  add("scheduler.params.warmup_max_lr", K::kNumber, kNull,
      "Learning rate at the end of warmup (WarmupLR: the optimizer's lr when not given).")
      .min(0)
      .auto_ok()
      .applies({"WarmupLR", "WarmupDecayLR"})
      .by_type({{"WarmupDecayLR", 0.001}})
      .field(STRATA_FIELD(scheduler.warmup_max_lr));
  add("scheduler.params.warmup_num_steps", K::kInt, 1000,
      "Steps of warmup (DeepSpeed uses at least 2).")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(scheduler.warmup_num_steps));
  add("scheduler.params.warmup_type", K::kString, "log", "Shape of the warmup curve.")
      .allowed({"log", "linear"})
      .field(STRATA_FIELD(scheduler.warmup_type));
  add("scheduler.params.total_num_steps", K::kInt, kNull,
      "Total training steps; required by WarmupDecayLR and WarmupCosineLR.")
      .min(1)
      .auto_ok()
      .applies({"WarmupDecayLR", "WarmupCosineLR"})
      .field(STRATA_FIELD(scheduler.total_num_steps));
  add("scheduler.params.warmup_min_ratio", K::kNumber, 0.0,
      "WarmupCosineLR: start of warmup as a fraction of the optimizer's lr.")
      .range(0, 1)
      .auto_ok()
      .applies({"WarmupCosineLR"})
      .field(STRATA_FIELD(scheduler.warmup_min_ratio));
  add("scheduler.params.cos_min_ratio", K::kNumber, 0.0001,
      "WarmupCosineLR: end of the cosine decay as a fraction of the optimizer's lr.")
      .range(0, 1)
      .auto_ok()
      .applies({"WarmupCosineLR"})
      .field(STRATA_FIELD(scheduler.cos_min_ratio));
  add("scheduler.params.lr_range_test_min_lr", K::kNumber, 1e-3,
      "LRRangeTest: learning rate at the start of the test.")
      .min(0)
      .applies({"LRRangeTest"})
      .field(STRATA_FIELD(scheduler.lr_range_test_min_lr));
  add("scheduler.params.lr_range_test_step_size", K::kInt, 2000,
      "LRRangeTest: steps per increase of the learning rate.")
      .min(1)
      .applies({"LRRangeTest"})
      .field(STRATA_FIELD(scheduler.lr_range_test_step_size));
  add("scheduler.params.lr_range_test_step_rate", K::kNumber, 1.0,
      "LRRangeTest: lr = min_lr * (1 + step_rate * interval).")
      .min(0)
      .applies({"LRRangeTest"})
      .field(STRATA_FIELD(scheduler.lr_range_test_step_rate));
  add("scheduler.params.lr_range_test_staircase", K::kBool, false,
      "LRRangeTest: raise the learning rate in stairs (whole intervals) instead of continuously.")
      .applies({"LRRangeTest"})
      .field(STRATA_FIELD(scheduler.lr_range_test_staircase));
  add("scheduler.params.cycle_min_lr", K::kNumber, kNull,
      "OneCycle: learning rate at the start and end of the cycle. Required by OneCycle.")
      .min(0)
      .auto_ok()
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_min_lr));
  add("scheduler.params.cycle_max_lr", K::kNumber, kNull,
      "OneCycle: learning rate at the peak of the cycle. Required by OneCycle.")
      .min(0)
      .auto_ok()
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_max_lr));
  add("scheduler.params.decay_lr_rate", K::kNumber, 0.0,
      "OneCycle: after the cycle, lr = cycle_min_lr / (1 + decay_lr_rate * k / decay_step_size).")
      .min(0)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.decay_lr_rate));
  add("scheduler.params.cycle_first_step_size", K::kInt, 2000,
      "OneCycle: steps of the rising half of the cycle.")
      .min(1)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_first_step_size));
  add("scheduler.params.cycle_second_step_size", K::kInt, kNull,
      "OneCycle: steps of the falling half (default: cycle_first_step_size).")
      .min(0)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_second_step_size));
  add("scheduler.params.cycle_first_stair_count", K::kInt, 0,
      "OneCycle: stairs in the rising half (0: continuous).")
      .min(0)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_first_stair_count));
  add("scheduler.params.cycle_second_stair_count", K::kInt, kNull,
      "OneCycle: stairs in the falling half (default: cycle_first_stair_count).")
      .min(0)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_second_stair_count));
  add("scheduler.params.decay_step_size", K::kInt, 0,
      "OneCycle: steps per decay interval after the cycle (0: no decay).")
      .min(0)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.decay_step_size));
  add("scheduler.params.cycle_momentum", K::kBool, true,
      "OneCycle: cycle betas[0] inversely to the learning rate (optimizers with betas only).")
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_momentum));
  add("scheduler.params.cycle_min_mom", K::kNumber, 0.8,
      "OneCycle: lowest betas[0] (at the lr peak).")
      .range(0, 1)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_min_mom));
  add("scheduler.params.cycle_max_mom", K::kNumber, 0.9,
      "OneCycle: highest betas[0] (at the start and end of the cycle).")
      .range(0, 1)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.cycle_max_mom));
  add("scheduler.params.decay_mom_rate", K::kNumber, 0.0,
      "OneCycle: after the cycle, betas[0] = cycle_max_mom * (1 + decay_mom_rate * k / "
      "decay_step_size).")
      .min(0)
      .applies({"OneCycle"})
      .field(STRATA_FIELD(scheduler.decay_mom_rate));
  add("scheduler.params.last_batch_iteration", K::kInt, -1,
      "Index of the last step taken (-1: start from the beginning).")
      .min(-1)
      .field(STRATA_FIELD(scheduler.last_batch_iteration));

  // ---- precision -------------------------------------------------------------
  add("fp16", K::kObject, json::object(), "fp16 mixed precision with dynamic loss scaling.");
  add("fp16.enabled", K::kBool, false,
      "fp16 model parameters and gradients; fp32 master weights and state.")
      .auto_ok()
      .field(STRATA_FIELD(precision.fp16_enabled));
  add("fp16.auto_cast", K::kBool, false, "Cast floating-point inputs of forward to fp16.")
      .field(STRATA_FIELD(precision.fp16_auto_cast));
  add("fp16.loss_scale", K::kNumber, 0.0, "Static loss scale; 0 selects dynamic loss scaling.")
      .min(0)
      .field(STRATA_FIELD(precision.fp16_loss_scale));
  add("fp16.initial_scale_power", K::kInt, 16,
      "Dynamic scaling starts at 2^initial_scale_power (127 is the largest a float holds).")
      .range(0, 127)
      .field(STRATA_FIELD(precision.fp16_initial_scale_power));
  add("fp16.loss_scale_window", K::kInt, 1000,
      "Overflow-free steps after which the dynamic scale is raised.")
      .min(1)
      .field(STRATA_FIELD(precision.fp16_loss_scale_window));
  add("fp16.hysteresis", K::kInt, 2, "Overflows tolerated before the dynamic scale is lowered.")
      .min(1)
      .field(STRATA_FIELD(precision.fp16_hysteresis));
  add("fp16.consecutive_hysteresis", K::kBool, false,
      "Refill hysteresis on every overflow-free step, not only after loss_scale_window.")
      .field(STRATA_FIELD(precision.fp16_consecutive_hysteresis));
  add("fp16.min_loss_scale", K::kNumber, 1.0, "Lower bound of the dynamic loss scale.")
      .min(0)
      .field(STRATA_FIELD(precision.fp16_min_loss_scale));
  add("fp16.fp16_master_weights_and_grads", K::kBool, kNull,
      "DeepSpeed: keep master weights in fp16.")
      .ignored(
          "strata keeps master weights in fp32, or in bf16 with "
          "bf16.bf16_master_weights_and_grads; there is no fp16 master");
  add("bf16", K::kObject, json::object(), "bf16 mixed precision.");
  add("bf16.enabled", K::kBool, false,
      "bf16 model parameters; fp32 master weights and state; no loss scaling.")
      .auto_ok()
      .field(STRATA_FIELD(precision.bf16_enabled));
  add("bf16.bf16_master_weights_and_grads", K::kBool, false,
      "DeepSpeed: keep the master weights in bf16 instead of fp32 (2 bytes per parameter "
      "instead of 4 on the optimizer's tier; rounded to nearest even after every update). "
      "Needs bf16.enabled and ZeRO stage 1-3, as DeepSpeed's support matrix says; gradients "
      "are bf16 unless data_types.grad_accum_dtype says otherwise.")
      .field(STRATA_FIELD(precision.bf16_master_weights_and_grads));
  add("bf16.bf16_optimizer_states", K::kBool, false,
      "DeepSpeed: keep the optimizer's moments (Adam's m and v) in bf16. Needs "
      "bf16.bf16_master_weights_and_grads, as in DeepSpeed; strata.optimizer_state_dtype bf16 "
      "gives bf16 moments with fp32 master weights.")
      .field(STRATA_FIELD(precision.bf16_optimizer_states));
  add("bf16.immediate_grad_update", K::kBool, kNull,
      "DeepSpeed: apply bf16 gradients to the fp32 copy as they arrive.")
      .ignored(kNoteNoEffect, {true, false});
  add("bfloat16", K::kObject, kNull, "Old name of bf16.").alias("bf16");
  add("data_types", K::kObject, json::object(), "Data types of internal buffers.");
  add("data_types.grad_accum_dtype", K::kString, kNull,
      "dtype the flat gradient buffers accumulate gradients in across micro-steps, and the "
      "update reads (not given: each parameter's own dtype, as DeepSpeed does under ZeRO). "
      "fp32 with bf16/fp16 parameters: each backward's gradient is added into fp32 buffers "
      "and .grad is None afterwards.")
      .allowed({"fp32", "fp16", "bf16"})
      .field(STRATA_FIELD(precision.grad_accum_dtype));

  // ---- ZeRO ------------------------------------------------------------------
  add("zero_optimization", K::kObject, json::object(),
      "ZeRO settings. The old form true/false means stage 1/0 (deprecated).");
  add("zero_optimization.stage", K::kInt, 0,
      "0: no sharding; 1 and 2: optimizer state (and gradients) sharded across data-parallel "
      "ranks; 3: the model's weights live on the param tier (offload_param) and are fetched "
      "per module, and gradients go to the optimizer as they are final; with several ranks "
      "every parameter is partitioned (each rank keeps its chunk, all-gathered before a "
      "module runs, gradients reduced to their owners).")
      .range(0, 3)
      .field(STRATA_FIELD(zero.stage));
  add("zero_optimization.sub_group_size", K::kInt, 1000000000,
      "Elements per sub-group: the unit of state that is read, updated and written back in one "
      "pipeline stage.")
      .min(1)
      .field(STRATA_FIELD(zero.sub_group_size));
  add("zero_optimization.offload_optimizer", K::kObject, json::object(),
      "Where the optimizer state (fp32 master weights, Adam's m and v) lives.");
  add("zero_optimization.offload_optimizer.device", K::kString, "none",
      "Tier of the optimizer state: none (with the model), cpu (pinned DRAM), cxl (the "
      "strata.cxl_nodes NUMA nodes), nvme (a swap file under nvme_path). Unlike DeepSpeed, nvme "
      "is honoured at stages 0-2.")
      .allowed({"none", "cpu", "nvme", "cxl"})
      .field(STRATA_FIELD(zero.offload.device));
  add("zero_optimization.offload_optimizer.nvme_path", K::kString, kNull,
      "Directory for the swap file, checked at parse time: created like mkdir -p (and said "
      "once) when missing and the folder above it is writable, else an error. Required with "
      "device nvme; with cpu or cxl, state that does not fit strata.dram_budget spills there.")
      .field(STRATA_FIELD(zero.offload.nvme_path));
  add("zero_optimization.offload_optimizer.buffer_count", K::kInt, 4,
      "Pinned staging buffers: the depth of the read -> update -> write pipeline.")
      .min(1)
      .field(STRATA_FIELD(zero.offload.buffer_count));
  add("zero_optimization.offload_optimizer.pin_memory", K::kBool, false,
      "Page-lock the host copy of the state (device cpu or cxl) for faster transfers to a GPU.")
      .field(STRATA_FIELD(zero.offload.pin_memory));
  add("zero_optimization.offload_optimizer.pipeline_read", K::kBool, kNull,
      "DeepSpeed: read the next sub-group's state while the current one is updated.")
      .ignored(kNotePipeline, {true});
  add("zero_optimization.offload_optimizer.pipeline_write", K::kBool, kNull,
      "DeepSpeed: write the previous sub-group's state back while the current one is updated.")
      .ignored(kNotePipeline, {true});
  add("zero_optimization.offload_optimizer.ratio", K::kNumber, 1.0,
      "With strata.schedule static: fraction of the sub-groups the GPU could update (state on the "
      "host tier, Adam/AdamW, model on the GPU) that the CPU updates; the GPU updates the rest, "
      "spread evenly, streaming their state over PCIe.")
      .range(0, 1)
      .field(STRATA_FIELD(zero.offload.ratio));
  add("zero_optimization.offload_optimizer.fast_init", K::kBool, kNull,
      "DeepSpeed: fast optimizer initialisation with NVMe offload.")
      .ignored("strata writes the initial state once at start; there is no separate fast path");
  add("zero_optimization.offload_optimizer.super_offload", K::kBool, kNull,
      "DeepSpeed: SuperOffload for superchips.")
      .ignored("not implemented; strata.overlap_backward overlaps updates with backward instead");
  add("zero_optimization.offload_optimizer.convert_grad_on_cpu", K::kBool, kNull,
      "DeepSpeed: SuperOffload gradient conversion on the CPU.")
      .ignored(kNoteNoEffect, {true, false});
  add("zero_optimization.offload_optimizer.cpuadam_cores_perc", K::kNumber, kNull,
      "DeepSpeed: share of cores for SuperOffload's CPU Adam.")
      .ignored("strata.threads sets the update threads", {0.8});
  add("zero_optimization.offload_param", K::kObject, json::object(),
      "Where the model's own weights (their model dtype) live at ZeRO stage 3: the param tier. "
      "Acted on at stage 3 only (DeepSpeed: \"valid only with stage 3\"); at stages 0-2 a "
      "device other than none is warned about and not acted on.");
  add("zero_optimization.offload_param.device", K::kString, "none",
      "Tier of the model weights at stage 3: none (the model's own memory; at stage 3 "
      "gradients still stream to the optimizer as they are final), cpu (pinned DRAM), cxl (the "
      "strata.cxl_nodes NUMA nodes), nvme (a swap file of its own under nvme_path). Weights are "
      "fetched before a module runs and released after.")
      .allowed({"none", "cpu", "nvme", "cxl"})
      .field(STRATA_FIELD(zero.offload_param.device));
  add("zero_optimization.offload_param.nvme_path", K::kString, kNull,
      "Directory for the weights' swap file, checked at parse time like "
      "offload_optimizer.nvme_path. Required with device nvme.")
      .field(STRATA_FIELD(zero.offload_param.nvme_path));
  add("zero_optimization.offload_param.buffer_count", K::kInt, 5,
      "Staging buffers for weights fetched from NVMe or CXL: the resident window is "
      "buffer_count x buffer_size elements (with stage3_max_live_parameters, whichever is "
      "smaller).")
      .min(1)
      .field(STRATA_FIELD(zero.offload_param.buffer_count));
  add("zero_optimization.offload_param.buffer_size", K::kInt, 100000000,
      "Elements per staging buffer; a parameter larger than this is refused (the error names it "
      "and the size needed).")
      .min(1)
      .field(STRATA_FIELD(zero.offload_param.buffer_size));
  add("zero_optimization.offload_param.max_in_cpu", K::kInt, kNull,
      "DeepSpeed: parameter elements kept in CPU memory with device nvme.")
      .min(0)
      .ignored(
          "with device nvme strata keeps no weights in CPU memory beyond the staging "
          "buffers (buffer_count x buffer_size) and the persistent parameters",
          {1000000000});
  add("zero_optimization.offload_param.pin_memory", K::kBool, false,
      "Page-lock the param tier (device cpu) and the staging buffers, for faster copies to a "
      "GPU.")
      .field(STRATA_FIELD(zero.offload_param.pin_memory));
  add("zero_optimization.cpu_offload", K::kBool, kNull,
      "Old form of offload_optimizer.device: true means cpu.")
      .alias("zero_optimization.offload_optimizer.device", {{"true", "cpu"}, {"false", nullptr}});
  add("zero_optimization.cpu_offload_param", K::kBool, kNull,
      "Old form of offload_param.device: true means cpu.")
      .alias("zero_optimization.offload_param.device", {{"true", "cpu"}, {"false", nullptr}});
  add("zero_optimization.cpu_offload_params", K::kBool, kNull,
      "Misspelt old form of offload_param.device seen in the wild: true means cpu.")
      .alias("zero_optimization.offload_param.device", {{"true", "cpu"}, {"false", nullptr}});
  add("zero_optimization.cpu_offload_use_pin_memory", K::kBool, kNull,
      "Old form of offload_optimizer.pin_memory.")
      .alias("zero_optimization.offload_optimizer.pin_memory");
  add("zero_optimization.overlap_comm", K::kBool, kNull,
      "DeepSpeed: overlap gradient reduction with backward.")
      .ignored(kNoteComm)
      .with_ranks();
  add("zero_optimization.reduce_bucket_size", K::kInt, kNull,
      "DeepSpeed: elements reduced at a time.")
      .min(0)
      .auto_ok()
      .ignored(kNoteComm)
      .with_ranks();
  add("zero_optimization.allgather_bucket_size", K::kInt, kNull,
      "DeepSpeed: elements allgathered at a time.")
      .min(0)
      .auto_ok()
      .ignored(kNoteComm)
      .with_ranks();
  add("zero_optimization.reduce_scatter", K::kBool, kNull,
      "DeepSpeed: reduce-scatter instead of allreduce.")
      .ignored(kNoteComm)
      .with_ranks();
  add("zero_optimization.contiguous_gradients", K::kBool, kNull,
      "DeepSpeed: copy gradients into a contiguous buffer.")
      .ignored(
          "one process: strata always copies gradients into flat per-sub-group buffers; with "
          "several ranks at ZeRO stage 1 it picks one flat gradient buffer (true) or torch's "
          "own .grad tensors copied into buckets (false) (docs/distributed.md)",
          {true, false});
  add("zero_optimization.allgather_partitions", K::kBool, kNull,
      "DeepSpeed: allgather instead of broadcasts after the step.")
      .ignored(kNoteComm);
  add("zero_optimization.round_robin_gradients", K::kBool, kNull,
      "DeepSpeed: round-robin gradient copies to the CPU.")
      .ignored(kNoteComm);
  add("zero_optimization.use_multi_rank_bucket_allreduce", K::kBool, kNull,
      "DeepSpeed: combine reduce buckets of ranks.")
      .ignored(kNoteComm);
  add("zero_optimization.ignore_unused_parameters", K::kBool, kNull,
      "DeepSpeed: tolerate parameters without gradients.")
      .ignored("parameters without a gradient are always tolerated (they are not updated)", {true});
  add("zero_optimization.load_from_fp32_weights", K::kBool, kNull,
      "DeepSpeed: initialise masters from the checkpoint's fp32 copy.")
      .ignored("strata checkpoints always carry fp32 masters and load them", {true});
  add("zero_optimization.elastic_checkpoint", K::kBool, kNull,
      "DeepSpeed: legacy elastic checkpoints.")
      .ignored(kNoteFeature);
  add("zero_optimization.legacy_stage1", K::kBool, kNull, "DeepSpeed: old stage-1 code.")
      .ignored(kNoteNoEffect);
  add("zero_optimization.stage3_max_live_parameters", K::kInt, 1000000000,
      "Stage 3: weight elements resident at once (fetched, prefetched and persistent), on the "
      "compute device (CPU memory on a CPU-only machine). A module whose own weights exceed it "
      "is an error naming the module.")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(zero.stage3.max_live_parameters));
  add("zero_optimization.stage3_max_reuse_distance", K::kInt, 1000000000,
      "Stage 3: a weight used again within this many elements of fetches (in the order recorded "
      "in the first step) is kept resident instead of released and fetched again.")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(zero.stage3.max_reuse_distance));
  add("zero_optimization.stage3_prefetch_bucket_size", K::kInt, 50000000,
      "Stage 3: weight elements fetched ahead of the module that runs, following the module "
      "order recorded in the first step (0: no prefetch).")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(zero.stage3.prefetch_bucket_size));
  add("zero_optimization.stage3_param_persistence_threshold", K::kInt, 100000,
      "Stage 3: parameters with fewer elements stay resident (never offloaded; biases, "
      "LayerNorm weights).")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(zero.stage3.param_persistence_threshold));
  add("zero_optimization.stage3_model_persistence_threshold", K::kInt, kNull,
      "Stage 3: at most this many elements in total stay resident by "
      "stage3_param_persistence_threshold, the first ones built first (not given: no bound).")
      .min(0)
      .auto_ok()
      .field(STRATA_FIELD(zero.stage3.model_persistence_threshold));
  add("zero_optimization.stage3_gather_16bit_weights_on_model_save", K::kBool, false,
      "Stage 3: save_16bit_model writes the whole weights (fetched from the param tier one "
      "parameter at a time). false: DeepSpeed writes no weights then; strata says so and "
      "writes none.")
      .field(STRATA_FIELD(zero.stage3.gather_16bit_weights_on_model_save));
  add("zero_optimization.stage3_gather_fp16_weights_on_model_save", K::kBool, kNull,
      "DeepSpeed: old name of stage3_gather_16bit_weights_on_model_save.")
      .alias("zero_optimization.stage3_gather_16bit_weights_on_model_save");
  add("zero_optimization.stage3_module_granularity_threshold", K::kInt, kNull,
      "DeepSpeed: stage-3 module fetch granularity.")
      .auto_ok()
      .ignored(kNoteStage3);
  add("zero_optimization.stage3_use_all_reduce_for_fetch_params", K::kBool, kNull,
      "DeepSpeed: allreduce to fetch stage-3 parameters.")
      .ignored(kNoteStage3);
  add("zero_optimization.stage3_allgather_sequential", K::kBool, kNull,
      "DeepSpeed: sequential stage-3 allgather.")
      .ignored(kNoteStage3);
  add("zero_optimization.stage3_partition_stream_chunk_size", K::kInt, kNull,
      "DeepSpeed: chunked partitioning in zero.Init.")
      .min(0)
      .ignored(kNoteStage3);
  add("zero_optimization.prefetch_bucket_size", K::kInt, kNull,
      "DeepSpeed: field name of stage3_prefetch_bucket_size.")
      .alias("zero_optimization.stage3_prefetch_bucket_size");
  add("zero_optimization.param_persistence_threshold", K::kInt, kNull,
      "DeepSpeed: field name of stage3_param_persistence_threshold.")
      .alias("zero_optimization.stage3_param_persistence_threshold");
  add("zero_optimization.model_persistence_threshold", K::kInt, kNull,
      "DeepSpeed: field name of stage3_model_persistence_threshold.")
      .alias("zero_optimization.stage3_model_persistence_threshold");
  add("zero_optimization.max_live_parameters", K::kInt, kNull,
      "DeepSpeed: field name of stage3_max_live_parameters.")
      .alias("zero_optimization.stage3_max_live_parameters");
  add("zero_optimization.max_reuse_distance", K::kInt, kNull,
      "DeepSpeed: field name of stage3_max_reuse_distance.")
      .alias("zero_optimization.stage3_max_reuse_distance");
  add("zero_optimization.gather_16bit_weights_on_model_save", K::kBool, kNull,
      "DeepSpeed: field name of stage3_gather_16bit_weights_on_model_save.")
      .alias("zero_optimization.stage3_gather_16bit_weights_on_model_save");
  add("zero_optimization.memory_efficient_linear", K::kBool, kNull,
      "DeepSpeed: memory-efficient linear layers at stage 3.")
      .ignored(kNoteStage3);
  add("zero_optimization.zero_hpz_partition_size", K::kInt, kNull,
      "DeepSpeed ZeRO++: hierarchical partition size.")
      .ignored(kNoteFeature, {1});
  add("zero_optimization.zero_quantized_weights", K::kBool, kNull,
      "DeepSpeed ZeRO++: quantized weight communication.")
      .ignored(kNoteFeature);
  add("zero_optimization.zero_quantized_nontrainable_weights", K::kBool, kNull,
      "DeepSpeed ZeRO++: quantized frozen weights.")
      .ignored(kNoteFeature);
  add("zero_optimization.zero_quantized_gradients", K::kBool, kNull,
      "DeepSpeed ZeRO++: quantized gradient communication.")
      .ignored(kNoteFeature);
  add("zero_optimization.zeropp_loco_param", K::kObject, kNull, "DeepSpeed ZeRO++: LoCo.")
      .ignored(kNoteFeature);
  add("zero_optimization.mics_shard_size", K::kInt, kNull, "DeepSpeed MiCS shard size.")
      .ignored(kNoteFeature, {-1});
  add("zero_optimization.mics_hierarchical_params_gather", K::kBool, kNull,
      "DeepSpeed MiCS hierarchical gather.")
      .ignored(kNoteFeature);
  add("zero_optimization.pipeline_loading_checkpoint", K::kBool, kNull,
      "DeepSpeed: load checkpoints in pipeline mode.")
      .ignored(kNoteFeature);
  add("zero_optimization.override_module_apply", K::kBool, kNull,
      "DeepSpeed: override nn.Module.apply at stage 3.")
      .ignored(kNoteNoEffect, {true, false});
  add("zero_optimization.log_trace_cache_warnings", K::kBool, kNull,
      "DeepSpeed: stage-3 trace-cache warnings.")
      .ignored(kNoteNoEffect, {true, false});
  add("zero_optimization.enable_sanity_checks", K::kBool, kNull,
      "DeepSpeed: internal sanity checks.")
      .ignored(kNoteNoEffect);
  add("zero_optimization.save_muon_momentum_buffer_in_memory", K::kBool, kNull,
      "DeepSpeed: Muon momentum placement.")
      .ignored(kNoteFeature);
  add("zero_optimization.leaf_module", K::kObject, kNull, "DeepSpeed: stage-3 leaf modules.")
      .ignored(kNoteStage3);
  add("zero_optimization.zenflow", K::kObject, kNull,
      "DeepSpeed ZenFlow: stall-free offloading with importance-based updates.")
      .ignored("not implemented; strata.overlap_backward overlaps updates with backward instead");
  add("zero_optimization.super_offload", K::kBool, kNull, "DeepSpeed SuperOffload switch.")
      .ignored("not implemented; strata.overlap_backward overlaps updates with backward instead");
  add("zero_allow_untested_optimizer", K::kBool, false,
      "Allow a client optimizer outside DeepSpeed's ZeRO-tested list (torch Adam, AdamW, "
      "Adagrad, DeepSpeed's and strata's own) with ZeRO stage 1 or more; without it "
      "initialize refuses one, as DeepSpeed does.")
      .field(STRATA_FIELD(training.zero_allow_untested_optimizer));
  add("zero_force_ds_cpu_optimizer", K::kBool, kNull,
      "DeepSpeed: require its CPU Adam with offload.")
      .ignored("offloaded state is always updated by strata's own kernels", {true, false});

  // ---- asynchronous I/O --------------------------------------------------------
  add("aio", K::kObject, json::object(), "NVMe I/O settings (io_uring in strata).");
  add("aio.block_size", K::kInt, 1048576, "Bytes per I/O request; a multiple of 4096 for O_DIRECT.")
      .range(4096, 1073741824)
      .multiple_of(4096)
      .field(STRATA_FIELD(aio.block_size));
  add("aio.queue_depth", K::kInt, 8,
      "I/O requests in flight per ring (DeepSpeed's default 8; fast drives want 32-128).")
      .range(1, double(kMaxQueueDepth))
      .field(STRATA_FIELD(aio.queue_depth));
  add("aio.intra_op_parallelism", K::kInt, 1, "I/O submission threads, each with its own ring.")
      .range(1, double(kMaxIntraOpParallelism))
      .field(STRATA_FIELD(aio.intra_op_parallelism));
  add("aio.thread_count", K::kInt, kNull, "Old name of intra_op_parallelism.")
      .range(1, double(kMaxIntraOpParallelism))
      .alias("aio.intra_op_parallelism");
  add("aio.single_submit", K::kBool, false, "Submit requests one at a time instead of in batches.")
      .field(STRATA_FIELD(aio.single_submit));
  add("aio.overlap_events", K::kBool, true,
      "Submit new requests while completions of earlier ones are reaped.")
      .field(STRATA_FIELD(aio.overlap_events));
  add("aio.use_gds", K::kBool, kNull, "DeepSpeed: GPUDirect Storage.")
      .ignored("GPUDirect Storage is not used; I/O goes through pinned host buffers");

  // ---- strata's own keys -------------------------------------------------------
  add("strata", K::kObject, json::object(), "strata's own settings.");
  add("strata.cxl_nodes", K::kArray, kNull,
      "NUMA nodes used by the cxl device (not given: every CPU-less node).")
      .array_of(K::kInt)
      .min(0)
      .field(STRATA_FIELD(strata.cxl_nodes));
  add("strata.dram_budget", K::kInt, kNull,
      "Bytes of host DRAM the engine may use for state and buffers (not given: a fraction of "
      "MemAvailable). In exact mode (gradient clipping, fp16) with strata.overlap_backward, the "
      "room it leaves (up to half of it for all working buffers together) holds more working "
      "buffers, so that backward prefetches more records before the clip factor is known.")
      .min(1)
      .field(STRATA_FIELD(strata.dram_budget));
  add("strata.dram_cache_bytes", K::kInt, 0,
      "With device nvme, bytes of state kept resident in DRAM.")
      .min(0)
      .field(STRATA_FIELD(strata.dram_cache_bytes));
  add("strata.verify_checksums", K::kBool, true,
      "Per-extent XXH3 checksums on swapped state, verified after every read (checkpoints always "
      "carry them).")
      .field(STRATA_FIELD(strata.verify_checksums));
  add("strata.overlap_backward", K::kBool, true,
      "Start sub-group updates (or their state prefetch) during backward, and fetch the next "
      "step's first records (as many as there are working buffers) once a step's stores are "
      "done, so they arrive during the next forward.")
      .field(STRATA_FIELD(strata.overlap_backward));
  add("strata.overlap_mode", K::kString, "auto",
      "With strata.overlap_backward, one process: auto decides once, from the phases measured "
      "in the second step (forward, backward, the update's busy time and the I/O's), whether an "
      "overlapped backward can hide at least 5% of a step; where it cannot (no I/O to hide and "
      "no core free beside torch's threads, or an update of a few milliseconds) the steps "
      "after run a plain backward and then the step, and the engine says so once. Stage 3 "
      "with weights on a tier always overlaps (its gradients are released as they are "
      "updated). always: overlap every step.")
      .allowed({"auto", "always"})
      .field(STRATA_FIELD(strata.overlap_mode));
  add("strata.clip_mode", K::kString, "exact",
      "How clipping and overlap combine: exact waits for the global norm before updating (with "
      "overlap, state is prefetched and gradient statistics computed during backward).")
      .allowed({"exact"})
      .removed("speculative",
               "speculative updates with rollback are not implemented; the engine always runs "
               "exact mode")
      .field(STRATA_FIELD(strata.clip_mode));
  add("strata.optimizer_state_dtype", K::kString, kNull,
      "How the optimizer's moments are stored on their tier: fp32 (4 bytes each), bf16 (2, "
      "round to nearest even), int8_blockwise (1 byte each plus one fp32 scale per 256 "
      "elements: a per-block 8-bit float code, see docs/kernels.md). The update is computed "
      "in fp32 either way. Not given: bf16 when bf16.bf16_optimizer_states, else fp32. "
      "Compressed state is updated on the CPU.")
      .allowed({"fp32", "bf16", "int8_blockwise"})
      .field(STRATA_FIELD(strata.optimizer_state_dtype));
  add("strata.threads", K::kInt, 0,
      "CPU threads for updates; 0: all cores while no backward runs, and during overlap the "
      "cores torch leaves free (at least one).")
      .range(0, 4096)
      .field(STRATA_FIELD(strata.threads));
  add("strata.schedule", K::kString, kNull,
      "static: CPU/GPU split from offload_optimizer.ratio; auto: the split chosen by the "
      "performance model among all-CPU and interleaves of GPU-updated sub-groups, from "
      "strata.hardware_profile or rates measured at start (a few seconds). Not given: auto where "
      "a GPU can update sub-groups (the engine: a model on a GPU; strata plan: a profile with a "
      "GPU), static otherwise. Only a model on a GPU has sub-groups the GPU can update.")
      .allowed({"static", "auto"})
      .field(STRATA_FIELD(strata.schedule));
  add("strata.hardware_profile", K::kString, kNull,
      "Path of a JSON of measured rates for the performance model (not given: calibrate at "
      "start).")
      .field(STRATA_FIELD(strata.hardware_profile));
  add("strata.trace", K::kObject, json::object(), "Chrome/Perfetto trace of the step pipeline.");
  add("strata.trace.path", K::kString, kNull, "Trace file to write (not given: no trace).")
      .field(STRATA_FIELD(strata.trace_path));
  add("strata.trace.steps", K::kInt, 1, "Optimizer steps recorded in the trace.")
      .min(1)
      .field(STRATA_FIELD(strata.trace_steps));
  add("strata.progress", K::kString, "auto",
      "auto: a progress bar on a terminal, periodic log lines otherwise; bar; log; off.")
      .allowed({"auto", "bar", "log", "off"})
      .field(STRATA_FIELD(strata.progress));

  // ---- other DeepSpeed sections: accepted, not acted on -----------------------
  add("activation_checkpointing", K::kObject, kNull, "DeepSpeed activation checkpointing.")
      .ignored("use torch.utils.checkpoint in the model; strata does not configure it");
  add("flops_profiler", K::kObject, kNull, "DeepSpeed FLOPS profiler.").ignored(kNoteMonitor);
  add("tensorboard", K::kObject, kNull, "DeepSpeed TensorBoard monitor.").ignored(kNoteMonitor);
  add("wandb", K::kObject, kNull, "DeepSpeed Weights & Biases monitor.").ignored(kNoteMonitor);
  add("csv_monitor", K::kObject, kNull, "DeepSpeed CSV monitor.").ignored(kNoteMonitor);
  add("comet", K::kObject, kNull, "DeepSpeed Comet monitor.").ignored(kNoteMonitor);
  add("comms_logger", K::kObject, kNull, "DeepSpeed communication logger.").ignored(kNoteMonitor);
  add("memory_breakdown", K::kBool, kNull, "DeepSpeed memory breakdown prints.")
      .ignored(kNoteMonitor);
  add("dump_state", K::kBool, kNull, "DeepSpeed: print its state after init.")
      .ignored(kNoteMonitor);
  add("elasticity", K::kObject, kNull, "DeepSpeed elastic training.").ignored(kNoteFeature);
  add("amp", K::kObject, kNull, "DeepSpeed NVIDIA Apex AMP.")
      .ignored("use fp16 or bf16; Apex AMP is not supported");
  add("autotuning", K::kObject, kNull, "DeepSpeed autotuner.").ignored(kNoteFeature);
  add("checkpoint", K::kObject, kNull, "DeepSpeed checkpoint options.")
      .ignored("strata's checkpoints are always atomic and checksummed; no options yet");
  add("compression_training", K::kObject, kNull, "DeepSpeed compression.").ignored(kNoteFeature);
  add("data_efficiency", K::kObject, kNull, "DeepSpeed data efficiency.").ignored(kNoteFeature);
  add("curriculum_learning", K::kObject, kNull, "DeepSpeed curriculum learning.")
      .ignored(kNoteFeature);
  add("sparse_attention", K::kObject, kNull, "DeepSpeed sparse attention.").ignored(kNoteFeature);
  add("pipeline", K::kObject, kNull, "DeepSpeed pipeline parallelism.").ignored(kNoteFeature);
  add("progressive_layer_drop", K::kObject, kNull, "DeepSpeed progressive layer drop.")
      .ignored(kNoteFeature);
  add("eigenvalue", K::kObject, kNull, "DeepSpeed eigenvalue computation.").ignored(kNoteFeature);
  add("quantize_training", K::kObject, kNull, "DeepSpeed quantized training.")
      .ignored(kNoteFeature);
  add("weight_quantization", K::kObject, kNull, "DeepSpeed weight quantization.")
      .ignored(kNoteFeature);
  add("hybrid_engine", K::kObject, kNull, "DeepSpeed hybrid engine (RLHF).").ignored(kNoteFeature);
  add("tensor_parallel", K::kObject, kNull, "DeepSpeed AutoTP training.").ignored(kNoteFeature);
  add("torch_autocast", K::kObject, kNull, "DeepSpeed torch.autocast integration.")
      .ignored("use fp16 or bf16, or torch.autocast in the script");
  add("compile", K::kObject, kNull, "DeepSpeed torch.compile options.")
      .ignored("call torch.compile on the model yourself");
  add("nebula", K::kObject, kNull, "DeepSpeed Nebula checkpointing.").ignored(kNoteFeature);
  add("timers", K::kObject, kNull, "DeepSpeed timers.").ignored(kNoteMonitor);
  add("dataloader_drop_last", K::kBool, kNull,
      "DeepSpeed: drop the last incomplete batch of the DataLoader it builds.")
      .ignored("the DataLoader built from training_data keeps the last batch");
  add("graph_harvesting", K::kBool, kNull, "DeepSpeed HPU graph harvesting.")
      .ignored(kNoteNoEffect);
  add("use_node_local_storage", K::kBool, kNull, "DeepSpeed: per-node checkpoint storage.")
      .ignored(kNoteFeature);
  add("load_universal_checkpoint", K::kBool, kNull, "DeepSpeed universal checkpoints.")
      .ignored(kNoteFeature);
  add("disable_allgather", K::kBool, kNull, "DeepSpeed: disable allgather.").ignored(kNoteComm);

  std::vector<ConfigKey> out;
  out.reserve(rows.size());
  for (Row& row : rows) {
    out.push_back(row.take());
  }
  return out;
}

}  // namespace

const std::vector<ConfigKey>& config_schema() {
  static const std::vector<ConfigKey> schema = build_schema();
  return schema;
}

const ConfigKey* find_config_key(const std::string& path) {
  const auto& index = config_detail::schema_index();
  auto it = index.by_path.find(path);
  return it == index.by_path.end() ? nullptr : it->second;
}

nlohmann::json config_schema_json() {
  json rows = json::array();
  for (const ConfigKey& key : config_schema()) {
    json row = {
        {"path", key.path},
        {"type", key_type_name(key.type)},
        {"default", key.default_value},
        {"description", key.description},
        {"allowed", key.allowed},
        {"allow_auto", key.allow_auto},
        {"support", key.support == KeySupport::kHonoured          ? "honoured"
                    : key.support == KeySupport::kAcceptedIgnored ? "accepted_ignored"
                                                                  : "deprecated_alias"},
        {"alias_of", key.alias_of},
        {"note", key.note},
        {"applies_to", key.applies_to},
        {"default_by_type", key.default_by_type},
        {"accepts", config_detail::describe_allowed(key)},
    };
    row["min"] = key.min ? json(*key.min) : json(nullptr);
    row["max"] = key.max ? json(*key.max) : json(nullptr);
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace strata
