// strata/tiers/param_store.h — the param tier: the model's own weights (in
// their model dtype) at ZeRO stage 3 (zero_optimization.offload_param).
//
// One record per parameter, added as the model is built (strata.zero.Init
// adds each parameter as its module is constructed, so the model's size is
// not known up front). A record holds the parameter's bytes, padded to
// 4 KiB. Where it lives:
//   - host (offload_param.device cpu): pinned (or plain) DRAM; resident —
//     data(id) is the record, stable for the store's life, and a module's
//     weights can point straight at it;
//   - cxl: memory bound to CPU-less NUMA nodes; fetched/stored by memcpy;
//   - nvme: extents of swap files of its own under nvme_path (checksummed,
//     O_DIRECT through its own IoEngine); the store grows by whole files of
//     chunk_bytes (or one record's size, when larger) as records are added.
//
// A fetch copies a record into a caller's buffer (staging(): 4 KiB aligned,
// record_bytes long); a store writes one back. store_owned() hands the store
// a staging buffer to write from and keep until the write completed — what
// the optimizer's update does with the new weights — and a later fetch of
// the same record waits for that write first, so a fetch always sees the
// last stored bytes. The error of an owned write is returned by the next
// fetch of its record or by flush().
//
// Ownership: the store owns its records, swap files, I/O engine and staging
//   pools; buffers passed to submit_fetch/submit_store are borrowed until
//   their ticket is waited.
// Units: bytes, except numel. Alignment: records and staging buffers are
//   4 KiB aligned.
// Thread-safety: every method may be called from any thread (internally
//   locked); a ticket is waited by one thread; one record is not fetched
//   into and stored from the same buffer at the same time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <strata/config.h>
#include <strata/io/io_engine.h>
#include <strata/memory/pinned_pool.h>
#include <strata/status.h>
#include <strata/tiers/tier.h>

namespace strata::tiers {

struct ParamStoreOptions {
  TierKind kind = TierKind::kHost;           // kHost, kCxl or kNvme
  std::string nvme_path;                     // kNvme
  std::string tag = "param";                 // part of the swap files' names
  bool pin = false;                          // page-lock host records and staging buffers
  bool checksums = true;                     // strata.verify_checksums (NVMe)
  bool direct = true;                        // O_DIRECT (NVMe), buffered when refused
  std::vector<int> cxl_nodes;                // kCxl
  io::IoOptions io;                          // aio.*
  uint64_t chunk_bytes = uint64_t(1) << 30;  // NVMe: each swap file's size (at least)
};

// offload_param.* of a parsed config: device (cpu -> kHost, cxl, nvme; none
// is InvalidArgument: there is no param tier), nvme_path, pin_memory,
// aio.*, strata.verify_checksums and strata.cxl_nodes.
Result<ParamStoreOptions> param_store_options(const Config& config, const std::string& tag);

struct ParamStoreStats {
  uint64_t records = 0;
  uint64_t bytes = 0;         // the parameters' own bytes
  uint64_t record_bytes = 0;  // with padding: what the tier holds
  uint64_t bytes_fetched = 0;
  uint64_t bytes_stored = 0;  // initial values included
  uint64_t fetches = 0;
  uint64_t stores = 0;
  uint64_t staging_in_use = 0;  // bytes of live staging buffers
  uint64_t staging_peak = 0;
  uint64_t files = 0;  // NVMe swap files
  std::string path;    // the first swap file (NVMe), else ""
};

// One NVMe transfer of a record, for a timeline (the engine's trace): from
// its submit to its completion as the I/O engine saw it, in
// std::chrono::steady_clock nanoseconds.
struct ParamTransfer {
  bool read = false;  // a fetch; else a store (owned writes included)
  uint32_t id = 0;
  uint64_t bytes = 0;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
};

class ParamStore {
 public:
  static Result<std::unique_ptr<ParamStore>> create(const ParamStoreOptions& options);
  ~ParamStore();
  ParamStore(const ParamStore&) = delete;
  ParamStore& operator=(const ParamStore&) = delete;

  TierKind kind() const;
  bool resident() const;  // host: data() is the record

  // Adds a record of `bytes` and writes `init` (bytes long, any alignment)
  // into it; null init: zeros. Returns its id (0, 1, 2, ... in order).
  Result<uint32_t> add(size_t bytes, const void* init);
  size_t count() const;
  size_t bytes(uint32_t id) const;         // as given to add()
  size_t record_bytes(uint32_t id) const;  // bytes rounded up to 4 KiB
  // Resident stores: the record's memory. Else nullptr.
  void* data(uint32_t id);

  // A 4 KiB-aligned buffer of `bytes` for fetches and stores (pinned when
  // the options say so), from a pool that keeps freed ranges for reuse.
  Result<memory::PinnedBuffer> staging(size_t bytes);

  // dst/src: record_bytes(id), 4 KiB aligned. A ticket of 0 is complete.
  Result<io::Ticket> submit_fetch(uint32_t id, void* dst);
  Result<io::Ticket> submit_store(uint32_t id, const void* src);
  Status wait(io::Ticket ticket);
  // Non-blocking: true when the ticket's transfer completed (wait() then
  // returns at once, with its checksum verdict); the ticket stays to be
  // waited. 0 is complete; an unknown ticket is InvalidArgument.
  Result<bool> poll(io::Ticket ticket);
  Status fetch(uint32_t id, void* dst);
  Status store(uint32_t id, const void* src);
  // Writes buf (record_bytes(id) or more) to the record and keeps buf until
  // the write completed; returns once the write is submitted.
  Status store_owned(uint32_t id, memory::PinnedBuffer buf);
  // Waits for every write in flight; the first error of an owned write.
  Status flush();
  // Unmaps staging memory no buffer uses (after building a model, whose
  // largest parameter sized the pool); returns the bytes released.
  uint64_t trim_staging();

  // Transfer log (NVMe; off until enabled): every completed fetch and store
  // is kept, the oldest dropped past 65536, until take_transfers() hands
  // them over (completion order).
  void record_transfers(bool on);
  std::vector<ParamTransfer> take_transfers();

  ParamStoreStats stats() const;
  std::string describe() const;  // "nvme (io_uring, O_DIRECT, /x/strata-param-....swap)"
  Status close();                // drains; safe to call twice

 private:
  struct Impl;
  explicit ParamStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::tiers
