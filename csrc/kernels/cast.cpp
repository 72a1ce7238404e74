// Bulk fp32 <-> bf16/fp16 casts over the thread pool (the scalar bit rules
// live in kernels_scalar.cpp, the SIMD ones in kernels_<isa>.cpp).
#include <strata/kernels/cast.h>

#include <algorithm>
#include <string>

#include "kernels/kernel_impl.h"

namespace strata::kernels {
namespace {

constexpr size_t kCastTile = size_t(1) << 16;

Status check_cast(const void* src, const void* dst, DType dtype, size_t n, Isa isa,
                  const detail::KernelTable** table, const char* what) {
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return invalid_argument(std::string(what) + ": bad dtype " + std::to_string(int(dtype)));
  }
  if (n > 0 && (src == nullptr || dst == nullptr)) {
    return invalid_argument(std::string(what) + ": nullptr with n = " + std::to_string(n));
  }
  *table = detail::table_for(isa);
  if (*table == nullptr) {
    return Status(StatusCode::kUnavailable,
                  std::string(what) + ": this CPU cannot run the " + isa_name(isa) + " kernels");
  }
  return Status::Ok();
}

template <class Fn>
void tiled(size_t n, ThreadPool* pool, Fn fn) {
  const size_t tiles = (n + kCastTile - 1) / kCastTile;
  auto one = [&fn, n](size_t t) {
    const size_t begin = t * kCastTile;
    fn(begin, std::min(n, begin + kCastTile) - begin);
  };
  if (pool == nullptr || tiles <= 1) {
    for (size_t t = 0; t < tiles; ++t) {
      one(t);
    }
  } else {
    pool->parallel_for(tiles, one);
  }
}

}  // namespace

Status cast_from_f32(const float* src, void* dst, DType dst_dtype, size_t n, ThreadPool* pool,
                     Isa isa) {
  const detail::KernelTable* table = nullptr;
  STRATA_RETURN_IF_ERROR(check_cast(src, dst, dst_dtype, n, isa, &table, "cast_from_f32"));
  const size_t elem = dtype_size(dst_dtype);
  const detail::OutKind out = detail::out_kind(dst_dtype);
  tiled(n, pool, [&](size_t begin, size_t count) {
    table->cast_from_f32(src + begin, static_cast<unsigned char*>(dst) + begin * elem, out, count);
  });
  return Status::Ok();
}

Status cast_to_f32(const void* src, DType src_dtype, float* dst, size_t n, ThreadPool* pool,
                   Isa isa) {
  const detail::KernelTable* table = nullptr;
  STRATA_RETURN_IF_ERROR(check_cast(src, dst, src_dtype, n, isa, &table, "cast_to_f32"));
  const size_t elem = dtype_size(src_dtype);
  tiled(n, pool, [&](size_t begin, size_t count) {
    table->cast_to_f32(static_cast<const unsigned char*>(src) + begin * elem, src_dtype,
                       dst + begin, count);
  });
  return Status::Ok();
}

}  // namespace strata::kernels
