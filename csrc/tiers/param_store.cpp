// The param tier (tiers/param_store.h): one record per model parameter on
// host DRAM, CXL or NVMe swap files that grow by whole files.
#include <strata/tiers/param_store.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>

#include <strata/io/swap_file.h>
#include <strata/log.h>
#include <strata/platform/clock.h>
#include <strata/tiers/tiers.h>

namespace strata::tiers {

namespace {
constexpr size_t kAlign = 4096;
size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

Result<ParamStoreOptions> param_store_options(const Config& config, const std::string& tag) {
  const EngineConfig& c = config.typed();
  const OffloadParamConfig& op = c.zero.offload_param;
  ParamStoreOptions o;
  switch (op.device) {
    case OffloadDevice::kNone:
      return invalid_argument(
          "zero_optimization.offload_param.device: \"none\" has no param tier; use cpu, cxl or "
          "nvme");
    case OffloadDevice::kCpu:
      o.kind = TierKind::kHost;
      break;
    case OffloadDevice::kCxl:
      o.kind = TierKind::kCxl;
      break;
    case OffloadDevice::kNvme:
      o.kind = TierKind::kNvme;
      if (!op.nvme_path) {
        return invalid_argument(
            "zero_optimization.offload_param.nvme_path: missing; offload_param.device \"nvme\" "
            "needs a directory for the model weights' swap file");
      }
      o.nvme_path = *op.nvme_path;
      break;
  }
  o.tag = tag;
  o.pin = op.pin_memory;
  o.checksums = c.strata.verify_checksums;
  o.cxl_nodes = c.strata.cxl_nodes.value_or(std::vector<int>());
  o.io = io::io_options_from(c.aio);
  return o;
}

struct ParamStore::Impl {
  ParamStoreOptions opts;
  mutable std::mutex mu;
  std::unique_ptr<memory::PinnedPool> host_pool;     // host records
  std::unique_ptr<memory::PinnedPool> staging_pool;  // staging buffers
  std::unique_ptr<Tier> cxl;
  std::unique_ptr<io::IoEngine> io;
  std::vector<std::unique_ptr<io::SwapFile>> files;

  struct OwnedWrite {
    uint32_t id = 0;
    io::Ticket ticket = 0;
    memory::PinnedBuffer buf;
    int64_t start_ns = 0;
  };
  // Owned writes in flight, oldest first. Completed ones are reaped (their
  // buffers freed) by every later call, so staging memory tracks the writes
  // still running, not every parameter written this step; past
  // kMaxOwnedBytes in flight, store_owned waits for the oldest.
  static constexpr uint64_t kMaxOwnedBytes = uint64_t(256) << 20;
  std::deque<OwnedWrite> owned;
  uint64_t owned_bytes = 0;
  struct Record {
    size_t bytes = 0;
    size_t record_bytes = 0;
    memory::PinnedBuffer host;  // kHost
    uint32_t cxl_handle = 0;    // kCxl
    uint32_t file = 0;          // kNvme
    io::Extent extent;
    Status owned_error;  // first failed owned write, until reported
  };
  std::vector<Record> records;
  struct Pending {
    uint32_t id = 0;
    bool read = false;
    void* buf = nullptr;
    int64_t start_ns = 0;
  };
  std::unordered_map<io::Ticket, Pending> pending;
  // The transfer log (record_transfers), under mu.
  static constexpr size_t kMaxTransfers = size_t(1) << 16;
  bool log_transfers = false;
  std::deque<ParamTransfer> transfers;
  // end_ns 0 (the I/O engine gave no completion time): now.
  void log(bool read, uint32_t id, int64_t start_ns, int64_t end_ns) {
    if (end_ns == 0) {
      end_ns = platform::steady_ns();
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!log_transfers) {
      return;
    }
    if (transfers.size() == kMaxTransfers) {
      transfers.pop_front();
    }
    transfers.push_back(ParamTransfer{read, id, records[id].record_bytes, start_ns, end_ns});
  }
  ParamStoreStats st;
  bool closed = false;

