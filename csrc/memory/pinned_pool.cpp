// PinnedPool: best-fit sub-allocation with coalescing over pinned slabs.
// See strata/memory/pinned_pool.h for the contract and invariants.
#include <strata/memory/pinned_pool.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include <strata/log.h>
#include <strata/platform/meminfo.h>
#include <strata/platform/memlock.h>
#include <strata/platform/topology.h>

#include "memory/dcheck.h"
#include "memory/slab.h"

namespace strata::memory {

namespace {

using platform::format_bytes;

struct SlabEntry {
  detail::Slab slab;
  uint64_t live = 0;  // live buffers carved from this slab (trim() frees slabs at 0)
};

struct FreeRange {
  size_t size = 0;
  uintptr_t slab = 0;  // base of the owning slab: ranges of different slabs never merge
};

struct LiveRange {
  size_t size = 0;      // requested bytes
  size_t reserved = 0;  // aligned bytes
};

}  // namespace

struct PinnedPool::Impl {
  PoolOptions options;
  std::shared_ptr<PinBackend> backend;
  detail::SlabSpec spec;

  mutable std::mutex mu;
  // Guarded by mu:
  std::map<uintptr_t, std::unique_ptr<SlabEntry>> slabs;  // by base address
  std::map<uintptr_t, FreeRange> free_by_addr;            // coalescing: neighbours by address
  std::set<std::pair<size_t, uintptr_t>> free_by_size;    // best fit: (size, address)
  std::map<uintptr_t, LiveRange> live;                    // catches double and foreign frees
  uint64_t reserved = 0;
  uint64_t in_use = 0;
  uint64_t free_bytes = 0;
  uint64_t requested = 0;
  uint64_t peak_in_use = 0;
  uint64_t peak_reserved = 0;
  uint64_t peak_requested = 0;
  bool unpinned = false;  // pinning refused once: the pool stays unpinned from then on
  std::string pin_note;

  void check_counters() const {
    STRATA_DCHECK(reserved == in_use + free_bytes, "reserved != in_use + free_bytes");
    STRATA_DCHECK(requested <= in_use, "requested > in_use");
    STRATA_DCHECK(peak_in_use >= in_use, "peak_in_use < in_use");
  }

  void insert_free(uintptr_t addr, size_t size, uintptr_t slab) {
    free_by_addr.emplace(addr, FreeRange{size, slab});
    free_by_size.emplace(size, addr);
  }
  void erase_free(std::map<uintptr_t, FreeRange>::iterator it) {
    free_by_size.erase({it->second.size, it->first});
    free_by_addr.erase(it);
  }

  // Records a refused pin: unpinned for good from now on. Returns true the
  // first time, when the caller warns (once per pool) after releasing mu: a
  // log sink may block (the binding's waits for the GIL).
  bool note_unpinned(const std::string& why) {
    if (unpinned) {
      return false;
    }
    unpinned = true;
    pin_note = why;
    return true;
  }
  static void warn_unpinned(const std::string& why) {
    log_message(LogLevel::kWarning, "pinned pool continues unpinned: " + why);
  }

  // Maps and pins (unless refused) one slab; called without mu held because
  // pre-faulting and pinning hundreds of MiB takes a while.
  Result<std::unique_ptr<SlabEntry>> map_slab(size_t bytes) {
    STRATA_ASSIGN_OR_RETURN(detail::Slab slab, detail::Slab::map(bytes, spec));
    auto entry = std::make_unique<SlabEntry>();
    entry->slab = std::move(slab);
    bool want_pin = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      want_pin = options.pin && !unpinned;
    }
    if (!want_pin) {
      return entry;
    }
    size_t size = entry->slab.size();
    std::string refused;
    if (backend->uses_memlock()) {
      platform::MemlockLimit limit = platform::memlock_limit();
      if (!limit.allows(size, platform::locked_bytes())) {
        refused = platform::memlock_advice(limit, size);
      }
    }
    if (refused.empty()) {
      Status st = entry->slab.pin(backend);
      if (!st.ok()) {
        refused = std::string(backend->name()) + " of a " + format_bytes(size) +
                  " slab failed: " + st.message();
        if (backend->uses_memlock()) {
          refused += "; " + platform::memlock_advice(platform::memlock_limit(), size);
        }
      }
    }
    if (!refused.empty()) {
      if (!options.allow_unpinned) {
        return Status(StatusCode::kPermissionDenied, "pinned pool: " + refused);
      }
      bool first;
      {
        std::lock_guard<std::mutex> lock(mu);
        first = note_unpinned(refused);
      }
      if (first) {
        warn_unpinned(refused);
      }
    }
    return entry;
  }

