// strata-bench-pool: reserved/requested bytes and allocation time of pinned
// host memory, replaying the allocation pattern of a LLaMA-7B-like model's
// optimizer offload through
//   pinned_pool   strata's PinnedPool growing slab by slab (no plan),
//   pool_reserve  PinnedPool with the planned peak reserved up front (what the
//                 engine does: it knows every record size before step 1),
//   pow2_caching  a model of PyTorch's CachingHostAllocator (>= 2.3): round
//                 each request up to a power of two, reuse a cached block of
//                 that size class, otherwise pin a new block; blocks are
//                 cached, never returned,
//   memalign_mlock  per-tensor posix_memalign(4096) + mlock, munlock + free,
//   bound         one mapping of the peak requested bytes, pre-faulted and
//                 locked at once: the least any allocator can reserve, and
//                 the time pinning that much takes on this machine.
// Every allocator pins (mlock) what it reserves; the ratio is peak reserved
// over peak requested, both measured in this run.
//
// The pattern (same sequence for every allocator):
//   init: per tensor, bf16 parameter and gradient staging buffers; per tensor
//         in DRAM (the first --dram-fraction of the parameters), its fp32
//         record [master | m | v] (12 B/param);
//   steps: the NVMe-resident tensors, packed into sub-groups of at most
//         --sub-group-size elements (larger tensors split), flow through the
//         swap pipeline in gradient-ready (reverse) order: each sub-group's
//         record buffer is allocated for its fetch and freed after its
//         write-back, with --buffer-count of them in flight.
// --scale keeps ceil(scale * rows) rows of every 2-D tensor (norms whole)
// and scales sub_group_size and the pool's slab size alike, so the pattern
// keeps the model's column widths and shape mix at a size that fits here.
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <strata/memory/pinned_pool.h>
#include <strata/platform/meminfo.h>
#include <strata/platform/memlock.h>
#include <strata/platform/vm.h>

#include "common/bench_util.h"

namespace {

namespace bench = strata::bench;
namespace platform = strata::platform;
using strata::memory::PinnedBuffer;
using strata::memory::PinnedPool;
using strata::memory::PoolOptions;

constexpr size_t kPage = 4096;

struct Tensor {
  std::string name;
  uint64_t rows, cols;  // cols == 1 for 1-D
  uint64_t numel() const { return rows * cols; }
};

std::vector<Tensor> llama7b_like(double scale) {
  const uint64_t hidden = 4096, inter = 11008, vocab = 32000, layers = 32;
  auto rows = [&](uint64_t r) {
    return std::max<uint64_t>(1, uint64_t(std::ceil(double(r) * scale)));
  };
  std::vector<Tensor> out;
  out.push_back({"embed_tokens", rows(vocab), hidden});
  for (uint64_t l = 0; l < layers; ++l) {
    std::string p = "layers." + std::to_string(l) + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      out.push_back({p + n, rows(hidden), hidden});
    }
    out.push_back({p + "gate_proj", rows(inter), hidden});
    out.push_back({p + "up_proj", rows(inter), hidden});
    out.push_back({p + "down_proj", rows(hidden), inter});
    out.push_back({p + "input_layernorm", hidden, 1});
    out.push_back({p + "post_attention_layernorm", hidden, 1});
  }
  out.push_back({"norm", hidden, 1});
  out.push_back({"lm_head", rows(vocab), hidden});
  return out;
}

struct Op {
  bool alloc;
  uint32_t id;
  uint64_t bytes;  // for alloc
};

struct Pattern {
  std::vector<Op> ops;
  uint32_t ids = 0;
  uint64_t params = 0;
  uint64_t sub_groups = 0;
  uint64_t peak_requested = 0;  // bytes
  uint64_t peak_aligned =
      0;  // bytes rounded to 4 KiB each: what a perfect 4 KiB allocator reserves
};

