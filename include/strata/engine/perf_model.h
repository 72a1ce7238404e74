// strata/engine/perf_model.h — the performance model of a step and the
// CPU/GPU scheduler built on it.
//
// Three things live here:
// 1. HardwareProfile: the rates the model needs (CPU update rate by gradient
//    dtype and thread count, checksum rate, NVMe read/write/duplex rates,
//    PCIe H2D/D2H, GPU update rate, free GPU memory, optional forward and
//    backward times) and where each came from ("measured ..." / "given ...").
//    Loaded from / saved to the JSON of `strata.hardware_profile`; calibrate.h
//    measures one.
// 2. predict_step(): a closed-form model of one optimizer step for any
//    assignment of sub-groups to the CPU or the GPU, state placement,
//    buffer_count and overlap mode. Without overlap it is the flow-shop bound
//    of the pipeline: max over resources of (fill + busy time + drain); with
//    overlap a single-server recursion over sub-groups in gradient-ready order
//    whose per-sub-group cost is the bottleneck stage at the rate in force
//    (fewer CPU threads while backward runs). docs/performance-model.md gives
//    the equations; simulator.h replays the engine's exact pipeline rules.
// 3. choose_schedule(): evaluates all-CPU, the static `ratio` (Twin-Flow:
//    GPU sub-groups keep their state resident on the GPU) and Deep Optimizer
//    States' interleave (every k-th sub-group streamed to the GPU over PCIe,
//    or every k-th kept on the CPU; search over k), each with overlap off and
//    on, respecting free GPU memory and PCIe both ways, and picks the fastest.
//
// Units: seconds, bytes, bytes/s, parameters (elements)/s.
// Ownership: plain values; nothing borrowed.
// Thread-safety: every function is pure (load/save touch only their file).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <strata/config.h>
#include <strata/engine/plan.h>
#include <strata/kernels/optimizer.h>
#include <strata/status.h>

namespace strata::engine {

// Rates of one machine. A rate of 0 means "unknown / absent": a profile with
// gpu_update_params_per_s == 0 has no GPU.
struct HardwareProfile {
  std::string name;  // free text: "this machine (measured)", "published: ..."

  // CPU optimizer_step (AdamW) with cpu_threads threads, parameters/s.
  double cpu_update_params_per_s = 0;          // fp32 gradients
  double cpu_update_params_per_s_half = 0;     // bf16/fp16 gradients (0: as fp32)
  double cpu_update_params_per_s_1thread = 0;  // fp32 grads, one thread (0: linear share)
  unsigned cpu_threads = 0;
  // CPU work (updates, hashing) runs at this fraction of its rate while NVMe
  // I/O streams: the I/O path (io_uring worker, interrupts) takes CPU from the
  // update threads, which matters on small machines. 0: 1.0.
  double cpu_update_io_factor = 0;
  // XXH3 on one thread (strata.verify_checksums hashes each record once when
  // it is stored and once when it is fetched, 1 MiB chunks spread over the
  // update threads: see checksum_rate). 0: not modelled.
  double checksum_bytes_per_s = 0;
  // Gradient statistics (norm, inf/NaN) in exact mode, params/s. 0: free.
  double grad_stats_params_per_s = 0;

  // NVMe (the swap directory), O_DIRECT at the configured block size/depth.
  double nvme_read_bytes_per_s = 0;
  double nvme_write_bytes_per_s = 0;
  // Aggregate bytes/s with reads and writes in flight together. 0: the drive
  // time-shares (a byte costs 1/read or 1/write rate whatever the mix).
  double nvme_duplex_bytes_per_s = 0;
  // The drive's rates scale by this while the update threads compute (the
  // I/O submission/completion thread and interrupts wait for a core). 0: 1.0.
  double nvme_cpu_busy_factor = 0;

  // GPU (absent when gpu_update_params_per_s == 0).
  double h2d_bytes_per_s = 0;  // pinned host -> device
  double d2h_bytes_per_s = 0;
  bool pcie_duplex = true;  // H2D and D2H run together at full rate (two copy engines)
  double gpu_update_params_per_s = 0;
  uint64_t gpu_free_bytes = 0;  // device memory free for optimizer work during the step

  // Workload timings, when known (0: not given).
  double backward_seconds = 0;
  double forward_seconds = 0;

  // Where each figure came from, by JSON key: "measured: 128 MiB O_DIRECT ...",
  // "given: Samsung 990 Pro datasheet", "no GPU: built without CUDA".
  std::map<std::string, std::string> sources;

