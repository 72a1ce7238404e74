// benchmarks/common/plain_bound.h — the independent memory bound of the CPU
// optimizer benches: strata-bench-adam's indep_bound rows, and (through
// libstrata_plain_bound.so, plain_bound_lib.cpp) benchmarks/bench_cpu_adam.py's
// "bound" contender beside strata and DeepSpeed's cpu_adam.
//
// Header-only and free of strata's headers on purpose: it must share no code
// with the kernel path it bounds. Ownership: a Bound owns its arrays and its
// threads. Units: elements and bytes per element; run_seconds() in seconds.
// Alignment: arrays 4 KiB-aligned (2 MiB with `huge`). Thread-safety: one
// Bound is driven from one thread at a time.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "common/bench_util.h"

// ------------------------------------------------------ the independent bound
// A plain streaming loop that shares no code with the kernel path: its own
// arrays (aligned_alloc, first-touched by the thread that streams them), its
// own std::threads with a static partition, no strata call anywhere. Per
// element it moves the optimizer's bytes — reads `rw` fp32 state arrays and
// the gradient (4 or 2 bytes), writes the `rw` arrays back and the copy-out
// (0, 4 or 2 bytes) — with one multiply-add per array: s = g * a + s, a = 0
// at run time. 16-bit gradients are widened and 16-bit copy-outs narrowed by
// a shift (the bound counts bytes, not rounding rules).
//
// It is compiled for the widest vector ISA the CPU reports
// (__builtin_cpu_supports, not strata's cpu_features), at -O3 whatever the
// build type, so its loop vectorises.
namespace strata::bench::plain {

// Elements per fp32 scale of the 8-bit moments (the kernels' kQ8Block; the
// bench checks they agree, this header includes nothing of strata's).
inline constexpr size_t kScaleBlock = 256;

template <int K, int kGradBytes, int kOutBytes>
inline __attribute__((always_inline)) void pass_body(float* __restrict s0, float* __restrict s1,
                                                     float* __restrict s2, float* __restrict s3,
                                                     const void* __restrict grad,
                                                     void* __restrict out, size_t begin, size_t end,
                                                     float a) {
  const auto* __restrict g32 = static_cast<const float*>(grad);
  const auto* __restrict g16 = static_cast<const uint16_t*>(grad);
  auto* __restrict o32 = static_cast<float*>(out);
  auto* __restrict o16 = static_cast<uint16_t*>(out);
  for (size_t i = begin; i < end; ++i) {
    float g;
    if constexpr (kGradBytes == 4) {
      g = g32[i];
    } else {
      g = std::bit_cast<float>(uint32_t(g16[i]) << 16);
    }
    const float x0 = g * a + s0[i];
    s0[i] = x0;
    if constexpr (K > 1) {
      s1[i] = g * a + s1[i];
    }
    if constexpr (K > 2) {
      s2[i] = g * a + s2[i];
    }
    if constexpr (K > 3) {
      s3[i] = g * a + s3[i];
    }
    if constexpr (kOutBytes == 4) {
      o32[i] = x0;
    } else if constexpr (kOutBytes == 2) {
      o16[i] = uint16_t(std::bit_cast<uint32_t>(x0) >> 16);
    }
  }
}

using PassFn = void (*)(float*, float*, float*, float*, const void*, void*, size_t, size_t, float);

#define STRATA_PLAIN_PASS(name, attrs)                                                          \
  template <int K, int G, int O>                                                                \
  attrs void name(float* s0, float* s1, float* s2, float* s3, const void* g, void* o, size_t b, \
                  size_t e, float a) {                                                          \
    pass_body<K, G, O>(s0, s1, s2, s3, g, o, b, e, a);                                          \
  }
STRATA_PLAIN_PASS(pass_avx512,
                  __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), optimize("O3"))))
STRATA_PLAIN_PASS(pass_avx2, __attribute__((target("avx2,fma"), optimize("O3"))))
STRATA_PLAIN_PASS(pass_base, __attribute__((optimize("O3"))))
#undef STRATA_PLAIN_PASS

template <int K, int G, int O>
PassFn pick_isa(const char** isa) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    *isa = "avx512";
    return &pass_avx512<K, G, O>;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    *isa = "avx2";
    return &pass_avx2<K, G, O>;
  }
  *isa = "sse2";
  return &pass_base<K, G, O>;
}

template <int K, int G>
PassFn pick_out(int out_bytes, const char** isa) {
  switch (out_bytes) {
    case 0:
      return pick_isa<K, G, 0>(isa);
    case 2:
      return pick_isa<K, G, 2>(isa);
    default:
      return pick_isa<K, G, 4>(isa);
  }
}

