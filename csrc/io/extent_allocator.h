// io/extent_allocator.h — private: first-fit allocator of aligned file ranges.
//
// Hands out [offset, offset+length) ranges of a file of `capacity` bytes,
// lengths rounded up to `alignment`; free() coalesces with both neighbours,
// so thousands of sub-groups cost one file and freeing everything leaves one
// free range. Each live extent has an id (reused after free) that indexes
// per-extent metadata such as checksums.
//
// Invariants (bytes): capacity == used + Σ free lengths; free ranges are
//   disjoint, aligned and never adjacent (adjacent ones are merged).
// Thread-safety: none; SwapFile locks around it.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include <strata/io/swap_file.h>
#include <strata/status.h>

namespace strata::io::detail {

class ExtentAllocator {
 public:
  explicit ExtentAllocator(uint64_t capacity, uint64_t alignment = kDirectAlignment);

  // First fit. InvalidArgument for 0 bytes, NoSpace when nothing fits.
  Result<Extent> allocate(uint64_t bytes);
  // InvalidArgument when `extent` is not live (double free, foreign extent).
  Status free(const Extent& extent);
  bool is_live(const Extent& extent) const;

  uint64_t capacity() const { return capacity_; }
  uint64_t used_bytes() const { return used_; }
  uint64_t free_bytes() const { return capacity_ - used_; }
  uint64_t largest_free() const;
  uint64_t fragments() const { return free_.size(); }
  uint64_t live_extents() const { return live_; }
  // Checks the invariants above (tests).
  bool check_invariants() const;

 private:
  struct Slot {
    uint64_t offset = 0;
    uint64_t length = 0;
    bool live = false;
  };

  uint64_t capacity_;
  uint64_t alignment_;
  uint64_t used_ = 0;
  uint64_t live_ = 0;
  std::map<uint64_t, uint64_t> free_;  // offset -> length
  std::vector<Slot> slots_;            // by extent id
  std::vector<uint32_t> free_ids_;
};

}  // namespace strata::io::detail
