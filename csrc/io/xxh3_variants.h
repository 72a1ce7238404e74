// The ISA variants behind strata/io/checksum.h: each translation unit
// includes xxhash.h with XXH_INLINE_ALL under its own -m flags, so its XXH3
// uses that vector unit (xxhash picks it from __AVX2__ / __AVX512F__).
// The streaming state is XXH3_state_t in every unit (its layout does not
// depend on the vector unit), passed as void*.
#pragma once

#include <cstddef>
#include <cstdint>

namespace strata::io::detail {

uint64_t xxh3_64_sse2(const void* p, size_t bytes);
uint64_t xxh3_64_avx2(const void* p, size_t bytes);
uint64_t xxh3_64_avx512(const void* p, size_t bytes);

void xxh3_128_update_sse2(void* state, const void* p, size_t bytes);
void xxh3_128_update_avx2(void* state, const void* p, size_t bytes);
void xxh3_128_update_avx512(void* state, const void* p, size_t bytes);

}  // namespace strata::io::detail
