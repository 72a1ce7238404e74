// strata/memory/pinned_pool.h — pinned host memory without power-of-two waste.
//
// A PinnedPool owns a few large slabs (mmap → mbind → madvise → pre-fault →
// pin once: cudaHostRegister with a CUDA device, mlock otherwise; see
// pin_backend.h) and sub-allocates 4 KiB-aligned buffers from them best-fit
// with coalescing on free, so reserved bytes track requested bytes (no
// rounding to powers of two). A new slab is mapped only when no free range
// fits; its size is max(slab_bytes, request rounded up to 4 KiB).
//
// Pinning and RLIMIT_MEMLOCK: before a slab is pinned with a backend that
// counts against RLIMIT_MEMLOCK (mlock), the limit is checked. When it is too
// low: with allow_unpinned (default) the pool prints one warning naming the
// limit and how to raise it (ulimit -l, limits.conf, systemd LimitMEMLOCK)
// and goes on unpinned (stats().pinned == false, pin_note() says why);
// without it, create()/allocate()/reserve() return PermissionDenied with that
// message. create() checks against slab_bytes, so a too-low limit shows up
// before the first allocation.
//
// Invariants (per pool, bytes): reserved == in_use + free_bytes;
//   peak_in_use >= in_use; requested <= in_use (in_use adds alignment padding);
//   free ranges are 4 KiB multiples, lie inside one slab each, never overlap
//   a live buffer, and no two free ranges of one slab touch (coalesced).
//   check_invariants() verifies all of them; debug builds check the counters
//   after every operation.
// Ownership: the pool owns the slabs; a PinnedBuffer is a move-only handle
//   that returns its range on destruction. Every buffer must be released
//   before the pool is destroyed (checked in debug builds).
// Thread-safety: allocate/free/reserve/trim/stats are internally locked;
//   a PinnedBuffer may be destroyed on any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include <strata/memory/pin_backend.h>
#include <strata/status.h>

namespace strata::memory {

inline constexpr size_t kPoolAlignment = 4096;

struct PoolOptions {
  size_t slab_bytes = size_t(256) << 20;    // size of each new slab (a larger request gets its own)
  int numa_node = -1;                       // -1: no binding; else mbind(MPOL_BIND) to this node
  bool pin = true;                          // mlock / cudaHostRegister
  bool allow_unpinned = true;               // memlock too low: warn and continue unpinned
  bool prefault = true;                     // touch every page at slab creation
  bool hugepage = true;                     // madvise(MADV_HUGEPAGE) on slabs
  bool dontfork = true;                     // madvise(MADV_DONTFORK): forked children get no copy
  unsigned prefault_threads = 0;            // 0: one per 64 MiB, at most the CPUs and 16
  std::shared_ptr<PinBackend> pin_backend;  // null: default_pin_backend() at create()
};

struct PoolStats {
  uint64_t reserved = 0;   // bytes in slabs
  uint64_t in_use = 0;     // bytes handed out (aligned sizes)
  uint64_t requested = 0;  // bytes asked for (sum of live requests)
  uint64_t peak_in_use = 0;
  uint64_t slabs = 0;
  bool pinned = false;  // false when pinning was refused and allow_unpinned let us go on
  double ratio() const { return requested ? double(reserved) / double(requested) : 1.0; }
  // Added beside the original fields:
  uint64_t free_bytes = 0;     // reserved - in_use
  uint64_t largest_free = 0;   // largest free range: the largest allocation needing no new slab
  uint64_t free_ranges = 0;    // number of free ranges (fragmentation)
  uint64_t buffers = 0;        // live buffers
  uint64_t peak_reserved = 0;  // high-water marks since create()
  uint64_t peak_requested = 0;
  // reserved at its peak over requested at its peak: what the pool cost for
  // the most the caller ever asked for at once.
  double peak_ratio() const {
    return peak_requested ? double(peak_reserved) / double(peak_requested) : 1.0;
  }
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
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return size_; }          // requested bytes
  size_t capacity() const { return reserved_; }  // aligned bytes taken from the slab (>= size)
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
  // Validates options (numa_node must be a node with memory; slab_bytes > 0)
  // and checks RLIMIT_MEMLOCK; maps nothing yet.
  static Result<std::unique_ptr<PinnedPool>> create(const PoolOptions& options);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // Reserves `bytes` up front in one slab (so later allocations of that total
  // need no new slab). Optional. A no-op when a free range of that size
  // already exists; otherwise maps one slab of round_up(bytes, 4 KiB).
  // Sizes are rounded to 4 KiB each, so plan with the sum of rounded sizes.
  // Frees in between can still fragment the slab: a FIFO of variable-size
  // buffers (a swap pipeline allocating per sub-group) may need one more
  // slab when it wraps; fixed-size buffers allocated once (the engine's
  // working buffers) never do.
  Status reserve(size_t bytes);

  // 4 KiB-aligned buffer of `bytes` (bytes > 0). Adds a slab when no free
  // range fits. The contents are unspecified (zero for fresh slabs, stale
  // after reuse).
  Result<PinnedBuffer> allocate(size_t bytes);

  PoolStats stats() const;

  // Unmaps slabs with no live buffer; returns the bytes released.
  uint64_t trim();

  // Full walk of the free lists and live buffers against the invariants at
  // the top of this file; Internal with the first violation found.
  Status check_invariants() const;

  // Empty while every slab is pinned (or pin == false); otherwise why the pool
  // runs unpinned (the warning it printed).
  std::string pin_note() const;
  const PoolOptions& options() const;

 private:
  friend class PinnedBuffer;
  struct Impl;
  explicit PinnedPool(std::unique_ptr<Impl> impl);
  void release(void* data, size_t size, size_t reserved);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::memory
