#include "common/bench_util.h"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace strata::bench {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec * 1e-6;
}

uint64_t peak_rss_bytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return uint64_t(ru.ru_maxrss) * 1024;
}

uint64_t current_rss_bytes() {
  std::ifstream f("/proc/self/statm");
  uint64_t size = 0, rss = 0;
  f >> size >> rss;
  return rss * uint64_t(sysconf(_SC_PAGESIZE));
}

uint64_t parse_size(const std::string& text) {
  size_t pos = 0;
  double v = std::stod(text, &pos);
  std::string suffix = text.substr(pos);
  for (auto& c : suffix) c = char(std::toupper(c));
  double mul = 1;
  if (suffix.empty() || suffix == "B")
    mul = 1;
  else if (suffix[0] == 'K')
    mul = 1024.0;
  else if (suffix[0] == 'M')
    mul = 1024.0 * 1024;
  else if (suffix[0] == 'G')
    mul = 1024.0 * 1024 * 1024;
  else if (suffix[0] == 'T')
    mul = 1024.0 * 1024 * 1024 * 1024;
  else
    throw std::invalid_argument("bad size: " + text);
  return uint64_t(std::llround(v * mul));
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[64];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

Args::Args(int argc, char** argv, std::map<std::string, std::string> defaults, std::string usage)
    : values_(std::move(defaults)) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << usage << "\n";
      std::exit(0);
    }
    if (a.rfind("--", 0) != 0) {
      std::cerr << "unexpected argument: " << a << "\n" << usage << "\n";
      std::exit(2);
    }
    std::string name = a.substr(2), value;
    auto eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (values_.count(name) && (values_[name] == "false" || values_[name] == "true")) {
      value = "true";
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      std::cerr << "missing value for --" << name << "\n" << usage << "\n";
      std::exit(2);
    }
    if (!values_.count(name)) {
      std::cerr << "unknown flag --" << name << "\n" << usage << "\n";
      std::exit(2);
    }
    values_[name] = value;
  }
}

std::string Args::get(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::string() : it->second;
}

double Args::number(const std::string& name) const { return std::stod(get(name)); }

bool Args::flag(const std::string& name) const {
  std::string v = get(name);
  return v == "true" || v == "1" || v == "yes";
}

std::vector<std::string> Args::list(const std::string& name) const {
  std::vector<std::string> out;
  std::stringstream ss(get(name));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

Table::Table(std::vector<std::string> columns, bool json)
    : columns_(std::move(columns)), json_(json) {}

static std::string cell_text(const Cell& c) {
  char buf[64];
  if (auto s = std::get_if<std::string>(&c)) return *s;
  if (auto i = std::get_if<int64_t>(&c)) return std::to_string(*i);
  double d = std::get<double>(c);
  if (d != 0 && (std::fabs(d) >= 1e6 || std::fabs(d) < 1e-3)) {
    std::snprintf(buf, sizeof(buf), "%.3e", d);
  } else {
    std::snprintf(buf, sizeof(buf), "%.3f", d);
  }
  return buf;
}

void Table::row(const std::vector<std::pair<std::string, Cell>>& cells) {
  if (json_) {
    nlohmann::ordered_json j;
    for (auto& [k, v] : cells) {
      std::visit([&](auto&& x) { j[k] = x; }, v);
    }
    std::cout << j.dump() << std::endl;
    return;
  }
  if (!header_done_) {
    for (auto& c : columns_) std::printf("%14s ", c.c_str());
    std::printf("\n");
    header_done_ = true;
  }
  for (auto& c : columns_) {
    std::string text = "-";
    for (auto& [k, v] : cells) {
      if (k == c) text = cell_text(v);
    }
    std::printf("%14s ", text.c_str());
  }
  std::printf("\n");
  std::fflush(stdout);
}

void Table::note(const std::string& text) {
  if (json_) {
    std::cerr << "# " << text << std::endl;
  } else {
    std::cout << "# " << text << std::endl;
  }
}

}  // namespace strata::bench
