// strata/tiers/tier.h — where a sub-group's optimizer state lives.
//
// One interface for every tier. A record is the sub-group's fp32 state slots
// laid out back to back ([master | m | v] for Adam), each slot padded to
// 4 KiB, so one record is one contiguous, 4 KiB-aligned range.
//
// Resident tiers (Host, Gpu) update in place: data(handle) points at the
// record. Fetch/store tiers (Cxl, Nvme) copy a record into a DRAM working
// buffer (fetch) and back (store); the asynchronous methods have synchronous
// defaults, so a tier only overrides what it can overlap.
//
// Ownership: a tier owns the memory or file behind its records; buffers
//   passed to fetch/store are borrowed until the ticket completes.
// Units: bytes. Alignment: records and working buffers are 4 KiB aligned.
// Thread-safety: one pipeline drives a tier; calls are not concurrent except
//   that distinct tickets may be in flight together.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <strata/status.h>

namespace strata::tiers {

enum class TierKind : uint8_t { kGpu, kHost, kCxl, kNvme };
const char* tier_name(TierKind kind);

using TierTicket = uint64_t;  // 0: already complete

struct TierStats {
  uint64_t records = 0;
  uint64_t bytes = 0;          // bytes of records held
  uint64_t bytes_fetched = 0;  // cumulative
  uint64_t bytes_stored = 0;
};

class Tier {
 public:
  virtual ~Tier() = default;
  virtual TierKind kind() const = 0;
  const char* name() const { return tier_name(kind()); }
  virtual bool resident() const = 0;

  // Reserves a record of `bytes` (multiple of 4096); returns its handle.
  virtual Result<uint32_t> add_record(size_t bytes) = 0;
  virtual size_t record_bytes(uint32_t handle) const = 0;

  // Resident tiers only: the record's memory.
  virtual float* data(uint32_t handle) { return nullptr; }

  // Fetch/store tiers: copy a record into / out of a working buffer.
  virtual Result<TierTicket> submit_fetch(uint32_t handle, void* dst) {
    STRATA_RETURN_IF_ERROR(fetch(handle, dst));
    return TierTicket{0};
  }
  virtual Result<TierTicket> submit_store(uint32_t handle, const void* src) {
    STRATA_RETURN_IF_ERROR(store(handle, src));
    return TierTicket{0};
  }
  // Completes a ticket; for fetches also verifies the record (checksums).
  // done_ns (may be null): set to when the transfer itself completed
  // (steady_clock ns, before any verification), left alone when the tier
  // does not know — ticket 0 completed inside submit.
  virtual Status wait(TierTicket ticket, int64_t* done_ns = nullptr) { return Status::Ok(); }
  virtual Status fetch(uint32_t handle, void* dst) = 0;
  virtual Status store(uint32_t handle, const void* src) = 0;

  // Chunk checksums (strata/io/checksum.h: chunk_checksum over the record's
  // record_bytes), for a pipeline that checks and hashes a record chunk by
  // chunk while it updates it, so the record crosses the memory bus once.
  // True on a tier that checks what it fetches (NVMe with
  // strata.verify_checksums); on the others the three calls below are plain
  // wait and submit_store.
  virtual bool checks_chunks() const { return false; }
  // Whether a ticket's transfer has completed (wait() then does not block on
  // the drive); an I/O error is reported by wait().
  virtual Result<bool> poll(TierTicket ticket) { return true; }
  // wait() without verifying a fetched record: the caller verifies every
  // chunk (verify_chunks) before it uses any of the chunk's bytes.
  virtual Status wait_unverified(TierTicket ticket, int64_t* done_ns = nullptr) {
    return wait(ticket, done_ns);
  }
  // Chunks [first, first + sums.size()) of a record fetched with
  // wait_unverified, against what the tier recorded at its last store.
  virtual Status verify_chunks(uint32_t handle, size_t first, std::span<const uint64_t> sums) {
    return Status::Ok();
  }
  // submit_store with the checksums of every chunk of src, computed by the
  // caller over the bytes it stores.
  virtual Result<TierTicket> submit_store_hashed(uint32_t handle, const void* src,
                                                 std::vector<uint64_t> chunk_sums) {
    return submit_store(handle, src);
  }

  // Drains in-flight work (close, errors).
  virtual void drain() {}
  virtual TierStats stats() const = 0;
  // Human-readable detail for logs and `strata info` ("io_uring, O_DIRECT, /x.swap").
  virtual std::string describe() const = 0;
  // Path of the backing file, if any (NVMe swap file), and where a record
  // sits in it (bytes).
  virtual std::string location() const { return ""; }
  virtual uint64_t record_offset(uint32_t handle) const { return 0; }
};

}  // namespace strata::tiers
