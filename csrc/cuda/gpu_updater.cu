// GpuUpdater: K device buffers, three streams (h2d, compute, d2h) ordered by
// events; see strata/cuda/gpu_updater.h for the pipeline.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <strata/cuda/gpu_updater.h>

#include "cuda/adam_launch.h"
#include "cuda/cuda_util.h"

namespace strata::cuda {
namespace {

using detail::EventHandle;
using detail::Seg;

constexpr size_t kAlign = 256;  // bytes; cudaMalloc's own alignment

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// One device buffer and the events of the job that last used it:
//   [slot 0 | slot 1 | slot 2 | (slot 3) | grad | segment table]
struct Buffer {
  float* slot[4] = {nullptr, nullptr, nullptr, nullptr};
  void* grad = nullptr;
  Seg* segs = nullptr;
  Seg* staging = nullptr;  // pinned host copy of the segment table
  EventHandle h2d_start, h2d_done, kernel_start, kernel_done, d2h_start, d2h_done;
  EventHandle after;              // recorded on the job's after_stream
  GpuUpdater::Ticket ticket = 0;  // last job that used it (0: none yet)
};

class GpuUpdaterImpl final : public GpuUpdater {
 public:
  explicit GpuUpdaterImpl(const GpuUpdaterOptions& o) : options_(o) {}

  ~GpuUpdaterImpl() override {
    // Nothing may be freed while a copy or kernel still uses it.
    if (h2d_.get() != nullptr) {
      (void)cudaSetDevice(options_.device);
      (void)cudaStreamSynchronize(h2d_.get());
      (void)cudaStreamSynchronize(compute_.get());
      (void)cudaStreamSynchronize(d2h_.get());
    }
  }

  Status init() {
    const GpuUpdaterOptions& o = options_;
    STRATA_RETURN_IF_ERROR(detail::use_device(o.device, "GpuUpdater"));
    if (o.max_elements == 0 || o.buffers < 1 || !valid_elem_type(o.max_grad_type)) {
      return invalid_argument("GpuUpdater: max_elements must be > 0, buffers >= 1 (got " +
                              std::to_string(o.max_elements) + ", " + std::to_string(o.buffers) +
                              ")");
    }
    slots_ = o.amsgrad ? 4 : 3;
    max_segs_ = 2 * o.max_copy_out + 1;
    slot_bytes_ = round_up(o.max_elements * sizeof(float), kAlign);
    grad_bytes_ = round_up(o.max_elements * elem_size(o.max_grad_type), kAlign);
    seg_bytes_ = round_up(max_segs_ * sizeof(Seg), kAlign);
    const size_t per_buffer = slots_ * slot_bytes_ + grad_bytes_ + seg_bytes_;
    STRATA_RETURN_IF_ERROR(detail::alloc_device(&device_, per_buffer * o.buffers, "GpuUpdater"));
    STRATA_RETURN_IF_ERROR(detail::alloc_pinned(&staging_, seg_bytes_ * o.buffers, "GpuUpdater"));
    STRATA_RETURN_IF_ERROR(detail::make_stream(&h2d_, "GpuUpdater"));
    STRATA_RETURN_IF_ERROR(detail::make_stream(&compute_, "GpuUpdater"));
    STRATA_RETURN_IF_ERROR(detail::make_stream(&d2h_, "GpuUpdater"));
    stats_.device_bytes = per_buffer * o.buffers;
    buffers_.resize(o.buffers);
    auto* base = static_cast<unsigned char*>(device_.get());
    auto* stage = static_cast<unsigned char*>(staging_.get());
    for (int b = 0; b < o.buffers; ++b) {
      Buffer& buf = buffers_[b];
      unsigned char* p = base + size_t(b) * per_buffer;
      for (int s = 0; s < slots_; ++s) {
        buf.slot[s] = reinterpret_cast<float*>(p + s * slot_bytes_);
      }
      buf.grad = p + slots_ * slot_bytes_;
      buf.segs = reinterpret_cast<Seg*>(p + slots_ * slot_bytes_ + grad_bytes_);
      buf.staging = reinterpret_cast<Seg*>(stage + size_t(b) * seg_bytes_);
      for (EventHandle* e : {&buf.h2d_start, &buf.h2d_done, &buf.kernel_start, &buf.kernel_done,
                             &buf.d2h_start, &buf.d2h_done}) {
        STRATA_RETURN_IF_ERROR(detail::make_event(e, true, "GpuUpdater"));
      }
      STRATA_RETURN_IF_ERROR(detail::make_event(&buf.after, false, "GpuUpdater"));
    }
    return Status::Ok();
  }

