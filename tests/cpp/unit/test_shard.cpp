// Data-parallel sharding of the flat parameter space: bounds, pieces and the
// per-rank slices the Python layer builds its engines from.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include <strata/engine/shard.h>

using namespace strata;
using namespace strata::engine;
using kernels::DType;

namespace {

bool is_piece(const FlatPiece& a, size_t param, size_t po, size_t fo, size_t n) {
  return a.param == param && a.param_offset == po && a.flat_offset == fo && a.numel == n;
}

}  // namespace

TEST(Shard, BoundsRoundDownAndCoverTheSpace) {
  EXPECT_EQ(shard_bounds(17, 2), (std::vector<size_t>{0, 8, 17}));
  // More ranks than elements: empty shards.
  EXPECT_EQ(shard_bounds(2, 4), (std::vector<size_t>{0, 0, 1, 1, 2}));
  EXPECT_EQ(shard_bounds(0, 3), (std::vector<size_t>{0, 0, 0, 0}));
  EXPECT_EQ(shard_bounds(5, 1), (std::vector<size_t>{0, 5}));
  // No overflow of total * rank for a 7e12-element space over 1024 ranks.
  const size_t big = size_t(7e12);
  auto b = shard_bounds(big, 1024);
  EXPECT_EQ(b.back(), big);
  EXPECT_EQ(b[512], big / 2);
}

TEST(Shard, PackedSpaceKeepsDtypesApartInOrderOfFirstParameter) {
  const auto space =
      FlatSpace::packed({10, 3, 7, 5}, {DType::kF32, DType::kBF16, DType::kF32, DType::kBF16});
  EXPECT_EQ(space.dtypes(), (std::vector<DType>{DType::kF32, DType::kBF16}));
  EXPECT_EQ(space.total(DType::kF32), 17u);
  EXPECT_EQ(space.total(DType::kBF16), 8u);
  EXPECT_EQ(space.total(DType::kF16), 0u);
  auto p = space.pieces(DType::kF32, 8, 17);
  ASSERT_EQ(p.size(), 2u);
  EXPECT_TRUE(is_piece(p[0], 0, 8, 8, 2));
  EXPECT_TRUE(is_piece(p[1], 2, 0, 10, 7));
  EXPECT_TRUE(space.pieces(DType::kF32, 5, 5).empty());
  EXPECT_TRUE(space.pieces(DType::kF16, 0, 100).empty());
}

TEST(Shard, SlicesOfEveryRankTileEveryParameterOnce) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const int world = 1 + int(rng() % 7);
    const size_t nparams = 1 + rng() % 9;
    std::vector<int64_t> numels;
    std::vector<DType> dtypes;
    for (size_t i = 0; i < nparams; ++i) {
      numels.push_back(1 + int64_t(rng() % 40));
      dtypes.push_back(rng() % 3 == 0 ? DType::kBF16 : DType::kF32);
    }
    const auto space = FlatSpace::packed(numels, dtypes);
    std::map<size_t, size_t> covered;  // param -> elements seen, pieces in order
    for (int r = 0; r < world; ++r) {
      const auto mine = shard_slices(numels, dtypes, world, r);
      for (size_t k = 0; k + 1 < mine.size(); ++k) {
        EXPECT_LT(mine[k].param, mine[k + 1].param) << "one piece per parameter and rank, sorted";
      }
      for (const auto& s : mine) {
        EXPECT_GT(s.numel, 0u);
        EXPECT_EQ(s.dtype, dtypes[s.param]);
        EXPECT_EQ(s.param_offset, covered[s.param]) << "ranks own consecutive pieces";
        covered[s.param] += s.numel;
        const auto b = space.bounds(s.dtype, world);
        EXPECT_GE(s.flat_offset, b[size_t(r)]);
        EXPECT_LE(s.flat_offset + s.numel, b[size_t(r) + 1]);
        const auto& e = space.entries()[s.param];
        EXPECT_EQ(s.flat_offset, e.offset + s.param_offset);
      }
    }
    for (size_t i = 0; i < nparams; ++i) {
      EXPECT_EQ(covered[i], size_t(numels[i])) << "parameter " << i;
    }
  }
}

TEST(Shard, SpaceAtGivenOffsetsWithPadding) {
  // A gradient arena: parameters at padded offsets, the arena longer than the last one.
  FlatSpace space({{0, DType::kF32, 0, 10}, {1, DType::kF32, 1024, 3}}, {{DType::kF32, 2048}});
  EXPECT_EQ(space.total(DType::kF32), 2048u);
  auto p = space.pieces(DType::kF32, 5, 1025);
  ASSERT_EQ(p.size(), 2u);
  EXPECT_TRUE(is_piece(p[0], 0, 5, 5, 5));
  EXPECT_TRUE(is_piece(p[1], 1, 0, 1024, 1));
  EXPECT_TRUE(space.pieces(DType::kF32, 10, 1024).empty()) << "padding holds no parameter";
}
