// XXH3's SSE2 variant (the x86-64 baseline: this file has no -m flags) and
// the choice among the variants; see strata/io/checksum.h.
#include <strata/io/checksum.h>

#include <algorithm>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "io/xxh3_variants.h"

namespace strata::io {

namespace detail {

uint64_t xxh3_64_sse2(const void* p, size_t bytes) { return XXH3_64bits(p, bytes); }

void xxh3_128_update_sse2(void* state, const void* p, size_t bytes) {
  (void)XXH3_128bits_update(static_cast<XXH3_state_t*>(state), p, bytes);
}

}  // namespace detail

namespace {

bool cpu_has(HashIsa isa) {
  switch (isa) {
    case HashIsa::kSse2:
      return true;
    case HashIsa::kAvx2:
      // libgcc's check includes the OS's support (XCR0) for the registers.
      return __builtin_cpu_supports("avx2");
    case HashIsa::kAvx512:
      return __builtin_cpu_supports("avx512f");
  }
  return false;
}

HashIsa best() {
  if (cpu_has(HashIsa::kAvx512)) {
    return HashIsa::kAvx512;
  }
  return cpu_has(HashIsa::kAvx2) ? HashIsa::kAvx2 : HashIsa::kSse2;
}

using UpdateFn = void (*)(void*, const void*, size_t);

struct Variant {
  Xxh3Fn one_shot;
  UpdateFn update;
};

// By HashIsa's value.
constexpr Variant kVariants[] = {
    {detail::xxh3_64_sse2, detail::xxh3_128_update_sse2},
    {detail::xxh3_64_avx2, detail::xxh3_128_update_avx2},
    {detail::xxh3_64_avx512, detail::xxh3_128_update_avx512},
};

}  // namespace

const char* hash_isa_name(HashIsa isa) {
  switch (isa) {
    case HashIsa::kSse2:
      return "sse2";
    case HashIsa::kAvx2:
      return "avx2";
    case HashIsa::kAvx512:
      return "avx512";
  }
  return "?";
}

HashIsa hash_isa() {
  static const HashIsa isa = best();
  return isa;
}

Xxh3Fn xxh3_64_variant(HashIsa isa) {
  return cpu_has(isa) ? kVariants[size_t(isa)].one_shot : nullptr;
}

size_t checksum_chunks(size_t bytes) {
  return std::max<size_t>(1, (bytes + kChecksumChunk - 1) / kChecksumChunk);
}

uint64_t chunk_checksum(const void* base, size_t bytes, size_t i) {
  const size_t off = std::min(bytes, i * kChecksumChunk);
  return xxh3_64(static_cast<const unsigned char*>(base) + off,
                 std::min(kChecksumChunk, bytes - off));
}

uint64_t xxh3_64(const void* p, size_t bytes) {
  static const Xxh3Fn fn = xxh3_64_variant(hash_isa());
  return fn(p, bytes);
}

struct Xxh3Stream::State {
  XXH3_state_t s;  // XXH3_state_t is declared 64-byte aligned; new honours it
};

Xxh3Stream::Xxh3Stream() : Xxh3Stream(hash_isa()) {}

Xxh3Stream::Xxh3Stream(HashIsa isa)
    : state_(std::make_unique<State>()),
      update_(kVariants[size_t(cpu_has(isa) ? isa : HashIsa::kSse2)].update) {
  (void)XXH3_128bits_reset(&state_->s);
}

Xxh3Stream::~Xxh3Stream() = default;

void Xxh3Stream::update(const void* p, size_t bytes) { update_(&state_->s, p, bytes); }

Hash128 Xxh3Stream::digest() const {
  XXH128_hash_t h = XXH3_128bits_digest(&state_->s);
  return Hash128{h.high64, h.low64};
}

}  // namespace strata::io
