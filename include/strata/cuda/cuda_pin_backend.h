// strata/cuda/cuda_pin_backend.h — pin the pool's slabs with
// cudaHostRegister, so DMA to and from them needs no bounce copy.
//
// The pool (csrc/memory) pins through memory::PinBackend and knows nothing
// about CUDA; with a device, install_cuda_pin_backend() makes this backend
// the default for pools created afterwards (pools already created keep the
// backend they took). cudaHostRegister pins through the driver and does not
// count against RLIMIT_MEMLOCK (uses_memlock() is false), so the pool skips
// its memlock check.
//
// Registration is portable (cudaHostRegisterPortable: pinned for every CUDA
// context) and happens once per slab; unpin() unregisters before the pool
// unmaps the slab.
//
// Ownership: the backend is shared; it never owns the memory it pins.
// Alignment: 4 KiB (slab boundaries). Thread-safety: pin/unpin may run
// concurrently on distinct ranges (the CUDA runtime is thread-safe).
#pragma once

#include <memory>

#include <strata/cuda/device.h>
#include <strata/memory/pin_backend.h>
#include <strata/status.h>

namespace strata::cuda {

#if STRATA_CUDA_ENABLED

class CudaPinBackend final : public memory::PinBackend {
 public:
  const char* name() const override { return "cudaHostRegister"; }
  bool uses_memlock() const override { return false; }
  // Unavailable without a device; Internal/OutOfMemory with CUDA's error.
  Status pin(void* addr, size_t bytes) override;
  Status unpin(void* addr, size_t bytes) override;
};

// A new backend; Unavailable (with the reason) when there is no device.
Result<std::shared_ptr<memory::PinBackend>> make_cuda_pin_backend();

#else

inline Result<std::shared_ptr<memory::PinBackend>> make_cuda_pin_backend() {
  return cuda_not_compiled("cudaHostRegister pin backend");
}

#endif

// Installs the cudaHostRegister backend as memory::default_pin_backend()
// when a device exists. Unavailable (and the mlock default left in place)
// otherwise. Defined here, not in csrc/cuda, because it calls into
// csrc/memory (see csrc/cuda/cuda_util.h on link order).
inline Status install_cuda_pin_backend() {
  auto backend = make_cuda_pin_backend();
  if (!backend.ok()) {
    return backend.status();
  }
  memory::set_default_pin_backend(std::move(backend).value());
  return Status::Ok();
}

}  // namespace strata::cuda
