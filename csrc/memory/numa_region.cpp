// NUMA-placed regions and page-placement checks; see strata/memory/numa_region.h.
#include <strata/memory/numa_region.h>

#include <algorithm>
#include <cstdio>
#include <map>

#include <strata/platform/meminfo.h>
#include <strata/platform/vm.h>

#include "memory/slab.h"

namespace strata::memory {

namespace {

std::string node_list(std::span<const int> nodes) {
  std::string out;
  for (size_t i = 0; i < nodes.size(); ++i) {
    out += (i ? "," : "") + std::to_string(nodes[i]);
  }
  return out;
}

}  // namespace

Status verify_placement(const void* addr, size_t bytes, std::span<const int> allowed,
                        size_t max_samples) {
  if (bytes == 0) {
    return Status::Ok();
  }
  if (allowed.empty()) {
    return invalid_argument("verify_placement: empty list of allowed nodes");
  }
  std::vector<const void*> pages = platform::sample_pages(addr, bytes, max_samples);
  std::vector<int> where(pages.size(), -1);
  int r = platform::query_page_nodes(pages, where);
  if (r != 0) {
    return Status::from_errno(r, "move_pages query of " + std::to_string(pages.size()) + " pages");
  }
  for (size_t i = 0; i < pages.size(); ++i) {
    int node = where[i];
    if (std::find(allowed.begin(), allowed.end(), node) != allowed.end()) {
      continue;
    }
    size_t offset = static_cast<const char*>(pages[i]) - static_cast<const char*>(addr);
    char where_text[96];
    if (node < 0) {
      std::snprintf(where_text, sizeof(where_text), "not placed (%s)",
                    node == -ENOENT ? "page not present" : "move_pages status error");
    } else {
      std::snprintf(where_text, sizeof(where_text), "on node %d", node);
    }
    return Status(StatusCode::kFailedPrecondition,
                  "page at offset " + std::to_string(offset) + " of a " +
                      platform::format_bytes(bytes) + " region is " + where_text +
                      ", expected node(s) " + node_list(allowed) + " (" +
                      std::to_string(pages.size()) + " pages checked)");
  }
  return Status::Ok();
}

Result<std::vector<std::pair<int, size_t>>> page_census(const void* addr, size_t bytes,
                                                        size_t max_samples) {
  std::vector<const void*> pages = platform::sample_pages(addr, bytes, max_samples);
  std::vector<int> where(pages.size(), -1);
  int r = platform::query_page_nodes(pages, where);
  if (r != 0) {
    return Status::from_errno(r, "move_pages query of " + std::to_string(pages.size()) + " pages");
  }
  std::map<int, size_t> counts;
  for (int n : where) {
    counts[n < 0 ? -1 : n] += 1;
  }
  return std::vector<std::pair<int, size_t>>(counts.begin(), counts.end());
}

NumaRegion::NumaRegion() = default;
NumaRegion::NumaRegion(NumaRegion&&) noexcept = default;
NumaRegion& NumaRegion::operator=(NumaRegion&&) noexcept = default;
NumaRegion::~NumaRegion() = default;

void* NumaRegion::data() const { return slab_ ? slab_->data() : nullptr; }
size_t NumaRegion::size() const { return slab_ ? size_ : 0; }
size_t NumaRegion::capacity() const { return slab_ ? slab_->size() : 0; }
bool NumaRegion::locked() const { return slab_ && slab_->pinned(); }

Result<NumaRegion> NumaRegion::create(size_t bytes, const NumaRegionOptions& options) {
  if (bytes == 0) {
    return invalid_argument("NUMA region of 0 bytes");
  }
  if (options.nodes.empty()) {
    return invalid_argument("NUMA region: no nodes given");
  }
  std::vector<int> nodes = options.nodes;
  std::sort(nodes.begin(), nodes.end());
  if (std::adjacent_find(nodes.begin(), nodes.end()) != nodes.end()) {
    return invalid_argument("NUMA region: node list " + node_list(options.nodes) +
                            " names a node twice");
  }
  auto topo = platform::read_topology(options.sysfs_root);
  if (!topo.ok()) {
    return topo.status().with_context("NUMA region on nodes " + node_list(nodes));
  }
  STRATA_RETURN_IF_ERROR(platform::check_memory_nodes(nodes, topo.value()));

  detail::SlabSpec spec;
  spec.nodes = nodes;
  spec.policy = options.policy == NumaPolicy::kInterleave ? platform::MemPolicy::kInterleave
                                                          : platform::MemPolicy::kBind;
  spec.hugepage = options.hugepage;
  spec.dontfork = options.dontfork;
  spec.prefault = options.prefault;
  auto slab = detail::Slab::map(bytes, spec);
  if (!slab.ok()) {
    return slab.status().with_context("NUMA region");
  }
  NumaRegion region;
  region.slab_ = std::make_unique<detail::Slab>(std::move(slab).value());
  region.size_ = bytes;
  region.nodes_ = std::move(nodes);
  region.policy_ = options.policy;
  if (options.lock) {
    STRATA_RETURN_IF_ERROR(region.slab_->pin(mlock_pin_backend()).with_context("NUMA region"));
  }
  return region;
}

Status NumaRegion::verify_placement(size_t max_samples) const {
  if (!slab_) {
    return Status(StatusCode::kFailedPrecondition, "verify_placement on an empty NUMA region");
  }
  return memory::verify_placement(slab_->data(), slab_->size(), nodes_, max_samples);
}

}  // namespace strata::memory