  bool has_gpu() const {
    return gpu_update_params_per_s > 0 && h2d_bytes_per_s > 0 && d2h_bytes_per_s > 0;
  }
  bool has_nvme() const { return nvme_read_bytes_per_s > 0 && nvme_write_bytes_per_s > 0; }
  // CPU update rate with `threads` threads (0: cpu_threads) for a gradient
  // dtype: linear in threads from the one-thread rate, capped by the
  // all-threads rate (the kernel is memory-bound).
  double cpu_rate(kernels::DType grad_dtype, unsigned threads = 0) const;
  // Gradient statistics rate with `threads` threads (0: all): scaled from the
  // all-threads rate like the update rate (both stream memory).
  double stats_rate(unsigned threads = 0) const;
  // Checksum rate, bytes/s, with `threads` threads (0: all): the one-thread
  // rate scaled as the update's rate scales from one thread to `threads`
  // (both stream memory). 0 when checksum_bytes_per_s is 0.
  double checksum_rate(unsigned threads = 0) const;
  double io_factor() const {
    return cpu_update_io_factor > 0 ? std::min(cpu_update_io_factor, 1.0) : 1.0;
  }
  double busy_factor() const {
    return nvme_cpu_busy_factor > 0 ? std::min(nvme_cpu_busy_factor, 1.0) : 1.0;
  }
  // Effective mixed read+write rate (bytes/s) for `read` and `write` bytes.
  double nvme_mixed_seconds(double read_bytes, double write_bytes) const;
};

// JSON form (flat keys named as the fields above, "sources" an object;
// cpu_update_params_per_s may also be {"fp32": x, "bf16": y}). Unknown keys
// are an error naming them; `origin` (a path) prefixes every message:
//   "hardware profile p.json: nvme_read_bytes_per_s: must be a non-negative number, got -1".
Result<HardwareProfile> hardware_profile_from_json(const nlohmann::json& j,
                                                   const std::string& origin);
Result<HardwareProfile> load_hardware_profile(const std::string& path);
nlohmann::json hardware_profile_to_json(const HardwareProfile& profile);
Status save_hardware_profile(const HardwareProfile& profile, const std::string& path);

// ---------------------------------------------------------------------------
// What one step moves and computes.
// ---------------------------------------------------------------------------

// Where a sub-group is updated, and whether its state crosses PCIe.
enum class UpdateDevice : uint8_t {
  kCpu,          // CPU kernel on the host record (fetched from NVMe/CXL if not resident)
  kGpuStreamed,  // state copied H2D, updated on the GPU, copied back D2H (Deep Optimizer States)
  kGpuResident,  // state lives in GPU memory; updated in place (Twin-Flow `ratio`)
};
const char* update_device_name(UpdateDevice device);

struct SubGroupLoad {
  size_t numel = 0;
  size_t record_bytes = 0;  // fp32 state record
  kernels::DType grad_dtype = kernels::DType::kF32;
  tiers::TierKind tier = tiers::TierKind::kHost;  // where the state lives between steps
  // Seconds after backward starts when its gradients are final; < 0: spread
  // over backward in proportion to the cumulative element count.
  double ready_s = -1;
};

// Fields named after a config key default to the schema's (step_shape_from_plan
// fills them from a parsed config).
struct StepShape {
  std::vector<SubGroupLoad> subgroups;  // gradient-ready order
  // offload_optimizer.buffer_count; >= 1 (predict_step calls 0 infeasible)
  size_t buffer_count = size_t(default_engine_config().zero.offload.buffer_count);
  // strata.verify_checksums (NVMe records are hashed)
  bool checksums = default_engine_config().strata.verify_checksums;
  // Model on a GPU: CPU-updated sub-groups send gradients D2H (during
  // backward) and new parameters H2D (after their update).
  bool model_on_gpu = false;
  size_t param_bytes = 2;  // bytes per model parameter (H2D copy-out)
  // Clipping or an fp16 overflow check: without overlap the step is preceded
  // by a gradient-statistics pass over every sub-group (all threads); exact
  // overlap computes them during backward as sub-groups become ready.
  bool grad_stats = false;
  size_t io_block_bytes = size_t(default_engine_config().aio.block_size);       // simulator
  unsigned io_queue_depth = unsigned(default_engine_config().aio.queue_depth);  // simulator

