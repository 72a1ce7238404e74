// /proc/meminfo figures; see strata/platform/meminfo.h.
#include <strata/platform/meminfo.h>

#include <cstdio>
#include <fstream>
#include <sstream>

namespace strata::platform {

Result<uint64_t> meminfo_bytes(std::string_view key, const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return Status(StatusCode::kNotFound, "cannot read " + path);
  }
  std::string line;
  std::string want = std::string(key) + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, want.size(), want) != 0) {
      continue;
    }
    std::istringstream ls(line.substr(want.size()));
    long long value = -1;
    std::string unit;
    if (!(ls >> value) || value < 0) {
      return invalid_argument("malformed line in " + path + ": '" + line + "'");
    }
    uint64_t mul = 1;
    if (ls >> unit) {
      if (unit != "kB") {
        return invalid_argument("unknown unit '" + unit + "' in " + path + ": '" + line + "'");
      }
      mul = 1024;
    }
    return uint64_t(value) * mul;
  }
  return Status(StatusCode::kNotFound, "no " + std::string(key) + " line in " + path);
}

std::string format_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = double(bytes);
  int u = 0;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    ++u;
  }
  char buf[48];
  if (u == 0) {
    std::snprintf(buf, sizeof(buf), "%llu B", static_cast<unsigned long long>(bytes));
  } else {
    std::snprintf(buf, sizeof(buf), "%.2f %s", v, units[u]);
  }
  return buf;
}

}  // namespace strata::platform
