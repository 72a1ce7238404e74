// strata/memory/pin_backend.h — the seam through which a slab is pinned.
//
// Slabs are pinned once, after they are pre-faulted. Without CUDA the backend
// is mlock(2); the GPU layer installs a cudaHostRegister backend with
// set_default_pin_backend() when a device exists, so that DMA to and from
// the pool needs no bounce copy. No CUDA code lives in csrc/memory/.
//
// Ownership: backends are shared (std::shared_ptr); a slab keeps its backend
//   alive until it has unpinned. pin()/unpin() never own the memory.
// Alignment: addr and bytes are multiples of 4096 (slab boundaries).
// Thread-safety: pin()/unpin() may be called concurrently on distinct ranges;
//   set_default_pin_backend()/default_pin_backend() are internally locked.
#pragma once

#include <cstddef>
#include <memory>

#include <strata/status.h>

namespace strata::memory {

class PinBackend {
 public:
  virtual ~PinBackend() = default;
  // "mlock", "cudaHostRegister": printed in stats, warnings and errors.
  virtual const char* name() const = 0;
  // True when pinned bytes count against RLIMIT_MEMLOCK (mlock). The pool
  // checks the limit before pinning only for such backends.
  virtual bool uses_memlock() const = 0;
  virtual Status pin(void* addr, size_t bytes) = 0;
  // Called once per successful pin(), before the range is unmapped.
  virtual Status unpin(void* addr, size_t bytes) = 0;
};

// The mlock(2)/munlock(2) backend (a process-wide instance).
std::shared_ptr<PinBackend> mlock_pin_backend();

// The backend a pool uses when PoolOptions::pin_backend is null: the one
// installed last with set_default_pin_backend(), else mlock_pin_backend().
std::shared_ptr<PinBackend> default_pin_backend();
// nullptr restores mlock. Pools already created keep the backend they took.
void set_default_pin_backend(std::shared_ptr<PinBackend> backend);

}  // namespace strata::memory
