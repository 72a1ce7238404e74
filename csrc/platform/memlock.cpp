// RLIMIT_MEMLOCK and CAP_IPC_LOCK; see strata/platform/memlock.h.
#include <strata/platform/memlock.h>

#include <linux/capability.h>
#include <sys/resource.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>

#include <strata/platform/meminfo.h>

namespace strata::platform {

namespace {

std::mutex g_override_mu;
std::optional<MemlockLimit> g_override;

// A "Key:\tvalue" line of /proc/self/status.
bool status_field(const std::string& key, std::string* value) {
  std::ifstream in("/proc/self/status");
  std::string line;
  std::string want = key + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, want.size(), want) == 0) {
      size_t b = line.find_first_not_of(" \t", want.size());
      *value = b == std::string::npos ? std::string() : line.substr(b);
      return true;
    }
  }
  return false;
}

bool has_cap_ipc_lock() {
  std::string hex;
  if (!status_field("CapEff", &hex)) {
    return false;
  }
  char* end = nullptr;
  errno = 0;
  unsigned long long caps = std::strtoull(hex.c_str(), &end, 16);
  if (errno != 0 || end == hex.c_str()) {  // malformed: assume no capability
    return false;
  }
  return (caps >> CAP_IPC_LOCK) & 1ULL;
}

}  // namespace

MemlockLimit memlock_limit() {
  {
    std::lock_guard<std::mutex> lock(g_override_mu);
    if (g_override) {
      return *g_override;
    }
  }
  MemlockLimit out;
  rlimit rl{};
  if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
    out.unlimited = rl.rlim_cur == RLIM_INFINITY;
    out.soft = out.unlimited ? UINT64_MAX : uint64_t(rl.rlim_cur);
    out.hard = rl.rlim_max == RLIM_INFINITY ? UINT64_MAX : uint64_t(rl.rlim_max);
  }
  out.cap_ipc_lock = has_cap_ipc_lock();
  return out;
}

uint64_t locked_bytes() {
  std::string v;
  if (!status_field("VmLck", &v)) {
    return 0;
  }
  std::istringstream in(v);
  unsigned long long kib = 0;
  in >> kib;
  return uint64_t(kib) * 1024;
}

std::string memlock_advice(const MemlockLimit& limit, uint64_t bytes) {
  auto text = [](uint64_t v) {
    return v == UINT64_MAX ? std::string("unlimited") : format_bytes(v);
  };
  std::string msg = "RLIMIT_MEMLOCK is " + text(limit.soft) + " (hard " + text(limit.hard) + ")";
  msg += limit.cap_ipc_lock ? " and CAP_IPC_LOCK is held" : " and CAP_IPC_LOCK is not held";
  msg += ", so " + format_bytes(bytes) +
         " cannot be locked; raise it with `ulimit -l unlimited`"
         " (shell), a `memlock` line in /etc/security/limits.conf, LimitMEMLOCK=infinity"
         " (systemd unit) or --ulimit memlock=-1 (docker)";
  return msg;
}

void set_memlock_limit_override(std::optional<MemlockLimit> limit) {
  std::lock_guard<std::mutex> lock(g_override_mu);
  g_override = limit;
}

}  // namespace strata::platform