  Result<io::Extent> allocate_extent(size_t bytes, uint32_t* file) {
    if (!files.empty()) {
      auto e = files.back()->allocate(bytes);
      if (e.ok()) {
        *file = uint32_t(files.size() - 1);
        return e;
      }
    }
    io::SwapFileOptions so;
    so.dir = opts.nvme_path;
    so.tag = opts.tag + "-" + std::to_string(files.size());
    so.size = std::max<uint64_t>(opts.chunk_bytes, bytes);
    so.direct = opts.direct;
    so.checksums = opts.checksums;
    STRATA_ASSIGN_OR_RETURN(std::unique_ptr<io::SwapFile> f, io::SwapFile::create(so, io.get()));
    files.push_back(std::move(f));
    st.files = files.size();
    if (st.path.empty()) {
      st.path = files[0]->path();
    }
    *file = uint32_t(files.size() - 1);
    return files.back()->allocate(bytes);
  }

  // Takes out of `owned` (under mu) the writes `pick` selects; the caller
  // waits for them without the lock.
  template <typename Pick>
  std::vector<OwnedWrite> take_owned(Pick pick) {
    std::vector<OwnedWrite> out;
    for (auto it = owned.begin(); it != owned.end();) {
      if (pick(*it)) {
        owned_bytes -= it->buf.capacity();
        out.push_back(std::move(*it));
        it = owned.erase(it);
      } else {
        ++it;
      }
    }
    return out;
  }
  // Waits for taken writes (no lock held); an error is kept on its record.
  void finish_owned(std::vector<OwnedWrite>& ws) {
    for (auto& w : ws) {
      int64_t done = 0;
      Status st = io->wait_timed(w.ticket, &done);
      if (st.ok()) {
        log(false, w.id, w.start_ns, done);
      } else {
        std::lock_guard<std::mutex> lock(mu);
        if (records[w.id].owned_error.ok()) {
          records[w.id].owned_error =
              st.with_context("write of parameter record " + std::to_string(w.id));
        }
      }
    }
    ws.clear();  // the buffers go back to the staging pool
  }
  // Frees the buffers of owned writes that completed; with `cap`, also waits
  // for the oldest until at most kMaxOwnedBytes are in flight.
  void reap_owned(bool cap) {
    std::vector<OwnedWrite> done;
    {
      std::lock_guard<std::mutex> lock(mu);
      uint64_t over = cap && owned_bytes > kMaxOwnedBytes ? owned_bytes - kMaxOwnedBytes : 0;
      done = take_owned([&](const OwnedWrite& w) {
        if (over > 0) {
          over -= std::min<uint64_t>(over, w.buf.capacity());
          return true;
        }
        auto polled = io->poll(w.ticket);
        return polled.ok() && polled.value();
      });
    }
    finish_owned(done);
  }
  // Waits for the owned writes of a record (the caller holds no lock).
  // Returns the first error of one, once.
  Status wait_owned(uint32_t id) {
    std::vector<OwnedWrite> mine;
    {
      std::lock_guard<std::mutex> lock(mu);
      mine = take_owned([id](const OwnedWrite& w) { return w.id == id; });
    }
    finish_owned(mine);
    std::lock_guard<std::mutex> lock(mu);
    Status first = records[id].owned_error;
    records[id].owned_error = Status::Ok();
    return first;
  }

