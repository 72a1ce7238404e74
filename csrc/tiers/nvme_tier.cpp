// NVMe tier: one SwapFile; each record is an extent, moved whole by one read
// and one write per step through the IoEngine.
#include <mutex>
#include <unordered_map>
#include <vector>

#include <strata/io/swap_file.h>
#include <strata/tiers/tiers.h>

namespace strata::tiers {
namespace {

class NvmeTier final : public Tier {
 public:
  NvmeTier(std::unique_ptr<io::SwapFile> file) : file_(std::move(file)) {}
  ~NvmeTier() override { drain(); }

  TierKind kind() const override { return TierKind::kNvme; }
  bool resident() const override { return false; }

  Result<uint32_t> add_record(size_t bytes) override {
    STRATA_ASSIGN_OR_RETURN(io::Extent e, file_->allocate(bytes));
    extents_.push_back(e);
    stats_.records += 1;
    stats_.bytes += bytes;
    return uint32_t(extents_.size() - 1);
  }
  size_t record_bytes(uint32_t h) const override { return extents_[h].length; }

  Result<TierTicket> submit_fetch(uint32_t h, void* dst) override {
    STRATA_ASSIGN_OR_RETURN(io::Ticket t, file_->submit_read(extents_[h], dst));
    pending_[t] = Pending{h, dst, true};
    return TierTicket{t};
  }
  Result<TierTicket> submit_store(uint32_t h, const void* src) override {
    STRATA_ASSIGN_OR_RETURN(io::Ticket t, file_->submit_write(extents_[h], src));
    pending_[t] = Pending{h, const_cast<void*>(src), false};
    return TierTicket{t};
  }
  Status wait(TierTicket ticket, int64_t* done_ns = nullptr) override {
    return complete(ticket, done_ns, true);
  }
  bool checks_chunks() const override { return file_->checksums(); }
  Result<bool> poll(TierTicket ticket) override {
    if (ticket == 0) {
      return true;
    }
    return file_->engine()->poll(ticket);
  }
  Status wait_unverified(TierTicket ticket, int64_t* done_ns = nullptr) override {
    return complete(ticket, done_ns, false);
  }
  Status verify_chunks(uint32_t h, size_t first, std::span<const uint64_t> sums) override {
    return file_->verify_chunks(extents_[h], first, sums);
  }
  Result<TierTicket> submit_store_hashed(uint32_t h, const void* src,
                                         std::vector<uint64_t> chunk_sums) override {
    STRATA_ASSIGN_OR_RETURN(io::Ticket t,
                            file_->submit_write(extents_[h], src, std::move(chunk_sums)));
    pending_[t] = Pending{h, const_cast<void*>(src), false};
    return TierTicket{t};
  }
  Status fetch(uint32_t h, void* dst) override {
    STRATA_ASSIGN_OR_RETURN(TierTicket t, submit_fetch(h, dst));
    return wait(t);
  }
  Status store(uint32_t h, const void* src) override {
    STRATA_ASSIGN_OR_RETURN(TierTicket t, submit_store(h, src));
    return wait(t);
  }
  void drain() override {
    for (auto& [t, p] : pending_) {
      file_->engine()->wait(t).ignore();
    }
    pending_.clear();
    file_->engine()->drain();
  }
  TierStats stats() const override { return stats_; }
  std::string describe() const override {
    return std::string(file_->engine()->backend_name()) +
           (file_->direct() ? ", O_DIRECT, " : ", buffered, ") + file_->path();
  }
  std::string location() const override { return file_->path(); }
  uint64_t record_offset(uint32_t h) const override { return extents_[h].offset; }

 private:
  Status complete(TierTicket ticket, int64_t* done_ns, bool verify) {
    if (ticket == 0) {
      return Status::Ok();
    }
    auto it = pending_.find(ticket);
    if (it == pending_.end()) {
      return internal_error("nvme tier: unknown ticket " + std::to_string(ticket));
    }
    Pending p = it->second;
    pending_.erase(it);
    STRATA_RETURN_IF_ERROR(file_->engine()->wait_timed(ticket, done_ns));
    if (p.read) {
      if (verify) {
        STRATA_RETURN_IF_ERROR(file_->verify(extents_[p.handle], p.buf));
      }
      stats_.bytes_fetched += extents_[p.handle].length;
    } else {
      stats_.bytes_stored += extents_[p.handle].length;
    }
    return Status::Ok();
  }

  struct Pending {
    uint32_t handle;
    void* buf;
    bool read;
  };
  std::unique_ptr<io::SwapFile> file_;
  std::vector<io::Extent> extents_;
  std::unordered_map<io::Ticket, Pending> pending_;
  TierStats stats_;
};

}  // namespace

Result<std::unique_ptr<Tier>> make_nvme_tier(const NvmeTierOptions& options, io::IoEngine* io) {
  io::SwapFileOptions so;
  so.dir = options.dir;
  so.tag = options.tag;
  so.size = options.capacity;
  so.direct = options.direct;
  so.checksums = options.checksums;
  so.parallel_for = options.parallel_for;
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<io::SwapFile> file, io::SwapFile::create(so, io));
  return std::unique_ptr<Tier>(std::make_unique<NvmeTier>(std::move(file)));
}

}  // namespace strata::tiers
