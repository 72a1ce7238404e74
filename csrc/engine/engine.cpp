#include <strata/engine/engine.h>

#include <strata/engine/calibrate.h>
#include <strata/engine/perf_model.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <thread>

#include <strata/cuda/device.h>
#include <strata/io/checksum.h>
#include <strata/io/io_engine.h>
#include <strata/kernels/cast.h>
#include <strata/kernels/thread_pool.h>
#include <strata/log.h>
#include <strata/memory/pinned_pool.h>
#include <strata/platform/vm.h>
#include <strata/tiers/param_store.h>
#include <strata/tiers/tiers.h>

#include "engine/kill_point.h"
#include "engine/step_run.h"

namespace strata::engine {

using kernels::DType;
using tiers::Tier;
using tiers::TierKind;
using tiers::TierTicket;

struct Engine::Impl {
  EngineOptions opts;
  Plan plan;
  std::vector<int> slots;  // per group
  std::vector<int64_t> step_counts;

  // Declaration order is destruction order in reverse: buffers are released
  // before the pool, tiers (and their swap files) before the I/O engine.
  std::unique_ptr<memory::PinnedPool> pool;
  std::unique_ptr<io::IoEngine> io;
  std::map<TierKind, std::unique_ptr<Tier>> tiers;
  std::vector<uint32_t> handles;  // per sub-group, in its tier
  std::vector<memory::PinnedBuffer> arenas_mem;
  std::vector<memory::PinnedBuffer> host_copies;  // per parameter; empty unless host_copy
  std::vector<GradSpan> arenas;
  std::vector<int> arena_of_dtype = std::vector<int>(3, -1);
  // release_grads: the arenas are plain mappings (address, bytes), unmapped at close.
  std::vector<std::pair<void*, size_t>> arena_maps;
  // Parameters on a non-resident param tier (store_id >= 0, no data): the
  // new weights of a step gather in wb[param] (from the store's staging
  // pool) until every piece is updated (wb_pieces counts them), then go to
  // the store. Pipeline thread only (reset before each step starts).
  std::vector<uint8_t> in_store;
  std::vector<uint8_t> sg_has_store;  // per sub-group: a segment of such a parameter
  std::vector<memory::PinnedBuffer> wb;
  std::vector<uint32_t> wb_pieces;
  // The last parameter fetched from the store to read its weights (creation,
  // sync_master_from_params), so its pieces in several sub-groups fetch once.
  memory::PinnedBuffer scratch;
  int64_t scratch_of = -1;
  Result<const char*> param_source(size_t param);
  Status release_grad_range(void* data, size_t bytes);
  std::vector<memory::PinnedBuffer> work;
  // Working buffers the I/O engine registered for fixed-buffer I/O, and those
  // it refused (they are used unregistered): registered + unregistered ==
  // work.size() when an I/O engine exists.
  uint64_t registered_buffers = 0;
  uint64_t unregistered_buffers = 0;
  std::vector<size_t> param_grad_offset;
  std::vector<std::vector<kernels::CopyOut>> copy_out;  // per sub-group
  std::unique_ptr<kernels::ThreadPool> threads;
  std::unique_ptr<kernels::ThreadPool> backward_threads;  // while backward runs
  std::vector<std::vector<uint32_t>> subgroups_of_param;
  std::vector<uint32_t> params_in_subgroup;  // distinct parameters per sub-group
  // The step in flight, if any. Only the driving thread replaces it, and
  // always under run_mu; mark_param_ready (any thread) reads it under run_mu,
  // so a run is never destroyed while a hook is inside it.
  std::unique_ptr<StepRun> run;
  std::mutex run_mu;
  // Guarded by run_mu: the first bad mark_param_ready call not yet reported
  // (by the next end_backward or step).
  Status hook_error;
  Status take_hook_error() {
    std::lock_guard<std::mutex> lock(run_mu);
    Status st = std::move(hook_error);
    hook_error = Status::Ok();
    return st;
  }
  std::vector<uint32_t> observed_order;  // ready order of the last complete step
  // The processing order of the next run: the last observed ready order, else plan order.
  std::vector<uint32_t> next_expected() const {
    if (observed_order.size() == plan.subgroups.size()) {
      return observed_order;
    }
    std::vector<uint32_t> ids(plan.subgroups.size());
    for (uint32_t i = 0; i < ids.size(); ++i) {
      ids[i] = i;
    }
    return ids;
  }
  // With strata.overlap_backward, a step's worker fetches the next step's
  // first records (in next_expected() order) into the idle working buffers
  // once its own stores are done, so they arrive during the next forward.
  // The next run adopts them (start_run moves them into its StepRun); any
  // other call that reads or writes records drops them first (sync()).
  // Written by the worker, read by the driving thread after joining it.
  std::vector<CarriedFetch> carried;
  void carry_next_fetches();
  void drop_carried();
  std::atomic<uint64_t> verified_in_backward{0};  // EngineStats::records_verified_in_backward
  uint64_t dropped_fetch_bytes = 0;               // carried fetches dropped unused (EngineStats)
  // After a failed step: per sub-group, records lost until fully rewritten.
  // lost[sg] => written[sg] counts (segment, slot) pairs rewritten so far.
  std::vector<uint8_t> lost;
  std::vector<uint8_t> rewrite_started;
  std::vector<std::vector<uint8_t>> written;
  Trace trace;
  Status error;
  bool closed = false;
  uint64_t steps = 0;

  // GPU updates: the updater, which sub-groups it takes, their copy-out into
  // device memory, and the jobs of the run in flight (pipeline thread only).
  std::unique_ptr<cuda::GpuUpdater> gpu;
  std::vector<uint8_t> on_gpu;                                // per sub-group
  std::vector<std::vector<cuda::CopyOutRange>> gpu_copy_out;  // per sub-group
  std::atomic<void*> model_stream{nullptr};
  struct GpuPending {
    uint32_t sg;
    cuda::GpuUpdater::Ticket ticket;
    int64_t start;
  };
  std::vector<GpuPending> gpu_pending;
  Status choose_gpu_subgroups();
  Result<std::vector<uint8_t>> choose_streamed_split(const HardwareProfile& hw,
                                                     const std::vector<uint8_t>& eligible);
  Status submit_gpu(const SubGroup& sg, float* record, float grad_mul);
  Status finish_gpu(int64_t step_id);

  Tier* tier_of(const SubGroup& sg) { return tiers.at(sg.tier).get(); }
  const void* grad_ptr(const SubGroup& sg) {
    if (opts.grad_source) {
      return opts.grad_source(sg);
    }
    const GradSpan& a = arenas[size_t(arena_of_dtype[size_t(sg.grad_dtype)])];
    return static_cast<const char*>(a.data) + sg.grad_offset * kernels::dtype_size(sg.grad_dtype);
  }
  kernels::StateView view(const SubGroup& sg, float* record) const {
    return state_view(sg, slots[size_t(sg.group)], record);
  }
  // State access outside a step works on fp32 slots (slot k at k *
  // slot_stride floats). For a compressed record, unpack() decodes it into
  // `unpacked` (one record's fp32 size, heap, released after each access
  // call) and pack() encodes the fp32 slots back; for an fp32 record both
  // are the identity and cost nothing.
  std::vector<float> unpacked;
  Result<float*> unpack(const SubGroup& sg, float* record) {
    if (!sg.compressed) {
      return record;
    }
    const int n = slots[size_t(sg.group)];
    const size_t want = size_t(n) * sg.slot_stride;
    if (unpacked.size() < want) {
      unpacked.assign(want, 0.0f);
    }
    const kernels::StateView v = view(sg, record);
    for (int k = 0; k < n; ++k) {
      float* dst = unpacked.data() + size_t(k) * sg.slot_stride;
      if (v.dtype[k] == kernels::SlotDType::kF32) {
        std::memcpy(dst, v.slot[k], sg.numel * sizeof(float));
      } else {
        STRATA_RETURN_IF_ERROR(kernels::decode_slot(v.dtype[k], v.packed[k], v.scales[k], dst,
                                                    sg.numel, threads.get()));
      }
    }
    return unpacked.data();
  }
  Status pack(const SubGroup& sg, const float* fp32, float* record) {
    if (!sg.compressed) {
      return Status::Ok();
    }
    const kernels::StateView v = view(sg, record);
    for (int k = 0; k < slots[size_t(sg.group)]; ++k) {
      const float* src = fp32 + size_t(k) * sg.slot_stride;
      if (v.dtype[k] == kernels::SlotDType::kF32) {
        std::memcpy(v.slot[k], src, sg.numel * sizeof(float));
      } else {
        STRATA_RETURN_IF_ERROR(kernels::encode_slot(v.dtype[k], src, v.packed[k], v.scales[k],
                                                    sg.numel, threads.get()));
      }
    }
    return Status::Ok();
  }
  void release_unpacked() { std::vector<float>().swap(unpacked); }
  // Releases `unpacked` when a state-access call returns, however it returns.
  struct UnpackedScope {
    Impl* e;
    ~UnpackedScope() { e->release_unpacked(); }
  };

