// strata/engine_config.h — the configuration as typed fields.
//
// EngineConfig is what every layer reads: one field per honoured schema row,
// named and nested like the JSON path (aio.queue_depth is
// EngineConfig::aio.queue_depth). Config::parse() fills it once, from the
// schema's own rows: each row of config_schema() that strata acts on is bound
// to its field (ConfigKey::fill / ConfigKey::read, RocksDB's OptionTypeInfo
// pattern), so a key reaches its field by the row and nowhere else.
//
// Defaults: the fields carry no default of their own. A row's default lives in
// the schema only; default_engine_config() is the configuration of an empty
// JSON ({}), and option structs of lower layers (io::IoOptions,
// CalibrationOptions, ...) take their defaults from it.
// A row with no default (null: "not given") binds a std::optional field.
//
// Thread-safety: a value; default_engine_config() is built once, thread-safely.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace strata {

// Ranges shared by the schema and the layers that check their own options
// (io::validate_io_options): one range per key.
inline constexpr int64_t kMaxQueueDepth = 4096;        // aio.queue_depth
inline constexpr int64_t kMaxIntraOpParallelism = 64;  // aio.intra_op_parallelism: rings

// String-valued keys become enums; the enumerators follow the order of the
// row's allowed values (the binder maps allowed[i] <-> enumerator i).
enum class OffloadDevice : uint8_t { kNone, kCpu, kNvme, kCxl };  // none, cpu, nvme, cxl
enum class GradAccumDType : uint8_t { kF32, kF16, kBF16 };        // fp32, fp16, bf16
enum class ClipMode : uint8_t { kExact };                         // exact
enum class ScheduleMode : uint8_t { kStatic, kAuto };             // static, auto
enum class ProgressMode : uint8_t { kAuto, kBar, kLog, kOff };    // auto, bar, log, off
enum class AllreduceOp : uint8_t { kMean, kSum };                 // mean, sum
// strata.optimizer_state_dtype: fp32, bf16, int8_blockwise (the moments' storage)
enum class OptimizerStateDType : uint8_t { kF32, kBF16, kInt8Blockwise };

// Top-level training keys (read by python/strata).
struct TrainingConfig {
  std::optional<int64_t> train_batch_size;  // resolved by the batch rule: always set after parse
  std::optional<int64_t> train_micro_batch_size_per_gpu;
  std::optional<int64_t> gradient_accumulation_steps;
  int64_t steps_per_print;
  bool wall_clock_breakdown;
  double gradient_clipping;  // 0: off
  AllreduceOp gradient_allreduce_op;
  bool zero_allow_untested_optimizer;
};

// optimizer.* (optional section: fields are set only when it is given).
struct OptimizerConfig {
  std::optional<std::string> type;  // canonical case
  std::optional<double> lr;
  std::array<double, 2> betas;
  std::optional<double> eps;
  double weight_decay;
  bool adam_w_mode;
  bool bias_correction;
  bool amsgrad;
  double momentum;
  double dampening;
  bool nesterov;
  double lr_decay;
  double initial_accumulator_value;
};

// scheduler.* (optional section).
struct SchedulerConfig {
  std::optional<std::string> type;
  double warmup_min_lr;
  std::optional<double> warmup_max_lr;
  int64_t warmup_num_steps;
  std::string warmup_type;
  std::optional<int64_t> total_num_steps;
  double warmup_min_ratio;
  double cos_min_ratio;
  int64_t last_batch_iteration;
  // LRRangeTest
  double lr_range_test_min_lr;
  int64_t lr_range_test_step_size;
  double lr_range_test_step_rate;
  bool lr_range_test_staircase;
  // OneCycle
  std::optional<double> cycle_min_lr;  // required by OneCycle
  std::optional<double> cycle_max_lr;  // required by OneCycle
  double decay_lr_rate;
  int64_t cycle_first_step_size;
  std::optional<int64_t> cycle_second_step_size;  // not given: cycle_first_step_size
  int64_t cycle_first_stair_count;
  std::optional<int64_t> cycle_second_stair_count;  // not given: cycle_first_stair_count
  int64_t decay_step_size;
  bool cycle_momentum;
  double cycle_min_mom;
  double cycle_max_mom;
  double decay_mom_rate;
};

// fp16.*, bf16.enabled, data_types.*.
struct PrecisionConfig {
  bool fp16_enabled;
  bool fp16_auto_cast;
  double fp16_loss_scale;
  int64_t fp16_initial_scale_power;
  int64_t fp16_loss_scale_window;
  int64_t fp16_hysteresis;
  bool fp16_consecutive_hysteresis;
  double fp16_min_loss_scale;
  bool bf16_enabled;
  bool bf16_master_weights_and_grads;  // master weights stored in bf16
  bool bf16_optimizer_states;          // moments in bf16 (needs the line above, as DeepSpeed)
  std::optional<GradAccumDType> grad_accum_dtype;  // not given: each parameter's dtype
};