  Result<Ticket> submit(const GpuJob& job) override {
    STRATA_RETURN_IF_ERROR(error_.st);
    STRATA_RETURN_IF_ERROR(check(job));
    detail::LaunchPlan plan;
    STRATA_RETURN_IF_ERROR(detail::plan_launch(job.n, job.copy_out, job.copy_out_count, &plan));
    if (plan.segments() > max_segs_) {
      return invalid_argument("GpuUpdater::submit: " + std::to_string(job.copy_out_count) +
                              " copy-out ranges need " + std::to_string(plan.segments()) +
                              " segments, more than max_copy_out allows");
    }
    Status st = enqueue(job, plan);
    if (!st.ok()) {
      // A stream may hold half a job; nothing after it can be trusted.
      return fail(std::move(st));
    }
    return last_;
  }

  Status wait(Ticket t) override {
    STRATA_RETURN_IF_ERROR(error_.st);
    STRATA_RETURN_IF_ERROR(check_ticket(t, "wait"));
    if (t <= completed_) {
      return Status::Ok();
    }
    STRATA_RETURN_IF_ERROR(detail::use_device(options_.device, "GpuUpdater::wait"));
    // If the buffer was reused, its event belongs to a later job, whose
    // completion implies this one's (one d2h stream, in order).
    const cudaError_t e = cudaEventSynchronize(buffer_of(t).d2h_done.get());
    if (e != cudaSuccess) {
      return fail(detail::cuda_status(e, "GpuUpdater::wait: job " + std::to_string(t)));
    }
    completed_ = std::max(completed_, buffer_of(t).ticket);
    return Status::Ok();
  }

  Status wait_all() override {
    if (last_ == 0) {
      return error_.st;
    }
    return wait(last_);
  }

  Result<bool> done(Ticket t) override {
    STRATA_RETURN_IF_ERROR(error_.st);
    STRATA_RETURN_IF_ERROR(check_ticket(t, "done"));
    if (t <= completed_) {
      return true;
    }
    STRATA_RETURN_IF_ERROR(detail::use_device(options_.device, "GpuUpdater::done"));
    const cudaError_t e = cudaEventQuery(buffer_of(t).d2h_done.get());
    if (e == cudaErrorNotReady) {
      return false;
    }
    if (e != cudaSuccess) {
      return fail(detail::cuda_status(e, "GpuUpdater::done: job " + std::to_string(t)));
    }
    completed_ = std::max(completed_, buffer_of(t).ticket);
    return true;
  }

  Status stream_wait(Ticket t, void* stream) override {
    STRATA_RETURN_IF_ERROR(error_.st);
    STRATA_RETURN_IF_ERROR(check_ticket(t, "stream_wait"));
    STRATA_RETURN_IF_ERROR(detail::use_device(options_.device, "GpuUpdater::stream_wait"));
    STRATA_CUDA_CHECK(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), buffer_of(t).kernel_done.get(), 0),
        "GpuUpdater::stream_wait: cudaStreamWaitEvent");
    return Status::Ok();
  }

  Result<GpuJobTimes> job_times(Ticket t) override {
    STRATA_RETURN_IF_ERROR(check_ticket(t, "job_times"));
    Buffer& b = buffer_of(t);
    if (b.ticket != t) {
      return Status(StatusCode::kNotFound, "GpuUpdater::job_times: job " + std::to_string(t) +
                                               "'s buffer was reused by job " +
                                               std::to_string(b.ticket));
    }
    STRATA_RETURN_IF_ERROR(wait(t));
    GpuJobTimes out;
    STRATA_CUDA_CHECK(cudaEventElapsedTime(&out.h2d_ms, b.h2d_start.get(), b.h2d_done.get()),
                      "GpuUpdater::job_times");
    STRATA_CUDA_CHECK(
        cudaEventElapsedTime(&out.kernel_ms, b.kernel_start.get(), b.kernel_done.get()),
        "GpuUpdater::job_times");
    STRATA_CUDA_CHECK(cudaEventElapsedTime(&out.d2h_ms, b.d2h_start.get(), b.d2h_done.get()),
                      "GpuUpdater::job_times");
    STRATA_CUDA_CHECK(cudaEventElapsedTime(&out.total_ms, b.h2d_start.get(), b.d2h_done.get()),
                      "GpuUpdater::job_times");
    return out;
  }

