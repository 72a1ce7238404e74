// Device discovery (device.h), the cudaHostRegister pin backend
// (cuda_pin_backend.h) and the rate measurements (gpu_rates.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <strata/cuda/cuda_pin_backend.h>
#include <strata/cuda/device.h>
#include <strata/cuda/gpu_rates.h>

#include "cuda/adam_math.h"
#include "cuda/cuda_util.h"

namespace strata::cuda {

// ------------------------------------------------------------------ devices
namespace {

std::string version_text(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

Status unavailable(const std::string& msg) { return Status(StatusCode::kUnavailable, msg); }

// The first CUDA calls of the process. With the static runtime and no
// driver, cudaGetDeviceCount fails (cudaErrorInsufficientDriver) and
// cudaDriverGetVersion reports 0: that is "no driver", not "driver too old".
Status probe_cuda() {
  int runtime = 0;
  (void)cudaRuntimeGetVersion(&runtime);
  int driver = 0;
  (void)cudaDriverGetVersion(&driver);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  (void)cudaGetLastError();  // do not leave the error for an unrelated later check
  if (e == cudaSuccess && count > 0) {
    return Status::Ok();
  }
  const std::string detail = "cudaGetDeviceCount: " + detail::cuda_error_text(e);
  if (driver == 0) {
    return unavailable("no CUDA driver (libcuda.so.1 not found; " + detail + ")");
  }
  if (e == cudaErrorInsufficientDriver) {
    return unavailable("CUDA driver too old (the driver supports CUDA " + version_text(driver) +
                       ", strata was built with the CUDA " + version_text(runtime) + " runtime; " +
                       detail + ")");
  }
  if (e == cudaErrorNoDevice || (e == cudaSuccess && count == 0)) {
    return unavailable("no device (the CUDA " + version_text(driver) +
                       " driver sees no GPU; check CUDA_VISIBLE_DEVICES)");
  }
  return unavailable("CUDA initialisation failed (" + detail + ")");
}

}  // namespace

Status cuda_available() {
  // A function-local static: probed on the first call, never at static
  // initialisation, and thread-safe.
  static const Status kProbe = probe_cuda();
  return kProbe;
}

int cuda_runtime_version() {
  int v = 0;
  (void)cudaRuntimeGetVersion(&v);
  return v;
}

int cuda_driver_version() {
  int v = 0;
  (void)cudaDriverGetVersion(&v);
  return v;
}

Result<std::vector<CudaDeviceInfo>> cuda_devices() {
  STRATA_RETURN_IF_ERROR(detail::require_device("cuda_devices"));
  int count = 0;
  STRATA_CUDA_CHECK(cudaGetDeviceCount(&count), "cuda_devices: cudaGetDeviceCount");
  std::vector<CudaDeviceInfo> out;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    STRATA_CUDA_CHECK(cudaGetDeviceProperties(&p, i),
                      "cuda_devices: cudaGetDeviceProperties(" + std::to_string(i) + ")");
    CudaDeviceInfo d;
    d.index = i;
    d.name = p.name;
    d.major = p.major;
    d.minor = p.minor;
    d.total_memory = p.totalGlobalMem;
    d.multiprocessors = p.multiProcessorCount;
    d.memory_bus_width = p.memoryBusWidth;
    d.pci_domain = p.pciDomainID;
    d.pci_bus = p.pciBusID;
    d.pci_device = p.pciDeviceID;
    d.unified_addressing = p.unifiedAddressing != 0;
    d.async_engines = p.asyncEngineCount;
    d.concurrent_copy_compute = p.asyncEngineCount > 0;
    out.push_back(std::move(d));
  }
  return out;
}

Result<GpuMemory> gpu_memory(int device) {
  STRATA_RETURN_IF_ERROR(detail::use_device(device, "gpu_memory"));
  size_t free_b = 0, total_b = 0;
  STRATA_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b), "gpu_memory: cudaMemGetInfo");
  return GpuMemory{free_b, total_b};
}

// --------------------------------------------------------------- pin backend
Status CudaPinBackend::pin(void* addr, size_t bytes) {
  STRATA_RETURN_IF_ERROR(detail::require_device("cudaHostRegister"));
  STRATA_CUDA_CHECK(cudaHostRegister(addr, bytes, cudaHostRegisterPortable),
                    "cudaHostRegister " + std::to_string(bytes) + " bytes");
  return Status::Ok();
}

Status CudaPinBackend::unpin(void* addr, size_t bytes) {
  STRATA_CUDA_CHECK(cudaHostUnregister(addr),
                    "cudaHostUnregister " + std::to_string(bytes) + " bytes");
  return Status::Ok();
}

Result<std::shared_ptr<memory::PinBackend>> make_cuda_pin_backend() {
  STRATA_RETURN_IF_ERROR(detail::require_device("cudaHostRegister pin backend"));
  return std::shared_ptr<memory::PinBackend>(std::make_shared<CudaPinBackend>());
}