Pattern make_pattern(const std::vector<Tensor>& tensors, double dram_fraction,
                     uint64_t sub_group_size, unsigned buffer_count, unsigned steps) {
  Pattern p;
  for (const auto& t : tensors) {
    p.params += t.numel();
  }
  const uint64_t dram_params = uint64_t(double(p.params) * dram_fraction);
  uint64_t placed = 0;
  std::vector<uint64_t> nvme_numels;
  auto alloc = [&](uint64_t bytes) {
    p.ops.push_back({true, p.ids++, bytes});
    return p.ids - 1;
  };
  for (const auto& t : tensors) {
    uint64_t n = t.numel();
    alloc(2 * n);  // bf16 parameter staging
    alloc(2 * n);  // bf16 gradient staging
    if (placed + n <= dram_params) {
      alloc(12 * n);  // fp32 [master | m | v] record in DRAM
    } else {
      nvme_numels.push_back(n);
    }
    placed += n;
  }
  // Sub-groups of the NVMe part: whole tensors packed up to sub_group_size,
  // larger tensors split into sub_group_size pieces.
  std::vector<uint64_t> groups;
  uint64_t cur = 0;
  for (uint64_t n : nvme_numels) {
    while (n > sub_group_size) {
      if (cur) {
        groups.push_back(cur);
        cur = 0;
      }
      groups.push_back(sub_group_size);
      n -= sub_group_size;
    }
    if (cur + n > sub_group_size) {
      groups.push_back(cur);
      cur = 0;
    }
    cur += n;
  }
  if (cur) {
    groups.push_back(cur);
  }
  p.sub_groups = groups.size();
  for (unsigned s = 0; s < steps; ++s) {
    std::deque<uint32_t> in_flight;
    for (auto it = groups.rbegin(); it != groups.rend(); ++it) {
      if (in_flight.size() == buffer_count) {
        p.ops.push_back({false, in_flight.front(), 0});  // oldest write-back done
        in_flight.pop_front();
      }
      in_flight.push_back(alloc(12 * *it));
    }
    for (uint32_t id : in_flight) {
      p.ops.push_back({false, id, 0});
    }
  }
  // Peak of live bytes, as requested and as 4 KiB-rounded.
  std::vector<uint64_t> size(p.ids);
  uint64_t live = 0, live_aligned = 0;
  for (const auto& op : p.ops) {
    if (op.alloc) {
      size[op.id] = op.bytes;
      live += op.bytes;
      live_aligned += platform::round_up(op.bytes, kPage);
    } else {
      live -= size[op.id];
      live_aligned -= platform::round_up(size[op.id], kPage);
    }
    p.peak_requested = std::max(p.peak_requested, live);
    p.peak_aligned = std::max(p.peak_aligned, live_aligned);
  }
  return p;
}

struct Result {
  std::string name;
  uint64_t peak_requested = 0;
  uint64_t peak_reserved = 0;
  double alloc_seconds = 0;   // inside allocation calls (slab/block creation included)
  double replay_seconds = 0;  // the whole replay, frees included
  uint64_t chunks = 0;        // slabs / blocks / mappings
  bool ok = true;
  std::string error;
};

// --- (a) PinnedPool --------------------------------------------------------

Result run_pinned_pool(const Pattern& p, const PoolOptions& opt, bool plan, const char* name) {
  Result r;
  r.name = name;
  auto pool = PinnedPool::create(opt);
  if (!pool.ok()) {
    r.ok = false;
    r.error = pool.status().to_string();
    return r;
  }
  std::vector<PinnedBuffer> bufs(p.ids);
  double t0 = bench::now_seconds();
  if (plan) {
    double a = bench::now_seconds();
    strata::Status st = (*pool)->reserve(p.peak_aligned);
    r.alloc_seconds += bench::now_seconds() - a;
    if (!st.ok()) {
      r.ok = false;
      r.error = st.to_string();
      return r;
    }
  }
  for (const auto& op : p.ops) {
    if (op.alloc) {
      double a = bench::now_seconds();
      auto b = (*pool)->allocate(op.bytes);
      r.alloc_seconds += bench::now_seconds() - a;
      if (!b.ok()) {
        r.ok = false;
        r.error = b.status().to_string();
        break;
      }
      bufs[op.id] = std::move(b).value();
    } else {
      bufs[op.id].reset();
    }
  }
  r.replay_seconds = bench::now_seconds() - t0;
  strata::memory::PoolStats s = (*pool)->stats();
  r.peak_requested = s.peak_requested;
  r.peak_reserved = s.peak_reserved;
  r.chunks = s.slabs;
  if (r.ok && !s.pinned) {
    r.error = "unpinned: " + (*pool)->pin_note();
  }
  strata::Status inv = (*pool)->check_invariants();
  if (!inv.ok()) {
    r.ok = false;
    r.error = inv.to_string();
  }
  bufs.clear();
  return r;
}

// Pinned (locked) anonymous block, the stand-in for cudaHostAlloc: the pages
// are allocated and locked when the call returns.
void* pinned_block(size_t bytes, bool lock) {
  void* p = nullptr;
  if (platform::map_anonymous(bytes, kPage, &p) != 0) {
    return nullptr;
  }
  int r = lock ? platform::lock_memory(p, bytes) : platform::prefault(p, bytes, 1);
  if (r != 0) {
    (void)platform::unmap(p, bytes);
    return nullptr;
  }
  return p;
}