  std::atomic<bool> in_backward{false};  // mirrors the run's backward_running (checksum pool)
  kernels::ThreadPool* pool_for(bool backward_running) {
    return backward_running && backward_threads ? backward_threads.get() : threads.get();
  }
  Status init_record(const SubGroup& sg, float* record);
  // A record of a tier that checks chunk checksums, updated in slices: each
  // chunk is verified before the slice that first reads it and hashed once
  // the last slice that writes it is done, while it is still in cache, so the
  // record crosses the memory bus once instead of three times (read to
  // verify, update, read to hash the store). sums: the new chunk checksums,
  // for the tier's submit_store_hashed.
  struct ChunkHashing {
    Tier* tier = nullptr;
    uint32_t handle = 0;
    std::vector<uint64_t> sums;
    std::vector<uint64_t> verified;  // the fetched record's chunk checksums, when already checked
  };
  Status update(const SubGroup& sg, float* record, float grad_mul, kernels::ThreadPool* pool,
                int64_t step_id, ChunkHashing* hashing = nullptr);
  Status step_in_slices(const SubGroup& sg, const kernels::StepArgs& args, float* record,
                        std::span<const kernels::CopyOut> outs, kernels::ThreadPool* pool,
                        ChunkHashing& h);
  // The pipeline hashes this sub-group's record while it updates it.
  bool hashes_in_slices(const SubGroup& sg) {
    return !gpu && !sg.compressed && tier_of(sg)->checks_chunks();
  }
  Status run_pipeline(StepRun& run);
  // The param tier's completed transfers into the trace, as this step's.
  void absorb_weight_transfers(int64_t step) {
    if (opts.param_store == nullptr) {
      return;
    }
    for (const auto& t : opts.param_store->take_transfers()) {
      trace.record({t.read ? EventKind::kWeightFetch : EventKind::kWeightStore, step, int32_t(t.id),
                    "param", t.bytes, t.start_ns, t.end_ns});
    }
  }
  // After an update: run.updated = next_update, waking wait_grad_room().
  void publish_progress(StepRun& run, size_t next_update) {
    if (opts.release_grads) {
      std::lock_guard<std::mutex> lock(run.mu);
      run.updated = next_update;
      run.cv.notify_all();
    }
  }
  // Appends `count` working buffers of plan.working_buffer_bytes from the
  // pool, registered with the I/O engine where it accepts them.
  Status add_working_buffers(size_t count) {
    for (size_t b = 0; b < count; ++b) {
      STRATA_ASSIGN_OR_RETURN(memory::PinnedBuffer buf, pool->allocate(plan.working_buffer_bytes));
      if (io) {
        // The I/O engine's contract: a refused registration (low
        // RLIMIT_MEMLOCK, no CAP_IPC_LOCK, an old kernel) leaves it working
        // with plain reads and writes of that buffer.
        Status reg = io->register_buffer(buf.data(), buf.size());
        if (reg.ok()) {
          ++registered_buffers;
        } else {
          if (unregistered_buffers == 0) {
            plan.notes.push_back("working buffers: fixed-buffer registration refused (" +
                                 reg.message() + "); I/O continues with unregistered buffers");
          }
          ++unregistered_buffers;
        }
      }
      work.push_back(std::move(buf));
    }
    return Status::Ok();
  }
  // At the first exact-mode backward: plan.exact_prefetch_buffers more
  // working buffers, so the pipeline fetches that many more records before
  // the gradient multiplier is known (every later step keeps them). Memory
  // refused: a warning, and the step goes on with the buffers it has.
  bool exact_buffers_added = false;
  void add_exact_prefetch_buffers() {
    if (exact_buffers_added || plan.exact_prefetch_buffers == 0 || work.empty()) {
      return;
    }
    exact_buffers_added = true;
    const size_t before = work.size();
    Status st = add_working_buffers(plan.exact_prefetch_buffers);
    const size_t added = work.size() - before;
    if (st.ok()) {
      log_message(
          LogLevel::kInfo,
          "exact mode (the gradient multiplier comes after backward): " + std::to_string(added) +
              " more working buffers of " + std::to_string(plan.working_buffer_bytes) + " bytes, " +
              std::to_string(work.size()) +
              " records are fetched while backward runs (strata.dram_budget " +
              std::to_string(plan.dram_budget) + " bytes)");
    } else {
      log_message(LogLevel::kWarning, "exact mode: " + std::to_string(added) + " of " +
                                          std::to_string(plan.exact_prefetch_buffers) +
                                          " more working buffers allocated (" + st.to_string() +
                                          "); backward prefetches " + std::to_string(work.size()) +
                                          " records");
    }
  }
  // Starts a step run on the worker thread (step counts advance).
  void start_run(bool gate, float grad_mul, bool collect_stats, bool backward_running);
  // Waits until every update of the run in flight is done.
  Status wait_updates();
  // Joins the run in flight (stores included) and returns its status; an
  // error poisons the engine. keep_carried: the records the run fetched for
  // the next step stay (begin_backward and step adopt them); otherwise they
  // are dropped first, so the caller may read or write any record.
  Status sync(bool keep_carried = false);
  Status join_run();
  void mark_all_lost() {
    lost.assign(plan.subgroups.size(), 1);
    rewrite_started.assign(plan.subgroups.size(), 0);
    written.assign(plan.subgroups.size(), {});
    for (const auto& sg : plan.subgroups) {
      written[sg.id].assign(sg.segments.size() * size_t(slots[size_t(sg.group)]), 0);
    }
  }
  // A record to modify and put back: as stored, or, for a lost record, an
  // empty one the first time (its old contents are unknown).
  Result<float*> record_for_write(const SubGroup& sg) {
    if (lost.empty() || !lost[sg.id]) {
      return get_record(sg);
    }
    Tier* tier = tier_of(sg);
    float* rec = tier->resident() ? tier->data(handles[sg.id]) : work[0].as<float>();
    if (!rewrite_started[sg.id]) {
      std::memset(rec, 0, sg.record_bytes);
      rewrite_started[sg.id] = 1;
    } else if (!tier->resident()) {
      STRATA_RETURN_IF_ERROR(tier->fetch(handles[sg.id], rec));
    }
    return rec;
  }
  void note_written(const SubGroup& sg, size_t segment, size_t slot) {
    if (!lost.empty() && lost[sg.id]) {
      written[sg.id][segment * size_t(slots[size_t(sg.group)]) + slot] = 1;
    }
  }
  void note_record_stored(const SubGroup& sg) {
    if (!lost.empty() && lost[sg.id] &&
        std::all_of(written[sg.id].begin(), written[sg.id].end(),
                    [](uint8_t w) { return w != 0; })) {
      lost[sg.id] = 0;
    }
  }
  Status check_readable(const SubGroup& sg) const {
    if (!lost.empty() && lost[sg.id]) {
      return Status(StatusCode::kFailedPrecondition,
                    "sub-group " + std::to_string(sg.id) + " lost its state in a failed step (" +
                        error.message() + "); reload every parameter's state before reading it");
    }
    return Status::Ok();
  }
  // Gives access to a record outside a step: resident memory, or the record
  // fetched into working buffer 0 (write back with put_record).
  Result<float*> get_record(const SubGroup& sg);
  Status put_record(const SubGroup& sg, float* record);
  using RecordVisitor = Engine::RecordVisitor;
  using RecordView = Engine::RecordView;
  Status walk_records(const std::vector<size_t>& params, bool write, bool overwrite,
                      const RecordVisitor& visit);
  Status close();
};

Status Engine::Impl::init_record(const SubGroup& sg, float* stored) {
  const auto& hyper = opts.groups[size_t(sg.group)];
  std::memset(stored, 0, sg.record_bytes);
  // A compressed record is built in fp32 and encoded once at the end.
  STRATA_ASSIGN_OR_RETURN(float* record, unpack(sg, stored));
  for (const auto& seg : sg.segments) {
    const ParamInfo& p = opts.params[seg.param];
    STRATA_ASSIGN_OR_RETURN(const char* base, param_source(seg.param));
    if (base == nullptr) {
      continue;  // bench mode: masters start at zero
    }
    const char* src = base + seg.param_offset * kernels::dtype_size(p.dtype);
    STRATA_RETURN_IF_ERROR(
        kernels::cast_to_f32(src, p.dtype, record + seg.offset, seg.numel, threads.get()));
  }
  for (int k = 1; k < slots[size_t(sg.group)]; ++k) {
    float init = kernels::initial_slot_value(hyper, k);
    if (init != 0.0f) {
      std::fill_n(record + size_t(k) * sg.slot_stride, sg.numel, init);
    }
  }
  return pack(sg, record, stored);
}

Result<const char*> Engine::Impl::param_source(size_t param) {
  const ParamInfo& p = opts.params[param];
  if (p.data != nullptr || p.store_id < 0) {
    return static_cast<const char*>(p.data);
  }
  if (scratch_of != int64_t(param)) {
    const size_t rb = opts.param_store->record_bytes(uint32_t(p.store_id));
    if (!scratch || scratch.size() < rb) {
      scratch.reset();
      STRATA_ASSIGN_OR_RETURN(scratch, opts.param_store->staging(rb));
    }
    scratch_of = -1;
    STRATA_RETURN_IF_ERROR(opts.param_store->fetch(uint32_t(p.store_id), scratch.data())
                               .with_context("weights of parameter " + p.name));
    scratch_of = int64_t(param);
  }
  return static_cast<const char*>(scratch.data());
}

// Zeroes a sub-group's gradients and gives their whole pages back (the
// pages at either end may hold a neighbour's gradients: only this range's
// bytes of them are zeroed).
Status Engine::Impl::release_grad_range(void* data, size_t bytes) {
  char* a = static_cast<char*>(data);
  char* start = reinterpret_cast<char*>(
      platform::round_up(reinterpret_cast<uintptr_t>(a), platform::kPageSize));
  char* end = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(a + bytes) / platform::kPageSize *
                                      platform::kPageSize);
  if (end <= start) {
    std::memset(a, 0, bytes);
    return Status::Ok();
  }
  std::memset(a, 0, size_t(start - a));
  std::memset(end, 0, size_t(a + bytes - end));
  int rc = platform::release_pages(start, size_t(end - start));
  if (rc != 0) {
    return Status::from_errno(-rc, "madvise(MADV_DONTNEED) of gradient pages");
  }
  return Status::Ok();
}

namespace {
cuda::ElemType elem_type(kernels::DType d) {
  switch (d) {
    case kernels::DType::kBF16:
      return cuda::ElemType::kBF16;
    case kernels::DType::kF16:
      return cuda::ElemType::kF16;
    default:
      return cuda::ElemType::kF32;
  }
}
}  // namespace

// Which sub-groups the GPU updates: (1 - ratio) of the eligible ones, spread
// evenly (sub-group j of E eligible goes when floor((j+1)G/E) > floor(jG/E)),
// so CPU and GPU work interleave through the step.
Status Engine::Impl::choose_gpu_subgroups() {
  const EngineConfig& cfg = opts.config.typed();
  on_gpu.assign(plan.subgroups.size(), 0);
  const double ratio = cfg.zero.offload.ratio;
  // strata.schedule auto (the default where a GPU can update sub-groups; which
  // ones can is found below): the performance model picks the split (ratio is
  // not used); static: (1 - ratio) of the eligible sub-groups.
  const bool auto_schedule = schedule_is_auto(cfg.strata, /*gpu=*/true);
  if ((ratio >= 1.0 && !auto_schedule) || opts.grad_source) {
    return Status::Ok();
  }
  std::vector<uint32_t> eligible;
  size_t max_numel = 0, max_ranges = 0;
  bool amsgrad = false, f32_grads = false;
  for (const auto& sg : plan.subgroups) {
    const auto& h = opts.groups[size_t(sg.group)];
    // The GPU kernel reads fp32 state: compressed records update on the CPU.
    bool ok = sg.tier == TierKind::kHost && !sg.compressed &&
              (h.kind == kernels::OptimizerKind::kAdam || h.kind == kernels::OptimizerKind::kAdamW);
    for (const auto& seg : sg.segments) {
      ok = ok && opts.params[seg.param].device_data != nullptr;
    }
    if (ok) {
      eligible.push_back(sg.id);
      max_numel = std::max(max_numel, sg.numel);
      max_ranges = std::max(max_ranges, sg.segments.size());
      amsgrad = amsgrad || h.amsgrad;
      f32_grads = f32_grads || sg.grad_dtype == kernels::DType::kF32;
    }
  }
  if (eligible.empty()) {
    if (ratio >= 1.0) {
      return Status::Ok();  // nothing asked for the GPU (a CPU model, auto schedule)
    }
    plan.notes.push_back("offload_optimizer.ratio " + std::to_string(ratio) +
                         ": no sub-group can be updated on the GPU (that needs fp32 state on "
                         "the host tier, Adam or AdamW, and the model on the GPU); every "
                         "sub-group is updated on the CPU");
    return Status::Ok();
  }
  cuda::GpuUpdaterOptions go;
  go.device = opts.params[plan.subgroups[eligible.front()].segments.front().param].device;
  go.max_elements = max_numel;
  go.amsgrad = amsgrad;
  go.buffers = int(plan.buffer_count);  // device staging as deep as the host pipeline
  go.max_grad_type = f32_grads ? cuda::ElemType::kF32 : cuda::ElemType::kBF16;
  go.max_copy_out = std::max<size_t>(max_ranges, 1);
  auto made = opts.make_gpu_updater ? opts.make_gpu_updater(go) : cuda::GpuUpdater::create(go);
  if (!made.ok()) {
    plan.notes.push_back(std::string(auto_schedule
                                         ? "strata.schedule auto"
                                         : "offload_optimizer.ratio " + std::to_string(ratio)) +
                         ": GPU updates unavailable (" + made.status().message() +
                         "); every sub-group is updated on the CPU");
    return Status::Ok();
  }
  gpu = std::move(made).value();
  const size_t E = eligible.size();
  std::vector<uint8_t> pick(plan.subgroups.size(), 0);
  const size_t G = size_t(std::llround((1.0 - ratio) * double(E)));
  for (size_t j = 0; j < E; ++j) {
    if ((j + 1) * G / E > j * G / E) {
      pick[eligible[j]] = 1;
    }
  }
  // Auto: the performance model picks the split among all-CPU and the
  // streamed interleaves, from strata.hardware_profile or rates measured now.
  // (An injected updater — tests — takes the model's choice only from a given profile.)
  if (auto_schedule && (!opts.make_gpu_updater || cfg.strata.hardware_profile)) {
    Result<HardwareProfile> hw = cfg.strata.hardware_profile
                                     ? load_hardware_profile(*cfg.strata.hardware_profile)
                                     : calibrate(calibration_options_from_config(opts.config));
    if (!hw.ok()) {
      plan.notes.push_back("schedule: the performance model has no rates (" +
                           hw.status().message() + "); the split follows offload_optimizer.ratio");
    } else {
      std::vector<uint8_t> ok(plan.subgroups.size(), 0);
      for (uint32_t id : eligible) {
        ok[id] = 1;
      }
      auto chosen = choose_streamed_split(hw.value(), ok);
      if (!chosen.ok()) {
        plan.notes.push_back("schedule: " + chosen.status().message() +
                             "; the split follows offload_optimizer.ratio");
      } else {
        pick = std::move(chosen).value();
      }
    }
  }
  gpu_copy_out.assign(plan.subgroups.size(), {});
  for (const auto& sg : plan.subgroups) {
    if (pick[sg.id]) {
      on_gpu[sg.id] = 1;
      for (const auto& seg : sg.segments) {
        const ParamInfo& p = opts.params[seg.param];
        void* dst =
            static_cast<char*>(p.device_data) + seg.param_offset * kernels::dtype_size(p.dtype);
        gpu_copy_out[sg.id].push_back(cuda::CopyOutRange{seg.offset, seg.numel, dst});
      }
    }
  }
  return Status::Ok();
}

