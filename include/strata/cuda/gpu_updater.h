// strata/cuda/gpu_updater.h — Adam/AdamW updates of host-resident
// sub-group records on the GPU: H2D → kernel → D2H, pipelined.
//
// The interleaved schedule (issue 9, Deep Optimizer States) updates every
// k-th sub-group on the GPU while the CPU updates the rest. For such a
// sub-group the record ([master | m | v (| max_v)] fp32, in pinned host
// memory) and its gradients travel to one of K device buffers, the CUDA Adam
// kernel updates it there and writes the new parameters straight into the
// model's device tensors (copy-out in bf16/fp16/fp32), and the updated record
// travels back into the same host memory:
//
//   h2d stream:      [wait d2h_done(b)] H2D slots, grad, segment table → h2d_done(b)
//   compute stream:  [wait h2d_done(b), after_stream] Adam kernel → kernel_done(b)
//   d2h stream:      [wait kernel_done(b)] D2H slots → d2h_done(b)
//
// Three streams, so job j+1's H2D overlaps job j's kernel and job j-1's D2H
// (PCIe is full duplex; H100/H200 have separate copy engines each way).
// Buffer b = (ticket - 1) % K is reused only after its D2H (a stream wait,
// not a host wait). Jobs complete in submission order.
//
// Results: the same bits as kernels::optimizer_step on the CPU scalar path
// (see adam.h), so a sub-group may move between CPU and GPU from step to
// step without changing the training run.
//
// Ownership: the updater owns its device buffers, streams and events. A
//   job's host slots, host gradients and copy-out destinations are borrowed
//   from submit() until wait() (or done()) reports the job complete; the
//   caller must not touch the host record in between. Host memory should be
//   pinned (the pool with install_cuda_pin_backend(), or cudaHostAlloc):
//   pageable memory works but its copies are synchronous and slow.
// Alignment: the element type's own; 4 KiB-aligned host records copy fastest.
// Units: elements, bytes.
// Thread-safety: one thread at a time drives an updater (like a tier's
//   pipeline); distinct updaters are independent.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include <strata/cuda/adam.h>
#include <strata/cuda/cuda_pin_backend.h>
#include <strata/cuda/device.h>
#include <strata/cuda/gpu_rates.h>
#include <strata/status.h>

namespace strata::cuda {

struct GpuUpdaterOptions {
  int device = 0;
  size_t max_elements = 0;  // largest record (elements per slot) a job may have; > 0
  bool amsgrad = false;     // reserve room for the max_v slot
  int buffers = 2;          // K device buffers (records in flight); >= 1
  ElemType max_grad_type = ElemType::kF32;  // sizes the device gradient area for host grads
  size_t max_copy_out = 4096;               // copy-out ranges per job
};

struct GpuJob {
  AdamStepConsts consts;  // adam_step_consts(hyper, args) in C++20 code
  float* host_slot[4] = {nullptr, nullptr, nullptr, nullptr};  // master, m, v, max_v
  size_t n = 0;                                                // elements per slot, <= max_elements
  const void* grad = nullptr;                                  // n elements of grad_type
  ElemType grad_type = ElemType::kF32;
  bool grad_on_device = false;             // grad is device memory: no H2D
  const CopyOutRange* copy_out = nullptr;  // dst: device memory (the model's tensors)
  size_t copy_out_count = 0;
  ElemType param_type = ElemType::kBF16;
  // A cudaStream_t whose work enqueued so far must finish before the kernel
  // runs (it produced the gradients, or still reads the parameters that
  // copy-out overwrites). nullptr: none.
  void* after_stream = nullptr;
};

// Stage durations of one job, from its CUDA events (milliseconds).
struct GpuJobTimes {
  float h2d_ms = 0.0f;
  float kernel_ms = 0.0f;
  float d2h_ms = 0.0f;
  float total_ms = 0.0f;  // start of H2D to end of D2H
};

struct GpuUpdaterStats {
  uint64_t jobs = 0;
  uint64_t elements = 0;
  uint64_t bytes_h2d = 0;
  uint64_t bytes_d2h = 0;
  uint64_t device_bytes = 0;  // device memory held (buffers)
};

class GpuUpdater {
 public:
  using Ticket = uint64_t;  // 1, 2, ... in submission order

  // Allocates K device buffers on options.device, three streams and their
  // events. Unavailable without CUDA or a device; InvalidArgument for bad
  // options; OutOfMemory when the buffers do not fit.
  static Result<std::unique_ptr<GpuUpdater>> create(const GpuUpdaterOptions& options);

  // Waits for every job, then frees the device resources.
  virtual ~GpuUpdater() = default;

  // Enqueues one job and returns at once (it waits on the host only for the
  // H2D of the job K places earlier, to reuse its segment-table staging).
  // InvalidArgument (nothing enqueued) for bad arguments; after a CUDA
  // failure every call returns FailedPrecondition with the first error.
  virtual Result<Ticket> submit(const GpuJob& job) = 0;

  // Blocks until job `ticket` is complete: its updated record is in host
  // memory and its copy-out written. Jobs complete in order, so this also
  // completes every earlier job.
  virtual Status wait(Ticket ticket) = 0;
  virtual Status wait_all() = 0;
  // Non-blocking: true when `ticket` is complete.
  virtual Result<bool> done(Ticket ticket) = 0;

  // Makes `stream` (a cudaStream_t, e.g. torch's current stream) wait on the
  // device, without blocking the host, until job `ticket`'s copy-out is
  // written, so the next forward reads the new parameters.
  virtual Status stream_wait(Ticket ticket, void* stream) = 0;

  // Stage times of a completed job; NotFound once its buffer was reused by a
  // later job (K jobs later).
  virtual Result<GpuJobTimes> job_times(Ticket ticket) = 0;

  virtual const GpuUpdaterOptions& options() const = 0;
  virtual GpuUpdaterStats stats() const = 0;
};

#if !STRATA_CUDA_ENABLED
inline Result<std::unique_ptr<GpuUpdater>> GpuUpdater::create(const GpuUpdaterOptions&) {
  return cuda_not_compiled("GpuUpdater");
}
#endif

}  // namespace strata::cuda