// -------------------------------------------------------------------- rates
namespace {

// Fills x[0, n) with values in [lo, lo + span) from a hash of the index: the
// bench's state, gradients and parameters, without a host round trip.
template <ElemType T>
__global__ void fill_kernel(void* x, uint64_t n, uint32_t seed, float lo, float span) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 0x9E3779B1u ^ uint32_t(i >> 32) ^ seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    const float u = float(h >> 8) * (1.0f / 16777216.0f);
    math::store_elem<T>(x, i, lo + span * u);
  }
}

Status fill(void* x, ElemType t, uint64_t n, uint32_t seed, float lo, float span, cudaStream_t s) {
  const unsigned blocks = unsigned(std::min<uint64_t>((n + 255) / 256, 4096));
  switch (t) {
    case ElemType::kF32:
      fill_kernel<ElemType::kF32><<<blocks, 256, 0, s>>>(x, n, seed, lo, span);
      break;
    case ElemType::kBF16:
      fill_kernel<ElemType::kBF16><<<blocks, 256, 0, s>>>(x, n, seed, lo, span);
      break;
    case ElemType::kF16:
      fill_kernel<ElemType::kF16><<<blocks, 256, 0, s>>>(x, n, seed, lo, span);
      break;
  }
  STRATA_CUDA_CHECK(cudaGetLastError(), "fill kernel launch");
  return Status::Ok();
}

// One warm-up, then `reps` timed repetitions, each between its own events.
template <class Enqueue>
Result<Timing> time_reps(cudaStream_t s, int reps, const char* what, Enqueue enqueue) {
  if (reps < 1) {
    return invalid_argument(std::string(what) + ": reps = " + std::to_string(reps) + " (>= 1)");
  }
  STRATA_RETURN_IF_ERROR(enqueue());
  STRATA_CUDA_CHECK(cudaStreamSynchronize(s), std::string(what) + ": warm-up");
  std::vector<detail::EventHandle> start(reps), stop(reps);
  for (int i = 0; i < reps; ++i) {
    STRATA_RETURN_IF_ERROR(detail::make_event(&start[i], true, what));
    STRATA_RETURN_IF_ERROR(detail::make_event(&stop[i], true, what));
  }
  for (int i = 0; i < reps; ++i) {
    STRATA_CUDA_CHECK(cudaEventRecord(start[i].get(), s), std::string(what) + ": cudaEventRecord");
    STRATA_RETURN_IF_ERROR(enqueue());
    STRATA_CUDA_CHECK(cudaEventRecord(stop[i].get(), s), std::string(what) + ": cudaEventRecord");
  }
  STRATA_CUDA_CHECK(cudaStreamSynchronize(s), std::string(what) + ": cudaStreamSynchronize");
  std::vector<double> secs(reps);
  for (int i = 0; i < reps; ++i) {
    float ms = 0.0f;
    STRATA_CUDA_CHECK(cudaEventElapsedTime(&ms, start[i].get(), stop[i].get()),
                      std::string(what) + ": cudaEventElapsedTime");
    secs[i] = double(ms) * 1e-3;
  }
  std::sort(secs.begin(), secs.end());
  Timing t;
  t.reps = reps;
  t.best_s = secs.front();
  t.median_s = secs[secs.size() / 2];
  return t;
}

}  // namespace

Result<Timing> time_copy(int device, CopyKind kind, void* host, size_t bytes, int reps) {
  STRATA_RETURN_IF_ERROR(detail::use_device(device, "time_copy"));
  if (bytes == 0) {
    return invalid_argument("time_copy: bytes = 0");
  }
  detail::StreamHandle stream;
  STRATA_RETURN_IF_ERROR(detail::make_stream(&stream, "time_copy"));
  detail::DeviceMemory a, b;
  detail::PinnedHostMemory own_host;
  STRATA_RETURN_IF_ERROR(detail::alloc_device(&a, bytes, "time_copy"));
  void* src = nullptr;
  void* dst = nullptr;
  cudaMemcpyKind dir = cudaMemcpyDeviceToDevice;
  if (kind == CopyKind::kDeviceToDevice) {
    STRATA_RETURN_IF_ERROR(detail::alloc_device(&b, bytes, "time_copy"));
    src = a.get();
    dst = b.get();
  } else {
    if (host == nullptr) {
      STRATA_RETURN_IF_ERROR(detail::alloc_pinned(&own_host, bytes, "time_copy"));
      std::fill_n(static_cast<unsigned char*>(own_host.get()), bytes, (unsigned char)1);
      host = own_host.get();
    }
    const bool h2d = kind == CopyKind::kHostToDevice;
    src = h2d ? host : a.get();
    dst = h2d ? a.get() : host;
    dir = h2d ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  }
  cudaStream_t s = stream.get();
  return time_reps(s, reps, "time_copy", [&]() -> Status {
    STRATA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, dir, s), "time_copy: cudaMemcpyAsync");
    return Status::Ok();
  });
}

