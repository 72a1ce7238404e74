// NUMA topology from sysfs: the fake trees under tests/data/sysfs/ and the
// real machine.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <gtest/gtest.h>

#include <strata/platform/topology.h>

namespace {

namespace fs = std::filesystem;
using strata::StatusCode;
using namespace strata::platform;

// The fixtures sit beside the sources; __FILE__ is absolute in CMake builds.
std::string data_dir(const std::string& tree) {
  return (fs::path(__FILE__).parent_path() / ".." / ".." / "data" / "sysfs" / tree)
      .lexically_normal();
}

constexpr uint64_t kKiB = 1024;

TEST(Topology, OneNode) {
  auto topo = read_topology(data_dir("one_node"));
  ASSERT_TRUE(topo.ok()) << topo.status().to_string();
  ASSERT_EQ(topo->size(), 1u);
  const NumaNode& n = topo->at(0);
  EXPECT_EQ(n.id, 0);
  EXPECT_EQ(n.cpus, (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(n.mem_total_bytes, 32768000 * kKiB);
  EXPECT_EQ(n.mem_free_bytes, 30000000 * kKiB);
  EXPECT_EQ(n.distances, std::vector<int>{10});
  EXPECT_FALSE(n.cpu_less);
  EXPECT_TRUE(cpu_less_nodes(topo.value()).empty());
}

TEST(Topology, DramPlusTwoCpuLessNodes) {
  auto topo = read_topology(data_dir("dram_cxl"));
  ASSERT_TRUE(topo.ok()) << topo.status().to_string();
  ASSERT_EQ(topo->size(), 3u);
  const auto& n0 = topo->at(0);
  EXPECT_EQ(n0.id, 0);
  ASSERT_EQ(n0.cpus.size(), 32u);
  EXPECT_EQ(n0.cpus.front(), 0);
  EXPECT_EQ(n0.cpus[15], 15);
  EXPECT_EQ(n0.cpus[16], 32);
  EXPECT_EQ(n0.cpus.back(), 47);
  EXPECT_FALSE(n0.cpu_less);
  EXPECT_EQ(n0.mem_total_bytes, 131072000 * kKiB);
  EXPECT_EQ(n0.distances, (std::vector<int>{10, 21, 21}));
  for (int id : {1, 2}) {
    const auto& n = topo->at(id);
    EXPECT_EQ(n.id, id);
    EXPECT_TRUE(n.cpus.empty());
    EXPECT_TRUE(n.cpu_less) << "node " << id << " has memory and no CPUs";
    EXPECT_EQ(n.mem_total_bytes, 67108864 * kKiB);
  }
  EXPECT_EQ(topo->at(1).distances, (std::vector<int>{21, 10, 24}));
  EXPECT_EQ(topo->at(2).mem_free_bytes, 66000000 * kKiB);
  EXPECT_EQ(cpu_less_nodes(topo.value()), (std::vector<int>{1, 2}));

  std::string text = describe_topology(topo.value());
  EXPECT_NE(text.find("node 0: cpus 0-15,32-47, 125.00 GiB"), std::string::npos) << text;
  EXPECT_NE(text.find("node 2: cpu-less (CXL/memory-only), 64.00 GiB"), std::string::npos) << text;
}

TEST(Topology, CheckMemoryNodesNamesTheMissingNode) {
  auto topo = read_topology(data_dir("dram_cxl"));
  ASSERT_TRUE(topo.ok());
  const int good[] = {1, 2};
  EXPECT_TRUE(check_memory_nodes(good, topo.value()).ok());
  const int bad[] = {0, 5};
  strata::Status st = check_memory_nodes(bad, topo.value());
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "NUMA node 5 does not exist (nodes with memory: 0, 1, 2)");
}

TEST(Topology, ParseCpulist) {
  auto a = parse_cpulist("0-3,8,10-11\n");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a.value(), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  auto empty = parse_cpulist("\n");
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
  auto single = parse_cpulist("5");
  ASSERT_TRUE(single.ok());
  EXPECT_EQ(single.value(), std::vector<int>{5});
  for (const char* bad : {"3-1", "a", "1,,2", "1-", "-1", "0x3"}) {
    auto r = parse_cpulist(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << bad;
  }
}

TEST(Topology, FormatCpulistInvertsParse) {
  EXPECT_EQ(format_cpulist(std::vector<int>{0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(format_cpulist(std::vector<int>{5}), "5");
  EXPECT_EQ(format_cpulist(std::vector<int>{}), "");
  auto back = parse_cpulist(format_cpulist(std::vector<int>{0, 2, 3, 4, 9}));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back.value(), (std::vector<int>{0, 2, 3, 4, 9}));
}

TEST(Topology, NodeCpusReadsOneCpulist) {
  auto cpus = node_cpus(0, data_dir("dram_cxl"));
  ASSERT_TRUE(cpus.ok()) << cpus.status().to_string();
  EXPECT_EQ(cpus->size(), 32u);
  EXPECT_EQ(format_cpulist(cpus.value()), "0-15,32-47");
  auto cxl = node_cpus(1, data_dir("dram_cxl"));  // memory only
  ASSERT_TRUE(cxl.ok());
  EXPECT_TRUE(cxl->empty());
  auto missing = node_cpus(7, data_dir("dram_cxl"));
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("node7/cpulist"), std::string::npos)
      << missing.status().message();
}

class TempTree : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/strata_topo_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { fs::remove_all(root_); }
  void write(const std::string& rel, const std::string& text) {
    fs::create_directories((root_ / rel).parent_path());
    std::ofstream(root_ / rel) << text;
  }
  fs::path root_;
};

TEST_F(TempTree, MissingRootAndEmptyRootAreNotFound) {
  auto missing = read_topology((root_ / "nope").string());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("nope"), std::string::npos);
  auto empty = read_topology(root_.string());
  EXPECT_EQ(empty.status().code(), StatusCode::kNotFound);
  EXPECT_NE(empty.status().message().find("no node<N> directories"), std::string::npos);
}

TEST_F(TempTree, MalformedFilesNameTheFile) {
  write("node0/cpulist", "0-1\n");
  write("node0/meminfo", "Node 0 MemTotal: lots kB\n");
  auto r = read_topology(root_.string());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("node0/meminfo"), std::string::npos)
      << r.status().to_string();

  write("node0/meminfo", "Node 0 MemTotal: 1024 kB\n");
  write("node0/distance", "10 x\n");
  r = read_topology(root_.string());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("node0/distance"), std::string::npos);

