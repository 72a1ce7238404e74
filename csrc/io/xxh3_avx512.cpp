// XXH3 compiled for AVX-512 (this file's name gives it its -m flags in
// CMakeLists.txt); see strata/io/checksum.h.
// GCC 12 warns inside avx512fintrin.h (its _mm512_undefined_epi32 idiom) where
// xxhash's loops inline it: a false positive of the header, not of this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "io/xxh3_variants.h"

#if XXH_VECTOR != XXH_AVX512
#error "xxh3_avx512.cpp must be compiled with its -m flags (CMakeLists.txt names *_avx512.cpp)"
#endif

namespace strata::io::detail {

uint64_t xxh3_64_avx512(const void* p, size_t bytes) { return XXH3_64bits(p, bytes); }

void xxh3_128_update_avx512(void* state, const void* p, size_t bytes) {
  (void)XXH3_128bits_update(static_cast<XXH3_state_t*>(state), p, bytes);
}

}  // namespace strata::io::detail