  const GpuUpdaterOptions& options() const override { return options_; }
  GpuUpdaterStats stats() const override { return stats_; }

 private:
  Buffer& buffer_of(Ticket t) { return buffers_[(t - 1) % buffers_.size()]; }

  Status check_ticket(Ticket t, const char* what) const {
    if (t == 0 || t > last_) {
      return invalid_argument(std::string("GpuUpdater::") + what + ": no job " + std::to_string(t) +
                              " (jobs 1.." + std::to_string(last_) + " were submitted)");
    }
    return Status::Ok();
  }

  // Remembers the first failure; every later call returns it.
  Status fail(Status st) {
    if (error_.st.ok()) {
      error_ = Sticky{
          Status(StatusCode::kFailedPrecondition, "GpuUpdater: failed earlier: " + st.message())};
    }
    return st;
  }

  Status check(const GpuJob& job) const {
    const char* what = "GpuUpdater::submit";
    STRATA_RETURN_IF_ERROR(detail::check_step(what, job.consts, job.host_slot, job.n, job.grad,
                                              job.grad_type, job.copy_out, job.copy_out_count,
                                              job.param_type));
    if (job.n > options_.max_elements) {
      return invalid_argument(std::string(what) + ": n = " + std::to_string(job.n) +
                              " exceeds max_elements = " + std::to_string(options_.max_elements));
    }
    if (job.consts.amsgrad && !options_.amsgrad) {
      return invalid_argument(std::string(what) +
                              ": amsgrad job on an updater created without amsgrad");
    }
    if (!job.grad_on_device && elem_size(job.grad_type) > elem_size(options_.max_grad_type)) {
      return invalid_argument(std::string(what) + ": host gradients of " +
                              elem_type_name(job.grad_type) + " do not fit the " +
                              elem_type_name(options_.max_grad_type) + " gradient area");
    }
    if (job.copy_out_count > options_.max_copy_out) {
      return invalid_argument(
          std::string(what) + ": " + std::to_string(job.copy_out_count) +
          " copy-out ranges, max_copy_out = " + std::to_string(options_.max_copy_out));
    }
    return Status::Ok();
  }

