// strata/cuda/gpu_rates.h — measured GPU rates: pinned host <-> device copy
// bandwidth, device-to-device copy bandwidth, and the CUDA Adam update
// rate, for the bench (strata-bench-gpu) and the performance model's
// calibration (issue 9: PCIe each way and the GPU update rate).
//
// Every timing is taken with CUDA events on one non-blocking stream, after
// one untimed warm-up, one event pair per repetition; best and median of the
// repetitions are reported. Bandwidths count bytes transferred once:
// host copies and device copies report bytes copied per second (a
// device-to-device copy of B bytes reads B and writes B: its memory traffic
// is 2B per copy — traffic_gbps() says so); the Adam update reports its own
// memory traffic (every byte read plus every byte written).
//
// Ownership: host buffers passed in are borrowed for the call; everything
//   allocated here is freed before returning.
// Units: bytes, seconds, GB/s = 1e9 bytes per second.
// Thread-safety: any thread; the calls make `device` current on the calling
//   thread and allocate their own streams, so they may run beside other work
//   (which then shares the bandwidth).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <strata/cuda/adam.h>
#include <strata/cuda/device.h>
#include <strata/status.h>

namespace strata::cuda {

struct Timing {
  double best_s = 0.0;    // fastest repetition, seconds
  double median_s = 0.0;  // median repetition, seconds
  int reps = 0;
};

enum class CopyKind : uint8_t { kHostToDevice, kDeviceToHost, kDeviceToDevice };

// Copies of `bytes` between `host` and a device buffer (kHostToDevice /
// kDeviceToHost), or between two device buffers (kDeviceToDevice; host
// unused). host == nullptr: a buffer from cudaHostAlloc is used (the
// reference pinned allocation). host memory that is not pinned is copied
// through the driver's staging buffers (slow, and that is what it shows).
Result<Timing> time_copy(int device, CopyKind kind, void* host, size_t bytes, int reps);

struct AdamBenchShape {
  size_t n = size_t(64) << 20;  // elements
  ElemType grad_type = ElemType::kF32;
  bool copy_out = false;  // write new params in param_type to a device buffer
  ElemType param_type = ElemType::kBF16;
  bool amsgrad = false;
  bool adamw = true;
};

// Bytes one step over `shape` reads plus writes, per element: p, m, v read
// and written (24), max_v read and written with amsgrad (+8), the gradient
// read, the copy-out written.
inline uint64_t adam_traffic_bytes(const AdamBenchShape& s) {
  return uint64_t(s.n) * (24u + (s.amsgrad ? 8u : 0u) + elem_size(s.grad_type) +
                          (s.copy_out ? elem_size(s.param_type) : 0u));
}

// The CUDA Adam step on state, gradients and copy-out already in device
// memory (random finite values), one launch per repetition.
Result<Timing> time_adam(int device, const AdamBenchShape& shape, int reps);

// What the performance model needs, measured in one call (a few hundred ms).
struct GpuRateOptions {
  int device = 0;
  size_t copy_bytes = size_t(256) << 20;
  void* host = nullptr;  // pinned host buffer of copy_bytes (the pool's); null: cudaHostAlloc
  size_t adam_elements = size_t(32) << 20;
  int reps = 5;
};

struct GpuRates {
  std::string device_name;
  double h2d_gbps = 0.0;           // pinned host -> device, bytes copied per second (best)
  double d2h_gbps = 0.0;           // device -> pinned host
  double d2d_gbps = 0.0;           // device -> device, bytes copied per second
  double adam_params_per_s = 0.0;  // AdamW, fp32 grads, no copy-out, state resident
  double adam_gbps = 0.0;          // its memory traffic (28 B/param) per second
  uint64_t free_memory = 0;        // bytes free on the device when measured
  uint64_t total_memory = 0;
};

Result<GpuRates> measure_gpu_rates(const GpuRateOptions& options);

// Bytes free and total on `device` (creates its context if needed).
struct GpuMemory {
  uint64_t free = 0, total = 0;
};
Result<GpuMemory> gpu_memory(int device);

#if !STRATA_CUDA_ENABLED

inline Result<Timing> time_copy(int, CopyKind, void*, size_t, int) {
  return cuda_not_compiled("time_copy");
}
inline Result<Timing> time_adam(int, const AdamBenchShape&, int) {
  return cuda_not_compiled("time_adam");
}
inline Result<GpuRates> measure_gpu_rates(const GpuRateOptions&) {
  return cuda_not_compiled("measure_gpu_rates");
}
inline Result<GpuMemory> gpu_memory(int) { return cuda_not_compiled("gpu_memory"); }

#endif

}  // namespace strata::cuda
