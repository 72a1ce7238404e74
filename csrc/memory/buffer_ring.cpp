// BufferRing: a FIFO of pinned buffers; see strata/memory/buffer_ring.h.
#include <strata/memory/buffer_ring.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <vector>

#include "memory/dcheck.h"

namespace strata::memory {

struct BufferRing::Impl {
  size_t buffer_bytes = 0;
  std::vector<PinnedBuffer> buffers;
  mutable std::mutex mu;
  std::condition_variable freed;
  std::deque<size_t> free_list;  // guarded by mu; FIFO of free indices
  std::vector<bool> out;         // guarded by mu; catches double release

  void give_back(size_t index) {
    {
      std::lock_guard<std::mutex> lock(mu);
      STRATA_DCHECK(index < out.size() && out[index], "ring buffer released twice");
      if (index >= out.size() || !out[index]) {
        return;
      }
      out[index] = false;
      free_list.push_back(index);
    }
    freed.notify_one();
  }
  Lease take_locked() {
    size_t index = free_list.front();
    free_list.pop_front();
    out[index] = true;
    return Lease(this, index, buffers[index].data(), buffer_bytes);
  }
};

BufferRing::Lease::Lease(Lease&& other) noexcept
    : ring_(other.ring_), index_(other.index_), data_(other.data_), size_(other.size_) {
  other.ring_ = nullptr;
  other.data_ = nullptr;
}

BufferRing::Lease& BufferRing::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    ring_ = other.ring_;
    index_ = other.index_;
    data_ = other.data_;
    size_ = other.size_;
    other.ring_ = nullptr;
    other.data_ = nullptr;
  }
  return *this;
}

void BufferRing::Lease::release() {
  if (ring_ != nullptr) {
    ring_->give_back(index_);
  }
  ring_ = nullptr;
  data_ = nullptr;
}

BufferRing::BufferRing() = default;
BufferRing::BufferRing(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BufferRing::BufferRing(BufferRing&&) noexcept = default;
BufferRing& BufferRing::operator=(BufferRing&&) noexcept = default;

BufferRing::~BufferRing() {
  if (impl_) {
    STRATA_DCHECK(in_use() == 0, "buffer ring destroyed with leases outstanding");
  }
}

Result<BufferRing> BufferRing::create(PinnedPool& pool, size_t buffer_count, size_t buffer_bytes) {
  if (buffer_count == 0 || buffer_bytes == 0) {
    return invalid_argument("buffer ring: buffer_count and buffer_bytes must be > 0 (got " +
                            std::to_string(buffer_count) + " x " + std::to_string(buffer_bytes) +
                            ")");
  }
  auto impl = std::make_unique<Impl>();
  impl->buffer_bytes = buffer_bytes;
  impl->buffers.reserve(buffer_count);
  for (size_t i = 0; i < buffer_count; ++i) {
    auto buf = pool.allocate(buffer_bytes);
    if (!buf.ok()) {
      return buf.status().with_context("buffer ring: buffer " + std::to_string(i) + " of " +
                                       std::to_string(buffer_count));
    }
    impl->buffers.push_back(std::move(buf).value());
    impl->free_list.push_back(i);
  }
  impl->out.assign(buffer_count, false);
  return BufferRing(std::move(impl));
}

Result<BufferRing> BufferRing::create_for_records(PinnedPool& pool, size_t buffer_count,
                                                  std::span<const size_t> record_bytes) {
  if (record_bytes.empty()) {
    return invalid_argument("buffer ring: no record sizes given");
  }
  return create(pool, buffer_count, *std::max_element(record_bytes.begin(), record_bytes.end()));
}

size_t BufferRing::buffer_count() const { return impl_ ? impl_->buffers.size() : 0; }
size_t BufferRing::buffer_bytes() const { return impl_ ? impl_->buffer_bytes : 0; }

size_t BufferRing::in_use() const {
  if (!impl_) {
    return 0;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->buffers.size() - impl_->free_list.size();
}

Result<BufferRing::Lease> BufferRing::try_acquire() {
  if (!impl_) {
    return Status(StatusCode::kFailedPrecondition, "buffer ring: empty (moved-from) ring");
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->free_list.empty()) {
    return Status(StatusCode::kUnavailable,
                  "buffer ring: all " + std::to_string(impl_->buffers.size()) + " buffers in use",
                  0, /*retryable=*/true);
  }
  return impl_->take_locked();
}

BufferRing::Lease BufferRing::acquire() {
  STRATA_DCHECK(impl_ != nullptr, "acquire on an empty ring");
  std::unique_lock<std::mutex> lock(impl_->mu);
  impl_->freed.wait(lock, [&] { return !impl_->free_list.empty(); });
  return impl_->take_locked();
}

void* BufferRing::buffer(size_t index) const {
  return impl_ && index < impl_->buffers.size() ? impl_->buffers[index].data() : nullptr;
}

}  // namespace strata::memory
