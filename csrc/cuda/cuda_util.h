// cuda/cuda_util.h — CUDA errors as Status, and move-only owners of CUDA
// handles (stream, event, device and pinned host allocations). Included by
// csrc/cuda/*.cu only.
//
// Link rule for csrc/cuda: strata_cuda is linked after strata_core, so code
// here must not call out-of-line core functions (Status::to_string,
// with_context, from_errno, anything in csrc/memory or csrc/kernels); a
// symbol only strata_cuda needs would not be pulled from the core archive.
// Status's constructor and accessors are inline, which is all we use.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include <strata/cuda/device.h>
#include <strata/status.h>

namespace strata::cuda::detail {

inline std::string cuda_error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// "context: cudaErrorX: text". Out-of-memory is its own code (callers may
// fall back to fewer buffers or the CPU); everything else is Internal.
inline Status cuda_status(cudaError_t e, const std::string& context) {
  const StatusCode code =
      e == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kInternal;
  return Status(code, context + ": " + cuda_error_text(e));
}

#define STRATA_CUDA_CHECK(call, context)                              \
  do {                                                                \
    const cudaError_t _strata_e = (call);                             \
    if (_strata_e != cudaSuccess) {                                   \
      return ::strata::cuda::detail::cuda_status(_strata_e, context); \
    }                                                                 \
  } while (0)

// Unavailable "<what>: <reason>" when there is no usable device.
inline Status require_device(const char* what) {
  Status st = cuda_available();
  if (!st.ok()) {
    return Status(StatusCode::kUnavailable, std::string(what) + ": " + st.message());
  }
  return Status::Ok();
}

// Makes `device` current on the calling thread (each API call acts on the
// thread's current device) after checking that it exists.
inline Status use_device(int device, const char* what) {
  STRATA_RETURN_IF_ERROR(require_device(what));
  int count = 0;
  STRATA_CUDA_CHECK(cudaGetDeviceCount(&count), std::string(what) + ": cudaGetDeviceCount");
  if (device < 0 || device >= count) {
    return invalid_argument(std::string(what) + ": device " + std::to_string(device) +
                            " does not exist (" + std::to_string(count) + " visible)");
  }
  STRATA_CUDA_CHECK(cudaSetDevice(device),
                    std::string(what) + ": cudaSetDevice(" + std::to_string(device) + ")");
  return Status::Ok();
}

// Move-only owner: T is a handle type, Destroy a function returning cudaError_t.
template <class T, cudaError_t (*Destroy)(T)>
class Owned {
 public:
  Owned() = default;
  explicit Owned(T h) : h_(h) {}
  Owned(Owned&& o) noexcept : h_(std::exchange(o.h_, T{})) {}
  Owned& operator=(Owned&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, T{});
    }
    return *this;
  }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() { reset(); }
  T get() const { return h_; }
  T* out() {
    reset();
    return &h_;
  }
  void reset() {
    if (h_ != T{}) {
      (void)Destroy(h_);  // errors at teardown have no one to report to
      h_ = T{};
    }
  }

 private:
  T h_{};
};

inline cudaError_t free_device(void* p) { return cudaFree(p); }
inline cudaError_t free_host(void* p) { return cudaFreeHost(p); }

using StreamHandle = Owned<cudaStream_t, cudaStreamDestroy>;
using EventHandle = Owned<cudaEvent_t, cudaEventDestroy>;
using DeviceMemory = Owned<void*, free_device>;
using PinnedHostMemory = Owned<void*, free_host>;

inline Status make_stream(StreamHandle* s, const char* what) {
  STRATA_CUDA_CHECK(cudaStreamCreateWithFlags(s->out(), cudaStreamNonBlocking),
                    std::string(what) + ": cudaStreamCreateWithFlags");
  return Status::Ok();
}

inline Status make_event(EventHandle* e, bool timing, const char* what) {
  STRATA_CUDA_CHECK(
      cudaEventCreateWithFlags(e->out(), timing ? cudaEventDefault : cudaEventDisableTiming),
      std::string(what) + ": cudaEventCreateWithFlags");
  return Status::Ok();
}

inline Status alloc_device(DeviceMemory* m, size_t bytes, const char* what) {
  STRATA_CUDA_CHECK(cudaMalloc(m->out(), bytes),
                    std::string(what) + ": cudaMalloc " + std::to_string(bytes) + " bytes");
  return Status::Ok();
}

inline Status alloc_pinned(PinnedHostMemory* m, size_t bytes, const char* what) {
  STRATA_CUDA_CHECK(cudaHostAlloc(m->out(), bytes, cudaHostAllocPortable),
                    std::string(what) + ": cudaHostAlloc " + std::to_string(bytes) + " bytes");
  return Status::Ok();
}

}  // namespace strata::cuda::detail
