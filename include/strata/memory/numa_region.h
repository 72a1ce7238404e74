// strata/memory/numa_region.h — memory placed on chosen NUMA nodes: the
// storage of the Cxl tier (CXL memory is a CPU-less node) and of DMA-only
// staging buffers that may live there.
//
// A NumaRegion maps N bytes, binds them (MPOL_BIND to one node or a node set,
// or MPOL_INTERLEAVE to stripe pages across several CXL nodes), advises
// huge pages and DONTFORK, and pre-faults so every page is placed before the
// region is used. verify_placement() then asks the kernel (move_pages) where
// the pages really are: a policy can be silently weakened (cpusets, a node
// running out of memory under a non-strict policy), so the tier checks.
//
// Binding to a node that does not exist, or has no memory, fails with a
// message naming the node and the nodes with memory that do exist.
// On a machine without CPU-less nodes a region can be bound to node 0 for
// testing; that exercises the code path, it is not a measurement of CXL.
//
// Ownership: move-only; the destructor unmaps (unlocking first if locked).
// Units: bytes. Alignment: data() is 4 KiB-aligned (2 MiB for >= 2 MiB).
// Thread-safety: const methods may run concurrently; the memory itself is
//   the caller's to synchronise.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <strata/platform/topology.h>
#include <strata/status.h>

namespace strata::memory {

namespace detail {
class Slab;
}  // namespace detail

enum class NumaPolicy {
  kBind,        // pages only on the listed nodes (the kernel fills them in order)
  kInterleave,  // pages round-robin across the listed nodes (striping)
};

struct NumaRegionOptions {
  std::vector<int> nodes;  // non-empty; each must be a node with memory
  NumaPolicy policy = NumaPolicy::kBind;
  bool prefault = true;  // place every page now
  bool hugepage = true;  // madvise(MADV_HUGEPAGE), best effort
  bool dontfork = true;  // madvise(MADV_DONTFORK)
  bool lock = false;     // mlock after pre-fault (not needed for CPU-copied state)
  std::string sysfs_root = platform::kDefaultSysfsNodeRoot;  // where nodes are looked up
};

// Checks, with move_pages(…, nullptr, status), that the pages of
// [addr, addr+bytes) are on nodes in `allowed`: every page when there are at
// most `max_samples`, else `max_samples` evenly spread ones (first and last
// included). Pages must be present (pre-faulted). Errors: Unavailable when
// the kernel refuses move_pages (no CONFIG_NUMA, seccomp); FailedPrecondition
// naming the first misplaced page, where it is and where it should be.
Status verify_placement(const void* addr, size_t bytes, std::span<const int> allowed,
                        size_t max_samples = 65536);

// Sampled pages per node, as (node, pages) in ascending node order; pages
// that are not present are counted under node -1.
Result<std::vector<std::pair<int, size_t>>> page_census(const void* addr, size_t bytes,
                                                        size_t max_samples = 65536);

class NumaRegion {
 public:
  static Result<NumaRegion> create(size_t bytes, const NumaRegionOptions& options);

  NumaRegion();
  NumaRegion(NumaRegion&&) noexcept;
  NumaRegion& operator=(NumaRegion&&) noexcept;
  NumaRegion(const NumaRegion&) = delete;
  NumaRegion& operator=(const NumaRegion&) = delete;
  ~NumaRegion();

  void* data() const;
  template <typename T>
  T* as() const {
    return static_cast<T*>(data());
  }
  size_t size() const;      // requested bytes
  size_t capacity() const;  // mapped bytes: the request rounded up to 4 KiB
  const std::vector<int>& nodes() const { return nodes_; }
  NumaPolicy policy() const { return policy_; }
  bool locked() const;
  explicit operator bool() const { return data() != nullptr; }

  // verify_placement() over the whole region against nodes().
  Status verify_placement(size_t max_samples = 65536) const;

 private:
  std::unique_ptr<detail::Slab> slab_;
  size_t size_ = 0;
  std::vector<int> nodes_;
  NumaPolicy policy_ = NumaPolicy::kBind;
};

}  // namespace strata::memory
