// strata/engine/engine.h — the optimizer engine: sub-groups, placement and
// the pipelined step.
//
// The flat space of trainable parameters is cut into sub-groups (one param
// group and one dtype each, at most sub_group_size elements; a larger tensor
// is split across consecutive sub-groups). Each sub-group owns one record of
// fp32 state slots on a tier (see tiers/tier.h) and a range of the flat
// gradient arena of its gradient dtype (the parameters' dtype, or
// data_types.grad_accum_dtype when the config gives it). A step streams
// sub-groups through a pipeline buffer_count deep: fetch (NVMe/CXL → DRAM working buffer) → update
// (CPU kernel, new parameters copied into the model in the same pass) → store.
//
// Ownership: the engine owns its pool, I/O engine, swap files, tiers, the
//   gradient arenas and its thread pool. Model parameter memory is borrowed:
//   ParamInfo::data must stay valid (and not move) for the engine's life.
// Thread-safety: one thread drives an engine (step, zero_grads, state
//   access); mark_param_ready may also be called from any other thread (see
//   there). Several engines may live in one process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <strata/config.h>
#include <strata/cuda/gpu_updater.h>
#include <strata/engine/plan.h>
#include <strata/engine/trace.h>
#include <strata/io/io_engine.h>
#include <strata/kernels/optimizer.h>
#include <strata/status.h>
#include <strata/tiers/param_store.h>

