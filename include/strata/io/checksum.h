// strata/io/checksum.h — XXH3 on the widest vector unit the CPU has.
//
// xxhash's XXH3 (the Debian package's header, inlined) compiled three times:
// SSE2 (csrc/io/checksum.cpp), AVX2 (xxh3_avx2.cpp) and AVX-512
// (xxh3_avx512.cpp); the variant is chosen once, at first use, from what the
// CPU and the OS support. XXH3's value does not depend on the variant (tested
// against each other), so swap-file and checkpoint checksums read the same on
// any machine. From DRAM, AVX2 hashes about twice as fast as SSE2 (5.6 vs
// 10.4 GB/s a core on an Intel Xeon VM), which matters because every record
// the tiers move is hashed once.
//
// Units: bytes. Alignment: none required. Thread-safety: xxh3_64 and the
// variant queries are pure and callable from any thread; one Xxh3Stream is
// used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace strata::io {

enum class HashIsa : uint8_t { kSse2, kAvx2, kAvx512 };
const char* hash_isa_name(HashIsa isa);

// XXH3-64 of [p, p+bytes), seed 0.
uint64_t xxh3_64(const void* p, size_t bytes);

// Swap-file extents are checksummed by chunk: the XXH3-64 of each
// kChecksumChunk bytes (the last chunk may be shorter), so chunks hash in
// parallel and a pipeline can check or hash part of a record while it works
// on the rest (engine: verify a chunk before its bytes are read, hash it
// after its last byte is written, while it is still in cache).
inline constexpr size_t kChecksumChunk = size_t(1) << 20;
// Chunks of an extent of `bytes` bytes (at least 1).
size_t checksum_chunks(size_t bytes);
// XXH3-64 of chunk `i` of the extent [base, base + bytes).
uint64_t chunk_checksum(const void* base, size_t bytes, size_t i);

// The variant xxh3_64 and Xxh3Stream use on this machine.
HashIsa hash_isa();

// For tests and benches: the one-shot function of variant `isa`, or nullptr
// when this CPU (or OS) cannot run it.
using Xxh3Fn = uint64_t (*)(const void*, size_t);
Xxh3Fn xxh3_64_variant(HashIsa isa);

struct Hash128 {
  uint64_t high = 0, low = 0;
};

// Streaming XXH3-128 (checkpoint extents). Owns its state (heap, 64-byte
// aligned). `isa` picks a variant for tests; by default the machine's.
class Xxh3Stream {
 public:
  Xxh3Stream();
  explicit Xxh3Stream(HashIsa isa);
  ~Xxh3Stream();
  Xxh3Stream(const Xxh3Stream&) = delete;
  Xxh3Stream& operator=(const Xxh3Stream&) = delete;

  void update(const void* p, size_t bytes);
  Hash128 digest() const;

  struct State;

 private:
  std::unique_ptr<State> state_;
  void (*update_)(void* state, const void* p, size_t bytes);
};

}  // namespace strata::io
