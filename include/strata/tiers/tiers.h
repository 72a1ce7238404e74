// strata/tiers/tiers.h — constructors of the concrete tiers.
//
// Host: records in pinned DRAM from the engine's pool; updated in place.
// Nvme: records are extents of one SwapFile; fetched into and stored from
//   DRAM working buffers through the IoEngine.
// Cxl: records in memory bound to CPU-less NUMA nodes (striped across them);
//   fetched into and stored from DRAM working buffers by memcpy.
//
// Ownership: the returned tier owns its records; the pool / IoEngine passed
//   in are borrowed and must outlive the tier.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <strata/io/io_engine.h>
#include <strata/memory/pinned_pool.h>
#include <strata/status.h>
#include <strata/tiers/tier.h>

namespace strata::tiers {

std::unique_ptr<Tier> make_host_tier(memory::PinnedPool* pool);

struct NvmeTierOptions {
  std::string dir;          // offload_optimizer.nvme_path
  std::string tag = "opt";  // unique per engine/rank/tier (part of the file name)
  uint64_t capacity = 0;    // bytes of records to preallocate
  bool checksums = true;    // strata.verify_checksums
  bool direct = true;
  // Spreads checksum work over threads (io::SwapFileOptions::parallel_for).
  std::function<void(size_t tasks, const std::function<void(size_t)>& fn)> parallel_for;
};
Result<std::unique_ptr<Tier>> make_nvme_tier(const NvmeTierOptions& options, io::IoEngine* io);

// nodes: NUMA nodes to place records on (striped); must exist.
Result<std::unique_ptr<Tier>> make_cxl_tier(const std::vector<int>& nodes);

}  // namespace strata::tiers