  Status enqueue(const GpuJob& job, const detail::LaunchPlan& plan) {
    STRATA_RETURN_IF_ERROR(detail::use_device(options_.device, "GpuUpdater::submit"));
    const Ticket ticket = last_ + 1;
    Buffer& b = buffer_of(ticket);
    const bool reused = b.ticket != 0;
    const size_t slot_bytes = job.n * sizeof(float);
    const size_t grad_bytes = job.n * elem_size(job.grad_type);
    const size_t table_bytes = plan.segments() * sizeof(Seg);
    const std::string ctx = "GpuUpdater::submit job " + std::to_string(ticket);

    // The staging table of this buffer was last read by the H2D of job
    // ticket - K; that copy is long done in a running pipeline.
    if (reused) {
      STRATA_CUDA_CHECK(cudaEventSynchronize(b.h2d_done.get()), ctx + ": staging reuse");
    }
    std::copy(plan.update.begin(), plan.update.end(), b.staging);
    std::copy(plan.copy.begin(), plan.copy.end(), b.staging + plan.update.size());

    // H2D, after the buffer's previous D2H has drained it.
    cudaStream_t h2d = h2d_.get();
    if (reused) {
      STRATA_CUDA_CHECK(cudaStreamWaitEvent(h2d, b.d2h_done.get(), 0), ctx + ": wait d2h");
    }
    STRATA_CUDA_CHECK(cudaEventRecord(b.h2d_start.get(), h2d), ctx + ": record");
    const int slots = job.consts.amsgrad ? 4 : 3;
    if (job.n > 0) {
      for (int s = 0; s < slots; ++s) {
        STRATA_CUDA_CHECK(
            cudaMemcpyAsync(b.slot[s], job.host_slot[s], slot_bytes, cudaMemcpyHostToDevice, h2d),
            ctx + ": H2D slot " + std::to_string(s));
      }
      if (!job.grad_on_device) {
        STRATA_CUDA_CHECK(
            cudaMemcpyAsync(b.grad, job.grad, grad_bytes, cudaMemcpyHostToDevice, h2d),
            ctx + ": H2D grad");
      }
      STRATA_CUDA_CHECK(
          cudaMemcpyAsync(b.segs, b.staging, table_bytes, cudaMemcpyHostToDevice, h2d),
          ctx + ": H2D segment table");
    }
    STRATA_CUDA_CHECK(cudaEventRecord(b.h2d_done.get(), h2d), ctx + ": record");

    // The kernel, after its inputs arrived and after the caller's stream.
    cudaStream_t compute = compute_.get();
    STRATA_CUDA_CHECK(cudaStreamWaitEvent(compute, b.h2d_done.get(), 0), ctx + ": wait h2d");
    if (job.after_stream != nullptr) {
      STRATA_CUDA_CHECK(cudaEventRecord(b.after.get(), static_cast<cudaStream_t>(job.after_stream)),
                        ctx + ": record on after_stream");
      STRATA_CUDA_CHECK(cudaStreamWaitEvent(compute, b.after.get(), 0),
                        ctx + ": wait after_stream");
    }
    STRATA_CUDA_CHECK(cudaEventRecord(b.kernel_start.get(), compute), ctx + ": record");
    if (job.n > 0) {
      detail::RecordPtrs r;
      r.p = b.slot[0];
      r.m = b.slot[1];
      r.v = b.slot[2];
      r.vmax = job.consts.amsgrad ? b.slot[3] : nullptr;
      r.g = job.grad_on_device ? job.grad : b.grad;
      STRATA_RETURN_IF_ERROR(detail::launch_adam(job.consts, r, job.grad_type, job.param_type, plan,
                                                 b.segs, b.segs + plan.update.size(), compute));
    }
    STRATA_CUDA_CHECK(cudaEventRecord(b.kernel_done.get(), compute), ctx + ": record");

    // D2H of the updated state into the same host memory.
    cudaStream_t d2h = d2h_.get();
    STRATA_CUDA_CHECK(cudaStreamWaitEvent(d2h, b.kernel_done.get(), 0), ctx + ": wait kernel");
    STRATA_CUDA_CHECK(cudaEventRecord(b.d2h_start.get(), d2h), ctx + ": record");
    if (job.n > 0) {
      for (int s = 0; s < slots; ++s) {
        STRATA_CUDA_CHECK(
            cudaMemcpyAsync(job.host_slot[s], b.slot[s], slot_bytes, cudaMemcpyDeviceToHost, d2h),
            ctx + ": D2H slot " + std::to_string(s));
      }
    }
    STRATA_CUDA_CHECK(cudaEventRecord(b.d2h_done.get(), d2h), ctx + ": record");

    b.ticket = ticket;
    last_ = ticket;
    stats_.jobs += 1;
    stats_.elements += job.n;
    stats_.bytes_h2d += slots * slot_bytes + (job.grad_on_device ? 0 : grad_bytes) + table_bytes;
    stats_.bytes_d2h += slots * slot_bytes;
    return Status::Ok();
  }

  GpuUpdaterOptions options_;
  int slots_ = 3;
  size_t max_segs_ = 0;
  size_t slot_bytes_ = 0, grad_bytes_ = 0, seg_bytes_ = 0;
  detail::DeviceMemory device_;
  detail::PinnedHostMemory staging_;
  detail::StreamHandle h2d_, compute_, d2h_;
  std::vector<Buffer> buffers_;
  Ticket last_ = 0;       // last submitted
  Ticket completed_ = 0;  // every job <= completed_ is known complete
  // The first CUDA failure: the updater is unusable after it. (A wrapper:
  // nvcc warns about assigning a [[nodiscard]] class directly.)
  struct Sticky {
    Status st;
  } error_;
  GpuUpdaterStats stats_;
};

}  // namespace

Result<std::unique_ptr<GpuUpdater>> GpuUpdater::create(const GpuUpdaterOptions& options) {
  auto impl = std::make_unique<GpuUpdaterImpl>(options);
  STRATA_RETURN_IF_ERROR(impl->init());
  return std::unique_ptr<GpuUpdater>(std::move(impl));
}

}  // namespace strata::cuda
