// strata/io/fault_injection.h — an IoEngine that fails chosen operations.
//
// Wraps another IoEngine and makes the Nth block-level operation (each
// request is cut into block_size pieces, as the engines do) or the Nth
// submit() fail with EIO, ENOSPC or a short transfer. Deterministic: ops are
// numbered in submission order, so the same calls fail the same ops. Used by
// the tests of every layer above (tiers, engine, checkpoints) instead of
// patching syscalls.
//
// Fault kinds, as seen by the caller:
//   kEio    the op is not performed; wait() returns IoError (EIO).
//   kEnospc the op is not performed; wait() returns NoSpace (ENOSPC).
//   kShort  only the first half of the op is performed (rounded down to 4 KiB
//           on O_DIRECT files), as when a device stops mid-transfer and the
//           continuation fails; wait() returns IoError naming the bytes moved.
// For Scope::kSubmit, kEio/kEnospc make submit() itself fail (nothing is
// submitted); kShort shortens the last block op of that batch.
// Every injected error's message contains "injected".
//
// Ownership: borrows or owns the inner engine (constructor). Buffers and fds
//   as for any IoEngine.
// Thread-safety: as IoEngine; add_fault()/clear_faults() may be called at any
//   time and apply to ops submitted afterwards.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <strata/io/io_engine.h>
#include <strata/status.h>

namespace strata::io {

struct Fault {
  enum class Kind : uint8_t { kEio, kEnospc, kShort };
  enum class Scope : uint8_t { kBlockOp, kSubmit };
  enum class Match : uint8_t { kAny, kRead, kWrite };

  // 0-based index of the first failing op, counted among the ops of `scope`
  // that match `match` (e.g. at_op = 2, match = kWrite: the third block write).
  uint64_t at_op = 0;
  Kind kind = Kind::kEio;
  Scope scope = Scope::kBlockOp;
  Match match = Match::kAny;
  // How many consecutive matching ops fail from at_op on; 0: all of them (a
  // dead device).
  uint64_t count = 1;
};

class FaultInjectionEngine final : public IoEngine {
 public:
  // Borrows `inner`, which must outlive this engine. block_size: the size of
  // the pieces ops are counted in (the inner engine's block size).
  explicit FaultInjectionEngine(IoEngine* inner, size_t block_size = size_t(1) << 20);
  // Owns `inner`.
  explicit FaultInjectionEngine(std::unique_ptr<IoEngine> inner, size_t block_size = size_t(1)
                                                                                     << 20);
  ~FaultInjectionEngine() override;

  void add_fault(const Fault& fault);
  void clear_faults();
  uint64_t block_ops_seen() const;  // block ops submitted so far (all matches)
  uint64_t submits_seen() const;
  uint64_t faults_fired() const;  // block ops or submits that were failed
  IoEngine* inner() const { return inner_; }

  const char* backend_name() const override;
  const std::string& backend_note() const override { return note_; }
  Result<int> register_file(int fd, std::string path, bool direct) override;
  Status unregister_file(int file) override;
  Status register_buffer(void* base, size_t len) override;
  Status unregister_buffer(void* base) override;
  Result<Ticket> submit(std::span<const IoRequest> batch) override;
  Status wait(Ticket ticket) override;
  Status wait_timed(Ticket ticket, int64_t* done_ns) override;
  Result<bool> poll(Ticket ticket) override;
  void drain() override;
  IoStats stats() const override;
  std::vector<uint64_t> take_latencies_ns() override;

 private:
  struct Pending {
    Ticket inner = 0;  // 0: nothing was submitted to the inner engine
    Status injected;   // first injected error of the batch
  };
  struct FaultState {
    Fault fault;
    uint64_t fired = 0;
  };
  // Returns the fault that hits an op of `scope`/`op` whose per-match index
  // is given, or nullptr. Called under mu_.
  const Fault* hit(Fault::Scope scope, IoOp op, uint64_t any_index, uint64_t read_index,
                   uint64_t write_index);
  Status injected_error(const Fault& fault, IoOp op, int file, uint64_t offset, size_t len,
                        size_t moved) const;

  IoEngine* inner_;
  std::unique_ptr<IoEngine> owned_;
  size_t block_size_;
  std::string note_;

  mutable std::mutex mu_;
  std::vector<FaultState> faults_;
  uint64_t ops_ = 0, read_ops_ = 0, write_ops_ = 0;
  uint64_t submits_ = 0, read_submits_ = 0, write_submits_ = 0;
  uint64_t fired_ = 0;
  Ticket next_ticket_ = 1;
  std::unordered_map<Ticket, Pending> pending_;
  struct FileInfo {
    std::string path;
    bool direct = false;
  };
  std::unordered_map<int, FileInfo> files_;
};

}  // namespace strata::io