  // Adds a mapped slab as one free range. mu held.
  void add_slab_locked(std::unique_ptr<SlabEntry> entry) {
    uintptr_t base = reinterpret_cast<uintptr_t>(entry->slab.data());
    size_t size = entry->slab.size();
    insert_free(base, size, base);
    slabs.emplace(base, std::move(entry));
    reserved += size;
    free_bytes += size;
    peak_reserved = std::max(peak_reserved, reserved);
    check_counters();
  }

  uintptr_t slab_of(uintptr_t addr) const {
    auto it = slabs.upper_bound(addr);
    if (it == slabs.begin()) {
      return 0;
    }
    --it;
    uintptr_t base = it->first;
    return addr < base + it->second->slab.size() ? base : 0;
  }
};

// ---------------------------------------------------------------------------
// PinnedBuffer

PinnedBuffer::PinnedBuffer(PinnedBuffer&& other) noexcept
    : pool_(other.pool_), data_(other.data_), size_(other.size_), reserved_(other.reserved_) {
  other.pool_ = nullptr;
  other.data_ = nullptr;
  other.size_ = 0;
  other.reserved_ = 0;
}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    pool_ = other.pool_;
    data_ = other.data_;
    size_ = other.size_;
    reserved_ = other.reserved_;
    other.pool_ = nullptr;
    other.data_ = nullptr;
    other.size_ = 0;
    other.reserved_ = 0;
  }
  return *this;
}

PinnedBuffer::~PinnedBuffer() { reset(); }

void PinnedBuffer::reset() {
  if (pool_ != nullptr && data_ != nullptr) {
    pool_->release(data_, size_, reserved_);
  }
  pool_ = nullptr;
  data_ = nullptr;
  size_ = 0;
  reserved_ = 0;
}

// ---------------------------------------------------------------------------
// PinnedPool

PinnedPool::PinnedPool(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

PinnedPool::~PinnedPool() {
  if (!impl_) {
    return;
  }
  std::string leak;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    STRATA_DCHECK(impl_->live.empty(),
                  std::to_string(impl_->live.size()) + " buffers outlive their pinned pool");
    if (!impl_->live.empty()) {
      leak = "pinned pool destroyed with " + std::to_string(impl_->live.size()) +
             " live buffers (" + format_bytes(impl_->in_use) + "); their memory is unmapped now";
    }
  }
  if (!leak.empty()) {
    log_message(LogLevel::kError, leak);  // outside mu: a log sink may block
  }
}

