// strata/memory/pinned_pool.h — pinned host memory without power-of-two waste.
//
// A PinnedPool owns a few large slabs (mmap → mbind → madvise → pre-fault →
// pin once: cudaHostRegister with a CUDA device, mlock otherwise) and
// sub-allocates 4 KiB-aligned buffers from them first-fit with coalescing on
// free, so reserved bytes track requested bytes (no rounding to powers of two).
//
// Invariants (per pool, bytes): reserved == in_use + free_bytes;
//   peak_in_use >= in_use; requested <= in_use (in_use adds alignment padding).
// Ownership: the pool owns the slabs; a PinnedBuffer is a move-only handle
//   that returns its range on destruction. Every buffer must be released
//   before the pool is destroyed (checked in debug builds).
// Thread-safety: allocate/free are internally locked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include <strata/status.h>

namespace strata::memory {

inline constexpr size_t kPoolAlignment = 4096;

struct PoolOptions {
  size_t slab_bytes = size_t(256) << 20;  // size of each new slab (a larger request gets its own)
  int numa_node = -1;                     // -1: no binding
  bool pin = true;                        // mlock / cudaHostRegister
  bool allow_unpinned = true;             // memlock too low: warn and continue unpinned
  bool prefault = true;                   // touch every page at slab creation
};

struct PoolStats {
  uint64_t reserved = 0;   // bytes in slabs
  uint64_t in_use = 0;     // bytes handed out (aligned sizes)
  uint64_t requested = 0;  // bytes asked for (sum of live requests)
  uint64_t peak_in_use = 0;
  uint64_t slabs = 0;
  bool pinned = false;     // false when pinning was refused and allow_unpinned let us go on
  double ratio() const { return requested ? double(reserved) / double(requested) : 1.0; }
};

class PinnedPool;

// Move-only handle to a pool range.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(PinnedBuffer&& other) noexcept;
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer();

  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }
  size_t size() const { return size_; }  // requested bytes
  explicit operator bool() const { return data_ != nullptr; }
  void reset();

 private:
  friend class PinnedPool;
  PinnedBuffer(PinnedPool* pool, void* data, size_t size, size_t reserved)
      : pool_(pool), data_(data), size_(size), reserved_(reserved) {}
  PinnedPool* pool_ = nullptr;
  void* data_ = nullptr;
  size_t size_ = 0;
  size_t reserved_ = 0;  // aligned size taken from the slab
};

class PinnedPool {
 public:
  static Result<std::unique_ptr<PinnedPool>> create(const PoolOptions& options);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // Reserves `bytes` up front in one slab (so later allocations of that total
  // need no new slab). Optional.
  Status reserve(size_t bytes);

  // 4 KiB-aligned buffer of `bytes` (bytes > 0). Adds a slab when no free
  // range fits.
  Result<PinnedBuffer> allocate(size_t bytes);

  PoolStats stats() const;

 private:
  friend class PinnedBuffer;
  struct Impl;
  explicit PinnedPool(std::unique_ptr<Impl> impl);
  void release(void* data, size_t size, size_t reserved);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::memory
