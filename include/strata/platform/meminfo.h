// strata/platform/meminfo.h — system memory figures from /proc/meminfo.
//
// The engine's default strata.dram_budget is a fraction of MemAvailable (the
// kernel's estimate of memory available without swapping, page cache
// included), not MemFree.
//
// Units: bytes (meminfo's "kB" are KiB). The path is a parameter so tests can
// read a fixture. Thread-safety: free functions without shared state.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <strata/status.h>

namespace strata::platform {

inline constexpr const char* kProcMeminfo = "/proc/meminfo";

// Value of `key` ("MemAvailable", without the colon) in bytes. NotFound when
// the file or the key is missing; InvalidArgument when the line is malformed.
Result<uint64_t> meminfo_bytes(std::string_view key, const std::string& path = kProcMeminfo);

inline Result<uint64_t> mem_available_bytes(const std::string& path = kProcMeminfo) {
  return meminfo_bytes("MemAvailable", path);
}
inline Result<uint64_t> mem_total_bytes(const std::string& path = kProcMeminfo) {
  return meminfo_bytes("MemTotal", path);
}

// "1.50 GiB"-style text (binary units, two decimals), for messages.
std::string format_bytes(uint64_t bytes);

}  // namespace strata::platform
