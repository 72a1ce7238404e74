// Private: Slab, the RAII owner of one mapped, placed, pre-faulted and
// (optionally) pinned range — the middle layer between the primitives of
// strata/platform/vm.h and the pool / NUMA regions built on it.
//
// Setup order matters because Linux places a page when it is first touched:
//   mmap → mbind (policy before any touch) → madvise(HUGEPAGE, DONTFORK)
//   → parallel pre-fault → pin once (PinBackend; done by the owner via pin()
//   so that it can decide what a refused pin means).
// Ownership: move-only; the destructor unpins (when pinned) and unmaps.
// Thread-safety: none; owners serialise access.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include <strata/memory/pin_backend.h>
#include <strata/platform/vm.h>
#include <strata/status.h>

namespace strata::memory::detail {

struct SlabSpec {
  std::vector<int> nodes;  // empty: no binding
  platform::MemPolicy policy = platform::MemPolicy::kBind;
  bool hugepage = true;  // MADV_HUGEPAGE (best effort)
  bool dontfork = true;  // MADV_DONTFORK
  bool prefault = true;
  unsigned prefault_threads = 0;  // 0: platform::prefault's choice
};

class Slab {
 public:
  // Maps round_up(bytes, 4096) bytes and applies `spec`. The start is 2 MiB
  // aligned when bytes >= 2 MiB so transparent huge pages can back it.
  static Result<Slab> map(size_t bytes, const SlabSpec& spec);

  Slab() = default;
  Slab(Slab&& other) noexcept { *this = std::move(other); }
  Slab& operator=(Slab&& other) noexcept;
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;
  ~Slab() { release(); }

  // Pins the whole slab once through `backend`; on failure nothing is pinned.
  Status pin(std::shared_ptr<PinBackend> backend);

  char* data() const { return data_; }
  size_t size() const { return size_; }
  bool pinned() const { return pin_ != nullptr; }
  bool hugepage() const { return hugepage_; }  // MADV_HUGEPAGE accepted

 private:
  void release();
  char* data_ = nullptr;
  size_t size_ = 0;
  bool hugepage_ = false;
  std::shared_ptr<PinBackend> pin_;  // non-null while pinned
};

// "node 0", "nodes 1,2" for messages.
std::string describe_nodes(const std::vector<int>& nodes);

}  // namespace strata::memory::detail