  write("node0/distance", "10\n");
  write("node0/cpulist", "0-a\n");
  r = read_topology(root_.string());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("node0/cpulist"), std::string::npos);
}

TEST_F(TempTree, SparseIdsAndCpuLessWithoutMemory) {
  // Node ids need not be contiguous; a node with neither CPUs nor memory is
  // not a CXL node.
  write("node0/cpulist", "0\n");
  write("node0/meminfo", "Node 0 MemTotal: 1024 kB\nNode 0 MemFree: 512 kB\n");
  write("node4/cpulist", "\n");
  write("node4/meminfo", "Node 4 MemTotal: 0 kB\n");
  write("node7/cpulist", "\n");
  write("node7/meminfo", "Node 7 MemTotal: 2048 kB\n");
  write("nodeX/cpulist", "0\n");  // not a node directory
  auto r = read_topology(root_.string());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ(r->at(1).id, 4);
  EXPECT_FALSE(r->at(1).cpu_less);
  EXPECT_EQ(r->at(2).id, 7);
  EXPECT_TRUE(r->at(2).cpu_less);
  EXPECT_EQ(cpu_less_nodes(r.value()), std::vector<int>{7});
  const int four = 4;
  strata::Status st = check_memory_nodes({&four, 1}, r.value());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("NUMA node 4 has no memory (nodes with memory: 0, 7)"),
            std::string::npos)
      << st.message();
}

TEST(Topology, RealMachine) {
  auto topo = read_topology();
  ASSERT_TRUE(topo.ok()) << topo.status().to_string();
  ASSERT_FALSE(topo->empty());
  size_t cpus = 0;
  bool memory = false;
  for (const auto& n : topo.value()) {
    cpus += n.cpus.size();
    memory = memory || n.has_memory();
    EXPECT_GE(n.mem_total_bytes, n.mem_free_bytes);
  }
  EXPECT_GE(cpus, size_t(1));
  EXPECT_LE(cpus, size_t(sysconf(_SC_NPROCESSORS_CONF)));
  EXPECT_TRUE(memory);
  std::cout << describe_topology(topo.value());
}

}  // namespace
