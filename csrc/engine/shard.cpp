#include <strata/engine/shard.h>

#include <algorithm>

namespace strata::engine {

std::vector<size_t> shard_bounds(size_t total, int world) {
  const unsigned __int128 t = total;
  const size_t w = size_t(std::max(world, 1));
  std::vector<size_t> b(w + 1);
  for (size_t r = 0; r <= w; ++r) {
    b[r] = size_t(t * r / w);
  }
  return b;
}

FlatSpace::FlatSpace(std::vector<FlatEntry> entries,
                     const std::vector<std::pair<kernels::DType, size_t>>& min_totals) {
  std::stable_sort(entries.begin(), entries.end(),
                   [](const FlatEntry& a, const FlatEntry& b) { return a.param < b.param; });
  for (const auto& e : entries) {
    int d = index_of(e.dtype);
    if (d < 0) {
      d = int(dtypes_.size());
      dtypes_.push_back(e.dtype);  // by lowest parameter index: entries are sorted by param
      rows_.emplace_back();
      totals_.push_back(0);
    }
    rows_[size_t(d)].push_back(e);
    totals_[size_t(d)] = std::max(totals_[size_t(d)], e.offset + e.numel);
  }
  for (auto& rows : rows_) {
    std::stable_sort(rows.begin(), rows.end(),
                     [](const FlatEntry& a, const FlatEntry& b) { return a.offset < b.offset; });
  }
  for (const auto& [dtype, t] : min_totals) {
    const int d = index_of(dtype);
    if (d >= 0) {
      totals_[size_t(d)] = std::max(totals_[size_t(d)], t);
    }
  }
  by_param_ = std::move(entries);
}

FlatSpace FlatSpace::packed(const std::vector<int64_t>& numels,
                            const std::vector<kernels::DType>& dtypes) {
  std::vector<FlatEntry> entries;
  std::vector<size_t> run(3, 0);  // per DType value
  for (size_t i = 0; i < numels.size() && i < dtypes.size(); ++i) {
    const size_t d = size_t(dtypes[i]);
    const size_t n = size_t(std::max<int64_t>(numels[i], 0));
    entries.push_back(FlatEntry{i, dtypes[i], run[d], n});
    run[d] += n;
  }
  return FlatSpace(std::move(entries));
}

int FlatSpace::index_of(kernels::DType dtype) const {
  for (size_t d = 0; d < dtypes_.size(); ++d) {
    if (dtypes_[d] == dtype) {
      return int(d);
    }
  }
  return -1;
}

size_t FlatSpace::total(kernels::DType dtype) const {
  const int d = index_of(dtype);
  return d < 0 ? 0 : totals_[size_t(d)];
}

std::vector<FlatPiece> FlatSpace::pieces(kernels::DType dtype, size_t lo, size_t hi) const {
  std::vector<FlatPiece> out;
  const int d = index_of(dtype);
  if (d < 0 || lo >= hi) {
    return out;
  }
  const auto& rows = rows_[size_t(d)];
  // The last row starting at or before lo: it may reach into [lo, hi).
  auto it = std::upper_bound(rows.begin(), rows.end(), lo,
                             [](size_t v, const FlatEntry& e) { return v < e.offset; });
  if (it != rows.begin()) {
    --it;
  }
  for (; it != rows.end() && it->offset < hi; ++it) {
    const size_t a = std::max(lo, it->offset);
    const size_t e = std::min(hi, it->offset + it->numel);
    if (a < e) {
      out.push_back(FlatPiece{it->param, a - it->offset, a, e - a, dtype});
    }
  }
  return out;
}

std::vector<size_t> FlatSpace::bounds(kernels::DType dtype, int world) const {
  return shard_bounds(total(dtype), world);
}

std::vector<FlatPiece> FlatSpace::shard_slices(int world, int rank) const {
  std::vector<FlatPiece> out;
  if (rank < 0 || rank >= world) {
    return out;
  }
  for (const auto dtype : dtypes_) {
    const std::vector<size_t> b = bounds(dtype, world);
    const auto mine = pieces(dtype, b[size_t(rank)], b[size_t(rank) + 1]);
    out.insert(out.end(), mine.begin(), mine.end());
  }
  std::stable_sort(out.begin(), out.end(), [](const FlatPiece& a, const FlatPiece& b) {
    return a.param < b.param || (a.param == b.param && a.param_offset < b.param_offset);
  });
  return out;
}

std::vector<FlatPiece> shard_slices(const std::vector<int64_t>& numels,
                                    const std::vector<kernels::DType>& dtypes, int world,
                                    int rank) {
  return FlatSpace::packed(numels, dtypes).shard_slices(world, rank);
}

}  // namespace strata::engine
