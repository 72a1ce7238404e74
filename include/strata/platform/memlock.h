// strata/platform/memlock.h — how much memory this process may lock, and the
// message that tells the user how to raise it.
//
// mlock counts against RLIMIT_MEMLOCK's soft limit unless the process holds
// CAP_IPC_LOCK (root normally does, so tests that need a low limit either
// drop the capability in a child or use the override seam below).
//
// Units: bytes. Thread-safety: memlock_limit() and the override are safe to
// use from any thread (the override is an atomic snapshot under a mutex).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace strata::platform {

struct MemlockLimit {
  uint64_t soft = 0;          // RLIMIT_MEMLOCK rlim_cur (bytes); UINT64_MAX when unlimited
  uint64_t hard = 0;          // rlim_max
  bool unlimited = false;     // soft == RLIM_INFINITY
  bool cap_ipc_lock = false;  // CAP_IPC_LOCK in the effective set: the limit is not enforced
  // True when `bytes` more can be locked by a process that has
  // `already_locked` bytes locked (VmLck).
  bool allows(uint64_t bytes, uint64_t already_locked) const {
    return unlimited || cap_ipc_lock || (already_locked <= soft && bytes <= soft - already_locked);
  }
};

// The limit in force: the test override when one is set, else getrlimit()
// and CapEff from /proc/self/status.
MemlockLimit memlock_limit();

// Bytes this process has locked now (VmLck of /proc/self/status; 0 when unreadable).
uint64_t locked_bytes();

// "RLIMIT_MEMLOCK is 8.00 MiB (hard 8.00 MiB) and CAP_IPC_LOCK is not held, so
//  256.00 MiB cannot be locked; raise it with `ulimit -l unlimited` (shell),
//  a `memlock` line in /etc/security/limits.conf, LimitMEMLOCK=infinity
//  (systemd) or --ulimit memlock=-1 (docker)".
std::string memlock_advice(const MemlockLimit& limit, uint64_t bytes);

// Test seam: while set, memlock_limit() returns `limit` instead of the real
// one (process-wide). Restore with std::nullopt.
void set_memlock_limit_override(std::optional<MemlockLimit> limit);

// RAII form of the seam for tests.
class ScopedMemlockOverride {
 public:
  explicit ScopedMemlockOverride(const MemlockLimit& limit) { set_memlock_limit_override(limit); }
  ~ScopedMemlockOverride() { set_memlock_limit_override(std::nullopt); }
  ScopedMemlockOverride(const ScopedMemlockOverride&) = delete;
  ScopedMemlockOverride& operator=(const ScopedMemlockOverride&) = delete;
};

}  // namespace strata::platform