Result<Timing> time_adam(int device, const AdamBenchShape& shape, int reps) {
  STRATA_RETURN_IF_ERROR(detail::use_device(device, "time_adam"));
  if (shape.n == 0 || !valid_elem_type(shape.grad_type) || !valid_elem_type(shape.param_type)) {
    return invalid_argument("time_adam: n must be > 0 and the types valid");
  }
  detail::StreamHandle stream;
  STRATA_RETURN_IF_ERROR(detail::make_stream(&stream, "time_adam"));
  cudaStream_t s = stream.get();
  const int slots = shape.amsgrad ? 4 : 3;
  detail::DeviceMemory state[4], grad, out;
  for (int i = 0; i < slots; ++i) {
    STRATA_RETURN_IF_ERROR(detail::alloc_device(&state[i], shape.n * 4, "time_adam"));
  }
  STRATA_RETURN_IF_ERROR(
      detail::alloc_device(&grad, shape.n * elem_size(shape.grad_type), "time_adam"));
  if (shape.copy_out) {
    STRATA_RETURN_IF_ERROR(
        detail::alloc_device(&out, shape.n * elem_size(shape.param_type), "time_adam"));
  }
  STRATA_RETURN_IF_ERROR(fill(state[0].get(), ElemType::kF32, shape.n, 1, -1.0f, 2.0f, s));
  STRATA_RETURN_IF_ERROR(fill(state[1].get(), ElemType::kF32, shape.n, 2, -1e-3f, 2e-3f, s));
  STRATA_RETURN_IF_ERROR(fill(state[2].get(), ElemType::kF32, shape.n, 3, 0.0f, 1e-6f, s));
  if (shape.amsgrad) {
    STRATA_RETURN_IF_ERROR(fill(state[3].get(), ElemType::kF32, shape.n, 4, 0.0f, 1e-6f, s));
  }
  STRATA_RETURN_IF_ERROR(fill(grad.get(), shape.grad_type, shape.n, 5, -1.0f, 2.0f, s));

  DeviceAdamArgs a;
  a.consts = make_adam_step_consts(shape.adamw, 1e-3, 0.9, 0.999, 1e-8, 0.01, true, shape.amsgrad,
                                   10, 1.0f);
  for (int i = 0; i < slots; ++i) {
    a.slot[i] = static_cast<float*>(state[i].get());
  }
  a.n = shape.n;
  a.grad = grad.get();
  a.grad_type = shape.grad_type;
  CopyOutRange range{0, shape.n, out.get()};
  if (shape.copy_out) {
    a.copy_out = &range;
    a.copy_out_count = 1;
  }
  a.param_type = shape.param_type;
  return time_reps(s, reps, "time_adam", [&]() { return adam_step_device(a, s, false); });
}

Result<GpuRates> measure_gpu_rates(const GpuRateOptions& o) {
  STRATA_RETURN_IF_ERROR(detail::use_device(o.device, "measure_gpu_rates"));
  GpuRates r;
  cudaDeviceProp p{};
  STRATA_CUDA_CHECK(cudaGetDeviceProperties(&p, o.device), "measure_gpu_rates: properties");
  r.device_name = p.name;
  STRATA_ASSIGN_OR_RETURN(GpuMemory mem, gpu_memory(o.device));
  r.free_memory = mem.free;
  r.total_memory = mem.total;
  const double gb = double(o.copy_bytes) * 1e-9;
  STRATA_ASSIGN_OR_RETURN(
      Timing h2d, time_copy(o.device, CopyKind::kHostToDevice, o.host, o.copy_bytes, o.reps));
  STRATA_ASSIGN_OR_RETURN(
      Timing d2h, time_copy(o.device, CopyKind::kDeviceToHost, o.host, o.copy_bytes, o.reps));
  STRATA_ASSIGN_OR_RETURN(
      Timing d2d, time_copy(o.device, CopyKind::kDeviceToDevice, nullptr, o.copy_bytes, o.reps));
  r.h2d_gbps = gb / h2d.best_s;
  r.d2h_gbps = gb / d2h.best_s;
  r.d2d_gbps = gb / d2d.best_s;
  AdamBenchShape shape;
  shape.n = o.adam_elements;
  STRATA_ASSIGN_OR_RETURN(Timing adam, time_adam(o.device, shape, o.reps));
  r.adam_params_per_s = double(shape.n) / adam.best_s;
  r.adam_gbps = double(adam_traffic_bytes(shape)) * 1e-9 / adam.best_s;
  return r;
}

}  // namespace strata::cuda