template <int K>
PassFn pick_grad(int grad_bytes, int out_bytes, const char** isa) {
  return grad_bytes == 2 ? pick_out<K, 2>(out_bytes, isa) : pick_out<K, 4>(out_bytes, isa);
}

PassFn pick(int rw, int grad_bytes, int out_bytes, const char** isa) {
  switch (rw) {
    case 1:
      return pick_grad<1>(grad_bytes, out_bytes, isa);
    case 2:
      return pick_grad<2>(grad_bytes, out_bytes, isa);
    case 3:
      return pick_grad<3>(grad_bytes, out_bytes, isa);
    default:
      return pick_grad<4>(grad_bytes, out_bytes, isa);
  }
}

// The same loop for compressed state (--state-dtype): the master fp32, the
// K - 1 other slots `MW` bytes per element — 2: bf16, widened and narrowed by
// a shift; 1: an 8-bit code, widened and narrowed by a conversion, and per
// kScaleBlock elements one fp32 scale read and written (c1..c3) — one
// multiply-add per array and element, like pass_body.
template <int MW>
struct MomentBits;
template <>
struct MomentBits<2> {
  using T = uint16_t;
  static float load(T x) { return std::bit_cast<float>(uint32_t(x) << 16); }
  static T store(float x) { return T(std::bit_cast<uint32_t>(x) >> 16); }
};
template <>
struct MomentBits<1> {
  using T = int8_t;
  static float load(T x) { return float(x); }
  static T store(float x) { return T(int32_t(x)); }
};

template <int K, int MW, int kGradBytes, int kOutBytes>
inline __attribute__((always_inline)) void cpass_body(
    float* __restrict s0, void* __restrict m1, void* __restrict m2, void* __restrict m3,
    float* __restrict c1, float* __restrict c2, float* __restrict c3, const void* __restrict grad,
    void* __restrict out, size_t begin, size_t end, float a) {
  using B = MomentBits<MW>;
  using T = typename B::T;
  const auto* __restrict g32 = static_cast<const float*>(grad);
  const auto* __restrict g16 = static_cast<const uint16_t*>(grad);
  auto* __restrict s1 = static_cast<T*>(m1);
  auto* __restrict s2 = static_cast<T*>(m2);
  auto* __restrict s3 = static_cast<T*>(m3);
  auto* __restrict o32 = static_cast<float*>(out);
  auto* __restrict o16 = static_cast<uint16_t*>(out);
  for (size_t i = begin; i < end; ++i) {
    float g;
    if constexpr (kGradBytes == 4) {
      g = g32[i];
    } else {
      g = std::bit_cast<float>(uint32_t(g16[i]) << 16);
    }
    const float x0 = g * a + s0[i];
    s0[i] = x0;
    if constexpr (K > 1) {
      s1[i] = B::store(g * a + B::load(s1[i]));
    }
    if constexpr (K > 2) {
      s2[i] = B::store(g * a + B::load(s2[i]));
    }
    if constexpr (K > 3) {
      s3[i] = B::store(g * a + B::load(s3[i]));
    }
    if constexpr (kOutBytes == 4) {
      o32[i] = x0;
    } else if constexpr (kOutBytes == 2) {
      o16[i] = uint16_t(std::bit_cast<uint32_t>(x0) >> 16);
    }
  }
  if constexpr (MW == 1) {
    // begin is a multiple of kScaleBlock (the partition's granule).
    const size_t jb = begin / kScaleBlock, je = (end + kScaleBlock - 1) / kScaleBlock;
    float* const cs[3] = {c1, c2, c3};
    for (int k = 0; k + 1 < K; ++k) {
      float* __restrict c = cs[k];
      for (size_t j = jb; j < je; ++j) {
        c[j] = c[j] * a + c[j];
      }
    }
  }
}

using CPassFn = void (*)(float*, void*, void*, void*, float*, float*, float*, const void*, void*,
                         size_t, size_t, float);

#define STRATA_PLAIN_CPASS(name, attrs)                                                     \
  template <int K, int MW, int G, int O>                                                    \
  attrs void name(float* s0, void* m1, void* m2, void* m3, float* c1, float* c2, float* c3, \
                  const void* g, void* o, size_t b, size_t e, float a) {                    \
    cpass_body<K, MW, G, O>(s0, m1, m2, m3, c1, c2, c3, g, o, b, e, a);                     \
  }
STRATA_PLAIN_CPASS(cpass_avx512,
                   __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), optimize("O3"))))
STRATA_PLAIN_CPASS(cpass_avx2, __attribute__((target("avx2,fma"), optimize("O3"))))
STRATA_PLAIN_CPASS(cpass_base, __attribute__((optimize("O3"))))
#undef STRATA_PLAIN_CPASS