// The model's fastest schedule the engine can run: all-CPU or an interleave
// of streamed GPU sub-groups (GPU-resident state is not a tier yet), with
// every GPU sub-group eligible.
Result<std::vector<uint8_t>> Engine::Impl::choose_streamed_split(
    const HardwareProfile& hw, const std::vector<uint8_t>& eligible) {
  const auto& cfg = opts.config;
  const StepShape shape = step_shape_from_plan(plan, cfg, /*gpu=*/true);
  ChooseOptions co = choose_options_from_config(cfg, hw);
  co.auto_schedule = true;
  STRATA_ASSIGN_OR_RETURN(ScheduleChoice choice, choose_schedule(hw, shape, co));
  const Candidate* best = nullptr;
  for (const auto& c : choice.candidates) {
    bool runnable = c.prediction.feasible;
    for (size_t i = 0; runnable && i < c.schedule.device.size(); ++i) {
      const UpdateDevice d = c.schedule.device[i];
      runnable = d == UpdateDevice::kCpu || (d == UpdateDevice::kGpuStreamed && eligible[i]);
    }
    if (runnable && (!best || c.prediction.exposed_s < best->prediction.exposed_s * 0.995)) {
      best = &c;
    }
  }
  if (!best) {
    return Status(StatusCode::kNotFound, "no schedule the engine can run is feasible");
  }
  std::vector<uint8_t> pick(plan.subgroups.size(), 0);
  for (size_t i = 0; i < best->schedule.device.size() && i < pick.size(); ++i) {
    pick[i] = best->schedule.device[i] == UpdateDevice::kGpuStreamed;
  }
  char line[200];
  std::snprintf(line, sizeof(line),
                "schedule: %s chosen by the performance model (predicted %.3f s "
                "exposed per step; %s)",
                best->schedule.name.c_str(), best->prediction.exposed_s, hw.name.c_str());
  plan.notes.push_back(line);
  return pick;
}

Status Engine::Impl::submit_gpu(const SubGroup& sg, float* record, float grad_mul) {
  kill_point("engine_update");
  kernels::StepArgs args;
  args.step = step_counts[size_t(sg.group)];
  args.grad_mul = grad_mul;
  STRATA_ASSIGN_OR_RETURN(cuda::AdamStepConsts consts,
                          cuda::adam_step_consts(opts.groups[size_t(sg.group)], args));
  cuda::GpuJob job;
  job.consts = consts;
  for (int k = 0; k < slots[size_t(sg.group)] && k < 4; ++k) {
    job.host_slot[k] = record + size_t(k) * sg.slot_stride;
  }
  job.n = sg.numel;
  job.grad = grad_ptr(sg);
  job.grad_type = elem_type(sg.grad_dtype);
  job.copy_out = gpu_copy_out[sg.id].data();
  job.copy_out_count = gpu_copy_out[sg.id].size();
  job.param_type = elem_type(sg.dtype);
  job.after_stream = model_stream.load();
  const int64_t t0 = now_ns();
  auto t = gpu->submit(job);
  if (!t.ok()) {
    return t.status().with_context("GPU update of sub-group " + std::to_string(sg.id));
  }
  gpu_pending.push_back(GpuPending{sg.id, t.value(), t0});
  return Status::Ok();
}

// Waits for the run's GPU updates (their records are back in host memory),
// records them in the trace, and orders the model's stream after their
// copy-out.
Status Engine::Impl::finish_gpu(int64_t step_id) {
  Status st;
  for (const auto& p : gpu_pending) {
    Status w = gpu->wait(p.ticket);
    const SubGroup& sg = plan.subgroups[p.sg];
    trace.record({EventKind::kUpdate, step_id, int32_t(sg.id), "gpu", uint64_t(sg.numel), p.start,
                  now_ns()});
    if (st.ok() && !w.ok()) {
      st = w.with_context("GPU update of sub-group " + std::to_string(sg.id));
    }
  }
  if (st.ok() && !gpu_pending.empty()) {
    if (void* stream = model_stream.load()) {
      st = gpu->stream_wait(gpu_pending.back().ticket, stream);
    }
  }
  gpu_pending.clear();
  return st;
}

// Elements per slice of step_in_slices: a slice's state, gradients and
// copy-out (28-32 bytes an element: 7-8 MiB) stay in the last-level cache
// between the verification, the update and the hashing. On the 2-vCPU EPYC
// VM (a 32 MiB L3 of which a process sees about 16) 256K elements took a
// 50 MB AdamW record in 6 ms; 64K, 128K, 512K and 1M elements 7-10 ms, the
// unsliced verify + update + hash 9 ms, the update without checksums 3 ms.
constexpr size_t kHashSliceElems = size_t(1) << 18;

Status Engine::Impl::step_in_slices(const SubGroup& sg, const kernels::StepArgs& args,
                                    float* record, std::span<const kernels::CopyOut> outs,
                                    kernels::ThreadPool* pool, ChunkHashing& h) {
  constexpr size_t C = io::kChecksumChunk;
  const size_t bytes = h.tier->record_bytes(h.handle);
  const size_t nc = io::checksum_chunks(bytes);
  const size_t n = sg.numel;
  const int ns = slots[size_t(sg.group)];
  const kernels::StateView whole = view(sg, record);
  std::vector<size_t> base(static_cast<size_t>(ns));
  for (int k = 0; k < ns; ++k) {
    base[size_t(k)] = size_t(reinterpret_cast<const char*>(whole.slot[k]) -
                             reinterpret_cast<const char*>(record));
  }
  std::vector<uint64_t> old_sums(nc, 0);
  h.sums.assign(nc, 0);
  std::vector<char> verified(nc, 0), hashed(nc, 0), listed(nc, 0);
  if (h.verified.size() == nc) {
    old_sums = std::move(h.verified);
    verified.assign(nc, 1);
  }
  std::vector<size_t> list;
  auto hash_list = [&](std::vector<uint64_t>& into) {
    auto one = [&](size_t i) { into[list[i]] = io::chunk_checksum(record, bytes, list[i]); };
    if (pool != nullptr && list.size() > 1) {
      pool->parallel_for(list.size(), one);
    } else {
      for (size_t i = 0; i < list.size(); ++i) {
        one(i);
      }
    }
  };
  // Checks the listed chunks against the tier, in runs of consecutive chunks.
  auto verify_list = [&]() -> Status {
    std::sort(list.begin(), list.end());
    hash_list(old_sums);
    for (size_t i = 0; i < list.size();) {
      size_t j = i + 1;
      while (j < list.size() && list[j] == list[j - 1] + 1) {
        ++j;
      }
      STRATA_RETURN_IF_ERROR(h.tier->verify_chunks(
          h.handle, list[i], std::span<const uint64_t>(old_sums.data() + list[i], j - i)));
      i = j;
    }
    for (size_t c : list) {
      verified[c] = 1;
    }
    return Status::Ok();
  };
  // The chunks elements [a, b) of any slot lie in.
  auto touched = [&](size_t a, size_t b) {
    list.clear();
    for (size_t k = 0; k < base.size(); ++k) {
      for (size_t c = (base[k] + 4 * a) / C; c <= (base[k] + 4 * b - 1) / C; ++c) {
        if (!listed[c]) {
          listed[c] = 1;
          list.push_back(c);
        }
      }
    }
    for (size_t c : list) {
      listed[c] = 0;
    }
  };
  // Chunk c holds no slot bytes of elements at or past `front`.
  auto complete = [&](size_t c, size_t front) {
    for (size_t b0 : base) {
      const size_t end = std::min((c + 1) * C, b0 + 4 * n);
      if (end > std::max(c * C, b0 + 4 * front)) {
        return false;
      }
    }
    return true;
  };
  const size_t gsize = kernels::dtype_size(sg.grad_dtype);
  const size_t psize = kernels::dtype_size(sg.dtype);
  const char* grad = static_cast<const char*>(grad_ptr(sg));
  std::vector<kernels::CopyOut> slice_outs;
  for (size_t a = 0; a < n; a += kHashSliceElems) {
    const size_t b = std::min(n, a + kHashSliceElems);
    touched(a, b);
    std::vector<size_t> all = list;
    std::erase_if(list, [&](size_t c) { return verified[c] != 0; });
    STRATA_RETURN_IF_ERROR(verify_list());
    kernels::StateView v = whole;
    v.n = b - a;
    for (int k = 0; k < ns; ++k) {
      v.slot[k] += a;
    }
    slice_outs.clear();
    for (const kernels::CopyOut& o : outs) {
      const size_t lo = std::max(o.offset, a), hi = std::min(o.offset + o.n, b);
      if (lo < hi) {
        slice_outs.push_back(
            {lo - a, hi - lo, static_cast<char*>(o.dst) + (lo - o.offset) * psize});
      }
    }
    STRATA_RETURN_IF_ERROR(kernels::optimizer_step(opts.groups[size_t(sg.group)], args, v,
                                                   grad + a * gsize, sg.grad_dtype, slice_outs,
                                                   sg.dtype, pool));
    list.clear();
    for (size_t c : all) {
      if (!hashed[c] && complete(c, b)) {
        hashed[c] = 1;
        list.push_back(c);
      }
    }
    hash_list(h.sums);
  }
  // Chunks no slot element lies in (padding between and after the slots):
  // unchanged, so their checked checksum is also the new one.
  list.clear();
  for (size_t c = 0; c < nc; ++c) {
    if (!verified[c]) {
      list.push_back(c);
    }
  }
  STRATA_RETURN_IF_ERROR(verify_list());
  for (size_t c = 0; c < nc; ++c) {
    if (!hashed[c]) {
      h.sums[c] = old_sums[c];
    }
  }
  return Status::Ok();
}

Status Engine::Impl::update(const SubGroup& sg, float* record, float grad_mul,
                            kernels::ThreadPool* pool, int64_t step_id, ChunkHashing* hashing) {
  kill_point("engine_update");
  kernels::StepArgs args;
  args.step = step_counts[size_t(sg.group)];
  args.grad_mul = grad_mul;
  int64_t t0 = now_ns();
  std::span<const kernels::CopyOut> outs = copy_out[sg.id];
  std::vector<kernels::CopyOut> with_store;
  if (sg_has_store[sg.id]) {
    // Weights on a non-resident param tier: copied out into write-back buffers.
    with_store = copy_out[sg.id];
    for (const auto& seg : sg.segments) {
      if (!in_store[seg.param]) {
        continue;
      }
      const ParamInfo& p = opts.params[seg.param];
      if (!wb[seg.param]) {
        auto b = opts.param_store->staging(opts.param_store->record_bytes(uint32_t(p.store_id)));
        if (!b.ok()) {
          return b.status().with_context("write-back buffer of parameter " + p.name);
        }
        wb[seg.param] = std::move(b).value();
      }
      with_store.push_back(kernels::CopyOut{
          seg.offset, seg.numel,
          wb[seg.param].as<char>() + seg.param_offset * kernels::dtype_size(p.dtype)});
    }
    outs = with_store;
  }
  Status st = hashing != nullptr
                  ? step_in_slices(sg, args, record, outs, pool, *hashing)
                  : kernels::optimizer_step(opts.groups[size_t(sg.group)], args, view(sg, record),
                                            grad_ptr(sg), sg.grad_dtype, outs, sg.dtype, pool);
  trace.record(
      {EventKind::kUpdate, step_id, int32_t(sg.id), "cpu", uint64_t(sg.numel), t0, now_ns()});
  if (st.ok() && sg_has_store[sg.id]) {
    for (const auto& seg : sg.segments) {
      if (in_store[seg.param] && ++wb_pieces[seg.param] == subgroups_of_param[seg.param].size()) {
        wb_pieces[seg.param] = 0;
        const ParamInfo& p = opts.params[seg.param];
        st = opts.param_store->store_owned(uint32_t(p.store_id), std::move(wb[seg.param]))
                 .with_context("new weights of parameter " + p.name);
        if (!st.ok()) {
          break;
        }
      }
    }
  }
  if (st.ok() && opts.release_grads && !arenas.empty()) {
    st = release_grad_range(const_cast<void*>(grad_ptr(sg)),
                            sg.numel * kernels::dtype_size(sg.grad_dtype));
  }
  return st.with_context("update of sub-group " + std::to_string(sg.id));
}