// --- (b) PyTorch CachingHostAllocator model -------------------------------

class Pow2Caching {
 public:
  explicit Pow2Caching(bool lock, bool dry) : lock_(lock), dry_(dry) {}
  ~Pow2Caching() {
    for (auto& [size, list] : free_) {
      for (void* p : list) {
        if (p) {
          (void)platform::unmap(p, size);
        }
      }
    }
  }
  // Returns false when the OS refuses.
  bool allocate(uint32_t id, uint64_t bytes) {
    uint64_t round = std::bit_ceil(bytes);  // c10::llvm::PowerOf2Ceil
    auto& list = free_[round];              // free list of that size class
    void* p = nullptr;
    if (!list.empty()) {
      p = list.back();
      list.pop_back();
    } else {
      if (!dry_) {
        p = pinned_block(round, lock_);
        if (!p) {
          return false;
        }
      }
      reserved_ += round;
      blocks_ += 1;
    }
    live_[id] = {p, round};
    return true;
  }
  void release(uint32_t id) {
    auto it = live_.find(id);
    free_[it->second.second].push_back(it->second.first);  // cached, not returned
    live_.erase(it);
  }
  uint64_t reserved() const { return reserved_; }
  uint64_t blocks() const { return blocks_; }

 private:
  bool lock_, dry_;
  std::map<uint64_t, std::vector<void*>> free_;
  std::map<uint32_t, std::pair<void*, uint64_t>> live_;
  uint64_t reserved_ = 0, blocks_ = 0;
};

Result run_pow2(const Pattern& p, bool lock) {
  Result r;
  r.name = "pow2_caching";
  Pow2Caching a(lock, /*dry=*/false);
  std::vector<uint64_t> size(p.ids);
  uint64_t live = 0;
  double t0 = bench::now_seconds();
  for (const auto& op : p.ops) {
    if (op.alloc) {
      double s = bench::now_seconds();
      bool ok = a.allocate(op.id, op.bytes);
      r.alloc_seconds += bench::now_seconds() - s;
      if (!ok) {
        r.ok = false;
        r.error = "mmap/mlock of a power-of-two block failed";
        break;
      }
      size[op.id] = op.bytes;
      live += op.bytes;
      r.peak_requested = std::max(r.peak_requested, live);
    } else {
      a.release(op.id);
      live -= size[op.id];
    }
  }
  r.replay_seconds = bench::now_seconds() - t0;
  r.peak_reserved = a.reserved();  // never shrinks: the peak is the end
  r.chunks = a.blocks();
  return r;
}

// The same model without memory, for the full-size model's figures.
std::pair<uint64_t, uint64_t> pow2_dry(const Pattern& p) {
  Pow2Caching a(false, /*dry=*/true);
  for (const auto& op : p.ops) {
    if (op.alloc) {
      (void)a.allocate(op.id, op.bytes);
    } else {
      a.release(op.id);
    }
  }
  return {a.reserved(), p.peak_requested};
}

// --- (c) posix_memalign + mlock per tensor ---------------------------------

Result run_memalign(const Pattern& p, bool lock) {
  Result r;
  r.name = "memalign_mlock";
  std::vector<std::pair<void*, uint64_t>> live_ptr(p.ids, {nullptr, 0});
  uint64_t live = 0, live_pages = 0;
  double t0 = bench::now_seconds();
  for (const auto& op : p.ops) {
    if (op.alloc) {
      double s = bench::now_seconds();
      void* q = nullptr;
      bool ok = posix_memalign(&q, kPage, op.bytes) == 0;
      if (ok) {
        ok = lock ? platform::lock_memory(q, op.bytes) == 0
                  : platform::prefault(q, op.bytes, 1) == 0;
        if (!ok) {
          std::free(q);
        }
      }
      r.alloc_seconds += bench::now_seconds() - s;
      if (!ok) {
        r.ok = false;
        r.error = "posix_memalign/mlock failed";
        break;
      }
      live_ptr[op.id] = {q, op.bytes};
      live += op.bytes;
      live_pages += platform::round_up(op.bytes, kPage);  // what mlock pins
      r.peak_requested = std::max(r.peak_requested, live);
      r.peak_reserved = std::max(r.peak_reserved, live_pages);
      r.chunks += 1;
    } else {
      auto [q, bytes] = live_ptr[op.id];
      if (lock) {
        (void)platform::unlock_memory(q, bytes);
      }
      std::free(q);
      live_ptr[op.id] = {nullptr, 0};
      live -= bytes;
      live_pages -= platform::round_up(bytes, kPage);
    }
  }
  r.replay_seconds = bench::now_seconds() - t0;
  for (auto& [q, bytes] : live_ptr) {
    if (q) {
      if (lock) {
        (void)platform::unlock_memory(q, bytes);
      }
      std::free(q);
    }
  }
  return r;
}