template <int K, int MW, int G, int O>
CPassFn cpick_isa(const char** isa) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    *isa = "avx512";
    return &cpass_avx512<K, MW, G, O>;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    *isa = "avx2";
    return &cpass_avx2<K, MW, G, O>;
  }
  *isa = "sse2";
  return &cpass_base<K, MW, G, O>;
}

template <int K, int MW, int G>
CPassFn cpick_out(int out_bytes, const char** isa) {
  switch (out_bytes) {
    case 0:
      return cpick_isa<K, MW, G, 0>(isa);
    case 2:
      return cpick_isa<K, MW, G, 2>(isa);
    default:
      return cpick_isa<K, MW, G, 4>(isa);
  }
}

template <int K, int MW>
CPassFn cpick_grad(int grad_bytes, int out_bytes, const char** isa) {
  return grad_bytes == 2 ? cpick_out<K, MW, 2>(out_bytes, isa)
                         : cpick_out<K, MW, 4>(out_bytes, isa);
}

template <int K>
CPassFn cpick_width(int moment_bytes, int grad_bytes, int out_bytes, const char** isa) {
  return moment_bytes == 1 ? cpick_grad<K, 1>(grad_bytes, out_bytes, isa)
                           : cpick_grad<K, 2>(grad_bytes, out_bytes, isa);
}

CPassFn cpick(int rw, int moment_bytes, int grad_bytes, int out_bytes, const char** isa) {
  switch (rw) {
    case 1:
      return cpick_width<1>(moment_bytes, grad_bytes, out_bytes, isa);
    case 2:
      return cpick_width<2>(moment_bytes, grad_bytes, out_bytes, isa);
    case 3:
      return cpick_width<3>(moment_bytes, grad_bytes, out_bytes, isa);
    default:
      return cpick_width<4>(moment_bytes, grad_bytes, out_bytes, isa);
  }
}

// Owns the arrays and threads of one bound shape. run() is one pass over all
// n elements; the caller's thread streams partition 0, threads-1 std::threads
// the others, released and collected by two barriers.
// Thread-safety: one run() at a time, from the constructing thread.
class Bound {
 public:
  // moment_bytes 4: every slot fp32 (pass_body); 2 or 1: slots 1.. in
  // bf16 / 8-bit codes with scales (cpass_body), slot 0 fp32.
  Bound(size_t n, int rw, int grad_bytes, int out_bytes, unsigned threads, bool huge,
        int moment_bytes = 4)
      : n_(n),
        huge_(huge),
        rw_(rw),
        grad_bytes_(grad_bytes),
        out_bytes_(out_bytes),
        moment_bytes_(moment_bytes),
        granule_(moment_bytes == 1 ? kScaleBlock : 64),
        threads_(std::max(1u, threads)),
        start_(std::ptrdiff_t(threads_)),
        done_(std::ptrdiff_t(threads_)) {
    if (moment_bytes_ == 4) {
      pass_ = pick(rw, grad_bytes, out_bytes, &isa_);
      for (int k = 0; k < 4; ++k) {
        s_[k] = k < rw_ ? static_cast<float*>(alloc(n_ * 4)) : nullptr;
      }
    } else {
      cpass_ = cpick(rw, moment_bytes, grad_bytes, out_bytes, &isa_);
      s_[0] = static_cast<float*>(alloc(n_ * 4));
      for (int k = 1; k < rw_; ++k) {
        m_[k] = alloc(n_ * size_t(moment_bytes_));
        if (moment_bytes_ == 1) {
          c_[k] = static_cast<float*>(alloc(blocks() * 4));
        }
      }
    }
    grad_ = alloc(n_ * size_t(grad_bytes_));
    out_ = out_bytes_ > 0 ? alloc(n_ * size_t(out_bytes_)) : nullptr;
    for (unsigned t = 1; t < threads_; ++t) {
      workers_.emplace_back([this, t] { worker(t); });
    }
    first_touch(0);
    done_.arrive_and_wait();  // every partition touched
  }
  ~Bound() {
    stop_ = true;
    start_.arrive_and_wait();
    for (auto& w : workers_) {
      w.join();
    }
    for (void* p : blocks_) {
      std::free(p);
    }
  }
  Bound(const Bound&) = delete;
  Bound& operator=(const Bound&) = delete;

  const char* isa() const { return isa_; }

  double run_seconds() {
    const double t0 = now_seconds();
    start_.arrive_and_wait();
    stream(0);
    done_.arrive_and_wait();
    return now_seconds() - t0;
  }

