// strata/engine/shard.h — data-parallel sharding of the flat parameter space
// (ZeRO stages 1 and 2), and the flat coordinates gradient buckets are cut in.
//
// Per parameter dtype, the trainable parameters in the engine's order
// (gradient-ready order) lie back to back in a flat space of N_d elements;
// rank r of W owns [N_d*r/W, N_d*(r+1)/W) of it. A parameter may be split
// between ranks: each rank's engine takes its owned pieces as its parameters
// (python/strata/layout.py's ShardLayout), so its pool, swap file and gradient
// arena hold only that shard.
//
// A FlatSpace may also hold parameters at given offsets (the engine's gradient
// arena at stage 0, where buckets are views of the arena), with a total that
// may run past the last parameter (the arena's padding).
//
// Units: elements. Invariants: bounds(d, W)[0] == 0, bounds(d, W)[W] ==
//   total(d), bounds non-decreasing; the shard_slices of ranks 0..W-1 tile
//   every parameter exactly once; pieces(d, lo, hi) tile the parts of the
//   parameters inside [lo, hi), in space order.
// Pure functions of their inputs: no I/O, no allocation beyond the results.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <strata/kernels/optimizer.h>

namespace strata::engine {

// Where one parameter lies in the flat space of its dtype.
struct FlatEntry {
  size_t param = 0;  // index into the caller's parameter list
  kernels::DType dtype = kernels::DType::kF32;
  size_t offset = 0;  // elements into the space of dtype
  size_t numel = 0;
};

// A piece of one parameter: elements [param_offset, param_offset + numel) of
// it, at flat_offset in the space of its dtype.
struct FlatPiece {
  size_t param = 0;
  size_t param_offset = 0;
  size_t flat_offset = 0;
  size_t numel = 0;
  kernels::DType dtype = kernels::DType::kF32;
};

// Rank r of `world` owns [b[r], b[r+1]) of a space of `total` elements:
// b[r] = total * r / world (rounded down). world >= 1.
std::vector<size_t> shard_bounds(size_t total, int world);

class FlatSpace {
 public:
  FlatSpace() = default;
  // Parameters at the given places; `min_totals` lengthens a dtype's space
  // (an arena longer than its last parameter's end). Entries of one dtype
  // must not overlap.
  explicit FlatSpace(std::vector<FlatEntry> entries,
                     const std::vector<std::pair<kernels::DType, size_t>>& min_totals = {});
  // Parameters back to back per dtype, in the given order.
  static FlatSpace packed(const std::vector<int64_t>& numels,
                          const std::vector<kernels::DType>& dtypes);

  // The dtypes present, in the order of their first (lowest-index) parameter.
  const std::vector<kernels::DType>& dtypes() const { return dtypes_; }
  size_t total(kernels::DType dtype) const;
  // Every entry, by parameter index.
  const std::vector<FlatEntry>& entries() const { return by_param_; }

  // The parts of the parameters of `dtype` inside [lo, hi), in space order.
  std::vector<FlatPiece> pieces(kernels::DType dtype, size_t lo, size_t hi) const;
  std::vector<size_t> bounds(kernels::DType dtype, int world) const;
  // What rank `rank` of `world` owns of every dtype's space, sorted by
  // parameter (a parameter has at most one piece per rank).
  std::vector<FlatPiece> shard_slices(int world, int rank) const;

 private:
  std::vector<kernels::DType> dtypes_;
  std::vector<FlatEntry> by_param_;
  std::vector<std::vector<FlatEntry>> rows_;  // per dtype (index of dtypes_), by offset
  std::vector<size_t> totals_;                // per dtype (index of dtypes_)
  int index_of(kernels::DType dtype) const;   // -1: absent
};

// The pieces of the parameters (`numels`, `dtypes`: in the engine's order)
// that rank `rank` of `world` owns: FlatSpace::packed(...).shard_slices(...).
std::vector<FlatPiece> shard_slices(const std::vector<int64_t>& numels,
                                    const std::vector<kernels::DType>& dtypes, int world, int rank);

}  // namespace strata::engine