  Status check_id(uint32_t id) const {
    if (id >= records.size()) {
      return invalid_argument("param store: no record " + std::to_string(id) + " (it has " +
                              std::to_string(records.size()) + ")");
    }
    return Status::Ok();
  }
};

ParamStore::ParamStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ParamStore::~ParamStore() { close().ignore(); }

Result<std::unique_ptr<ParamStore>> ParamStore::create(const ParamStoreOptions& options) {
  auto impl = std::make_unique<Impl>();
  Impl& s = *impl;
  s.opts = options;
  memory::PoolOptions po;
  po.pin = options.pin;
  po.allow_unpinned = true;
  po.slab_bytes = size_t(64) << 20;
  po.prefault = false;  // records and buffers are written before they are read
  STRATA_ASSIGN_OR_RETURN(s.staging_pool, memory::PinnedPool::create(po));
  switch (options.kind) {
    case TierKind::kHost: {
      po.slab_bytes = size_t(256) << 20;
      STRATA_ASSIGN_OR_RETURN(s.host_pool, memory::PinnedPool::create(po));
      break;
    }
    case TierKind::kCxl: {
      STRATA_ASSIGN_OR_RETURN(s.cxl, make_cxl_tier(options.cxl_nodes));
      break;
    }
    case TierKind::kNvme: {
      if (options.nvme_path.empty()) {
        return invalid_argument("param store: nvme needs a directory (nvme_path)");
      }
      STRATA_ASSIGN_OR_RETURN(s.io, io::make_io_engine(options.io));
      break;
    }
    default:
      return invalid_argument(std::string("param store: no param tier on ") +
                              tier_name(options.kind));
  }
  return std::unique_ptr<ParamStore>(new ParamStore(std::move(impl)));
}

TierKind ParamStore::kind() const { return impl_->opts.kind; }
bool ParamStore::resident() const { return impl_->opts.kind == TierKind::kHost; }

Result<uint32_t> ParamStore::add(size_t bytes, const void* init) {
  Impl& s = *impl_;
  if (bytes == 0) {
    return invalid_argument("param store: a record of 0 bytes");
  }
  Impl::Record r;
  r.bytes = bytes;
  r.record_bytes = round_up(bytes);
  std::unique_lock<std::mutex> lock(s.mu);
  if (s.closed) {
    return Status(StatusCode::kFailedPrecondition, "param store: closed");
  }
  const uint32_t id = uint32_t(s.records.size());
  switch (s.opts.kind) {
    case TierKind::kHost: {
      STRATA_ASSIGN_OR_RETURN(r.host, s.host_pool->allocate(r.record_bytes));
      char* dst = static_cast<char*>(r.host.data());
      if (init != nullptr) {
        std::memcpy(dst, init, bytes);
      } else {
        std::memset(dst, 0, bytes);
      }
      std::memset(dst + bytes, 0, r.record_bytes - bytes);
      break;
    }
    case TierKind::kCxl:
    case TierKind::kNvme: {
      STRATA_ASSIGN_OR_RETURN(memory::PinnedBuffer tmp, s.staging_pool->allocate(r.record_bytes));
      char* dst = static_cast<char*>(tmp.data());
      if (init != nullptr) {
        std::memcpy(dst, init, bytes);
      } else {
        std::memset(dst, 0, bytes);
      }
      std::memset(dst + bytes, 0, r.record_bytes - bytes);
      if (s.opts.kind == TierKind::kCxl) {
        STRATA_ASSIGN_OR_RETURN(r.cxl_handle, s.cxl->add_record(r.record_bytes));
        STRATA_RETURN_IF_ERROR(s.cxl->store(r.cxl_handle, dst));
      } else {
        STRATA_ASSIGN_OR_RETURN(r.extent, s.allocate_extent(r.record_bytes, &r.file));
        io::SwapFile* f = s.files[r.file].get();
        lock.unlock();  // the write runs unlocked; the record is not visible yet
        STRATA_RETURN_IF_ERROR(
            f->write(r.extent, dst).with_context("initial values of record " + std::to_string(id)));
        lock.lock();
      }
      break;
    }
    default:
      break;
  }
  s.st.records += 1;
  s.st.bytes += bytes;
  s.st.record_bytes += r.record_bytes;
  s.st.bytes_stored += r.record_bytes;
  s.st.stores += 1;
  if (s.records.size() != id) {
    return internal_error("param store: records added concurrently");
  }
  s.records.push_back(std::move(r));
  return id;
}

size_t ParamStore::count() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->records.size();
}
size_t ParamStore::bytes(uint32_t id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return id < impl_->records.size() ? impl_->records[id].bytes : 0;
}
size_t ParamStore::record_bytes(uint32_t id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return id < impl_->records.size() ? impl_->records[id].record_bytes : 0;
}
void* ParamStore::data(uint32_t id) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (!resident() || id >= impl_->records.size()) {
    return nullptr;
  }
  return impl_->records[id].host.data();
}

Result<memory::PinnedBuffer> ParamStore::staging(size_t bytes) {
  return impl_->staging_pool->allocate(round_up(bytes));
}

