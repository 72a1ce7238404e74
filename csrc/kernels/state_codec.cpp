// Compressed optimizer state: the slot formats' sizes and names, which slot
// gets which format, and the whole-slot codec (decode_slot / encode_slot)
// over the thread pool. The bit rules live in the ISA translation units
// (kernels_scalar.cpp is the reference); optimizer.cpp runs the step on
// compressed slots chunk by chunk with the same table entries.
#include <strata/kernels/optimizer.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/kernel_impl.h"

namespace strata::kernels {
namespace {

// Elements per task: a multiple of kQ8Block, so a block never straddles two
// threads and the result does not depend on the thread count.
constexpr size_t kCodecTile = size_t(1) << 16;
static_assert(kCodecTile % kQ8Block == 0);

constexpr size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

bool valid_slot_dtype(SlotDType d) {
  return d == SlotDType::kF32 || d == SlotDType::kBF16 || d == SlotDType::kQ8S ||
         d == SlotDType::kQ8U;
}

bool is_q8(SlotDType d) { return d == SlotDType::kQ8S || d == SlotDType::kQ8U; }

Status check_codec(SlotDType dtype, const void* packed, const float* scales, const void* fp32,
                   size_t n, Isa isa, const detail::KernelTable** table, const char* what) {
  if (!valid_slot_dtype(dtype)) {
    return invalid_argument(std::string(what) + ": bad slot dtype " + std::to_string(int(dtype)));
  }
  if (n > 0 && (packed == nullptr || fp32 == nullptr)) {
    return invalid_argument(std::string(what) + ": " + slot_dtype_name(dtype) +
                            " slot data is nullptr with n = " + std::to_string(n));
  }
  if (n > 0 && is_q8(dtype) && scales == nullptr) {
    return invalid_argument(std::string(what) + ": " + slot_dtype_name(dtype) +
                            " slot needs scales, got nullptr");
  }
  if (isa != Isa::kScalar && isa != Isa::kAvx2 && isa != Isa::kAvx512 && isa != Isa::kAuto) {
    return invalid_argument(std::string(what) + ": bad isa " + std::to_string(int(isa)));
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
  const size_t tiles = (n + kCodecTile - 1) / kCodecTile;
  auto one = [&fn, n](size_t t) {
    const size_t begin = t * kCodecTile;
    fn(begin, std::min(n, begin + kCodecTile) - begin);
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

const char* slot_dtype_name(SlotDType dtype) {
  switch (dtype) {
    case SlotDType::kF32:
      return "fp32";
    case SlotDType::kBF16:
      return "bf16";
    case SlotDType::kQ8S:
      return "q8s";
    case SlotDType::kQ8U:
      return "q8u";
  }
  return "unknown";
}

const char* state_dtype_name(StateDType dtype) {
  switch (dtype) {
    case StateDType::kF32:
      return "fp32";
    case StateDType::kBF16:
      return "bf16";
    case StateDType::kInt8Blockwise:
      return "int8_blockwise";
  }
  return "unknown";
}

size_t q8_scales_offset(size_t n) { return round_up(n, 64); }

size_t slot_bytes(SlotDType dtype, size_t n) {
  switch (dtype) {
    case SlotDType::kF32:
      return 4 * n;
    case SlotDType::kBF16:
      return round_up(2 * n, 4);
    case SlotDType::kQ8S:
    case SlotDType::kQ8U:
      return q8_scales_offset(n) + round_up(4 * ((n + kQ8Block - 1) / kQ8Block), 64);
  }
  return 0;
}

SlotDType slot_dtype_for(const OptimizerHyper& hyper, int slot, StateDType state,
                         bool master_bf16) {
  if (slot == 0) {
    return master_bf16 ? SlotDType::kBF16 : SlotDType::kF32;
  }
  if (slot < 0 || slot >= state_slots(hyper)) {
    return SlotDType::kF32;  // no such slot
  }
  switch (state) {
    case StateDType::kF32:
      return SlotDType::kF32;
    case StateDType::kBF16:
      return SlotDType::kBF16;
    case StateDType::kInt8Blockwise:
      break;
  }
  // Signed: Adam's m (slot 1) and SGD's momentum (slot 1). Never negative:
  // Adam's v and max_v (slots 2, 3), Adagrad's sum (slot 1).
  const bool is_signed =
      (hyper.kind == OptimizerKind::kAdam || hyper.kind == OptimizerKind::kAdamW ||
       hyper.kind == OptimizerKind::kSgd) &&
      slot == 1;
  return is_signed ? SlotDType::kQ8S : SlotDType::kQ8U;
}

Status decode_slot(SlotDType dtype, const void* packed, const float* scales, float* out, size_t n,
                   ThreadPool* pool, Isa isa) {
  const detail::KernelTable* table = nullptr;
  STRATA_RETURN_IF_ERROR(check_codec(dtype, packed, scales, out, n, isa, &table, "decode_slot"));
  const auto* bytes = static_cast<const unsigned char*>(packed);
  tiled(n, pool, [&](size_t begin, size_t count) {
    switch (dtype) {
      case SlotDType::kF32:
        if (static_cast<const void*>(out) != packed) {
          std::memcpy(out + begin, bytes + begin * 4, count * 4);
        }
        break;
      case SlotDType::kBF16:
        table->cast_to_f32(bytes + begin * 2, DType::kBF16, out + begin, count);
        break;
      case SlotDType::kQ8S:
      case SlotDType::kQ8U:
        table->q8_decode(dtype, bytes + begin, scales + begin / kQ8Block, out + begin, count);
        break;
    }
  });
  return Status::Ok();
}

Status encode_slot(SlotDType dtype, const float* in, void* packed, float* scales, size_t n,
                   ThreadPool* pool, Isa isa) {
  const detail::KernelTable* table = nullptr;
  STRATA_RETURN_IF_ERROR(check_codec(dtype, packed, scales, in, n, isa, &table, "encode_slot"));
  auto* bytes = static_cast<unsigned char*>(packed);
  tiled(n, pool, [&](size_t begin, size_t count) {
    switch (dtype) {
      case SlotDType::kF32:
        if (static_cast<const void*>(in) != packed) {
          std::memcpy(bytes + begin * 4, in + begin, count * 4);
        }
        break;
      case SlotDType::kBF16:
        table->cast_from_f32(in + begin, bytes + begin * 2, detail::OutKind::kBF16, count);
        break;
      case SlotDType::kQ8S:
      case SlotDType::kQ8U:
        table->q8_encode(dtype, in + begin, bytes + begin, scales + begin / kQ8Block, count);
        break;
    }
  });
  return Status::Ok();
}

}  // namespace strata::kernels
