// Host tier: records in pinned DRAM from the engine's pool, updated in place.
#include <cstring>
#include <vector>

#include <strata/tiers/tiers.h>

namespace strata::tiers {

const char* tier_name(TierKind kind) {
  switch (kind) {
    case TierKind::kGpu:
      return "gpu";
    case TierKind::kHost:
      return "dram";
    case TierKind::kCxl:
      return "cxl";
    case TierKind::kNvme:
      return "nvme";
  }
  return "?";
}

namespace {

class HostTier final : public Tier {
 public:
  explicit HostTier(memory::PinnedPool* pool) : pool_(pool) {}

  TierKind kind() const override { return TierKind::kHost; }
  bool resident() const override { return true; }

  Result<uint32_t> add_record(size_t bytes) override {
    STRATA_ASSIGN_OR_RETURN(memory::PinnedBuffer buf, pool_->allocate(bytes));
    records_.push_back(std::move(buf));
    stats_.records += 1;
    stats_.bytes += bytes;
    return uint32_t(records_.size() - 1);
  }
  size_t record_bytes(uint32_t h) const override { return records_[h].size(); }
  float* data(uint32_t h) override { return records_[h].as<float>(); }

  Status fetch(uint32_t h, void* dst) override {
    std::memcpy(dst, records_[h].data(), records_[h].size());
    stats_.bytes_fetched += records_[h].size();
    return Status::Ok();
  }
  Status store(uint32_t h, const void* src) override {
    if (src != records_[h].data()) {
      std::memcpy(records_[h].data(), src, records_[h].size());
    }
    stats_.bytes_stored += records_[h].size();
    return Status::Ok();
  }
  TierStats stats() const override { return stats_; }
  std::string describe() const override { return "pinned host DRAM"; }

 private:
  memory::PinnedPool* pool_;
  std::vector<memory::PinnedBuffer> records_;
  TierStats stats_;
};

}  // namespace

std::unique_ptr<Tier> make_host_tier(memory::PinnedPool* pool) {
  return std::make_unique<HostTier>(pool);
}

}  // namespace strata::tiers
