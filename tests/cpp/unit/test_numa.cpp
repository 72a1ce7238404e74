// NUMA placement: regions and pool slabs land on the nodes asked for
// (checked with move_pages), and absent nodes fail with a clear error.
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include <strata/memory/numa_region.h>
#include <strata/memory/pinned_pool.h>
#include <strata/platform/topology.h>
#include <strata/platform/vm.h>

namespace {

namespace fs = std::filesystem;
using strata::StatusCode;
using namespace strata::memory;
namespace platform = strata::platform;

std::string data_dir(const std::string& tree) {
  return (fs::path(__FILE__).parent_path() / ".." / ".." / "data" / "sysfs" / tree)
      .lexically_normal();
}

class Numa : public ::testing::Test {
 protected:
  void SetUp() override {
    auto topo = platform::read_topology();
    ASSERT_TRUE(topo.ok()) << topo.status().to_string();
    topo_ = topo.value();
    for (const auto& n : topo_) {
      if (n.has_memory()) {
        memory_nodes_.push_back(n.id);
      }
      absent_node_ = std::max(absent_node_, n.id + 1);
    }
    ASSERT_FALSE(memory_nodes_.empty());
    // move_pages on one touched page tells whether the NUMA syscalls answer.
    void* p = nullptr;
    ASSERT_EQ(platform::map_anonymous(platform::kPageSize, platform::kPageSize, &p), 0);
    static_cast<char*>(p)[0] = 1;
    const void* pages[] = {p};
    int node = -1;
    int r = platform::query_page_nodes(pages, {&node, 1});
    ASSERT_EQ(platform::unmap(p, platform::kPageSize), 0);
    if (r != 0) {
      GTEST_SKIP() << "NUMA syscalls unavailable (move_pages: " << std::strerror(-r) << ")";
    }
  }
  bool has_node0() const {
    return std::find(memory_nodes_.begin(), memory_nodes_.end(), 0) != memory_nodes_.end();
  }
  std::vector<platform::NumaNode> topo_;
  std::vector<int> memory_nodes_;
  int absent_node_ = 0;
};

TEST_F(Numa, RegionBoundToNode0LandsOnNode0) {
  if (!has_node0()) {
    GTEST_SKIP() << "node 0 has no memory here";
  }
  NumaRegionOptions opt;
  opt.nodes = {0};
  auto region = NumaRegion::create((size_t(32) << 20) + 12345, opt);
  ASSERT_TRUE(region.ok()) << region.status().to_string();
  EXPECT_EQ(region->size(), (size_t(32) << 20) + 12345);
  EXPECT_EQ(region->capacity(), platform::round_up((size_t(32) << 20) + 12345, 4096));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(region->data()) % platform::kHugePageSize, 0u);
  ASSERT_TRUE(region->verify_placement().ok()) << region->verify_placement().to_string();
  auto census = page_census(region->data(), region->capacity(), 1 << 20);
  ASSERT_TRUE(census.ok());
  ASSERT_EQ(census->size(), 1u);
  EXPECT_EQ(census->at(0).first, 0);
  EXPECT_EQ(census->at(0).second, region->capacity() / platform::kPageSize) << "every page checked";
  platform::MemPolicy policy;
  std::vector<int> nodes;
  ASSERT_EQ(platform::query_policy(region->data(), &policy, &nodes), 0);
  EXPECT_EQ(policy, platform::MemPolicy::kBind);
  EXPECT_EQ(nodes, std::vector<int>{0});
}

TEST_F(Numa, InterleaveAcrossEveryMemoryNode) {
  NumaRegionOptions opt;
  opt.nodes = memory_nodes_;
  opt.policy = NumaPolicy::kInterleave;
  auto region = NumaRegion::create(size_t(16) << 20, opt);
  ASSERT_TRUE(region.ok()) << region.status().to_string();
  EXPECT_TRUE(region->verify_placement().ok());
  platform::MemPolicy policy;
  std::vector<int> nodes;
  ASSERT_EQ(platform::query_policy(region->data(), &policy, &nodes), 0);
  EXPECT_EQ(policy, platform::MemPolicy::kInterleave);
  EXPECT_EQ(nodes, memory_nodes_);
  auto census = page_census(region->data(), region->size());
  ASSERT_TRUE(census.ok());
  if (memory_nodes_.size() > 1) {
    EXPECT_EQ(census->size(), memory_nodes_.size()) << "interleave should touch every node";
  }
}

TEST_F(Numa, AbsentNodeFailsNamingNodesThatExist) {
  NumaRegionOptions opt;
  opt.nodes = {absent_node_};
  auto region = NumaRegion::create(1 << 20, opt);
  ASSERT_FALSE(region.ok());
  EXPECT_EQ(region.status().code(), StatusCode::kNotFound);
  std::string want =
      "NUMA node " + std::to_string(absent_node_) + " does not exist (nodes with memory: ";
  EXPECT_NE(region.status().message().find(want), std::string::npos) << region.status().to_string();
  EXPECT_NE(region.status().message().find(std::to_string(memory_nodes_[0])), std::string::npos);

  PoolOptions popt;
  popt.numa_node = absent_node_;
  auto pool = PinnedPool::create(popt);
  ASSERT_FALSE(pool.ok());
  EXPECT_EQ(pool.status().code(), StatusCode::kNotFound);
  EXPECT_NE(pool.status().message().find(want), std::string::npos) << pool.status().to_string();
}