// The step pipeline. Consumes run.order as sub-groups become ready; for
// sub-groups on fetch/store tiers it keeps up to work.size() records in
// flight: fetch ahead (in ready order) into free working buffers, update,
// store, and refill the buffer whose store was submitted one update earlier
// (lag 1), so the drive reads and writes together. Stores still in flight
// when every update is done complete in the background; the next sync point
// waits for them (write-back deferred into the next forward).
Status Engine::Impl::run_pipeline(StepRun& run) {
  const auto& sgs = plan.subgroups;
  const size_t nb = work.size();
  // kReady: fetched and verified while the pipeline had nothing else to do
  // (sums: its chunk checksums), waiting for its update.
  enum class BufState { kFree, kFetching, kReady, kStoring };
  struct Buf {
    BufState state = BufState::kFree;
    uint32_t sg = 0;
    TierTicket ticket = 0;
    int64_t start = 0;      // submit
    int64_t submitted = 0;  // submit returned (the end when the tier finished inside submit)
    uint64_t seq = 0;       // store order
    std::vector<uint64_t> sums;
  };
  std::vector<Buf> bufs(nb);
  std::vector<int> buf_of(sgs.size(), -1);
  std::vector<uint32_t> order;                // local copy of run.order
  std::vector<char> measured(sgs.size(), 0);  // collecting stats: gathered for this sub-group
  std::vector<uint32_t> to_fetch;  // fetch-tier sub-groups known and not yet fetched, in order
  size_t to_fetch_head = 0, next_update = 0;
  uint64_t store_seq = 0;
  int64_t step_id = int64_t(steps);

  auto finish = [&](size_t b, bool verify = true) -> Status {
    Buf& buf = bufs[b];
    if (buf.state == BufState::kFree) {
      return Status::Ok();
    }
    if (buf.state == BufState::kReady) {
      buf.state = BufState::kFree;  // completed, verified and traced by verify_ahead
      return Status::Ok();
    }
    const SubGroup& sg = sgs[buf.sg];
    const bool fetching = buf.state == BufState::kFetching;
    buf.state = BufState::kFree;
    // The interval ends when the transfer completed, not when the pipeline
    // came to wait for it (a store is waited only when its buffer is reused).
    int64_t done = 0;
    Status st = verify ? tier_of(sg)->wait(buf.ticket, &done)
                       : tier_of(sg)->wait_unverified(buf.ticket, &done);
    if (done == 0) {
      done = buf.ticket == 0 ? buf.submitted : now_ns();
    }
    trace.record({fetching ? EventKind::kFetch : EventKind::kStore, step_id, int32_t(sg.id),
                  tiers::tier_name(sg.tier), sg.record_bytes, buf.start,
                  std::max(done, buf.start)});
    return st.with_context(std::string(fetching ? "fetch" : "store") + " of sub-group " +
                           std::to_string(sg.id));
  };
  // Issues fetches for known sub-groups while buffers allow. A buffer being
  // stored is reused only if it is not the newest store (unless `force`).
  auto pump = [&](bool force) -> Status {
    while (to_fetch_head < to_fetch.size()) {
      int chosen = -1;
      for (size_t b = 0; b < nb; ++b) {
        if (bufs[b].state == BufState::kFree) {
          chosen = int(b);
          break;
        }
      }
      if (chosen < 0) {
        // The oldest store, if it is not the newest (or force).
        uint64_t best = UINT64_MAX;
        for (size_t b = 0; b < nb; ++b) {
          if (bufs[b].state == BufState::kStoring && bufs[b].seq < best) {
            best = bufs[b].seq;
            chosen = int(b);
          }
        }
        if (chosen < 0 || (!force && nb >= 2 && best + 1 == store_seq)) {
          return Status::Ok();
        }
        STRATA_RETURN_IF_ERROR(finish(size_t(chosen)));
      }
      uint32_t id = to_fetch[to_fetch_head++];
      Buf& buf = bufs[size_t(chosen)];
      buf.sg = id;
      buf.start = now_ns();
      STRATA_ASSIGN_OR_RETURN(
          buf.ticket, tier_of(sgs[id])->submit_fetch(handles[id], work[size_t(chosen)].data()));
      buf.submitted = now_ns();
      buf.state = BufState::kFetching;
      buf_of[id] = chosen;
      force = false;
    }
    return Status::Ok();
  };

  // While the pipeline waits for the gradient multiplier (exact mode: no
  // update can start before backward ends), it verifies fetched records
  // whose transfer completed, on its own thread, so that after backward only
  // their update and the store's hash from cache remain. Records of tiers
  // without chunk checksums, those still in flight when the updates start,
  // and every record in eager mode are verified in the update, in cache
  // (step_in_slices). Returns whether it verified one; *more: whether a fetch
  // it could verify later is still in flight.
  auto verify_ahead = [&](bool* more) -> Result<bool> {
    *more = false;
    for (size_t b = 0; b < nb; ++b) {
      Buf& buf = bufs[b];
      if (buf.state != BufState::kFetching || !hashes_in_slices(sgs[buf.sg])) {
        continue;
      }
      Tier* tier = tier_of(sgs[buf.sg]);
      STRATA_ASSIGN_OR_RETURN(bool done, tier->poll(buf.ticket));
      if (!done) {
        *more = true;
        continue;
      }
      const uint32_t id = buf.sg;
      STRATA_RETURN_IF_ERROR(finish(b, false));
      const size_t bytes = tier->record_bytes(handles[id]);
      std::vector<uint64_t> sums(io::checksum_chunks(bytes));
      for (size_t c = 0; c < sums.size(); ++c) {
        sums[c] = io::chunk_checksum(work[b].data(), bytes, c);
      }
      STRATA_RETURN_IF_ERROR(tier->verify_chunks(handles[id], 0, sums)
                                 .with_context("fetch of sub-group " + std::to_string(id)));
      buf.state = BufState::kReady;
      buf.sums = std::move(sums);
      verified_in_backward.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    return false;
  };

  // State does not depend on gradients: records are fetched in the expected
  // order (the order gradients became ready in the previous step) from the
  // start, and each update waits only for its own sub-group to be ready.
  const std::vector<uint32_t>& expected = run.expected;
  for (const CarriedFetch& c : run.carried) {  // fetched by the last step's worker
    Buf& buf = bufs[c.buffer];
    buf.state = BufState::kFetching;
    buf.sg = c.subgroup;
    buf.ticket = c.ticket;
    buf.start = c.start_ns;
    buf.submitted = c.submitted_ns;
    buf_of[c.subgroup] = int(c.buffer);
  }
  run.carried.clear();
  for (uint32_t id : expected) {
    if (!tier_of(sgs[id])->resident() && buf_of[id] < 0) {
      to_fetch.push_back(id);
    }
  }
  Status st = pump(false);
  bool collect = false;
  const size_t n = expected.size();
  for (;;) {
    if (!st.ok()) {
      break;
    }
    bool gate, closed, backward_running;
    float grad_mul;
    size_t known_before = order.size();
    {
      std::unique_lock<std::mutex> lock(run.mu);
      auto work_to_do = [&] {
        return run.cancel || run.order.size() > order.size() ||
               (run.gate && (next_update == n || run.queued[expected[next_update]]));
      };
      while (st.ok() && !work_to_do()) {
        if (run.gate) {
          // Updates may start at any moment: the fetched records are checked
          // in them, in cache (step_in_slices).
          run.cv.wait(lock);
          continue;
        }
        lock.unlock();
        bool more = false;
        auto did = verify_ahead(&more);
        lock.lock();
        if (!did.ok()) {
          st = did.status();
        } else if (!did.value() && !work_to_do()) {
          if (more) {
            run.cv.wait_for(lock, std::chrono::milliseconds(1));  // poll the fetches again
          } else {
            run.cv.wait(lock);
          }
        }
      }
      if (!st.ok() || run.cancel) {
        break;
      }
      order.insert(order.end(), run.order.begin() + long(order.size()), run.order.end());
      gate = run.gate;
      closed = run.closed;
      grad_mul = run.grad_mul;
      backward_running = run.backward_running;
      collect = run.collect_stats;
    }
    (void)closed;
    if (collect) {
      // Norm and inf/NaN of each sub-group as its gradients arrive; summed
      // later in sub-group order, so the total does not depend on arrival.
      for (size_t i = known_before; i < order.size(); ++i) {
        const SubGroup& sg = sgs[order[i]];
        kernels::GradStats g =
            kernels::grad_stats(grad_ptr(sg), sg.grad_dtype, sg.numel, pool_for(backward_running));
        std::lock_guard<std::mutex> lock(run.mu);
        run.stats[sg.id] = g;
        ++run.stats_done;
        measured[sg.id] = 1;
        run.cv.notify_all();
      }
    }
    if (!gate) {
      continue;
    }
    while (next_update < n && st.ok()) {
      const SubGroup& sg = sgs[expected[next_update]];
      Tier* tier = tier_of(sg);
      {
        std::lock_guard<std::mutex> lock(run.mu);
        backward_running = run.backward_running;
        if (run.cancel || !run.queued[sg.id] || (collect && !measured[sg.id])) {
          // Cancelled, or its gradients are not final yet, or their stats are not
          // gathered yet (an update may release the gradient pages they are read from).
          break;
        }
      }
      if (tier->resident()) {
        if (gpu && on_gpu[sg.id]) {
          st = submit_gpu(sg, tier->data(handles[sg.id]), grad_mul);
        } else {
          st =
              update(sg, tier->data(handles[sg.id]), grad_mul, pool_for(backward_running), step_id);
        }
        ++next_update;
        publish_progress(run, next_update);
        continue;
      }
      if (buf_of[sg.id] < 0) {
        st = pump(true);  // no buffer was free: make one
        if (!st.ok()) {
          break;
        }
      }
      size_t b = size_t(buf_of[sg.id]);
      // Verified chunk by chunk during the update when the tier allows it.
      const bool in_slices = hashes_in_slices(sg);
      const bool was_ready = bufs[b].state == BufState::kReady;
      st = finish(b, !in_slices);
      if (!st.ok()) {
        break;
      }
      float* record = work[b].as<float>();
      ChunkHashing hashing{tier, handles[sg.id], {}, {}};
      if (was_ready) {
        hashing.verified = std::move(bufs[b].sums);
      }
      bufs[b].sums.clear();
      st = update(sg, record, grad_mul, pool_for(backward_running), step_id,
                  in_slices ? &hashing : nullptr);
      if (!st.ok()) {
        break;
      }
      Buf& buf = bufs[b];
      buf.sg = sg.id;
      buf.start = now_ns();
      auto t = in_slices
                   ? tier->submit_store_hashed(handles[sg.id], record, std::move(hashing.sums))
                   : tier->submit_store(handles[sg.id], record);
      if (!t.ok()) {
        st = t.status();
        break;
      }
      buf.ticket = t.value();
      buf.submitted = now_ns();
      buf.state = BufState::kStoring;
      kill_point("engine_store");
      buf.seq = store_seq++;
      buf_of[sg.id] = -1;
      ++next_update;
      publish_progress(run, next_update);
      st = pump(false);
    }
    if (!st.ok() || next_update == n) {
      break;
    }
  }
  if (gpu) {
    // Every GPU job is waited for, also after an error: their records are
    // borrowed until then.
    Status g = finish_gpu(step_id);
    if (st.ok()) {
      st = g;
    }
  }
  {
    std::lock_guard<std::mutex> lock(run.mu);
    if (st.ok() && run.from_backward && run.order.size() == sgs.size()) {
      observed_order = run.order;  // the next step prefetches in this order
    }
    run.status = st;
    run.updates_done = true;
    run.cv.notify_all();
  }
  // Drain: stores complete in the background; fetches of a cancelled or
  // failed step are waited and dropped.
  for (size_t b = 0; b < nb; ++b) {
    Status s2 = finish(b);
    if (st.ok()) {
      st = s2;
    }
  }
  bool cancelled;
  {
    std::lock_guard<std::mutex> lock(run.mu);
    cancelled = run.cancel;
  }
  if (st.ok() && !cancelled) {
    carry_next_fetches();
  }
  return st;
}

void Engine::Impl::carry_next_fetches() {
  if (!opts.config.typed().strata.overlap_backward || closed) {
    return;
  }
  const auto& sgs = plan.subgroups;
  size_t b = 0;
  for (uint32_t id : next_expected()) {
    if (b == work.size()) {
      break;
    }
    Tier* tier = tier_of(sgs[id]);
    if (tier->resident()) {
      continue;
    }
    CarriedFetch c;
    c.buffer = b;
    c.subgroup = id;
    c.start_ns = now_ns();
    auto t = tier->submit_fetch(handles[id], work[b].data());
    if (!t.ok()) {
      // Nothing is lost: the next step fetches this record again and
      // reports the error there, with its context.
      break;
    }
    c.ticket = t.value();
    c.submitted_ns = now_ns();
    carried.push_back(c);
    ++b;
  }
}

void Engine::Impl::drop_carried() {
  for (const CarriedFetch& c : carried) {
    // A fetch that failed is not reported here: its record is not used, and
    // the next fetch of it reports the error with its context.
    Tier* tier = tier_of(plan.subgroups[c.subgroup]);
    const uint64_t before = tier->stats().bytes_fetched;
    (void)tier->wait(c.ticket, nullptr);
    dropped_fetch_bytes += tier->stats().bytes_fetched - before;
  }
  carried.clear();
}

Result<float*> Engine::Impl::get_record(const SubGroup& sg) {
  STRATA_RETURN_IF_ERROR(check_readable(sg));
  Tier* tier = tier_of(sg);
  if (tier->resident()) {
    return tier->data(handles[sg.id]);
  }
  STRATA_RETURN_IF_ERROR(tier->fetch(handles[sg.id], work[0].data()));
  return work[0].as<float>();
}

Status Engine::Impl::put_record(const SubGroup& sg, float* record) {
  Tier* tier = tier_of(sg);
  if (tier->resident()) {
    return Status::Ok();
  }
  return tier->store(handles[sg.id], record);
}

Status Engine::Impl::close() {
  if (closed) {
    return Status::Ok();
  }
  Status st;
  if (run) {
    {
      std::lock_guard<std::mutex> lock(run->mu);
      if (!run->updates_done) {
        run->cancel = true;  // a step never finished: leave the records as they were
      } else {
        run->stepped = true;  // its updates ran (before step() was called): join it
      }
      run->cv.notify_all();
    }
    st = sync();
  }
  drop_carried();  // no run: fetches the last step carried may be in flight
  closed = true;
  gpu.reset();  // waits for its jobs; frees device buffers and streams
  for (auto& [k, t] : tiers) {
    t->drain();
  }
  tiers.clear();  // removes swap files
  work.clear();
  arenas.clear();
  arenas_mem.clear();
  for (auto& [addr, bytes] : arena_maps) {
    (void)platform::unmap(addr, bytes);  // nothing to do about a failure at close
  }
  arena_maps.clear();
  wb.clear();
  scratch.reset();
  host_copies.clear();
  io.reset();
  threads.reset();
  backward_threads.reset();
  pool.reset();
  return st;
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() { close().ignore(); }

Result<std::unique_ptr<Engine>> Engine::create(EngineOptions options) {
  auto impl = std::make_unique<Impl>();
  Impl& e = *impl;
  e.opts = std::move(options);
  const Config& cfg = e.opts.config;
  if (e.opts.groups.empty()) {
    return invalid_argument("engine needs at least one param group");
  }

  PlanInputs pin;
  // What the plan tells users about GPU updates must match what
  // choose_gpu_subgroups() then does.
  // (A test's injected updater stands for a device.)
  pin.gpu_available = e.opts.make_gpu_updater ? true : cuda::cuda_available().ok();
  for (const auto& g : e.opts.groups) {
    e.slots.push_back(kernels::state_slots(g));
    pin.slot_dtypes.push_back(plan_slot_dtypes(cfg, g));
  }
  pin.slots = e.slots;
  for (const auto& p : e.opts.params) {
    if (p.host_copy && p.data != nullptr) {
      return invalid_argument("parameter " + p.name +
                              " asks for a host copy and gives host memory too");
    }
    if (p.store_id >= 0) {
      if (e.opts.param_store == nullptr) {
        return invalid_argument("parameter " + p.name + " names param-store record " +
                                std::to_string(p.store_id) + " but the engine has no param store");
      }
      if (p.data != nullptr || p.host_copy) {
        return invalid_argument("parameter " + p.name +
                                " lives in the param store and gives host memory too");
      }
      const size_t want = size_t(p.numel) * kernels::dtype_size(p.dtype);
      if (size_t(p.store_id) >= e.opts.param_store->count() ||
          e.opts.param_store->bytes(uint32_t(p.store_id)) != want) {
        return invalid_argument("parameter " + p.name + ": param-store record " +
                                std::to_string(p.store_id) + " does not hold its " +
                                std::to_string(want) + " bytes");
      }
    } else if (p.data == nullptr && !p.host_copy && !e.opts.grad_source) {
      return invalid_argument("parameter " + p.name + " has no data pointer");
    }
    pin.params.push_back(PlanParam{p.numel, p.dtype, p.group, p.host_copy});
  }
  if (e.opts.param_store != nullptr) {
    e.opts.param_store->record_transfers(true);  // weight lanes in the trace
  }
  STRATA_ASSIGN_OR_RETURN(e.plan, build_plan(cfg, pin));
  e.step_counts.assign(e.opts.groups.size(), 0);

  unsigned nthreads = unsigned(cfg.typed().strata.threads);
  e.threads = std::make_unique<kernels::ThreadPool>(nthreads);

  memory::PoolOptions po;
  // A GPU model's host copies and gradient arena cross PCIe every step: the
  // pool is pinned for them whatever pin_memory says about the state.
  const bool gpu_copies =
      std::any_of(e.opts.params.begin(), e.opts.params.end(),
                  [](const ParamInfo& p) { return p.host_copy && p.device_data; });
  po.pin = cfg.typed().zero.offload.pin_memory || gpu_copies;
  po.allow_unpinned = true;
  // One slab sized from the plan, so reserved tracks requested.
  uint64_t pool_bytes =
      e.plan.pool_bytes - ((e.opts.grad_source || e.opts.release_grads) ? e.plan.grad_bytes : 0);
  po.slab_bytes = std::max<uint64_t>(pool_bytes, 1 << 20);
  auto report = [&](const char* phase, uint64_t done, uint64_t total) {
    if (e.opts.progress) {
      e.opts.progress(phase, done, total);
    }
  };
  report("pinning memory", 0, po.slab_bytes);
  STRATA_ASSIGN_OR_RETURN(e.pool, memory::PinnedPool::create(po));
  report("pinning memory", po.slab_bytes, po.slab_bytes);

  // Host copies of device parameters: from the pool, before anything reads
  // the parameters' host memory (copy-out targets, the initial masters).
  e.host_copies.resize(e.opts.params.size());
  for (size_t i = 0; i < e.opts.params.size(); ++i) {
    ParamInfo& p = e.opts.params[i];
    if (!p.host_copy) {
      continue;
    }
    STRATA_ASSIGN_OR_RETURN(e.host_copies[i],
                            e.pool->allocate(size_t(p.numel) * kernels::dtype_size(p.dtype)));
    p.data = e.host_copies[i].data();
    if (e.opts.fill_host_copy) {
      STRATA_RETURN_IF_ERROR(e.opts.fill_host_copy(i, p.data));
    } else {
      std::memset(p.data, 0, e.host_copies[i].size());
    }
  }

  // Parameters in the param store: a resident store's record is their memory;
  // the others are read from and written back to the store.
  e.in_store.assign(e.opts.params.size(), 0);
  for (size_t i = 0; i < e.opts.params.size(); ++i) {
    ParamInfo& p = e.opts.params[i];
    if (p.store_id < 0) {
      continue;
    }
    if (e.opts.param_store->resident()) {
      p.data = e.opts.param_store->data(uint32_t(p.store_id));
    } else {
      e.in_store[i] = 1;
    }
  }
  e.wb.resize(e.opts.params.size());
  e.wb_pieces.assign(e.opts.params.size(), 0);
  e.sg_has_store.assign(e.plan.subgroups.size(), 0);
  for (const auto& sg : e.plan.subgroups) {
    for (const auto& seg : sg.segments) {
      e.sg_has_store[sg.id] |= e.in_store[seg.param];
    }
  }

  // Gradient arenas, one per gradient dtype, zeroed (release_grads: mapped
  // untouched, so they read as zero and take memory only where written).
  std::vector<size_t> arena_numel(3, 0);
  for (const auto& sg : e.plan.subgroups) {
    arena_numel[size_t(sg.grad_dtype)] =
        std::max(arena_numel[size_t(sg.grad_dtype)], sg.grad_offset + sg.numel);
  }
  for (size_t d = 0; d < 3; ++d) {
    if (arena_numel[d] == 0 || e.opts.grad_source) {
      continue;
    }
    size_t bytes = arena_numel[d] * kernels::dtype_size(DType(d));
    e.arena_of_dtype[d] = int(e.arenas.size());
    if (e.opts.release_grads) {
      // 2 MiB-aligned with transparent huge pages where the system allows
      // them: a sub-group's pages come back 512 at a time after release.
      void* addr = nullptr;
      int rc = platform::map_anonymous(bytes, size_t(2) << 20, &addr);
      if (rc != 0) {
        return Status::from_errno(-rc,
                                  "mmap of a " + std::to_string(bytes) + "-byte gradient arena");
      }
      (void)platform::advise_hugepage(addr, bytes);  // a hint: without THP, 4 KiB pages
      e.arena_maps.emplace_back(addr, bytes);
      e.arenas.push_back(GradSpan{DType(d), addr, arena_numel[d]});
      continue;
    }
    STRATA_ASSIGN_OR_RETURN(memory::PinnedBuffer buf, e.pool->allocate(bytes));
    std::memset(buf.data(), 0, bytes);
    e.arenas.push_back(GradSpan{DType(d), buf.data(), arena_numel[d]});
    e.arenas_mem.push_back(std::move(buf));
  }
  e.param_grad_offset.assign(e.opts.params.size(), 0);
  for (const auto& sg : e.plan.subgroups) {
    for (const auto& seg : sg.segments) {
      if (seg.param_offset == 0) {
        e.param_grad_offset[seg.param] = sg.grad_offset + seg.offset;
      }
    }
  }
  // Copy-out targets: the model's own parameter memory.
  e.copy_out.resize(e.plan.subgroups.size());
  for (const auto& sg : e.plan.subgroups) {
    for (const auto& seg : sg.segments) {
      const ParamInfo& p = e.opts.params[seg.param];
      if (p.data == nullptr) {
        continue;
      }
      void* dst = static_cast<char*>(p.data) + seg.param_offset * kernels::dtype_size(p.dtype);
      e.copy_out[sg.id].push_back(kernels::CopyOut{seg.offset, seg.numel, dst});
    }
  }

  e.subgroups_of_param.assign(e.opts.params.size(), {});
  e.params_in_subgroup.assign(e.plan.subgroups.size(), 0);
  for (const auto& sg : e.plan.subgroups) {
    for (const auto& seg : sg.segments) {
      auto& list = e.subgroups_of_param[seg.param];
      if (list.empty() || list.back() != sg.id) {
        list.push_back(sg.id);
        e.params_in_subgroup[sg.id] += 1;
      }
    }
  }

  // Tiers.
  const uint64_t nvme_bytes = e.plan.bytes_on(TierKind::kNvme);
  for (const auto& t : e.plan.tiers) {
    switch (t.tier) {
      case TierKind::kHost:
        e.tiers[TierKind::kHost] = tiers::make_host_tier(e.pool.get());
        break;
      case TierKind::kNvme: {
        STRATA_ASSIGN_OR_RETURN(e.io, io::make_io_engine(io::io_options_from(cfg.typed().aio)));
        if (e.opts.wrap_io) {
          e.io = e.opts.wrap_io(std::move(e.io));
        }
        tiers::NvmeTierOptions no;
        no.dir = cfg.typed().zero.offload.nvme_path.value_or(std::string());
        no.tag =
            "rank" + std::to_string(e.opts.rank) + (e.opts.tag.empty() ? "" : "-" + e.opts.tag);
        no.capacity = nvme_bytes;
        no.checksums = cfg.typed().strata.verify_checksums;
        // Checksums hash on the pool the updates use at that moment (fewer threads while
        // backward runs); the pipeline thread hashes between updates, never during one.
        no.parallel_for = [impl = &e](size_t tasks, const std::function<void(size_t)>& fn) {
          impl->pool_for(impl->in_backward.load(std::memory_order_relaxed))
              ->parallel_for(tasks, fn);
        };
        STRATA_ASSIGN_OR_RETURN(e.tiers[TierKind::kNvme], tiers::make_nvme_tier(no, e.io.get()));
        break;
      }
      case TierKind::kCxl: {
        const std::vector<int> nodes = cfg.typed().strata.cxl_nodes.value_or(std::vector<int>());
        STRATA_ASSIGN_OR_RETURN(e.tiers[TierKind::kCxl], tiers::make_cxl_tier(nodes));
        break;
      }
      case TierKind::kGpu:
        return Status(StatusCode::kUnavailable, "the GPU tier needs a CUDA build and a device");
    }
  }
  // Working buffers for fetch/store tiers.
  if (e.plan.working_buffer_bytes > 0) {
    STRATA_RETURN_IF_ERROR(e.add_working_buffers(e.plan.buffer_count));  // >= 1 by the schema
  }
  // Records, with their initial state written to the tier.
  // Stores rotate through the working buffers so the drive writes while the
  // next record is filled.
  e.handles.resize(e.plan.subgroups.size());
  std::vector<std::pair<Tier*, TierTicket>> pending(e.work.size(), {nullptr, 0});
  size_t k = 0;
  Status init_status;
  uint64_t state_total = 0, state_done = 0;
  for (const auto& sg : e.plan.subgroups) {
    state_total += sg.record_bytes;
  }
  Impl::UnpackedScope init_unpacked_scope{&e};  // compressed records are built in fp32
  for (const auto& sg : e.plan.subgroups) {
    report("writing the initial optimizer state", state_done, state_total);
    state_done += sg.record_bytes;
    Tier* tier = e.tier_of(sg);
    auto h = tier->add_record(sg.record_bytes);
    if (!h.ok()) {
      init_status = h.status();
      break;
    }
    e.handles[sg.id] = h.value();
    if (tier->resident()) {
      init_status = e.init_record(sg, tier->data(e.handles[sg.id]));
    } else {
      size_t b = k++ % e.work.size();
      if (pending[b].first) {
        init_status = pending[b].first->wait(pending[b].second);
        pending[b].first = nullptr;
        if (!init_status.ok()) {
          break;
        }
      }
      float* buf = e.work[b].as<float>();
      init_status = e.init_record(sg, buf);
      if (init_status.ok()) {
        auto t = tier->submit_store(e.handles[sg.id], buf);
        if (t.ok()) {
          pending[b] = {tier, t.value()};
        } else {
          init_status = t.status();
        }
      }
    }
    if (!init_status.ok()) {
      break;
    }
  }
  for (auto& [tier, ticket] : pending) {
    if (tier) {
      Status st = tier->wait(ticket);
      if (init_status.ok()) {
        init_status = st;
      }
    }
  }
  e.scratch.reset();
  e.scratch_of = -1;
  STRATA_RETURN_IF_ERROR(init_status.with_context("writing the initial optimizer state"));
  report("writing the initial optimizer state", state_total, state_total);
  STRATA_RETURN_IF_ERROR(e.choose_gpu_subgroups());
  e.trace.set_keep_steps(size_t(cfg.typed().strata.trace_steps));
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

void Engine::set_model_stream(void* stream) { impl_->model_stream.store(stream); }
bool Engine::gpu_updated(uint32_t subgroup) const {
  return subgroup < impl_->on_gpu.size() && impl_->on_gpu[subgroup] != 0;
}

const Plan& Engine::plan() const { return impl_->plan; }
const std::vector<SubGroup>& Engine::subgroups() const { return impl_->plan.subgroups; }
const std::vector<GradSpan>& Engine::grad_arenas() const { return impl_->arenas; }
size_t Engine::grad_offset(size_t param) const { return impl_->param_grad_offset.at(param); }
void* Engine::host_copy(size_t param) const {
  const auto& h = impl_->host_copies;
  return param < h.size() ? h[param].data() : nullptr;
}
kernels::DType Engine::grad_dtype(size_t param) const {
  const auto& sgs = impl_->subgroups_of_param.at(param);
  return sgs.empty() ? impl_->opts.params.at(param).dtype
                     : impl_->plan.subgroups[sgs.front()].grad_dtype;
}

Status Engine::zero_grads() {
  STRATA_RETURN_IF_ERROR(impl_->wait_updates());
  for (auto& a : impl_->arenas) {
    const size_t bytes = a.numel * kernels::dtype_size(a.dtype);
    if (impl_->opts.release_grads) {
      STRATA_RETURN_IF_ERROR(impl_->release_grad_range(a.data, bytes));
    } else {
      std::memset(a.data, 0, bytes);
    }
  }
  return Status::Ok();
}

Status Engine::set_hyper(int group, const kernels::OptimizerHyper& hyper) {
  if (impl_->run) {
    std::lock_guard<std::mutex> lock(impl_->run->mu);
    if (impl_->run->gate && !impl_->run->updates_done) {
      return Status(StatusCode::kFailedPrecondition, "set_hyper while updates run");
    }
  }
  if (group < 0 || size_t(group) >= impl_->opts.groups.size()) {
    return invalid_argument("set_hyper: no param group " + std::to_string(group));
  }
  if (kernels::state_slots(hyper) != impl_->slots[size_t(group)]) {
    return invalid_argument("set_hyper: the optimizer's state layout cannot change after creation");
  }
  impl_->opts.groups[size_t(group)] = hyper;
  return Status::Ok();
}

void Engine::Impl::start_run(bool gate, float grad_mul, bool collect_stats, bool backward_running) {
  auto fresh = std::make_unique<StepRun>();
  StepRun& r = *fresh;
  r.queued.assign(plan.subgroups.size(), 0);
  r.waiting = params_in_subgroup;
  r.gate = gate;
  r.grad_mul = grad_mul;
  r.collect_stats = collect_stats;
  r.backward_running = backward_running;
  in_backward.store(backward_running, std::memory_order_relaxed);
  r.from_backward = backward_running;
  r.stats.assign(plan.subgroups.size(), kernels::GradStats{});
  r.expected = next_expected();
  r.carried = std::move(carried);  // fetched in this order after the last step
  carried.clear();
  r.start_ns = now_ns();
  for (auto& b : wb) {
    b.reset();  // pieces of a step that did not finish
  }
  std::fill(wb_pieces.begin(), wb_pieces.end(), 0u);
  for (auto& c : step_counts) {
    ++c;
  }
  trace.begin_step(int64_t(steps));
  absorb_weight_transfers(int64_t(steps));  // this step's forward
  r.worker = std::thread([this, &r] {
    Status st = run_pipeline(r);
    int64_t end = now_ns();
    int64_t backward_end = 0;
    {
      // The updates can all finish before end_backward() (every sub-group was
      // marked ready in the hooks): the backward lane waits for its end.
      std::unique_lock<std::mutex> lock(r.mu);
      r.cv.wait(lock, [&] { return !r.backward_running || r.cancel || r.stepped; });
      backward_end = r.backward_end_ns;
    }
    if (backward_end) {
      trace.record({EventKind::kBackward, int64_t(steps), -1, "", 0, r.start_ns, backward_end});
    }
    trace.record({EventKind::kStep, int64_t(steps), -1, "", 0, r.start_ns, end});
    absorb_weight_transfers(int64_t(steps));  // its backward and write-back
    trace.end_step();
    std::lock_guard<std::mutex> lock(r.mu);
    if (r.status.ok()) {
      r.status = st;
    }
    r.finished = true;
    r.cv.notify_all();
  });
  std::lock_guard<std::mutex> lock(run_mu);
  run = std::move(fresh);
}

Status Engine::Impl::wait_updates() {
  if (!run) {
    return Status::Ok();
  }
  std::unique_lock<std::mutex> lock(run->mu);
  run->cv.wait(lock, [&] { return run->updates_done; });
  return run->status;
}

Status Engine::Impl::sync(bool keep_carried) {
  Status st = join_run();
  if (!keep_carried || !st.ok()) {
    drop_carried();
  }
  return st;
}

Status Engine::Impl::join_run() {
  if (!run) {
    return Status::Ok();
  }
  {
    std::lock_guard<std::mutex> lock(run->mu);
    if (!run->stepped && !run->cancel) {
      // Joining now would wait forever for a gate only step() opens.
      return Status(
          StatusCode::kFailedPrecondition,
          "a step begun by begin_backward() is in flight: call step() or cancel_step() first");
    }
  }
  run->worker.join();
  Status st = run->status;
  bool cancelled = run->cancel;
  std::unique_ptr<StepRun> done;
  {
    std::lock_guard<std::mutex> lock(run_mu);
    done = std::move(run);
  }
  done.reset();
  if (!st.ok()) {
    for (auto& [k, t] : tiers) {
      t->drain();
    }
    error = st;
    mark_all_lost();
  } else if (!cancelled) {
    ++steps;
  }
  return st;
}

static Status check_usable(const Status& error, bool closed) {
  if (closed) {
    return Status(StatusCode::kFailedPrecondition, "the engine is closed");
  }
  if (!error.ok()) {
    return Status(StatusCode::kFailedPrecondition,
                  "engine stopped by an earlier error (" + error.message() +
                      "); reload the optimizer state before stepping again");
  }
  return Status::Ok();
}

Status Engine::begin_backward(const BackwardOptions& options) {
  Impl& e = *impl_;
  STRATA_RETURN_IF_ERROR(e.sync(/*keep_carried=*/true));
  STRATA_RETURN_IF_ERROR(check_usable(e.error, e.closed));
  if (options.threads > 0 &&
      (!e.backward_threads || e.backward_threads->size() != options.threads)) {
    e.backward_threads = std::make_unique<kernels::ThreadPool>(options.threads);
  }
  if (!options.eager_update) {
    e.add_exact_prefetch_buffers();
  }
  // Stats are gathered as gradients arrive when a later grad_stats() could not
  // read them: exact mode (clipping waits for them), and released arenas (an eager
  // update returns its gradient pages, so the arena reads zero afterwards).
  e.start_run(options.eager_update, options.grad_mul, !options.eager_update || e.opts.release_grads,
              /*backward_running=*/true);
  return Status::Ok();
}

void Engine::mark_param_ready(size_t param) {
  Impl& e = *impl_;
  std::lock_guard<std::mutex> run_lock(e.run_mu);
  if (param >= e.subgroups_of_param.size()) {
    if (e.hook_error.ok()) {
      e.hook_error = invalid_argument("mark_param_ready(" + std::to_string(param) +
                                      "): no such parameter (the engine has " +
                                      std::to_string(e.subgroups_of_param.size()) + ")");
    }
    return;
  }
  if (!e.run) {
    return;
  }
  StepRun& r = *e.run;
  std::lock_guard<std::mutex> lock(r.mu);
  bool added = false;
  for (uint32_t sg : e.subgroups_of_param[param]) {
    if (r.waiting[sg] > 0 && --r.waiting[sg] == 0 && !r.queued[sg]) {
      r.queued[sg] = 1;
      r.order.push_back(sg);
      added = true;
    }
  }
  if (r.order.size() == r.queued.size()) {
    r.closed = true;
  }
  if (added) {
    r.cv.notify_all();
  }
}

Status Engine::populate_grad(size_t param) {
  Impl& e = *impl_;
  if (!e.opts.release_grads || e.arenas.empty()) {
    return Status::Ok();
  }
  if (param >= e.param_grad_offset.size()) {
    return invalid_argument("populate_grad(" + std::to_string(param) +
                            "): no such parameter (the engine has " +
                            std::to_string(e.param_grad_offset.size()) + ")");
  }
  const kernels::DType dt = grad_dtype(param);
  const int arena = e.arena_of_dtype[size_t(dt)];
  if (e.opts.params[param].numel == 0 || arena < 0) {
    return Status::Ok();  // no elements, no pages (an empty parameter is in no sub-group)
  }
  const GradSpan& a = e.arenas[size_t(arena)];
  const size_t esize = kernels::dtype_size(dt);
  char* p = static_cast<char*>(a.data) + e.param_grad_offset[param] * esize;
  int rc = platform::populate_pages(p, size_t(e.opts.params[param].numel) * esize);
  if (rc != 0) {
    return Status::from_errno(-rc, "madvise(MADV_POPULATE_WRITE) of the gradient of parameter " +
                                       e.opts.params[param].name);
  }
  return Status::Ok();
}

double Engine::wait_grad_room() {
  Impl& e = *impl_;
  if (!e.opts.release_grads) {
    return 0.0;
  }
  const size_t cap = e.opts.max_pending_subgroups ? e.opts.max_pending_subgroups
                                                  : std::max<size_t>(2, e.work.size() + 1);
  StepRun* rp = nullptr;
  {
    // Not held while waiting (mark_param_ready from other threads takes it).
    // The run cannot be replaced meanwhile: only the driving thread does
    // that, and it is inside the backward that called this hook.
    std::lock_guard<std::mutex> run_lock(e.run_mu);
    rp = e.run.get();
  }
  if (!rp) {
    return 0.0;
  }
  StepRun& r = *rp;
  std::unique_lock<std::mutex> lock(r.mu);
  // Pending: ready (in `order`) and not yet updated. Waiting is safe only
  // while the pipeline can move: the gate is open and the next sub-group it
  // updates is ready (else it waits for this very backward).
  auto must_wait = [&] {
    return r.gate && r.backward_running && !r.cancel && !r.updates_done &&
           r.updated < r.expected.size() && r.queued[r.expected[r.updated]] &&
           r.order.size() - std::min(r.order.size(), r.updated) >= cap;
  };
  if (!must_wait()) {
    return 0.0;
  }
  int64_t t0 = now_ns();
  r.cv.wait(lock, [&] { return !must_wait(); });
  return double(now_ns() - t0) * 1e-9;
}

Status Engine::end_backward() {
  Impl& e = *impl_;
  // Taken before r.mu: mark_param_ready locks run_mu, then r.mu.
  Status hook = e.take_hook_error().with_context("end_backward");
  if (!e.run) {
    STRATA_RETURN_IF_ERROR(hook);
    return Status(StatusCode::kFailedPrecondition, "end_backward without begin_backward");
  }
  StepRun& r = *e.run;
  std::lock_guard<std::mutex> lock(r.mu);
  // Sub-groups some of whose parameters got no gradient: ready now, in plan order.
  for (uint32_t sg = 0; sg < r.queued.size(); ++sg) {
    if (!r.queued[sg]) {
      r.queued[sg] = 1;
      r.order.push_back(sg);
    }
  }
  r.closed = true;
  r.backward_running = false;
  e.in_backward.store(false, std::memory_order_relaxed);
  r.backward_end_ns = now_ns();
  r.cv.notify_all();
  return hook;
}

Status Engine::step(float grad_mul) {
  Impl& e = *impl_;
  STRATA_RETURN_IF_ERROR(e.take_hook_error().with_context("step (nothing was updated)"));
  bool begun = false;  // a run started by begin_backward() and not yet stepped
  if (e.run) {
    std::lock_guard<std::mutex> lock(e.run->mu);
    begun = !e.run->stepped;
  }
  if (begun) {
    StepRun& r = *e.run;
    {
      std::lock_guard<std::mutex> lock(r.mu);
      if (!r.closed) {
        return Status(StatusCode::kFailedPrecondition,
                      "step() during backward: call end_backward() first");
      }
      r.stepped = true;
      if (!r.gate) {
        r.gate = true;
        r.grad_mul = grad_mul;
      }
      r.cv.notify_all();
    }
  } else {
    STRATA_RETURN_IF_ERROR(e.sync(/*keep_carried=*/true));
    STRATA_RETURN_IF_ERROR(check_usable(e.error, e.closed));
    e.start_run(/*gate=*/true, grad_mul, /*collect_stats=*/false, /*backward_running=*/false);
    StepRun& r = *e.run;
    std::lock_guard<std::mutex> lock(r.mu);
    r.stepped = true;
    for (uint32_t sg = 0; sg < r.queued.size(); ++sg) {
      r.queued[sg] = 1;
      r.order.push_back(sg);
    }
    r.closed = true;
    r.cv.notify_all();
  }
  Status st = e.wait_updates();
  if (!st.ok()) {
    return e.sync();
  }
  return Status::Ok();
}

Status Engine::cancel_step() {
  Impl& e = *impl_;
  if (!e.run) {
    return Status::Ok();
  }
  {
    std::lock_guard<std::mutex> lock(e.run->mu);
    if (e.run->gate && e.run->updates_done) {
      return Status(StatusCode::kFailedPrecondition, "cancel_step after the updates ran");
    }
    e.run->cancel = true;
    e.run->cv.notify_all();
  }
  Status st = e.sync();
  for (auto& c : e.step_counts) {
    --c;
  }
  return st;
}

Status Engine::sync() { return impl_->sync(/*keep_carried=*/true); }

Result<kernels::GradStats> Engine::grad_stats() {
  Impl& e = *impl_;
  std::vector<kernels::GradStats> per(e.plan.subgroups.size());
  bool have = false;
  if (e.run) {
    std::unique_lock<std::mutex> lock(e.run->mu);
    // Only a run not yet stepped holds this step's statistics: a stepped one
    // stays until the next run starts, and a plain backward after it wrote new
    // gradients into the arena.
    if (e.run->collect_stats && !e.run->stepped) {
      if (!e.run->closed) {
        return Status(StatusCode::kFailedPrecondition,
                      "grad_stats() during backward: call end_backward() first");
      }
      e.run->cv.wait(lock, [&] { return e.run->stats_done == per.size() || e.run->updates_done; });
      if (e.run->stats_done == per.size()) {
        per = e.run->stats;
        have = true;
      }
    }
  }
  if (!have) {
    for (const auto& sg : e.plan.subgroups) {
      per[sg.id] = kernels::grad_stats(e.grad_ptr(sg), sg.grad_dtype, sg.numel, e.threads.get());
    }
  }
  kernels::GradStats total;  // fixed order: sub-group id
  for (const auto& g : per) {
    total.sum_sq += g.sum_sq;
    total.nonfinite = total.nonfinite || g.nonfinite;
  }
  return total;
}

Status Engine::read_param_states(size_t param, const std::vector<float*>& bufs) {
  Impl& e = *impl_;
  STRATA_RETURN_IF_ERROR(e.sync());
  Impl::UnpackedScope unpacked_scope{&e};
  if (param >= e.opts.params.size()) {
    return invalid_argument("read_param_state: no parameter " + std::to_string(param));
  }
  for (uint32_t id : e.subgroups_of_param[param]) {
    const SubGroup& sg = e.plan.subgroups[id];
    if (bufs.size() > size_t(e.slots[size_t(sg.group)])) {
      return invalid_argument("read_param_state: slot " + std::to_string(bufs.size() - 1) +
                              " out of range (" + std::to_string(e.slots[size_t(sg.group)]) +
                              " slots)");
    }
    STRATA_ASSIGN_OR_RETURN(float* stored, e.get_record(sg));
    STRATA_ASSIGN_OR_RETURN(float* rec, e.unpack(sg, stored));
    for (const auto& seg : sg.segments) {
      if (seg.param != param) {
        continue;
      }
      for (size_t k = 0; k < bufs.size(); ++k) {
        if (bufs[k]) {
          std::memcpy(bufs[k] + seg.param_offset, rec + k * sg.slot_stride + seg.offset,
                      seg.numel * 4);
        }
      }
    }
  }
  return Status::Ok();
}

Status Engine::write_param_states(size_t param, const std::vector<const float*>& bufs) {
  Impl& e = *impl_;
  STRATA_RETURN_IF_ERROR(e.sync());
  Impl::UnpackedScope unpacked_scope{&e};
  if (param >= e.opts.params.size()) {
    return invalid_argument("write_param_state: no parameter " + std::to_string(param));
  }
  for (uint32_t id : e.subgroups_of_param[param]) {
    const SubGroup& sg = e.plan.subgroups[id];
    if (bufs.size() > size_t(e.slots[size_t(sg.group)])) {
      return invalid_argument("write_param_state: slot " + std::to_string(bufs.size() - 1) +
                              " out of range (" + std::to_string(e.slots[size_t(sg.group)]) +
                              " slots)");
    }
    STRATA_ASSIGN_OR_RETURN(float* stored, e.record_for_write(sg));
    STRATA_ASSIGN_OR_RETURN(float* rec, e.unpack(sg, stored));
    for (size_t si = 0; si < sg.segments.size(); ++si) {
      const auto& seg = sg.segments[si];
      if (seg.param != param) {
        continue;
      }
      for (size_t k = 0; k < bufs.size(); ++k) {
        if (bufs[k]) {
          std::memcpy(rec + k * sg.slot_stride + seg.offset, bufs[k] + seg.param_offset,
                      seg.numel * 4);
          e.note_written(sg, si, k);
        }
      }
    }
    STRATA_RETURN_IF_ERROR(e.pack(sg, rec, stored));
    STRATA_RETURN_IF_ERROR(e.put_record(sg, stored));
    e.note_record_stored(sg);
  }
  e.scratch.reset();
  e.scratch_of = -1;
  return Status::Ok();
}

Status Engine::read_param_state(size_t param, int slot, float* out) {
  if (slot < 0 || slot >= 4) {
    return invalid_argument("read_param_state: slot " + std::to_string(slot) + " out of range");
  }
  std::vector<float*> bufs(size_t(slot) + 1, nullptr);
  bufs[size_t(slot)] = out;
  return read_param_states(param, bufs);
}

Status Engine::write_param_state(size_t param, int slot, const float* in) {
  if (slot < 0 || slot >= 4) {
    return invalid_argument("write_param_state: slot " + std::to_string(slot) + " out of range");
  }
  std::vector<const float*> bufs(size_t(slot) + 1, nullptr);
  bufs[size_t(slot)] = in;
  return write_param_states(param, bufs);
}

// The walk behind read_records / write_records: resident records in place,
// the others through the working buffers as a ring — record i uses buffer
// i % nb, whose previous record's store is waited for only when the buffer
// is reused, and fetches run nb - 1 records ahead of the visitor.
Status Engine::Impl::walk_records(const std::vector<size_t>& params, bool write, bool overwrite,
                                  const RecordVisitor& visit) {
  STRATA_RETURN_IF_ERROR(sync());
  const char* what = write ? "write_records" : "read_records";
  std::vector<uint8_t> wanted(opts.params.size(), params.empty() ? 1 : 0);
  for (size_t p : params) {
    if (p >= opts.params.size()) {
      return invalid_argument(std::string(what) + ": no parameter " + std::to_string(p) + " (" +
                              std::to_string(opts.params.size()) + " parameters)");
    }
    wanted[p] = 1;
  }
  // The records to visit, in tier order (resident first: no I/O).
  std::vector<uint32_t> ids;
  for (const auto& sg : plan.subgroups) {
    for (const auto& seg : sg.segments) {
      if (wanted[seg.param]) {
        ids.push_back(sg.id);
        break;
      }
    }
  }
  auto key = [&](uint32_t id) {
    const SubGroup& sg = plan.subgroups[id];
    Tier* t = tier_of(sg);
    return std::make_tuple(!t->resident(), int(sg.tier), t->record_offset(handles[id]), id);
  };
  std::sort(ids.begin(), ids.end(), [&](uint32_t a, uint32_t b) { return key(a) < key(b); });
  auto make_view = [&](const SubGroup& sg, float* rec, bool* covers_all) {
    RecordView v;
    v.subgroup = sg.id;
    v.data = rec;
    v.slot_stride = sg.slot_stride;
    v.slots = slots[size_t(sg.group)];
    bool all = true;
    for (const auto& seg : sg.segments) {
      if (wanted[seg.param]) {
        v.slices.push_back({seg.param, seg.param_offset, seg.offset, seg.numel});
      } else {
        all = false;
      }
    }
    if (covers_all) {
      *covers_all = all;
    }
    return v;
  };
  auto after_write = [&](const SubGroup& sg) {
    for (size_t si = 0; si < sg.segments.size(); ++si) {
      if (wanted[sg.segments[si].param]) {
        for (int k = 0; k < slots[size_t(sg.group)]; ++k) {
          note_written(sg, si, size_t(k));
        }
      }
    }
  };
  // The visitor sees fp32 slots: a compressed record is decoded first and,
  // for writes, encoded back before it is stored.
  auto run_visitor = [&](const RecordView& stored_view) -> Status {
    const SubGroup& sg = plan.subgroups[stored_view.subgroup];
    RecordView v = stored_view;
    Status st = Status::Ok();
    auto fp32 = unpack(sg, stored_view.data);
    if (!fp32.ok()) {
      st = fp32.status();
    } else {
      v.data = fp32.value();
      st = visit(v);
      if (st.ok() && write) {
        st = pack(sg, v.data, stored_view.data);
      }
    }
    if (!st.ok()) {
      return st.with_context(std::string(what) + ", sub-group " + std::to_string(v.subgroup));
    }
    return Status::Ok();
  };
  UnpackedScope unpacked_scope{this};
  std::vector<uint32_t> ring;  // records that go through the working buffers
  for (uint32_t id : ids) {
    const SubGroup& sg = plan.subgroups[id];
    Tier* tier = tier_of(sg);
    if (!tier->resident()) {
      ring.push_back(id);
      continue;
    }
    if (!write || !overwrite) {
      STRATA_RETURN_IF_ERROR(check_readable(sg));
    }
    bool all = false;
    RecordView v = make_view(sg, tier->data(handles[id]), &all);
    if (write && (lost.empty() || !lost[id] ? false : !rewrite_started[id])) {
      std::memset(v.data, 0, sg.record_bytes);  // a lost record's old contents are unknown
      rewrite_started[id] = 1;
    }
    STRATA_RETURN_IF_ERROR(run_visitor(v));
    if (write) {
      after_write(sg);
      note_record_stored(sg);
    }
  }
  if (ring.empty()) {
    return Status::Ok();
  }
  if (work.empty()) {
    return Status(StatusCode::kInternal, std::string(what) + ": no working buffers");
  }
  const size_t nb = work.size();
  struct Slot {
    Tier* tier = nullptr;
    TierTicket ticket = 0;
    bool fetching = false;
  };
  std::vector<Slot> inflight(nb);
  auto settle = [&](size_t b) -> Status {
    Slot& s = inflight[b];
    Status st = Status::Ok();
    if (s.tier) {
      st = s.tier->wait(s.ticket);
    }
    s = Slot{};
    return st;
  };
  auto drain_all = [&]() {
    for (size_t b = 0; b < nb; ++b) {
      settle(b).ignore();
    }
  };
  // Puts record i into its buffer: a fetch submitted, or a fresh record
  // (write with overwrite of the whole record, or a lost record's first
  // rewrite) zeroed. Waits for the buffer's previous store first.
  auto prepare = [&](size_t i) -> Status {
    const size_t b = i % nb;
    STRATA_RETURN_IF_ERROR(settle(b));
    const SubGroup& sg = plan.subgroups[ring[i]];
    Tier* tier = tier_of(sg);
    bool all = false;
    make_view(sg, nullptr, &all);
    const bool is_lost = !lost.empty() && lost[sg.id];
    bool fresh = write && overwrite && all;
    if (write && is_lost && !rewrite_started[sg.id]) {
      fresh = true;
      rewrite_started[sg.id] = 1;
    }
    if (fresh) {
      std::memset(work[b].data(), 0, sg.record_bytes);
      return Status::Ok();
    }
    if (!write) {
      STRATA_RETURN_IF_ERROR(check_readable(sg));
    }
    STRATA_ASSIGN_OR_RETURN(TierTicket t, tier->submit_fetch(handles[sg.id], work[b].data()));
    inflight[b] = {tier, t, true};
    return Status::Ok();
  };
  Status st = Status::Ok();
  const size_t ahead = nb > 1 ? nb - 1 : 1;
  for (size_t i = 0; i < ring.size() && i < ahead && st.ok(); ++i) {
    st = prepare(i);
  }
  for (size_t i = 0; i < ring.size() && st.ok(); ++i) {
    if (i + ahead < ring.size() && ahead == nb - 1) {
      st = prepare(i + ahead);  // the buffer of record i - 1, whose store was submitted last
      if (!st.ok()) {
        break;
      }
    }
    const size_t b = i % nb;
    if (inflight[b].fetching) {
      st = settle(b);
      if (!st.ok()) {
        break;
      }
    }
    const SubGroup& sg = plan.subgroups[ring[i]];
    RecordView v = make_view(sg, work[b].as<float>(), nullptr);
    st = run_visitor(v);
    if (!st.ok()) {
      break;
    }
    if (write) {
      after_write(sg);
      auto t = tier_of(sg)->submit_store(handles[sg.id], work[b].data());
      if (!t.ok()) {
        st = t.status();
        break;
      }
      inflight[b] = {tier_of(sg), t.value(), false};
      note_record_stored(sg);
    }
    if (nb == 1 && i + 1 < ring.size()) {
      st = prepare(i + 1);
    }
  }
  if (!st.ok()) {
    drain_all();
    return st;
  }
  for (size_t b = 0; b < nb; ++b) {
    Status s2 = settle(b);
    if (st.ok() && !s2.ok()) {
      st = s2.with_context(std::string(what) + ": storing a record");
    }
  }
  return st;
}

Status Engine::read_records(const std::vector<size_t>& params, const RecordVisitor& visit) {
  return impl_->walk_records(params, false, false, visit);
}

Status Engine::write_records(const std::vector<size_t>& params, bool overwrite,
                             const RecordVisitor& visit) {
  return impl_->walk_records(params, true, overwrite, visit);
}

size_t Engine::param_count() const { return impl_->opts.params.size(); }
size_t Engine::param_numel(size_t param) const {
  return size_t(impl_->opts.params.at(param).numel);
}
int Engine::param_slots(size_t param) const {
  const Impl& e = *impl_;
  return e.slots.at(size_t(e.opts.params.at(param).group));
}

Status Engine::copy_state_from(Engine& src_engine, const std::vector<StateCopy>& copies) {
  Impl& dst = *impl_;
  Impl& src = *src_engine.impl_;
  if (&src == &dst) {
    return invalid_argument("copy_state_from: an engine cannot copy from itself");
  }
  STRATA_RETURN_IF_ERROR(src.sync().with_context("copy_state_from: the source engine"));
  std::vector<const StateCopy*> by_dst(dst.opts.params.size(), nullptr);
  std::vector<size_t> params;
  bool whole = true;
  for (const auto& c : copies) {
    if (c.dst_param >= dst.opts.params.size() || c.src_param >= src.opts.params.size()) {
      return invalid_argument("copy_state_from: parameter " + std::to_string(c.dst_param) + " <- " +
                              std::to_string(c.src_param) + " out of range");
    }
    if (dst.opts.params[c.dst_param].numel != src.opts.params[c.src_param].numel) {
      return invalid_argument("copy_state_from: " + dst.opts.params[c.dst_param].name + " has " +
                              std::to_string(dst.opts.params[c.dst_param].numel) +
                              " elements, its source " +
                              std::to_string(src.opts.params[c.src_param].numel));
    }
    if (c.first_slot > 0 ||
        param_slots(c.dst_param) != src.slots.at(size_t(src.opts.params[c.src_param].group))) {
      whole = false;  // some slots keep their fresh contents: fetch those records
    }
    by_dst[c.dst_param] = &c;
    params.push_back(c.dst_param);
  }
  if (params.empty()) {
    return Status::Ok();
  }
  // Source records through the source's working buffers, least recently used
  // out; resident records in place.
  struct Cached {
    uint32_t sg = UINT32_MAX;
    uint64_t used = 0;
  };
  std::vector<Cached> cache(src.work.size());
  uint64_t clock = 0;
  auto raw_record = [&](uint32_t id) -> Result<const float*> {
    const SubGroup& sg = src.plan.subgroups[id];
    STRATA_RETURN_IF_ERROR(src.check_readable(sg));
    Tier* t = src.tier_of(sg);
    if (t->resident()) {
      return static_cast<const float*>(t->data(src.handles[id]));
    }
    if (cache.empty()) {
      return Status(StatusCode::kInternal, "copy_state_from: the source has no working buffers");
    }
    size_t victim = 0;
    for (size_t b = 0; b < cache.size(); ++b) {
      if (cache[b].sg == id) {
        cache[b].used = ++clock;
        return static_cast<const float*>(src.work[b].as<float>());
      }
      if (cache[b].used < cache[victim].used) {
        victim = b;
      }
    }
    cache[victim] = {UINT32_MAX, 0};
    STRATA_RETURN_IF_ERROR(t->fetch(src.handles[id], src.work[victim].data()));
    cache[victim] = {id, ++clock};
    return static_cast<const float*>(src.work[victim].as<float>());
  };
  // A compressed source record is decoded once while consecutive pieces
  // come from it (into the source's own fp32 scratch).
  int64_t decoded = -1;
  auto src_record = [&](uint32_t id) -> Result<const float*> {
    const SubGroup& sg = src.plan.subgroups[id];
    if (sg.compressed && decoded == int64_t(id)) {
      return static_cast<const float*>(src.unpacked.data());
    }
    STRATA_ASSIGN_OR_RETURN(const float* raw, raw_record(id));
    if (!sg.compressed) {
      return raw;
    }
    decoded = -1;
    STRATA_ASSIGN_OR_RETURN(float* fp32, src.unpack(sg, const_cast<float*>(raw)));
    decoded = int64_t(id);
    return static_cast<const float*>(fp32);
  };
  Impl::UnpackedScope source_unpacked_scope{&src};
  return dst.walk_records(params, true, whole, [&](const RecordView& v) -> Status {
    for (const auto& s : v.slices) {
      const StateCopy& c = *by_dst[s.param];
      const int nslots =
          std::min(v.slots, src.slots.at(size_t(src.opts.params[c.src_param].group)));
      // The source pieces overlapping [param_offset, param_offset + numel).
      for (uint32_t id : src.subgroups_of_param[c.src_param]) {
        const SubGroup& sg = src.plan.subgroups[id];
        for (const auto& seg : sg.segments) {
          if (seg.param != c.src_param) {
            continue;
          }
          const size_t a = std::max(seg.param_offset, s.param_offset);
          const size_t e = std::min(seg.param_offset + seg.numel, s.param_offset + s.numel);
          if (a >= e) {
            continue;
          }
          STRATA_ASSIGN_OR_RETURN(const float* rec, src_record(id));
          for (int k = c.first_slot; k < nslots; ++k) {
            std::memcpy(v.data + size_t(k) * v.slot_stride + s.record_offset + (a - s.param_offset),
                        rec + size_t(k) * sg.slot_stride + seg.offset + (a - seg.param_offset),
                        (e - a) * sizeof(float));
          }
        }
      }
    }
    return Status::Ok();
  });
}

Status Engine::read_record(uint32_t subgroup, float* out) {
  Impl& e = *impl_;
  STRATA_RETURN_IF_ERROR(e.sync());
  if (subgroup >= e.plan.subgroups.size()) {
    return invalid_argument("read_record: no sub-group " + std::to_string(subgroup));
  }
  const SubGroup& sg = e.plan.subgroups[subgroup];
  STRATA_ASSIGN_OR_RETURN(float* rec, e.get_record(sg));
  std::memcpy(out, rec, sg.record_bytes);
  return Status::Ok();
}

std::vector<Engine::RecordLocation> Engine::record_locations() const {
  const Impl& e = *impl_;
  std::vector<RecordLocation> out;
  for (const auto& sg : e.plan.subgroups) {
    const Tier* t = e.tiers.at(sg.tier).get();
    out.push_back({sg.tier, t->location(), t->record_offset(e.handles[sg.id]), sg.record_bytes});
  }
  return out;
}

Status Engine::sync_master_from_params() {
  Impl& e = *impl_;
  STRATA_RETURN_IF_ERROR(e.sync());
  Impl::UnpackedScope unpacked_scope{&e};
  for (const auto& sg : e.plan.subgroups) {
    STRATA_ASSIGN_OR_RETURN(float* stored, e.record_for_write(sg));
    STRATA_ASSIGN_OR_RETURN(float* rec, e.unpack(sg, stored));
    for (size_t si = 0; si < sg.segments.size(); ++si) {
      const auto& seg = sg.segments[si];
      const ParamInfo& p = e.opts.params[seg.param];
      STRATA_ASSIGN_OR_RETURN(const char* base, e.param_source(seg.param));
      if (base == nullptr) {
        continue;
      }
      const char* src = base + seg.param_offset * kernels::dtype_size(p.dtype);
      STRATA_RETURN_IF_ERROR(
          kernels::cast_to_f32(src, p.dtype, rec + seg.offset, seg.numel, e.threads.get()));
      e.note_written(sg, si, 0);
    }
    STRATA_RETURN_IF_ERROR(e.pack(sg, rec, stored));
    STRATA_RETURN_IF_ERROR(e.put_record(sg, stored));
    e.note_record_stored(sg);
  }
  e.scratch.reset();
  e.scratch_of = -1;
  return Status::Ok();
}

int64_t Engine::step_count(int group) const { return impl_->step_counts.at(size_t(group)); }
Status Engine::set_step_count(int group, int64_t step) {
  Impl& e = *impl_;
  if (group < 0 || size_t(group) >= e.step_counts.size()) {
    return invalid_argument("set_step_count: no param group " + std::to_string(group));
  }
  // No run may be in flight: its pipeline thread reads step_counts.
  STRATA_RETURN_IF_ERROR(e.sync().with_context("set_step_count"));
  e.step_counts[size_t(group)] = step;
  return Status::Ok();
}
Status Engine::clear_error() {
  Impl& e = *impl_;
  for (size_t id = 0; id < e.lost.size(); ++id) {
    if (e.lost[id]) {
      return Status(StatusCode::kFailedPrecondition,
                    "cannot resume: the state of sub-group " + std::to_string(id) +
                        " was not fully reloaded after the failed step (" + e.error.message() +
                        ")");
    }
  }
  e.lost.clear();
  e.error = Status::Ok();
  return Status::Ok();
}
const Status& Engine::error() const { return impl_->error; }
Trace& Engine::trace() { return impl_->trace; }

void Engine::record_phase(EventKind kind, int64_t start_ns, int64_t end_ns) {
  Impl& e = *impl_;
  bool stepped = false;
  {
    std::lock_guard<std::mutex> run_lock(e.run_mu);
    if (e.run) {
      std::lock_guard<std::mutex> lock(e.run->mu);
      stepped = e.run->stepped;
    }
  }
  // After step() of a run not yet synced, the next step's phase.
  e.trace.record({kind, int64_t(e.steps) + (stepped ? 1 : 0), -1, "", 0, start_ns, end_ns});
}

EngineStats Engine::stats() const {
  const Impl& e = *impl_;
  EngineStats s;
  s.steps = e.steps;
  for (const auto& [k, t] : e.tiers) {
    auto ts = t->stats();
    if (!t->resident()) {
      s.bytes_fetched += ts.bytes_fetched;
      s.bytes_stored += ts.bytes_stored;
    }
    if (k == TierKind::kNvme) {
      s.swap_file_bytes = ts.bytes;
      s.swap_file_path = t->location();
    }
  }
  s.bytes_fetched -= e.dropped_fetch_bytes;
  s.bytes_prefetched_unused = e.dropped_fetch_bytes;
  s.records_verified_in_backward = e.verified_in_backward.load(std::memory_order_relaxed);
  if (e.io) {
    auto is = e.io->stats();
    s.io_bytes_read = is.bytes_read;
    s.io_bytes_written = is.bytes_written;
    s.io_backend = e.io->backend_name();
    s.io_note = e.io->backend_note();
  }
  if (e.pool) {
    auto ps = e.pool->stats();
    s.pool_reserved = ps.reserved;
    s.pool_requested = ps.requested;
    s.pool_peak = ps.peak_in_use;
    s.pool_pinned = ps.pinned;
  }
  s.registered_buffers = e.registered_buffers;
  s.unregistered_buffers = e.unregistered_buffers;
  s.isa = kernels::isa_name(kernels::detect_isa());
  s.threads = e.threads ? e.threads->size() : 0;
  return s;
}

Status Engine::close() { return impl_->close(); }

}  // namespace strata::engine
