// strata/platform/topology.h — NUMA nodes as sysfs describes them, including
// CXL memory (which Linux shows as a node with memory and no CPUs).
//
// read_topology() parses <root>/node<N>/{cpulist,meminfo,distance}. The root
// is a parameter so tests point it at a fake tree (tests/data/sysfs/).
// A kernel without CONFIG_NUMA has no /sys/devices/system/node; for the
// default root only, read_topology() then reports one node 0 holding every
// online CPU and /proc/meminfo's MemTotal/MemFree.
//
// Units: bytes. distances[i] is the SLIT distance (10 = local) to the i-th
//   node of the returned list: sysfs lists distances to the online nodes in
//   ascending id order, which is the order of the returned vector.
// Thread-safety: free functions without shared state.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <strata/status.h>

namespace strata::platform {

inline constexpr const char* kDefaultSysfsNodeRoot = "/sys/devices/system/node";

struct NumaNode {
  int id = -1;
  std::vector<int> cpus;  // ascending
  uint64_t mem_total_bytes = 0;
  uint64_t mem_free_bytes = 0;
  std::vector<int> distances;  // see the header comment; empty when sysfs has none
  bool cpu_less = false;       // memory and no CPUs: CXL or other memory-only node
  bool has_memory() const { return mem_total_bytes > 0; }
};

// Nodes in ascending id order. NotFound when `sysfs_root` does not exist (other
// than the default root, see above) or holds no node<N> directory;
// InvalidArgument naming the file when a cpulist/meminfo/distance is malformed.
Result<std::vector<NumaNode>> read_topology(const std::string& sysfs_root = kDefaultSysfsNodeRoot);

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}. Empty or whitespace-only text -> {}.
Result<std::vector<int>> parse_cpulist(std::string_view text);

// The inverse for ascending ids: {0,1,2,3,8,10,11} -> "0-3,8,10-11"; {} -> "".
std::string format_cpulist(std::span<const int> cpus);

// The CPUs of node `node` alone (<sysfs_root>/node<N>/cpulist, ascending; {}
// for a memory-only node), without the rest of read_topology's files.
// NotFound when the cpulist cannot be read; InvalidArgument naming the file
// when it is malformed.
Result<std::vector<int>> node_cpus(int node, const std::string& sysfs_root = kDefaultSysfsNodeRoot);

// Ids of the CPU-less nodes with memory: the default of strata.cxl_nodes.
std::vector<int> cpu_less_nodes(const std::vector<NumaNode>& topology);

// OK when every id in `nodes` names a node of `topology` that has memory;
// otherwise NotFound (or InvalidArgument for a node without memory) with a
// message naming the offending node and the nodes with memory that exist,
// e.g. "NUMA node 5 does not exist (nodes with memory: 0, 1, 2)".
Status check_memory_nodes(std::span<const int> nodes, const std::vector<NumaNode>& topology);

// One line per node, for `python -m strata info` and logs:
// "node 1: cpu-less (CXL/memory-only), 64.00 GiB (63.10 GiB free), distances 20 10 20".
std::string describe_topology(const std::vector<NumaNode>& topology);

}  // namespace strata::platform