Result<io::Ticket> ParamStore::submit_fetch(uint32_t id, void* dst) {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    STRATA_RETURN_IF_ERROR(s.check_id(id));
  }
  if (s.opts.kind == TierKind::kNvme) {
    STRATA_RETURN_IF_ERROR(s.wait_owned(id));  // the last stored bytes first
    s.reap_owned(/*cap=*/false);
  }
  std::lock_guard<std::mutex> lock(s.mu);
  Impl::Record& r = s.records[id];
  s.st.fetches += 1;
  s.st.bytes_fetched += r.record_bytes;
  switch (s.opts.kind) {
    case TierKind::kHost:
      if (dst != r.host.data()) {
        std::memcpy(dst, r.host.data(), r.record_bytes);
      }
      return io::Ticket{0};
    case TierKind::kCxl:
      STRATA_RETURN_IF_ERROR(s.cxl->fetch(r.cxl_handle, dst));
      return io::Ticket{0};
    default: {
      int64_t t0 = platform::steady_ns();
      STRATA_ASSIGN_OR_RETURN(io::Ticket t, s.files[r.file]->submit_read(r.extent, dst));
      s.pending[t] = Impl::Pending{id, true, dst, t0};
      return t;
    }
  }
}

Result<io::Ticket> ParamStore::submit_store(uint32_t id, const void* src) {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    STRATA_RETURN_IF_ERROR(s.check_id(id));
  }
  if (s.opts.kind == TierKind::kNvme) {
    STRATA_RETURN_IF_ERROR(s.wait_owned(id));  // writes of one record never overlap
  }
  std::lock_guard<std::mutex> lock(s.mu);
  Impl::Record& r = s.records[id];
  s.st.stores += 1;
  s.st.bytes_stored += r.record_bytes;
  switch (s.opts.kind) {
    case TierKind::kHost:
      if (src != r.host.data()) {
        std::memcpy(r.host.data(), src, r.bytes);
      }
      return io::Ticket{0};
    case TierKind::kCxl:
      STRATA_RETURN_IF_ERROR(s.cxl->store(r.cxl_handle, src));
      return io::Ticket{0};
    default: {
      int64_t t0 = platform::steady_ns();
      STRATA_ASSIGN_OR_RETURN(io::Ticket t, s.files[r.file]->submit_write(r.extent, src));
      s.pending[t] = Impl::Pending{id, false, const_cast<void*>(src), t0};
      return t;
    }
  }
}

Status ParamStore::wait(io::Ticket ticket) {
  Impl& s = *impl_;
  if (ticket == 0) {
    return Status::Ok();
  }
  Impl::Pending p;
  io::SwapFile* file = nullptr;
  io::Extent extent;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.pending.find(ticket);
    if (it == s.pending.end()) {
      return invalid_argument("param store: unknown ticket " + std::to_string(ticket));
    }
    p = it->second;
    s.pending.erase(it);
    file = s.files[s.records[p.id].file].get();
    extent = s.records[p.id].extent;
  }
  const std::string what =
      std::string(p.read ? "fetch" : "store") + " of parameter record " + std::to_string(p.id);
  int64_t done = 0;
  STRATA_RETURN_IF_ERROR(s.io->wait_timed(ticket, &done).with_context(what));
  s.log(p.read, p.id, p.start_ns, done);
  if (p.read) {
    STRATA_RETURN_IF_ERROR(file->verify(extent, p.buf).with_context(what));
  }
  return Status::Ok();
}

Result<bool> ParamStore::poll(io::Ticket ticket) {
  Impl& s = *impl_;
  if (ticket == 0) {
    return true;
  }
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.pending.find(ticket) == s.pending.end()) {
      return invalid_argument("param store: unknown ticket " + std::to_string(ticket));
    }
  }
  return s.io->poll(ticket);
}

Status ParamStore::fetch(uint32_t id, void* dst) {
  STRATA_ASSIGN_OR_RETURN(io::Ticket t, submit_fetch(id, dst));
  return wait(t);
}

Status ParamStore::store(uint32_t id, const void* src) {
  STRATA_ASSIGN_OR_RETURN(io::Ticket t, submit_store(id, src));
  return wait(t);
}