// zero_optimization.offload_optimizer.*: where the state lives and the
// pipeline's depth (the plan's inputs besides the parameters).
struct OffloadConfig {
  OffloadDevice device;
  std::optional<std::string> nvme_path;
  int64_t buffer_count;  // >= 1 (schema): the depth of fetch -> update -> store
  bool pin_memory;
  double ratio;  // fraction of GPU-eligible sub-groups the CPU updates
};

// zero_optimization.offload_param.*: where the model's own (model-dtype)
// weights live at ZeRO stage 3 (the param tier, tiers/param_store.h). Acted
// on only at stage 3.
struct OffloadParamConfig {
  OffloadDevice device;  // none: the weights stay in the model's memory
  std::optional<std::string> nvme_path;
  int64_t buffer_count;  // staging buffers of buffer_size elements (NVMe fetches)
  int64_t buffer_size;   // elements
  bool pin_memory;
};

// zero_optimization.stage3_*: the parameter window at stage 3. Elements.
struct Stage3Config {
  int64_t prefetch_bucket_size;         // elements fetched ahead of the module that runs
  int64_t max_live_parameters;          // elements resident at once (prefetched ones included)
  int64_t max_reuse_distance;           // elements: a parameter used again within this stays
  int64_t param_persistence_threshold;  // elements: smaller parameters stay resident
  std::optional<int64_t>
      model_persistence_threshold;  // elements persistent in total; none: no bound
  bool gather_16bit_weights_on_model_save;
};

// zero_optimization.*.
struct ZeroConfig {
  int64_t stage;
  int64_t sub_group_size;  // elements
  OffloadConfig offload;
  OffloadParamConfig offload_param;
  Stage3Config stage3;
};

// aio.*: the I/O engine's settings (io::io_options_from() makes IoOptions).
struct AioConfig {
  int64_t block_size;            // bytes, a multiple of 4096
  int64_t queue_depth;           // [1, kMaxQueueDepth]
  int64_t intra_op_parallelism;  // [1, kMaxIntraOpParallelism]
  bool single_submit;
  bool overlap_events;
};

// strata.*: kernels (threads), tiers (cxl_nodes, dram_*), the schedule and
// the performance model, trace and progress.
struct StrataConfig {
  std::optional<std::vector<int>> cxl_nodes;  // not given: every CPU-less node
  std::optional<int64_t> dram_budget;         // bytes; not given: a fraction of MemAvailable
  int64_t dram_cache_bytes;
  bool verify_checksums;
  bool overlap_backward;
  std::string overlap_mode;  // auto | always (read by the Python engine)
  ClipMode clip_mode;
  int64_t threads;  // 0: all cores
  // Not given: auto where a GPU exists, static otherwise (schedule_is_auto()).
  std::optional<ScheduleMode> schedule;
  std::optional<std::string> hardware_profile;  // path
  std::optional<std::string> trace_path;
  int64_t trace_steps;
  ProgressMode progress;
  // Not given: bf16 when bf16.bf16_optimizer_states, else fp32 (optimizer_state_dtype()).
  std::optional<OptimizerStateDType> optimizer_state_dtype;
};

struct EngineConfig {
  TrainingConfig training;
  OptimizerConfig optimizer;
  SchedulerConfig scheduler;
  PrecisionConfig precision;
  ZeroConfig zero;
  AioConfig aio;
  StrataConfig strata;
};

// The configuration of an empty JSON: every field at its schema default.
const EngineConfig& default_engine_config();

// strata.schedule's one rule for "not given": auto when a GPU can update
// sub-groups (`gpu`), static otherwise.
inline bool schedule_is_auto(const StrataConfig& s, bool gpu) {
  return s.schedule ? *s.schedule == ScheduleMode::kAuto : gpu;
}

// The one rule for what the optimizer's moments are stored as:
// strata.optimizer_state_dtype when given, else bf16 when
// bf16.bf16_optimizer_states (DeepSpeed's key), else fp32.
inline OptimizerStateDType optimizer_state_dtype(const EngineConfig& c) {
  if (c.strata.optimizer_state_dtype) {
    return *c.strata.optimizer_state_dtype;
  }
  return c.precision.bf16_optimizer_states ? OptimizerStateDType::kBF16 : OptimizerStateDType::kF32;
}

}  // namespace strata