  size_t total_numel() const;
  uint64_t total_record_bytes() const;
};

// From a plan (sub-groups, tiers, buffer_count) and the config (checksums,
// aio.*, gradient_clipping / fp16 for grad_stats). model_on_gpu follows `gpu`.
StepShape step_shape_from_plan(const Plan& plan, const Config& config, bool gpu);

enum class OverlapMode : uint8_t {
  kOff,    // the step runs after backward
  kEager,  // sub-groups are updated as their gradients become final (no clipping, no fp16)
  kExact,  // during backward only prefetch (buffer_count records) and gradient statistics;
           // updates after backward; write-back deferred into the next forward
};
const char* overlap_mode_name(OverlapMode mode);

struct Schedule {
  std::string name;                  // "all-cpu", "static ratio 0.75", "gpu every 3rd", ...
  std::vector<UpdateDevice> device;  // per sub-group
  OverlapMode overlap = OverlapMode::kOff;
  unsigned backward_threads = 1;  // CPU update threads while backward runs (eager/exact)
  // Interleave parameters: gap k > 0 with gpu_every == true means sub-groups
  // k-1, 2k-1, ... go to the GPU; gpu_every == false means every k-th stays
  // on the CPU and the rest go to the GPU. 0: not an interleave.
  int gap_k = 0;
  bool gpu_every = true;
  double cpu_fraction() const;  // of elements
};

struct Prediction {
  // From the start of the step (or of backward, with overlap) until every
  // update is done: when step() returns.
  double updates_done_s = 0;
  // ... until the last write-back is done too (what the bench times).
  double step_s = 0;
  // Optimizer time the training loop waits for beyond backward: updates_done
  // minus backward, plus write-back not hidden by the next forward
  // (forward_seconds, 0 when not given).
  double exposed_s = 0;
  // forward + backward + exposed (0 when neither time is known).
  double iteration_s = 0;
  // Busy time per resource (seconds) over the step.
  double cpu_s = 0, nvme_s = 0, h2d_s = 0, d2h_s = 0, gpu_s = 0;
  std::string bound;  // resource with the largest busy time
  bool feasible = true;
  std::string infeasible_reason;  // e.g. "GPU-resident state 12 GiB > gpu_free_bytes 8 GiB"
  nlohmann::json to_json() const;
};

struct PredictOptions {
  double backward_s = -1;    // < 0: profile.backward_seconds
  double forward_s = -1;     // < 0: profile.forward_seconds
  unsigned gpu_buffers = 2;  // device buffers for streamed sub-groups (double buffering)
};

// The closed-form model. Never fails: an impossible schedule (a GPU device
// without a GPU, memory over the limit) comes back with feasible == false.
Prediction predict_step(const HardwareProfile& hw, const StepShape& shape, const Schedule& schedule,
                        const PredictOptions& options = {});

// ---------------------------------------------------------------------------
// The scheduler.
// ---------------------------------------------------------------------------

struct ChooseOptions {
  bool auto_schedule = true;  // strata.schedule: "auto" (true) or "static"
  // offload_optimizer.ratio: fraction of sub-groups on the CPU
  double ratio = default_engine_config().zero.offload.ratio;
  bool overlap_allowed =
      default_engine_config().strata.overlap_backward;  // strata.overlap_backward
  bool exact = false;  // clipping or fp16 (clip_mode is exact): kExact, else kEager
  unsigned backward_threads = 1;
  PredictOptions predict;
};

// From the config: strata.schedule (not given: auto when the profile has a
// GPU, static otherwise: schedule_is_auto), ratio, strata.overlap_backward,
// gradient_clipping / fp16, strata.threads, buffer_count (GPU staging buffers).
ChooseOptions choose_options_from_config(const Config& config, const HardwareProfile& hw);

struct Candidate {
  Schedule schedule;
  Prediction prediction;
};

struct ScheduleChoice {
  Schedule chosen;
  Prediction prediction;
  std::vector<Candidate> candidates;  // every schedule evaluated (infeasible ones included)
  std::vector<std::string> notes;     // why something was excluded / fell back
  nlohmann::json to_json() const;
  std::string to_string() const;  // readable table
};

// Builders of the schedules the chooser evaluates (exposed for tests, the
// simulator and the CLI).
Schedule all_cpu_schedule(size_t subgroups);
Schedule static_ratio_schedule(size_t subgroups, double ratio);
Schedule interleave_schedule(size_t subgroups, int k, bool gpu_every);

Result<ScheduleChoice> choose_schedule(const HardwareProfile& hw, const StepShape& shape,
                                       const ChooseOptions& options);

}  // namespace strata::engine