Status ParamStore::store_owned(uint32_t id, memory::PinnedBuffer buf) {
  Impl& s = *impl_;
  if (s.opts.kind != TierKind::kNvme) {
    return store(id, buf.data());
  }
  {
    std::lock_guard<std::mutex> lock(s.mu);
    STRATA_RETURN_IF_ERROR(s.check_id(id));
    if (buf.size() < s.records[id].record_bytes) {
      return invalid_argument("param store: buffer of " + std::to_string(buf.size()) +
                              " bytes for record " + std::to_string(id) + " of " +
                              std::to_string(s.records[id].record_bytes));
    }
  }
  STRATA_RETURN_IF_ERROR(s.wait_owned(id));
  s.reap_owned(/*cap=*/true);
  std::lock_guard<std::mutex> lock(s.mu);
  Impl::Record& r = s.records[id];
  int64_t t0 = platform::steady_ns();
  auto t = s.files[r.file]->submit_write(r.extent, buf.data());
  if (!t.ok()) {
    return t.status().with_context("write of parameter record " + std::to_string(id));
  }
  s.st.stores += 1;
  s.st.bytes_stored += r.record_bytes;
  s.owned_bytes += buf.capacity();
  s.owned.push_back(Impl::OwnedWrite{id, t.value(), std::move(buf), t0});
  return Status::Ok();
}

Status ParamStore::flush() {
  Impl& s = *impl_;
  if (s.opts.kind != TierKind::kNvme) {
    return Status::Ok();
  }
  std::vector<Impl::OwnedWrite> all;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    all = s.take_owned([](const Impl::OwnedWrite&) { return true; });
  }
  s.finish_owned(all);
  std::lock_guard<std::mutex> lock(s.mu);
  for (auto& r : s.records) {
    if (!r.owned_error.ok()) {
      Status first = r.owned_error;
      r.owned_error = Status::Ok();
      return first;
    }
  }
  return Status::Ok();
}

uint64_t ParamStore::trim_staging() { return impl_->staging_pool->trim(); }

void ParamStore::record_transfers(bool on) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->log_transfers = on;
  if (!on) {
    impl_->transfers.clear();
  }
}

std::vector<ParamTransfer> ParamStore::take_transfers() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<ParamTransfer> out(impl_->transfers.begin(), impl_->transfers.end());
  impl_->transfers.clear();
  return out;
}

ParamStoreStats ParamStore::stats() const {
  const memory::PoolStats ps = impl_->staging_pool->stats();
  std::lock_guard<std::mutex> lock(impl_->mu);
  ParamStoreStats out = impl_->st;
  out.staging_in_use = ps.in_use;
  out.staging_peak = ps.peak_in_use;
  return out;
}

std::string ParamStore::describe() const {
  const Impl& s = *impl_;
  switch (s.opts.kind) {
    case TierKind::kHost:
      return "dram (pinned host memory)";
    case TierKind::kCxl:
      return "cxl (" + s.cxl->describe() + ")";
    default: {
      std::lock_guard<std::mutex> lock(s.mu);
      std::string d = std::string("nvme (") + s.io->backend_name();
      if (!s.files.empty()) {
        d += std::string(s.files[0]->direct() ? ", O_DIRECT, " : ", buffered, ") +
             s.files[0]->path();
        if (s.files.size() > 1) {
          d += " and " + std::to_string(s.files.size() - 1) + " more";
        }
      } else {
        d += ", " + s.opts.nvme_path;
      }
      return d + ")";
    }
  }
}

Status ParamStore::close() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.closed) {
      return Status::Ok();
    }
  }
  Status first = flush();
  std::lock_guard<std::mutex> lock(s.mu);
  s.closed = true;
  if (s.io) {
    for (auto& [t, p] : s.pending) {
      s.io->wait(t).ignore();
    }
    s.pending.clear();
  }
  s.records.clear();
  s.files.clear();  // drains and removes the swap files
  s.cxl.reset();
  s.host_pool.reset();
  s.io.reset();
  return first;  // the staging pool lives on: callers may still hold its buffers
}

}  // namespace strata::tiers
