// strata/memory/buffer_ring.h — the swap pipeline's fixed set of pinned
// buffers (`buffer_count` deep), taken from a PinnedPool once.
//
// The pipeline acquires a buffer to read a sub-group's record into, updates
// it, writes it back, and releases it. Buffers are sized from the real
// sub-group records (create_for_records: the largest record, not the largest
// tensor), and are reused in FIFO order so a buffer released last is reused
// last (its write-back DMA has the most time to finish).
//
// Ownership: the ring owns its buffers (returned to the pool when the ring is
//   destroyed); a Lease is a move-only loan of one buffer that returns it on
//   destruction. The pool must outlive the ring, the ring every Lease.
// Alignment: every buffer starts 4 KiB-aligned (O_DIRECT); buffer_bytes() is
//   the requested size, the capacity behind it is rounded up to 4 KiB.
// Thread-safety: acquire/try_acquire/release may be called from any thread
//   (an I/O completion thread may release what the pipeline acquired);
//   acquire() blocks until a buffer is free.
#pragma once

#include <cstddef>
#include <memory>
#include <span>

#include <strata/memory/pinned_pool.h>
#include <strata/status.h>

namespace strata::memory {

class BufferRing {
 private:
  struct Impl;

 public:
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { release(); }

    void* data() const { return data_; }
    template <typename T>
    T* as() const {
      return static_cast<T*>(data_);
    }
    size_t size() const { return size_; }    // buffer_bytes of the ring
    size_t index() const { return index_; }  // 0 .. buffer_count-1
    explicit operator bool() const { return data_ != nullptr; }
    void release();  // returns the buffer early; idempotent

   private:
    friend class BufferRing;
    Lease(Impl* ring, size_t index, void* data, size_t size)
        : ring_(ring), index_(index), data_(data), size_(size) {}
    Impl* ring_ = nullptr;
    size_t index_ = 0;
    void* data_ = nullptr;
    size_t size_ = 0;
  };

  // buffer_count >= 1 buffers of buffer_bytes > 0 each, allocated from `pool`.
  static Result<BufferRing> create(PinnedPool& pool, size_t buffer_count, size_t buffer_bytes);
  // Same, with buffer_bytes = the largest of `record_bytes` (non-empty).
  static Result<BufferRing> create_for_records(PinnedPool& pool, size_t buffer_count,
                                               std::span<const size_t> record_bytes);

  BufferRing();
  BufferRing(BufferRing&&) noexcept;
  BufferRing& operator=(BufferRing&&) noexcept;
  BufferRing(const BufferRing&) = delete;
  BufferRing& operator=(const BufferRing&) = delete;
  ~BufferRing();  // every Lease must have been released (checked in debug builds)

  size_t buffer_count() const;
  size_t buffer_bytes() const;
  size_t in_use() const;  // leases outstanding

  // The next free buffer in FIFO order, or Unavailable (retryable) when all
  // buffer_count buffers are out.
  Result<Lease> try_acquire();
  // Blocks until a buffer is free. Calling it while this thread holds every
  // lease deadlocks; pipelines bound their depth by buffer_count.
  Lease acquire();

  // Raw pointer to buffer `index` (e.g. to register all buffers with io_uring
  // once); the ring keeps ownership.
  void* buffer(size_t index) const;

 private:
  explicit BufferRing(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::memory