Result<std::unique_ptr<PinnedPool>> PinnedPool::create(const PoolOptions& options) {
  if (options.slab_bytes == 0) {
    return invalid_argument("pinned pool: slab_bytes must be > 0");
  }
  if (options.numa_node < -1) {
    return invalid_argument("pinned pool: numa_node must be -1 (no binding) or a node id, got " +
                            std::to_string(options.numa_node));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->options.slab_bytes = platform::round_up(options.slab_bytes, kPoolAlignment);
  impl->backend = options.pin_backend ? options.pin_backend : default_pin_backend();
  impl->options.pin_backend = impl->backend;
  impl->spec.hugepage = options.hugepage;
  impl->spec.dontfork = options.dontfork;
  impl->spec.prefault = options.prefault;
  impl->spec.prefault_threads = options.prefault_threads;
  if (options.numa_node >= 0) {
    auto topo = platform::read_topology();
    if (!topo.ok()) {
      return topo.status().with_context("pinned pool on NUMA node " +
                                        std::to_string(options.numa_node));
    }
    const int node = options.numa_node;
    STRATA_RETURN_IF_ERROR(
        platform::check_memory_nodes({&node, 1}, topo.value()).with_context("pinned pool"));
    impl->spec.nodes = {node};
    impl->spec.policy = platform::MemPolicy::kBind;
  }
  if (options.pin && impl->backend->uses_memlock()) {
    // Checked first so a too-low limit is reported before anything is mapped.
    platform::MemlockLimit limit = platform::memlock_limit();
    uint64_t need = impl->options.slab_bytes;
    if (!limit.allows(need, platform::locked_bytes())) {
      std::string advice = platform::memlock_advice(limit, need);
      if (!options.allow_unpinned) {
        return Status(StatusCode::kPermissionDenied,
                      "pinned pool: " + advice +
                          " (or allow an unpinned pool: offload_optimizer.pin_memory=false)");
      }
      if (impl->note_unpinned(advice)) {
        Impl::warn_unpinned(advice);
      }
    }
  }
  return std::unique_ptr<PinnedPool>(new PinnedPool(std::move(impl)));
}

Status PinnedPool::reserve(size_t bytes) {
  if (bytes == 0) {
    return Status::Ok();
  }
  if (bytes > SIZE_MAX - kPoolAlignment) {
    return invalid_argument("pinned pool: reserve of " + std::to_string(bytes) + " bytes");
  }
  size_t aligned = platform::round_up(bytes, kPoolAlignment);
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (!impl_->free_by_size.empty() && impl_->free_by_size.rbegin()->first >= aligned) {
      return Status::Ok();
    }
  }
  auto entry = impl_->map_slab(aligned);
  if (!entry.ok()) {
    return entry.status().with_context("pinned pool: reserve " + format_bytes(aligned));
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->add_slab_locked(std::move(entry).value());
  return Status::Ok();
}

Result<PinnedBuffer> PinnedPool::allocate(size_t bytes) {
  if (bytes == 0) {
    return invalid_argument("pinned pool: allocation of 0 bytes");
  }
  if (bytes > SIZE_MAX - kPoolAlignment) {
    return invalid_argument("pinned pool: allocation of " + std::to_string(bytes) + " bytes");
  }
  const size_t aligned = platform::round_up(bytes, kPoolAlignment);
  Impl& m = *impl_;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(m.mu);
      auto fit = m.free_by_size.lower_bound({aligned, 0});
      if (fit != m.free_by_size.end()) {
        // Best fit, lowest address among equals; carve from the range's start.
        auto it = m.free_by_addr.find(fit->second);
        STRATA_DCHECK(it != m.free_by_addr.end(), "free lists disagree");
        uintptr_t addr = it->first;
        FreeRange range = it->second;
        m.erase_free(it);
        if (range.size > aligned) {
          // The remainder keeps the right neighbour of the old range, which was
          // not free (coalesced), so no merge is needed.
          m.insert_free(addr + aligned, range.size - aligned, range.slab);
        }
        m.live.emplace(addr, LiveRange{bytes, aligned});
        m.slabs.at(range.slab)->live += 1;
        m.in_use += aligned;
        m.free_bytes -= aligned;
        m.requested += bytes;
        m.peak_in_use = std::max(m.peak_in_use, m.in_use);
        m.peak_requested = std::max(m.peak_requested, m.requested);
        m.check_counters();
        return PinnedBuffer(this, reinterpret_cast<void*>(addr), bytes, aligned);
      }
    }
    // Nothing fits: map a slab outside the lock, then retry (another thread
    // may take part of it first; the loop then maps again).
    auto entry = m.map_slab(std::max(m.options.slab_bytes, aligned));
    if (!entry.ok()) {
      return entry.status().with_context("pinned pool: allocate " + format_bytes(bytes));
    }
    std::lock_guard<std::mutex> lock(m.mu);
    m.add_slab_locked(std::move(entry).value());
  }
}

void PinnedPool::release(void* data, size_t size, size_t reserved) {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  uintptr_t addr = reinterpret_cast<uintptr_t>(data);
  auto live = m.live.find(addr);
  bool known =
      live != m.live.end() && live->second.size == size && live->second.reserved == reserved;
  STRATA_DCHECK(known, "release of a range this pool did not hand out (double free?)");
  if (!known) {
    // Release builds: refuse rather than corrupt the free lists.
    lock.unlock();  // a log sink may block
    char what[96];
    std::snprintf(what, sizeof(what), "%p (%zu bytes)", data, size);
    log_message(LogLevel::kError,
                std::string("pinned pool: ignoring release of unknown range ") + what);
    return;
  }
  m.live.erase(live);
  uintptr_t slab = m.slab_of(addr);
  STRATA_DCHECK(slab != 0, "live range outside every slab");
  m.slabs.at(slab)->live -= 1;
  m.in_use -= reserved;
  m.free_bytes += reserved;
  m.requested -= size;

  uintptr_t start = addr;
  size_t len = reserved;
  auto next = m.free_by_addr.find(addr + reserved);
  if (next != m.free_by_addr.end() && next->second.slab == slab) {
    len += next->second.size;
    m.erase_free(next);
  }
  auto after = m.free_by_addr.lower_bound(addr);
  if (after != m.free_by_addr.begin()) {
    auto prev = std::prev(after);
    if (prev->second.slab == slab && prev->first + prev->second.size == addr) {
      start = prev->first;
      len += prev->second.size;
      m.erase_free(prev);
    }
  }
  m.insert_free(start, len, slab);
  m.check_counters();
}

PoolStats PinnedPool::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  PoolStats s;
  s.reserved = m.reserved;
  s.in_use = m.in_use;
  s.requested = m.requested;
  s.peak_in_use = m.peak_in_use;
  s.slabs = m.slabs.size();
  s.pinned = m.options.pin && !m.unpinned;
  s.free_bytes = m.free_bytes;
  s.largest_free = m.free_by_size.empty() ? 0 : m.free_by_size.rbegin()->first;
  s.free_ranges = m.free_by_addr.size();
  s.buffers = m.live.size();
  s.peak_reserved = m.peak_reserved;
  s.peak_requested = m.peak_requested;
  return s;
}