TEST_F(Numa, BadNodeLists) {
  NumaRegionOptions opt;
  EXPECT_EQ(NumaRegion::create(4096, opt).status().code(), StatusCode::kInvalidArgument);
  opt.nodes = {memory_nodes_[0], memory_nodes_[0]};
  EXPECT_EQ(NumaRegion::create(4096, opt).status().code(), StatusCode::kInvalidArgument);
  opt.nodes = {memory_nodes_[0]};
  EXPECT_EQ(NumaRegion::create(0, opt).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(Numa, KernelStillRefusesNodesOnlyAFakeSysfsHas) {
  // The fake tree claims CPU-less nodes 1 and 2; when the kernel has no such
  // nodes, mbind's own check turns that into an error naming the nodes.
  if (absent_node_ > 1) {
    GTEST_SKIP() << "this machine has a node 1";
  }
  NumaRegionOptions opt;
  opt.nodes = {1, 2};
  opt.policy = NumaPolicy::kInterleave;
  opt.sysfs_root = data_dir("dram_cxl");
  auto region = NumaRegion::create(1 << 20, opt);
  ASSERT_FALSE(region.ok());
  EXPECT_NE(region.status().message().find("mbind"), std::string::npos)
      << region.status().to_string();
  EXPECT_NE(region.status().message().find("nodes 1,2"), std::string::npos);
}

TEST_F(Numa, VerifyPlacementCatchesPagesNotPlaced) {
  // Without pre-fault no page is placed: verification must fail, which shows
  // it checks something.
  NumaRegionOptions opt;
  opt.nodes = {memory_nodes_[0]};
  opt.prefault = false;
  auto region = NumaRegion::create(size_t(4) << 20, opt);
  ASSERT_TRUE(region.ok()) << region.status().to_string();
  strata::Status st = region->verify_placement();
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("page not present"), std::string::npos) << st.to_string();
  // Touch the first half: the census sees placed and unplaced pages.
  std::memset(region->data(), 1, region->size() / 2);
  auto census = page_census(region->data(), region->size(), 1 << 20);
  ASSERT_TRUE(census.ok());
  ASSERT_EQ(census->size(), 2u);
  EXPECT_EQ(census->at(0).first, -1);
  EXPECT_EQ(census->at(0).second, region->size() / platform::kPageSize / 2);
  // Excluding the node it is on fails too, naming where the page is.
  const int other[] = {absent_node_};
  st = verify_placement(region->data(), region->size() / 2, other);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("is on node " + std::to_string(memory_nodes_[0])), std::string::npos)
      << st.to_string();
}

TEST_F(Numa, PoolBoundToNode0LandsOnNode0) {
  if (!has_node0()) {
    GTEST_SKIP() << "node 0 has no memory here";
  }
  PoolOptions opt;
  opt.numa_node = 0;
  opt.slab_bytes = size_t(8) << 20;
  auto pool = PinnedPool::create(opt);
  ASSERT_TRUE(pool.ok()) << pool.status().to_string();
  auto a = (*pool)->allocate(size_t(3) << 20);
  auto b = (*pool)->allocate(size_t(20) << 20);  // larger than a slab: its own slab, also bound
  ASSERT_TRUE(a.ok() && b.ok());
  const int node0[] = {0};
  EXPECT_TRUE(verify_placement(a->data(), a->size(), node0).ok());
  EXPECT_TRUE(verify_placement(b->data(), b->size(), node0).ok());
  for (void* p : {a->data(), b->data()}) {
    platform::MemPolicy policy;
    std::vector<int> nodes;
    ASSERT_EQ(platform::query_policy(p, &policy, &nodes), 0);
    EXPECT_EQ(policy, platform::MemPolicy::kBind);
    EXPECT_EQ(nodes, std::vector<int>{0});
  }
  EXPECT_EQ((*pool)->stats().slabs, 2u);
}

TEST_F(Numa, UnboundPoolUsesTheDefaultPolicy) {
  PoolOptions opt;
  opt.slab_bytes = size_t(4) << 20;
  opt.pin = false;
  auto pool = PinnedPool::create(opt);
  ASSERT_TRUE(pool.ok());
  auto a = (*pool)->allocate(4096);
  ASSERT_TRUE(a.ok());
  platform::MemPolicy policy;
  std::vector<int> nodes;
  ASSERT_EQ(platform::query_policy(a->data(), &policy, &nodes), 0);
  EXPECT_EQ(policy, platform::MemPolicy::kDefault);
  EXPECT_TRUE(verify_placement(a->data(), a->size(), memory_nodes_).ok());
}

}  // namespace
