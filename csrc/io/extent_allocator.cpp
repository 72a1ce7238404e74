#include "io/extent_allocator.h"

#include <algorithm>
#include <limits>
#include <string>

namespace strata::io::detail {

ExtentAllocator::ExtentAllocator(uint64_t capacity, uint64_t alignment)
    : capacity_(capacity / alignment * alignment), alignment_(alignment) {
  if (capacity_ > 0) {
    free_.emplace(0, capacity_);
  }
}

Result<Extent> ExtentAllocator::allocate(uint64_t bytes) {
  if (bytes == 0) {
    return invalid_argument("allocate: 0 bytes");
  }
  if (bytes > std::numeric_limits<uint64_t>::max() - alignment_) {
    return invalid_argument("allocate: " + std::to_string(bytes) + " bytes is too large");
  }
  const uint64_t need = (bytes + alignment_ - 1) / alignment_ * alignment_;
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < need) {
      continue;
    }
    const uint64_t offset = it->first;
    const uint64_t rest = it->second - need;
    free_.erase(it);
    if (rest > 0) {
      free_.emplace(offset + need, rest);
    }
    uint32_t id;
    if (!free_ids_.empty()) {
      id = free_ids_.back();
      free_ids_.pop_back();
    } else {
      id = uint32_t(slots_.size());
      slots_.emplace_back();
    }
    slots_[id] = Slot{offset, need, true};
    used_ += need;
    ++live_;
    return Extent{offset, need, id};
  }
  return Status(StatusCode::kNoSpace,
                "no free extent of " + std::to_string(need) + " bytes (" +
                    std::to_string(free_bytes()) + " bytes free in " +
                    std::to_string(free_.size()) + " fragment(s), largest " +
                    std::to_string(largest_free()) + ")",
                0, false);
}

bool ExtentAllocator::is_live(const Extent& e) const {
  return e.id < slots_.size() && slots_[e.id].live && slots_[e.id].offset == e.offset &&
         slots_[e.id].length == e.length;
}

Status ExtentAllocator::free(const Extent& e) {
  if (!is_live(e)) {
    return invalid_argument("free: extent " + std::to_string(e.id) + " (offset " +
                            std::to_string(e.offset) + ", length " + std::to_string(e.length) +
                            ") is not live");
  }
  slots_[e.id].live = false;
  free_ids_.push_back(e.id);
  used_ -= e.length;
  --live_;
  uint64_t offset = e.offset;
  uint64_t length = e.length;
  auto next = free_.lower_bound(offset);
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      length += prev->second;
      free_.erase(prev);
    }
  }
  if (next != free_.end() && offset + length == next->first) {
    length += next->second;
    free_.erase(next);
  }
  free_.emplace(offset, length);
  return Status::Ok();
}

uint64_t ExtentAllocator::largest_free() const {
  uint64_t m = 0;
  for (const auto& [off, len] : free_) {
    m = std::max(m, len);
  }
  return m;
}

bool ExtentAllocator::check_invariants() const {
  uint64_t sum = 0;
  uint64_t end = 0;
  bool first = true;
  for (const auto& [off, len] : free_) {
    if (len == 0 || off % alignment_ != 0 || len % alignment_ != 0) {
      return false;
    }
    if (!first && off <= end) {
      return false;  // overlapping or adjacent (should have been merged)
    }
    first = false;
    end = off + len;
    if (end > capacity_) {
      return false;
    }
    sum += len;
  }
  uint64_t live_sum = 0;
  uint64_t live_count = 0;
  for (const Slot& s : slots_) {
    if (s.live) {
      live_sum += s.length;
      ++live_count;
    }
  }
  return sum + used_ == capacity_ && live_sum == used_ && live_count == live_;
}

}  // namespace strata::io::detail