 private:
  // Page-aligned, like a plain C program's arrays (with transparent huge
  // pages in "madvise" mode, the Debian default, they get 4 KiB pages); with
  // `huge_` 2 MiB-aligned and advised MADV_HUGEPAGE, as the kernel's buffers
  // are by default: a bound on 4 KiB pages pays TLB misses the kernel does
  // not, and reads low.
  //
  // Array j starts j * kSkew bytes into its allocation (5 pages + 1088 B):
  // arrays whose bases the allocator happened to place a multiple of 2^28
  // bytes apart would otherwise share their L1 sets and the virtual address
  // bits 12-27 that AMD's L1 way predictor hashes, and stream at 0.6 of the
  // memory's rate (in one process and not in another: it depends on where
  // the heap put them). With the skew no two arrays share a set or a page
  // number within their allocation's alignment.
  static constexpr size_t kSkew = 5 * 4096 + 1088;
  void* alloc(size_t bytes) {
    const size_t align = huge_ ? size_t(2) << 20 : 4096;
    const size_t offset = blocks_.size() * kSkew;
    const size_t rounded = (std::max<size_t>(bytes, 1) + offset + align - 1) / align * align;
    void* p = std::aligned_alloc(align, rounded);
    if (p == nullptr) {
      std::fprintf(stderr, "aligned_alloc %zu bytes failed\n", bytes);
      std::exit(1);
    }
    if (huge_) {
      madvise(p, rounded, MADV_HUGEPAGE);
    }
    blocks_.push_back(p);
    return static_cast<char*>(p) + offset;
  }

  size_t blocks() const { return (n_ + kScaleBlock - 1) / kScaleBlock; }

  // Partition t: [begin, end), cut at multiples of 64 elements so no cache
  // line of any array is shared by two threads (of kScaleBlock with 8-bit
  // moments: nor any scale).
  size_t cut(unsigned t) const { return (n_ * t / threads_) / granule_ * granule_; }
  size_t begin(unsigned t) const { return cut(t); }
  size_t end(unsigned t) const { return t + 1 == threads_ ? n_ : cut(t + 1); }

  void first_touch(unsigned t) {
    const size_t b = begin(t), e = end(t);
    for (int k = 0; k < rw_; ++k) {
      if (s_[k] != nullptr) {
        std::fill(s_[k] + b, s_[k] + e, k == 0 ? 1.0f : 0.0f);
      }
      if (m_[k] != nullptr) {
        std::memset(static_cast<char*>(m_[k]) + b * size_t(moment_bytes_), 0,
                    (e - b) * size_t(moment_bytes_));
      }
      if (c_[k] != nullptr) {
        const size_t jb = b / kScaleBlock, je = (e + kScaleBlock - 1) / kScaleBlock;
        std::fill(c_[k] + jb, c_[k] + je, 0.0f);
      }
    }
    std::memset(static_cast<char*>(grad_) + b * size_t(grad_bytes_), 0,
                (e - b) * size_t(grad_bytes_));
    if (out_ != nullptr) {
      std::memset(static_cast<char*>(out_) + b * size_t(out_bytes_), 0,
                  (e - b) * size_t(out_bytes_));
    }
  }

  void stream(unsigned t) {
    if (cpass_ != nullptr) {
      cpass_(s_[0], m_[1], m_[2], m_[3], c_[1], c_[2], c_[3], grad_, out_, begin(t), end(t), a_);
    } else {
      pass_(s_[0], s_[1], s_[2], s_[3], grad_, out_, begin(t), end(t), a_);
    }
  }

  void worker(unsigned t) {
    first_touch(t);
    done_.arrive_and_wait();
    for (;;) {
      start_.arrive_and_wait();
      if (stop_) {
        return;
      }
      stream(t);
      done_.arrive_and_wait();
    }
  }

  size_t n_;
  bool huge_;
  int rw_, grad_bytes_, out_bytes_, moment_bytes_;
  size_t granule_;
  unsigned threads_;
  std::barrier<> start_, done_;
  PassFn pass_ = nullptr;
  CPassFn cpass_ = nullptr;
  const char* isa_ = "";
  float* s_[4] = {};
  void* m_[4] = {};   // compressed slots 1..3 (bf16 or 8-bit codes)
  float* c_[4] = {};  // their scales (8-bit codes)
  void* grad_ = nullptr;
  void* out_ = nullptr;
  volatile float a_volatile_ = 0.0f;
  float a_ = a_volatile_;  // 0, known only at run time: the FMA stays
  std::atomic<bool> stop_{false};
  std::vector<std::thread> workers_;
  std::vector<void*> blocks_;  // what alloc() got from aligned_alloc, freed by the destructor
};

}  // namespace strata::bench::plain
