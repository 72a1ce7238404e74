// benchmarks/common/bench_util.h — shared helpers of the bench binaries:
// timing, CPU time, peak RSS, a fixed-width table and --json lines.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace strata::bench {

double now_seconds();          // monotonic
double cpu_seconds();          // user + sys of the process (getrusage)
uint64_t peak_rss_bytes();     // ru_maxrss
uint64_t current_rss_bytes();  // /proc/self/statm

// Parses sizes like "4G", "512M", "1MiB", "1e9", "4096".
uint64_t parse_size(const std::string& text);
std::string format_bytes(double bytes);

// Minimal --flag value / --flag=value parser. Unknown flags are an error.
class Args {
 public:
  Args(int argc, char** argv, std::map<std::string, std::string> defaults, std::string usage);
  std::string get(const std::string& name) const;
  uint64_t size(const std::string& name) const { return parse_size(get(name)); }
  double number(const std::string& name) const;
  bool flag(const std::string& name) const;  // "--json" style boolean
  // Comma list: "1,4,32".
  std::vector<std::string> list(const std::string& name) const;

 private:
  std::map<std::string, std::string> values_;
};

using Cell = std::variant<std::string, double, int64_t>;

// One result row: printed as a table row, or as one JSON object per line
// with --json. Columns keep insertion order.
class Table {
 public:
  Table(std::vector<std::string> columns, bool json);
  void row(const std::vector<std::pair<std::string, Cell>>& cells);
  void note(const std::string& text);  // printed as "# text" (stderr with --json)

 private:
  std::vector<std::string> columns_;
  bool json_;
  bool header_done_ = false;
};

}  // namespace strata::bench
