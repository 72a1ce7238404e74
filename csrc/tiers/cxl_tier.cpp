// CXL tier: records in memory bound to CPU-less NUMA nodes (striped across
// them by interleaving), fetched into DRAM working buffers for the CPU update
// and stored back. CPU-Adam directly on CXL memory is several times slower
// than on local DRAM, while copies run at the link's bandwidth, so the state
// only ever moves by bulk copy here.
#include <cstring>
#include <vector>

#include <strata/memory/numa_region.h>
#include <strata/platform/topology.h>
#include <strata/tiers/tiers.h>

namespace strata::tiers {
namespace {

class CxlTier final : public Tier {
 public:
  explicit CxlTier(std::vector<int> nodes) : nodes_(std::move(nodes)) {}

  TierKind kind() const override { return TierKind::kCxl; }
  bool resident() const override { return false; }

  Result<uint32_t> add_record(size_t bytes) override {
    memory::NumaRegionOptions o;
    o.nodes = nodes_;
    o.policy = nodes_.size() > 1 ? memory::NumaPolicy::kInterleave : memory::NumaPolicy::kBind;
    STRATA_ASSIGN_OR_RETURN(memory::NumaRegion region, memory::NumaRegion::create(bytes, o));
    STRATA_RETURN_IF_ERROR(region.verify_placement(4096));
    records_.push_back(std::move(region));
    stats_.records += 1;
    stats_.bytes += bytes;
    return uint32_t(records_.size() - 1);
  }
  size_t record_bytes(uint32_t h) const override { return records_[h].size(); }

  Status fetch(uint32_t h, void* dst) override {
    std::memcpy(dst, records_[h].data(), records_[h].size());
    stats_.bytes_fetched += records_[h].size();
    return Status::Ok();
  }
  Status store(uint32_t h, const void* src) override {
    std::memcpy(records_[h].data(), src, records_[h].size());
    stats_.bytes_stored += records_[h].size();
    return Status::Ok();
  }
  TierStats stats() const override { return stats_; }
  std::string describe() const override {
    std::string s = "NUMA nodes";
    for (int n : nodes_) {
      s += " " + std::to_string(n);
    }
    return s;
  }

 private:
  std::vector<int> nodes_;
  std::vector<memory::NumaRegion> records_;
  TierStats stats_;
};

}  // namespace

Result<std::unique_ptr<Tier>> make_cxl_tier(const std::vector<int>& nodes_in) {
  STRATA_ASSIGN_OR_RETURN(std::vector<platform::NumaNode> topo, platform::read_topology());
  std::vector<int> nodes = nodes_in;
  if (nodes.empty()) {
    nodes = platform::cpu_less_nodes(topo);
    if (nodes.empty()) {
      return Status(
          StatusCode::kNotFound,
          "offload_optimizer.device \"cxl\": this machine has no CPU-less (CXL) NUMA node; "
          "set strata.cxl_nodes to the nodes to use (e.g. [0] to exercise the code path "
          "on ordinary DRAM, which is not a CXL measurement)");
    }
  }
  STRATA_RETURN_IF_ERROR(
      platform::check_memory_nodes(nodes, topo).with_context("strata.cxl_nodes"));
  return std::unique_ptr<Tier>(std::make_unique<CxlTier>(std::move(nodes)));
}

}  // namespace strata::tiers