namespace strata::engine {

struct ParamInfo {
  std::string name;
  int64_t numel = 0;
  kernels::DType dtype = kernels::DType::kF32;
  int group = 0;         // index into EngineOptions::groups
  void* data = nullptr;  // model parameter memory (host), contiguous, numel elements of dtype
  // The same parameter in GPU memory, when the model lives there and data is
  // its host copy: a sub-group updated on the GPU copies its new values out
  // here instead of into data. nullptr: CPU updates only.
  void* device_data = nullptr;
  int device = 0;  // the CUDA device of device_data
  // The engine allocates `data` itself, from its pool (counted by the plan:
  // Plan::host_copy_bytes): the host copy of a device parameter. `data` must
  // then be null; EngineOptions::fill_host_copy gives it its first values.
  bool host_copy = false;
  // ZeRO stage 3: the parameter's weights live in EngineOptions::param_store,
  // record store_id (numel elements of dtype). `data` must then be null. A
  // resident store (host) gives the record as `data`; otherwise the initial
  // masters are fetched from the store and each step's new weights are
  // written back to it (store_owned) once every piece of the parameter is
  // updated — never into a whole-model copy.
  int64_t store_id = -1;
};

struct EngineOptions {
  Config config;
  std::vector<ParamInfo> params;                // in gradient-ready order
  std::vector<kernels::OptimizerHyper> groups;  // one per param group
  int rank = 0;
  std::string tag;  // part of swap-file names; unique per engine in a process if given
  // Benches and tests: when set, the engine allocates no gradient arenas and
  // asks this for each sub-group's gradient (numel elements of its grad_dtype)
  // right before updating it. The pointer must stay valid until the update.
  std::function<const void*(const SubGroup&)> grad_source;
  // Long work at creation reports here (phase, done, total; bytes): pinning
  // the pool, writing the initial state to the tiers. Called on the creating
  // thread; may be empty.
  std::function<void(const char* phase, uint64_t done, uint64_t total)> progress;
  // Parameters with host_copy: called on the creating thread once each, when
  // its buffer (numel elements of its dtype, 4 KiB-aligned) is allocated and
  // before the initial state is read from it. Empty: the copy starts zeroed.
  std::function<Status(size_t param, void* data)> fill_host_copy;
  // Tests: wraps the I/O engine the NVMe tier uses (e.g. in a
  // FaultInjectionEngine) — the engine's own seam, no syscall patching.
  std::function<std::unique_ptr<io::IoEngine>(std::unique_ptr<io::IoEngine>)> wrap_io;
  // GPU updates (offload_optimizer.ratio < 1): builds the updater. Empty:
  // cuda::GpuUpdater::create (Unavailable without CUDA or a device: every
  // sub-group is then updated on the CPU, with a plan note). Tests inject a
  // host emulation of the device.
  std::function<Result<std::unique_ptr<cuda::GpuUpdater>>(const cuda::GpuUpdaterOptions&)>
      make_gpu_updater;
  // The param tier of parameters with store_id >= 0 (borrowed; it must
  // outlive the engine).
  tiers::ParamStore* param_store = nullptr;
  // ZeRO stage 3: gradients live only while they are needed. The arenas are
  // mapped without being touched (pages appear as gradients arrive), and a
  // sub-group's range is zeroed and its pages returned to the system right
  // after its update, so an overlapped backward never holds every gradient
  // at once. zero_grads() returns the pages instead of writing zeros. After
  // a step the gradients read as zero.
  bool release_grads = false;
  // With release_grads, the most sub-groups whose gradients are final but not
  // yet updated during an eager overlapped backward: wait_grad_room() holds
  // the caller (a gradient hook) until the pipeline has caught up, so the
  // gradients written and not yet released stay near this many sub-groups
  // even when the update is slower than backward. 0: the pipeline's working
  // buffers plus one (at least 2).
  size_t max_pending_subgroups = 0;
};

struct GradSpan {
  kernels::DType dtype;
  void* data = nullptr;  // start of the arena
  size_t numel = 0;
};

struct EngineStats {
  uint64_t steps = 0;
  uint64_t bytes_fetched = 0;  // from fetch/store tiers, for use
  // Records fetched for the next step after a step (strata.overlap_backward)
  // and dropped unused, because a call other than the next step's came first
  // (read_records, a checkpoint): bytes the drive moved in addition.
  uint64_t bytes_prefetched_unused = 0;
  uint64_t bytes_stored = 0;
  // Fetched records checked against their checksums while an exact-mode
  // backward ran (before the gradient multiplier was known); the others are
  // checked chunk by chunk inside their update.
  uint64_t records_verified_in_backward = 0;
  uint64_t io_bytes_read = 0;  // as counted by the IoEngine
  uint64_t io_bytes_written = 0;
  uint64_t pool_reserved = 0;
  uint64_t pool_requested = 0;
  uint64_t pool_peak = 0;
  bool pool_pinned = false;
  uint64_t swap_file_bytes = 0;
  std::string swap_file_path;
  // Working buffers of the swap pipeline registered with the I/O engine
  // (fixed-buffer I/O), and those it refused, used unregistered (a plan note
  // says why). Both 0 without a fetch/store tier on the I/O engine.
  uint64_t registered_buffers = 0;
  uint64_t unregistered_buffers = 0;
  std::string io_backend;
  std::string io_note;
  std::string isa;
  unsigned threads = 0;
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> create(EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const Plan& plan() const;
  const std::vector<SubGroup>& subgroups() const;

  // Flat gradient arenas (one per gradient dtype present). Parameter p's
  // gradient is arena(grad_dtype(p)).data + grad_offset(p) elements,
  // contiguous, numel elements. grad_dtype(p) is data_types.grad_accum_dtype
  // when the config gives it, else p's own dtype.
  const std::vector<GradSpan>& grad_arenas() const;
  size_t grad_offset(size_t param) const;
  kernels::DType grad_dtype(size_t param) const;
  Status zero_grads();

  // The host copy the engine allocated for a parameter with host_copy
  // (numel elements of its dtype; valid until close), else nullptr.
  void* host_copy(size_t param) const;

  // Hyper-parameters may change between steps (LR schedulers).
  Status set_hyper(int group, const kernels::OptimizerHyper& hyper);

  // One optimizer step over every sub-group. grad_mul multiplies every
  // gradient (clip coefficient / loss scale). Returns when every update is
  // done and the model's parameters hold the new values; write-back of the
  // last records continues in the background until the next sync point
  // (begin_backward, the next step, state access, close). On error the
  // engine is poisoned: further steps fail until state is reloaded.
  Status step(float grad_mul = 1.0f);

  // Overlap with backward. Between begin_backward() and end_backward(),
  // mark_param_ready(p) (from any thread, e.g. autograd hooks) says p's
  // gradient is final; a sub-group whose parameters are all final enters the
  // pipeline at once. Eager mode updates it right away (only when the step
  // needs no global quantity: no clipping, no fp16 overflow check); exact
  // mode prefetches its state and computes its gradient statistics, and the
  // updates run when step(grad_mul) supplies the clip/scale factor. Results
  // are bit-identical to a step without overlap.
  // mark_param_ready is safe against every other call (it locks the run in
  // flight; outside a backward it does nothing). An index that names no
  // parameter is an error (InvalidArgument) reported once, by the next
  // end_backward() (which still ends the backward) or step() (which then
  // updates nothing).
  struct BackwardOptions {
    bool eager_update = false;
    float grad_mul = 1.0f;  // eager mode only
    unsigned threads = 1;   // update threads while backward runs (cores torch leaves free)
  };
  Status begin_backward(const BackwardOptions& options);
  void mark_param_ready(size_t param);
  // Back-pressure for a gradient hook about to write into the arena (see
  // EngineOptions::max_pending_subgroups): returns at once unless
  // release_grads is set, an eager overlapped backward is running, the
  // pipeline has a ready sub-group to update (so waiting cannot deadlock) and
  // the pending sub-groups are at the cap; otherwise waits until one of those
  // stops holding. Any thread; returns the seconds it waited.
  double wait_grad_room();
  // With release_grads: maps the pages of parameter `param`'s gradient slice
  // now, before a hook adds into them (one madvise instead of two faults per
  // 4 KiB page; see platform::populate_pages). Keeps their contents; a no-op
  // otherwise. Any thread.
  Status populate_grad(size_t param);
  Status end_backward();
  // Drops the step begun by begin_backward (fp16 overflow): no record changes.
  Status cancel_step();
  // Waits for the step in flight, write-back included. The next step's
  // first records, fetched after the stores (strata.overlap_backward), stay
  // for it; calls that read or write records drop them first.
  Status sync();

  // Global gradient statistics over every sub-group (fixed order).
  Result<kernels::GradStats> grad_stats();

  // GPU updates (the interleaved schedule): with offload_optimizer.ratio < 1,
  // that share of the eligible sub-groups (state on the host tier, Adam or
  // AdamW, every parameter with device_data) is updated on the GPU, spread
  // evenly over the step: the record and the gradient go H2D, the kernel
  // writes the new parameters into device_data, the record comes back D2H;
  // the CPU updates the rest meanwhile. Results are bit-identical either way.
  // set_model_stream: the cudaStream_t the model's work runs on. GPU updates
  // wait (on the device) for the work enqueued on it when they are submitted
  // (it produced the gradients and may still read the parameters), and before
  // step() returns the stream is made to wait for their copy-out, so the next
  // forward sees the new parameters. nullptr (default): no stream ordering.
  void set_model_stream(void* stream);
  bool gpu_updated(uint32_t subgroup) const;

  // State access by parameter (tests and tools; a call fetches every record
  // the parameter touches, so loops over parameters should use the by-record
  // calls below). slot 0 is the master weights. Buffers hold numel floats.
  Status read_param_state(size_t param, int slot, float* out);
  Status write_param_state(size_t param, int slot, const float* in);
  // All slots in one pass over the parameter's records (one fetch and at
  // most one store per sub-group): slot k goes to/comes from bufs[k]; a null
  // entry skips that slot.
  Status read_param_states(size_t param, const std::vector<float*>& bufs);
  Status write_param_states(size_t param, const std::vector<const float*>& bufs);
  // State access by record — what checkpoints, state_dict, load_state_dict
  // and rebuilds use. Each call visits the sub-groups holding any of `params`
  // (every parameter when empty) once each, in their order on the tier (the
  // swap file's order), with up to buffer_count records in flight (fetches
  // run ahead while the visitor works on the current record). Bytes moved:
  // each visited record fetched at most once and, for writes, stored once.
  // The visitor runs on the calling thread; the view and its memory are
  // valid only during the call. An error from the visitor stops the walk
  // (records already stored stay stored) and is returned with context.
  struct StateSlice {
    size_t param = 0;          // engine parameter
    size_t param_offset = 0;   // elements into the parameter
    size_t record_offset = 0;  // elements into each slot of the record
    size_t numel = 0;
  };
  struct RecordView {
    uint32_t subgroup = 0;
    float* data = nullptr;   // slot k of slice s: data + k * slot_stride + s.record_offset
    size_t slot_stride = 0;  // elements
    int slots = 0;
    std::vector<StateSlice> slices;  // the pieces of the asked-for parameters, by offset
  };
  using RecordVisitor = std::function<Status(const RecordView&)>;
  Status read_records(const std::vector<size_t>& params, const RecordVisitor& visit);
  // The visitor writes into view.data. overwrite: it writes every slot of
  // every slice, so a record whose segments are all among `params` is not
  // fetched first (its padding is zeroed); other records are fetched, then
  // changed. A record lost in a failed step counts as rewritten for the
  // (slice, slot) pairs written this way (see clear_error).
  Status write_records(const std::vector<size_t>& params, bool overwrite,
                       const RecordVisitor& visit);
  // Carries state over from another engine (a rebuild after the parameters
  // changed): slots first_slot.. of src parameter src_param become those of
  // this engine's dst_param (equal numel). Walks this engine's records once
  // (write_records) and reads src's records through its idle working
  // buffers as a small cache, so matching orders read each source record
  // once. src must not be stepping; both engines are driven by this thread.
  struct StateCopy {
    size_t dst_param = 0;
    size_t src_param = 0;
    int first_slot = 0;
  };
  Status copy_state_from(Engine& src, const std::vector<StateCopy>& copies);
  size_t param_count() const;
  size_t param_numel(size_t param) const;
  int param_slots(size_t param) const;  // state slots of the parameter's group, master included

  // A whole sub-group record (record_bytes, all slots) and where it lives.
  Status read_record(uint32_t subgroup, float* out);
  struct RecordLocation {
    tiers::TierKind tier;
    std::string path;     // swap file for NVMe, else ""
    uint64_t offset = 0;  // bytes into path
    uint64_t bytes = 0;
  };
  std::vector<RecordLocation> record_locations() const;
  // Re-reads the master weights from the model parameters (after the model's
  // weights were loaded).
  Status sync_master_from_params();
  int64_t step_count(int group) const;
  // Sets the step count of a param group (checkpoint resume). The pipeline
  // thread reads the counts while a step runs, so this first joins the step
  // in flight (sync()) and writes nothing if that fails: FailedPrecondition
  // while a step begun by begin_backward() awaits step()/cancel_step(), or
  // the failed step's error. InvalidArgument for a group that does not exist.
  [[nodiscard]] Status set_step_count(int group, int64_t step);

  // After a failed step every record counts as lost: reads of it fail, and
  // writes start from an empty record. Once every slot of every parameter was
  // written again (write_param_state[s]), clear_error() lifts the poison; it
  // fails, naming a sub-group, while some state is still missing.
  Status clear_error();
  const Status& error() const;

  EngineStats stats() const;
  Trace& trace();
  // A phase the engine does not see (the model's forward, kForward), from the
  // driving thread, in steady_clock nanoseconds; labelled with the step it
  // belongs to (the next one once step() of the current one was called).
  void record_phase(EventKind kind, int64_t start_ns, int64_t end_ns);

  // Drains in-flight I/O and releases pool, swap files and threads. Safe to
  // call twice; the destructor calls it.
  Status close();

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::engine