// --- bound: pin the peak requested bytes in one go ---------------------------

Result run_bound(const Pattern& p, bool lock) {
  Result r;
  r.name = "bound";
  r.peak_requested = p.peak_requested;
  r.peak_reserved = platform::round_up(p.peak_requested, kPage);
  double t0 = bench::now_seconds();
  void* q = nullptr;
  int rc = platform::map_anonymous(r.peak_reserved, platform::kHugePageSize, &q);
  if (rc == 0) {
    (void)platform::advise_hugepage(q, r.peak_reserved);
    rc = platform::prefault(q, r.peak_reserved, 0);
  }
  if (rc == 0 && lock) {
    rc = platform::lock_memory(q, r.peak_reserved);
  }
  r.alloc_seconds = r.replay_seconds = bench::now_seconds() - t0;
  r.chunks = 1;
  if (rc != 0) {
    r.ok = false;
    r.error = "map/prefault/mlock of the bound failed";
  }
  if (q) {
    (void)platform::unmap(q, r.peak_reserved);
  }
  return r;
}

// Touches and frees `bytes` so that the next run starts from memory the
// kernel (and, in a VM, the host) has already backed: on this kind of
// machine the first touch of cold guest memory costs several times more than
// reusing freed pages, which would otherwise favour whichever allocator runs
// second.
void warm_up(uint64_t bytes) {
  void* q = nullptr;
  if (platform::map_anonymous(bytes, platform::kHugePageSize, &q) != 0) {
    return;
  }
  (void)platform::advise_hugepage(q, bytes);
  (void)platform::prefault(q, bytes, 0);
  (void)platform::unmap(q, bytes);
}

}  // namespace