uint64_t PinnedPool::trim() {
  Impl& m = *impl_;
  std::vector<std::unique_ptr<SlabEntry>> dropped;
  uint64_t released = 0;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    for (auto it = m.slabs.begin(); it != m.slabs.end();) {
      if (it->second->live != 0) {
        ++it;
        continue;
      }
      auto range = m.free_by_addr.find(it->first);
      size_t size = it->second->slab.size();
      STRATA_DCHECK(range != m.free_by_addr.end() && range->second.size == size,
                    "idle slab is not one free range");
      if (range == m.free_by_addr.end() || range->second.size != size) {
        ++it;
        continue;
      }
      m.erase_free(range);
      m.reserved -= size;
      m.free_bytes -= size;
      released += size;
      dropped.push_back(std::move(it->second));
      it = m.slabs.erase(it);
    }
    m.check_counters();
  }
  // Unpin and unmap outside the lock.
  dropped.clear();
  return released;
}

Status PinnedPool::check_invariants() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  auto fail = [](const std::string& what) {
    return internal_error("pinned pool invariant: " + what);
  };
  if (m.reserved != m.in_use + m.free_bytes) {
    return fail("reserved " + std::to_string(m.reserved) + " != in_use " +
                std::to_string(m.in_use) + " + free " + std::to_string(m.free_bytes));
  }
  if (m.requested > m.in_use) {
    return fail("requested > in_use");
  }
  if (m.peak_in_use < m.in_use || m.peak_reserved < m.reserved || m.peak_requested < m.requested) {
    return fail("a peak is below its current value");
  }
  if (m.free_by_addr.size() != m.free_by_size.size()) {
    return fail("free lists differ in length");
  }
  uint64_t slab_total = 0;
  for (const auto& [base, entry] : m.slabs) {
    slab_total += entry->slab.size();
  }
  if (slab_total != m.reserved) {
    return fail("sum of slab sizes != reserved");
  }
  // Every slab must be tiled exactly by its free and live ranges, in address
  // order, with no two free ranges adjacent.
  std::map<uintptr_t, std::pair<size_t, bool>> ranges;  // addr -> (len, is_free)
  uint64_t free_total = 0, live_reserved = 0, live_requested = 0;
  for (const auto& [addr, r] : m.free_by_addr) {
    if (!m.free_by_size.count({r.size, addr})) {
      return fail("free range missing from the size index");
    }
    if (r.size == 0 || r.size % kPoolAlignment || addr % kPoolAlignment) {
      return fail("free range not 4 KiB aligned");
    }
    if (m.slab_of(addr) != r.slab) {
      return fail("free range recorded in the wrong slab");
    }
    ranges.emplace(addr, std::make_pair(r.size, true));
    free_total += r.size;
  }
  std::map<uintptr_t, uint64_t> live_per_slab;
  for (const auto& [addr, r] : m.live) {
    if (r.reserved != platform::round_up(r.size, kPoolAlignment) || addr % kPoolAlignment) {
      return fail("live range misaligned or mis-sized");
    }
    uintptr_t slab = m.slab_of(addr);
    if (slab == 0) {
      return fail("live range outside every slab");
    }
    live_per_slab[slab] += 1;
    if (!ranges.emplace(addr, std::make_pair(r.reserved, false)).second) {
      return fail("live range starts where a free range starts");
    }
    live_reserved += r.reserved;
    live_requested += r.size;
  }
  if (free_total != m.free_bytes) {
    return fail("sum of free ranges != free_bytes");
  }
  if (live_reserved != m.in_use || live_requested != m.requested) {
    return fail("live ranges disagree with in_use/requested");
  }
  for (const auto& [base, entry] : m.slabs) {
    if (live_per_slab[base] != entry->live) {
      return fail("slab live count disagrees with live ranges");
    }
    uintptr_t cursor = base;
    uintptr_t end = base + entry->slab.size();
    bool prev_free = false;
    for (auto it = ranges.lower_bound(base); it != ranges.end() && it->first < end; ++it) {
      if (it->first != cursor) {
        return fail(it->first < cursor ? "ranges overlap"
                                       : "bytes of a slab are neither free nor live");
      }
      bool is_free = it->second.second;
      if (is_free && prev_free) {
        return fail("two adjacent free ranges were not coalesced");
      }
      prev_free = is_free;
      cursor += it->second.first;
    }
    if (cursor != end) {
      return fail("ranges do not end at the slab's end");
    }
  }
  return Status::Ok();
}

std::string PinnedPool::pin_note() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->pin_note;
}

const PoolOptions& PinnedPool::options() const { return impl_->options; }

}  // namespace strata::memory
