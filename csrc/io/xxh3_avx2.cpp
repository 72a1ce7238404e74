// XXH3 compiled for AVX2 (this file's name gives it its -m flags in
// CMakeLists.txt); see strata/io/checksum.h.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "io/xxh3_variants.h"

#if XXH_VECTOR != XXH_AVX2
#error "xxh3_avx2.cpp must be compiled with its -m flags (CMakeLists.txt names *_avx2.cpp)"
#endif

namespace strata::io::detail {

uint64_t xxh3_64_avx2(const void* p, size_t bytes) { return XXH3_64bits(p, bytes); }

void xxh3_128_update_avx2(void* state, const void* p, size_t bytes) {
  (void)XXH3_128bits_update(static_cast<XXH3_state_t*>(state), p, bytes);
}

}  // namespace strata::io::detail
