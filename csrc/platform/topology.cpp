// NUMA topology from sysfs; see strata/platform/topology.h.
#include <strata/platform/topology.h>

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <strata/platform/meminfo.h>

namespace strata::platform {

namespace {

namespace fs = std::filesystem;

Result<std::string> read_text(const fs::path& path) {
  std::ifstream in(path);
  if (!in) {
    return Status(StatusCode::kNotFound, "cannot read " + path.string());
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string_view trim(std::string_view s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string_view::npos) {
    return {};
  }
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

bool parse_int(std::string_view s, long long* out) {
  s = trim(s);
  if (s.empty()) {
    return false;
  }
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

// "Node 0 MemTotal:  6252760 kB" lines; returns bytes for MemTotal/MemFree.
Status parse_node_meminfo(const std::string& text, const fs::path& path, NumaNode* node) {
  std::istringstream in(text);
  std::string line;
  bool have_total = false;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string word, id, key, unit;
    long long value = 0;
    if (!(ls >> word >> id >> key)) {
      continue;
    }
    if (key != "MemTotal:" && key != "MemFree:") {
      continue;
    }
    if (!(ls >> value) || value < 0) {
      return invalid_argument("malformed line in " + path.string() + ": '" + line + "'");
    }
    uint64_t mul = 1;
    if (ls >> unit) {
      if (unit == "kB") {
        mul = 1024;
      } else {
        return invalid_argument("unknown unit '" + unit + "' in " + path.string());
      }
    }
    if (key == "MemTotal:") {
      node->mem_total_bytes = uint64_t(value) * mul;
      have_total = true;
    } else {
      node->mem_free_bytes = uint64_t(value) * mul;
    }
  }
  if (!have_total) {
    return invalid_argument("no MemTotal line in " + path.string());
  }
  return Status::Ok();
}

Result<std::vector<int>> parse_distances(std::string_view text, const fs::path& path) {
  std::vector<int> out;
  std::istringstream in{std::string(text)};
  std::string tok;
  while (in >> tok) {
    long long v = 0;
    if (!parse_int(tok, &v) || v < 0 || v > 255) {
      return invalid_argument("malformed distance '" + tok + "' in " + path.string());
    }
    out.push_back(int(v));
  }
  return out;
}

// Kernels without CONFIG_NUMA: one node 0 with every online CPU and all memory.
Result<std::vector<NumaNode>> single_node_fallback() {
  NumaNode node;
  node.id = 0;
  auto online = read_text("/sys/devices/system/cpu/online");
  if (online.ok()) {
    auto cpus = parse_cpulist(online.value());
    if (cpus.ok()) {
      node.cpus = std::move(cpus).value();
    }
  }
  if (node.cpus.empty()) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    for (long i = 0; i < std::max(1L, n); ++i) {
      node.cpus.push_back(int(i));
    }
  }
  STRATA_ASSIGN_OR_RETURN(node.mem_total_bytes, mem_total_bytes());
  auto free_bytes = meminfo_bytes("MemFree");
  node.mem_free_bytes = free_bytes.ok() ? free_bytes.value() : 0;
  node.distances = {10};
  node.cpu_less = false;
  return std::vector<NumaNode>{std::move(node)};
}

}  // namespace

Result<std::vector<int>> parse_cpulist(std::string_view text) {
  std::vector<int> out;
  text = trim(text);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t comma = text.find(',', pos);
    std::string_view item =
        text.substr(pos, comma == std::string_view::npos ? text.npos : comma - pos);
    pos = comma == std::string_view::npos ? text.size() : comma + 1;
    item = trim(item);
    if (item.empty()) {
      return invalid_argument("empty item in cpulist '" + std::string(text) + "'");
    }
    size_t dash = item.find('-');
    long long lo = 0, hi = 0;
    bool ok = dash == std::string_view::npos
                  ? parse_int(item, &lo) && (hi = lo, true)
                  : parse_int(item.substr(0, dash), &lo) && parse_int(item.substr(dash + 1), &hi);
    if (!ok || lo < 0 || hi < lo || hi > (1 << 20)) {
      return invalid_argument("malformed cpulist item '" + std::string(item) + "'");
    }
    for (long long c = lo; c <= hi; ++c) {
      out.push_back(int(c));
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::string format_cpulist(std::span<const int> cpus) {
  std::string list;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) {
      ++j;
    }
    list += (list.empty() ? "" : ",") + std::to_string(cpus[i]);
    if (j > i) {
      list += "-" + std::to_string(cpus[j]);
    }
    i = j + 1;
  }
  return list;
}

Result<std::vector<int>> node_cpus(int node, const std::string& sysfs_root) {
  const fs::path path = fs::path(sysfs_root) / ("node" + std::to_string(node)) / "cpulist";
  STRATA_ASSIGN_OR_RETURN(std::string text, read_text(path));
  auto cpus = parse_cpulist(text);
  if (!cpus.ok()) {
    return cpus.status().with_context(path.string());
  }
  return cpus;
}

Result<std::vector<NumaNode>> read_topology(const std::string& sysfs_root) {
  std::error_code ec;
  fs::path root(sysfs_root);
  if (!fs::is_directory(root, ec)) {
    if (sysfs_root == kDefaultSysfsNodeRoot) {
      return single_node_fallback();
    }
    return Status(StatusCode::kNotFound, "NUMA sysfs root " + sysfs_root + " is not a directory");
  }
  std::vector<std::pair<int, fs::path>> dirs;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    long long id = 0;
    if (name.rfind("node", 0) == 0 && name.size() > 4 && parse_int(name.substr(4), &id) &&
        id >= 0 && id < (1 << 20)) {
      dirs.emplace_back(int(id), it->path());
    }
  }
  if (ec) {
    return Status::from_errno(ec.value(), "list " + sysfs_root);
  }
  if (dirs.empty()) {
    return Status(StatusCode::kNotFound, "no node<N> directories under " + sysfs_root);
  }
  std::sort(dirs.begin(), dirs.end());
  std::vector<NumaNode> nodes;
  nodes.reserve(dirs.size());
  for (auto& [id, dir] : dirs) {
    NumaNode node;
    node.id = id;
    STRATA_ASSIGN_OR_RETURN(std::string cpulist, read_text(dir / "cpulist"));
    auto cpus = parse_cpulist(cpulist);
    if (!cpus.ok()) {
      return cpus.status().with_context((dir / "cpulist").string());
    }
    node.cpus = std::move(cpus).value();
    STRATA_ASSIGN_OR_RETURN(std::string meminfo, read_text(dir / "meminfo"));
    STRATA_RETURN_IF_ERROR(parse_node_meminfo(meminfo, dir / "meminfo", &node));
    auto distance = read_text(dir / "distance");
    if (distance.ok()) {
      STRATA_ASSIGN_OR_RETURN(node.distances, parse_distances(distance.value(), dir / "distance"));
    }
    node.cpu_less = node.cpus.empty() && node.mem_total_bytes > 0;
    nodes.push_back(std::move(node));
  }
  return nodes;
}

std::vector<int> cpu_less_nodes(const std::vector<NumaNode>& topology) {
  std::vector<int> out;
  for (const auto& n : topology) {
    if (n.cpu_less) {
      out.push_back(n.id);
    }
  }
  return out;
}

Status check_memory_nodes(std::span<const int> nodes, const std::vector<NumaNode>& topology) {
  std::string with_memory;
  for (const auto& n : topology) {
    if (n.has_memory()) {
      with_memory += (with_memory.empty() ? "" : ", ") + std::to_string(n.id);
    }
  }
  if (with_memory.empty()) {
    with_memory = "none";
  }
  for (int id : nodes) {
    auto it = std::find_if(topology.begin(), topology.end(),
                           [id](const NumaNode& n) { return n.id == id; });
    if (it == topology.end()) {
      return Status(StatusCode::kNotFound,
                    "NUMA node " + std::to_string(id) +
                        " does not exist (nodes with memory: " + with_memory + ")");
    }
    if (!it->has_memory()) {
      return invalid_argument("NUMA node " + std::to_string(id) +
                              " has no memory (nodes with memory: " + with_memory + ")");
    }
  }
  return Status::Ok();
}

std::string describe_topology(const std::vector<NumaNode>& topology) {
  std::string out;
  for (const auto& n : topology) {
    out += "node " + std::to_string(n.id) + ": ";
    if (n.cpu_less) {
      out += "cpu-less (CXL/memory-only)";
    } else if (n.cpus.empty()) {
      out += "no cpus, no memory";
    } else {
      out += "cpus " + format_cpulist(n.cpus);
    }
    out +=
        ", " + format_bytes(n.mem_total_bytes) + " (" + format_bytes(n.mem_free_bytes) + " free)";
    if (!n.distances.empty()) {
      out += ", distances";
      for (int d : n.distances) {
        out += " " + std::to_string(d);
      }
    }
    out += "\n";
  }
  return out;
}

}  // namespace strata::platform