int main(int argc, char** argv) {
  bench::Args args(
      argc, argv,
      {{"scale", "0.01"},
       {"dram-fraction", "0.5"},
       {"sub-group-size", "1e8"},
       {"buffer-count", "4"},
       {"steps", "3"},
       {"slab-bytes", "auto"},
       {"allocators", "bound,pinned_pool,pool_reserve,pow2_caching,memalign_mlock"},
       {"warm-up", "true"},
       {"json", "false"}},
      "strata-bench-pool [--scale F] [--dram-fraction F] [--sub-group-size N]\n"
      "  [--buffer-count N] [--steps N] [--slab-bytes SIZE|auto] [--allocators LIST]\n"
      "  [--warm-up true|false] [--json]\n"
      "Replays a LLaMA-7B-like offload allocation pattern through pinned allocators.\n"
      "--scale: fraction of every 2-D tensor's rows kept (default 0.01: ~0.7 GiB requested);\n"
      "--sub-group-size: elements per sub-group at full scale (scaled by --scale);\n"
      "--slab-bytes: PinnedPool slab size (auto: 256 MiB scaled by --scale).");
  const double scale = args.number("scale");
  if (!(scale > 0 && scale <= 1)) {
    std::fprintf(stderr, "--scale must be in (0, 1]\n");
    return 2;
  }
  const bool json = args.flag("json");
  const uint64_t sub_group_size =
      std::max<uint64_t>(1, uint64_t(std::llround(args.number("sub-group-size") * scale)));
  const unsigned buffer_count = unsigned(std::max(1.0, args.number("buffer-count")));
  const unsigned steps = unsigned(std::max(1.0, args.number("steps")));
  uint64_t slab_bytes =
      args.get("slab-bytes") == "auto"
          ? std::max<uint64_t>(64 << 10, uint64_t(double(uint64_t(256) << 20) * scale))
          : args.size("slab-bytes");
  slab_bytes = platform::round_up(slab_bytes, kPage);

  const auto tensors = llama7b_like(scale);
  const Pattern pattern =
      make_pattern(tensors, args.number("dram-fraction"), sub_group_size, buffer_count, steps);

  bench::Table table(
      {"allocator", "requested", "reserved", "ratio", "alloc_s", "vs_bound_t", "chunks"}, json);
  uint64_t allocs = 0;
  for (const auto& op : pattern.ops) {
    allocs += op.alloc;
  }
  table.note("pattern: " + std::to_string(tensors.size()) + " tensors, " +
             std::to_string(pattern.params) + " params (scale " + args.get("scale") + "), " +
             std::to_string(pattern.sub_groups) + " NVMe sub-groups of <= " +
             std::to_string(sub_group_size) + " elements, " + std::to_string(allocs) +
             " allocations; peak requested " + platform::format_bytes(pattern.peak_requested) +
             "; pool slab " + platform::format_bytes(slab_bytes));

  // Every allocator pins what it reserves. Without enough RLIMIT_MEMLOCK
  // (and no CAP_IPC_LOCK) all of them run unpinned, pre-faulting instead, so
  // they still compare like with like.
  platform::MemlockLimit lim = platform::memlock_limit();
  const bool lock =
      lim.allows(2 * pattern.peak_requested + (uint64_t(64) << 20), platform::locked_bytes());
  if (!lock) {
    table.note("not pinning (every allocator pre-faults instead): " +
               platform::memlock_advice(lim, 2 * pattern.peak_requested));
  }
  auto avail = platform::mem_available_bytes();
  if (avail.ok() && avail.value() < 3 * pattern.peak_requested) {
    table.note("warning: MemAvailable " + platform::format_bytes(avail.value()) +
               " is tight for this --scale (power-of-two rounding needs up to 2x)");
  }

  PoolOptions popt;
  popt.slab_bytes = slab_bytes;
  popt.pin = lock;
  popt.allow_unpinned = true;

  double bound_seconds = 0;
  int failures = 0;
  for (const std::string& which : args.list("allocators")) {
    Result r;
    if (args.flag("warm-up")) {
      warm_up(2 * pattern.peak_requested);
    }
    if (which == "bound") {
      r = run_bound(pattern, lock);
    } else if (which == "pinned_pool") {
      r = run_pinned_pool(pattern, popt, /*plan=*/false, "pinned_pool");
    } else if (which == "pool_reserve") {
      r = run_pinned_pool(pattern, popt, /*plan=*/true, "pool_reserve");
    } else if (which == "pow2_caching") {
      r = run_pow2(pattern, lock);
    } else if (which == "memalign_mlock") {
      r = run_memalign(pattern, lock);
    } else {
      std::fprintf(stderr, "unknown allocator %s\n", which.c_str());
      return 2;
    }
    if (!r.ok) {
      table.note(r.name + " failed: " + r.error);
      failures++;
      continue;
    }
    if (!r.error.empty()) {
      table.note(r.name + ": " + r.error);
    }
    if (which == "bound") {
      bound_seconds = r.alloc_seconds;
    }
    double ratio = r.peak_requested ? double(r.peak_reserved) / double(r.peak_requested) : 0;
    std::vector<std::pair<std::string, bench::Cell>> cells = {
        {"allocator", r.name},
        {"requested_bytes", int64_t(r.peak_requested)},
        {"reserved_bytes", int64_t(r.peak_reserved)},
        {"ratio", ratio},
        {"alloc_seconds", r.alloc_seconds},
    };
    if (json) {
      cells.push_back({"replay_seconds", r.replay_seconds});
      cells.push_back({"chunks", int64_t(r.chunks)});
      cells.push_back({"pinned", int64_t(lock)});
      if (bound_seconds > 0) {
        cells.push_back({"alloc_seconds_vs_bound", r.alloc_seconds / bound_seconds});
      }
      table.row(cells);
    } else {
      table.row({{"allocator", r.name},
                 {"requested", platform::format_bytes(r.peak_requested)},
                 {"reserved", platform::format_bytes(r.peak_reserved)},
                 {"ratio", ratio},
                 {"alloc_s", r.alloc_seconds},
                 {"vs_bound_t", bound_seconds > 0 ? bench::Cell(r.alloc_seconds / bound_seconds)
                                                  : bench::Cell(std::string("-"))},
                 {"chunks", int64_t(r.chunks)}});
    }
  }

  // The full-size model, by accounting only (no memory): what the
  // power-of-two rule costs at scale 1.
  const auto full = llama7b_like(1.0);
  const Pattern full_pattern =
      make_pattern(full, args.number("dram-fraction"), uint64_t(args.number("sub-group-size")),
                   buffer_count, steps);
  auto [full_reserved, full_requested] = pow2_dry(full_pattern);
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "at scale 1 (accounting only): pow2_caching would pin %s for a peak of %s "
                "requested (ratio %.3f); 4 KiB rounding needs %s (ratio %.5f)",
                platform::format_bytes(full_reserved).c_str(),
                platform::format_bytes(full_requested).c_str(),
                double(full_reserved) / double(full_requested),
                platform::format_bytes(full_pattern.peak_aligned).c_str(),
                double(full_pattern.peak_aligned) / double(full_requested));
  table.note(buf);
  return failures ? 1 : 0;
}
