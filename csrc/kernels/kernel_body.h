// kernels/kernel_body.h — the optimizer math, written once for every ISA.
//
// Included by kernels_scalar.cpp, kernels_avx2.cpp and kernels_avx512.cpp
// INSIDE their own namespace (so each gets private instantiations compiled
// with its own ISA flags; no COMDAT is shared between them), after they define
// `struct V`, the vector type of their ISA:
//   using F; static constexpr size_t kLanes;
//   F set1(float); F add(F, F); F mul(F, F); F div(F, F); F sqrt(F);
//   F fma(F a, F b, F c)   // a * b + c rounded once
//   F max_nan(F a, F b)    // (a > b) ? a : b, and a + b if either is NaN
//   template <bool kTail> F load(const float*, size_t cnt) / store(float*, F, size_t cnt)
//   template <bool kTail> F load_bf16 / load_f16 (const uint16_t*, size_t cnt)
//   template <bool kTail> void store_bf16 / store_f16 (uint16_t*, F, size_t cnt)
//   the q8 codec's lane operations (rules at encode_slot() in optimizer.h):
//   using M                       // an integer vector of kLanes uint32
//   M max_init()                  // zeros
//   template <bool kTail> M max_abs_bits(M acc, F x, size_t cnt)
//                                 // lane max of acc and bits(|x|) (live lanes only)
//   uint32_t reduce_max(M)        // max over the lanes
//   template <bool kSigned, bool kTail> F load_q8(const uint8_t*, F scale, size_t cnt)
//                                 // decode codes with their block's scale
//   template <bool kSigned, bool kTail> void store_q8(uint8_t*, F x, F inv, size_t cnt)
//                                 // the codes of x given inv = 1 / scale
//   template <bool kSigned> void store_q8x4(uint8_t*, F x0, F x1, F x2, F x3, F inv)
//                                 // four full vectors' codes, as four store_q8
// kTail: only the first cnt (< kLanes) elements exist; loads read zeros past
// them, stores leave memory past them untouched.
//
// Bit-identity across ISAs rests on: every operation here is elementwise and
// IEEE-exact-rounded (add, mul, div, sqrt, fma), the same sequence runs for
// body and tail lanes, and floating-point contraction is off in the including
// translation units (otherwise GCC fuses mul+add intrinsics into FMAs in the
// SIMD files only).
//
// The operation order is torch 1.13's single-tensor fp32 path, with its
// vectorised add(alpha) / addcmul being fused multiply-adds (checked against
// torch on this machine: `x.add_(y, alpha=a)` == fma(y, a, x),
// `x.addcmul_(y, z, value=a)` == fma(a * y, z, x), addcdiv and div unfused).
//
// No #include here: this file is pasted into a namespace.
//
// STRATA_KERNEL_INLINE forces the per-vector lambdas into the loop: out of
// line, the broadcast constants they capture by reference live in memory and
// every iteration reloads them.
#ifndef STRATA_KERNEL_INLINE
#define STRATA_KERNEL_INLINE __attribute__((always_inline))
#endif

template <class V, DType GD, bool kTail>
inline STRATA_KERNEL_INLINE typename V::F load_grad(const void* g, size_t i, size_t cnt) {
  if constexpr (GD == DType::kF32) {
    return V::template load<kTail>(static_cast<const float*>(g) + i, cnt);
  } else if constexpr (GD == DType::kBF16) {
    return V::template load_bf16<kTail>(static_cast<const uint16_t*>(g) + i, cnt);
  } else {
    return V::template load_f16<kTail>(static_cast<const uint16_t*>(g) + i, cnt);
  }
}

template <class V, detail::OutKind OK, bool kTail>
inline STRATA_KERNEL_INLINE void store_out(void* out, size_t i, typename V::F x, size_t cnt) {
  if constexpr (OK == detail::OutKind::kF32) {
    V::template store<kTail>(static_cast<float*>(out) + i, x, cnt);
  } else if constexpr (OK == detail::OutKind::kBF16) {
    V::template store_bf16<kTail>(static_cast<uint16_t*>(out) + i, x, cnt);
  } else if constexpr (OK == detail::OutKind::kF16) {
    V::template store_f16<kTail>(static_cast<uint16_t*>(out) + i, x, cnt);
  }
}

// Calls f.template operator()<GD, OK>() for the runtime (grad, out) pair.
template <DType GD, class Fn>
inline void dispatch_out(detail::OutKind out, Fn& f) {
  switch (out) {
    case detail::OutKind::kNone:
      f.template operator()<GD, detail::OutKind::kNone>();
      break;
    case detail::OutKind::kF32:
      f.template operator()<GD, detail::OutKind::kF32>();
      break;
    case detail::OutKind::kBF16:
      f.template operator()<GD, detail::OutKind::kBF16>();
      break;
    case detail::OutKind::kF16:
      f.template operator()<GD, detail::OutKind::kF16>();
      break;
  }
}

template <class Fn>
inline void dispatch_types(DType grad, detail::OutKind out, Fn&& f) {
  switch (grad) {
    case DType::kF32:
      dispatch_out<DType::kF32>(out, f);
      break;
    case DType::kBF16:
      dispatch_out<DType::kBF16>(out, f);
      break;
    case DType::kF16:
      dispatch_out<DType::kF16>(out, f);
      break;
  }
}

// Runs block<kTail>(i, cnt) over a segment: full vectors, then one tail.
template <class V, class Block>
inline STRATA_KERNEL_INLINE void for_each_block(size_t n, Block&& block) {
  size_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) {
    block.template operator()<false>(i, V::kLanes);
  }
  if (i < n) {
    block.template operator()<true>(i, n - i);
  }
}

// ----------------------------------------------------------------- q8 codec
// One block (cnt <= kQ8Block elements) given max_bits, the max of |x|'s bits
// over it (the rules at encode_slot(), optimizer.h).
template <class V, bool kSigned>
inline STRATA_KERNEL_INLINE void q8_encode_known_max(const float* in, uint8_t* out,
                                                     float* scale_out, size_t cnt,
                                                     uint32_t max_bits) {
  if (max_bits < detail::kQ8MinScaleBits || max_bits > detail::kQ8MaxScaleBits) {
    *scale_out = 0.0f;  // zero, below 2^-96, inf or NaN: scale 0, codes 0
    __builtin_memset(out, 0, cnt);
    return;
  }
  const float scale = __builtin_bit_cast(float, max_bits);
  *scale_out = scale;
  const typename V::F inv = V::set1(1.0f / scale);
  constexpr size_t kGroup = 4 * V::kLanes;
  size_t i = 0;
  for (; i + kGroup <= cnt; i += kGroup) {
    V::template store_q8x4<kSigned>(out + i, V::template load<false>(in + i, V::kLanes),
                                    V::template load<false>(in + i + V::kLanes, V::kLanes),
                                    V::template load<false>(in + i + 2 * V::kLanes, V::kLanes),
                                    V::template load<false>(in + i + 3 * V::kLanes, V::kLanes),
                                    inv);
  }
  for_each_block<V>(cnt - i, [&]<bool kTail>(size_t k, size_t c) STRATA_KERNEL_INLINE {
    V::template store_q8<kSigned, kTail>(out + i + k, V::template load<kTail>(in + i + k, c), inv,
                                         c);
  });
}

template <class V, bool kSigned>
void q8_encode_run(const float* in, uint8_t* out, float* scales, size_t n) {
  for (size_t b0 = 0; b0 < n; b0 += kQ8Block) {
    const size_t cnt = n - b0 < kQ8Block ? n - b0 : kQ8Block;
    typename V::M acc = V::max_init();
    for_each_block<V>(cnt, [&]<bool kTail>(size_t i, size_t c) STRATA_KERNEL_INLINE {
      acc = V::template max_abs_bits<kTail>(acc, V::template load<kTail>(in + b0 + i, c), c);
    });
    q8_encode_known_max<V, kSigned>(in + b0, out + b0, scales + b0 / kQ8Block, cnt,
                                    V::reduce_max(acc));
  }
}

template <class V, bool kSigned>
void q8_decode_run(const uint8_t* in, const float* scales, float* out, size_t n) {
  for (size_t b0 = 0; b0 < n; b0 += kQ8Block) {
    const size_t cnt = n - b0 < kQ8Block ? n - b0 : kQ8Block;
    const typename V::F scale = V::set1(scales[b0 / kQ8Block]);
    for_each_block<V>(cnt, [&]<bool kTail>(size_t i, size_t c) STRATA_KERNEL_INLINE {
      V::template store<kTail>(out + b0 + i,
                               V::template load_q8<kSigned, kTail>(in + b0 + i, scale, c), c);
    });
  }
}

// ------------------------------------------------------------- slot storage
// SlotIo<V, kind, kSigned>: how a kernel reads and writes one slot of its
// segment. load/store give and take fp32 vectors; bit for bit, load is
// decode_slot() and store is encode_slot() of the values stored, so a fused
// step is exactly "decode, fp32 step, encode". `stored` is what a later
// decode of a just-stored vector returns (the copy-out of a compressed
// master). kQ8 works block by block (kBlocked): store keeps the block's new
// values in an L1 buffer with their running max, end_block encodes them.
// The kernels take these by value and every member is inlined, so they
// live in registers (a vector store may alias anything in memory, and would
// otherwise force the pointers and running maxima to be reloaded); the q8
// block buffers are separate arrays for the same reason.
template <class V, detail::SlotKind K, bool kSigned>
struct SlotIo;

template <class V, bool kSigned>
struct SlotIo<V, detail::SlotKind::kF32, kSigned> {
  using F = typename V::F;
  static constexpr bool kBlocked = false;
  float* p;
  SlotIo(void* slot, float*, float*) : p(static_cast<float*>(slot)) {}
  template <bool kTail>
  STRATA_KERNEL_INLINE F load(size_t i, size_t cnt) const {
    return V::template load<kTail>(p + i, cnt);
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE void store(size_t i, F x, size_t cnt) {
    V::template store<kTail>(p + i, x, cnt);
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE F stored(size_t, F x, size_t) const {
    return x;
  }
  void begin_block(size_t) {}
  void encode_prev(size_t) {}
  void end_block(size_t, size_t, size_t) {}
  void flush() {}
};

template <class V, bool kSigned>
struct SlotIo<V, detail::SlotKind::kBF16, kSigned> {
  using F = typename V::F;
  static constexpr bool kBlocked = false;
  uint16_t* p;
  SlotIo(void* slot, float*, float*) : p(static_cast<uint16_t*>(slot)) {}
  template <bool kTail>
  STRATA_KERNEL_INLINE F load(size_t i, size_t cnt) const {
    return V::template load_bf16<kTail>(p + i, cnt);
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE void store(size_t i, F x, size_t cnt) {
    V::template store_bf16<kTail>(p + i, x, cnt);
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE F stored(size_t i, F, size_t cnt) const {
    return V::template load_bf16<kTail>(p + i, cnt);  // the rounded value, from L1
  }
  void begin_block(size_t) {}
  void encode_prev(size_t) {}
  void end_block(size_t, size_t, size_t) {}
  void flush() {}
};

template <class V, bool kSigned>
struct SlotIo<V, detail::SlotKind::kQ8, kSigned> {
  using F = typename V::F;
  static constexpr bool kBlocked = true;
  static constexpr size_t kVectors = kQ8Block / V::kLanes;  // per full block
  static_assert(kVectors % 4 == 0);
  uint8_t* codes;  // null: the slot is not used (max_v without amsgrad)
  float* scales;
  float* cur;   // kQ8Block floats: the new values of the block being stepped
  float* prev;  // kQ8Block floats: those of the block before, being encoded
  F scale;      // the current block's (decode)
  typename V::M max;
  size_t b0 = 0;
  F pinv;           // the previous block's 1 / scale (0 with scale 0, its values zeroed)
  size_t pb0 = 0;   // the previous block's first element
  size_t pcnt = 0;  // and its element count; 0: none pending
  // block_buf: 2 * kQ8Block floats.
  SlotIo(void* slot, float* s, float* block_buf)
      : codes(static_cast<uint8_t*>(slot)),
        scales(s),
        cur(block_buf),
        prev(block_buf + kQ8Block),
        scale(V::set1(0.0f)),
        max(V::max_init()),
        pinv(V::set1(0.0f)) {}
  STRATA_KERNEL_INLINE void begin_block(size_t begin) {
    if (codes != nullptr) {
      b0 = begin;
      scale = V::set1(scales[begin / kQ8Block]);
      max = V::max_init();
    }
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE F load(size_t i, size_t cnt) const {
    return V::template load_q8<kSigned, kTail>(codes + i, scale, cnt);
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE void store(size_t i, F x, size_t cnt) {
    V::template store<kTail>(cur + (i - b0), x, cnt);
    max = V::template max_abs_bits<kTail>(max, x, cnt);
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE F stored(size_t, F x, size_t) const {
    return x;  // never the master (StateKinds)
  }
  template <bool kTail>
  STRATA_KERNEL_INLINE void encode_vector(size_t j, size_t cnt) {
    V::template store_q8<kSigned, kTail>(
        codes + pb0 + j * V::kLanes, V::template load<kTail>(prev + j * V::kLanes, cnt), pinv, cnt);
  }
  // Vectors 4g..4g+3 of the previous block (a full one).
  STRATA_KERNEL_INLINE void encode_group(size_t g) {
    const float* const x = prev + 4 * g * V::kLanes;
    V::template store_q8x4<kSigned>(codes + pb0 + 4 * g * V::kLanes,
                                    V::template load<false>(x, V::kLanes),
                                    V::template load<false>(x + V::kLanes, V::kLanes),
                                    V::template load<false>(x + 2 * V::kLanes, V::kLanes),
                                    V::template load<false>(x + 3 * V::kLanes, V::kLanes), pinv);
  }
  // After step j of the current block: every fourth, four vectors of the
  // previous block's codes, so the integer encode work is spread between
  // the steps (and overlaps their divides) instead of running as a pass of
  // its own. The previous block is a full one here (only the last block is
  // short, and it is flushed).
  STRATA_KERNEL_INLINE void encode_prev(size_t j) {
    if (codes != nullptr && pcnt != 0 && j % 4 == 3) {
      encode_group(j / 4);
    }
  }
  // After the current block's `done` steps: the rest of the previous block,
  // then this block's scale (the rules of q8_encode_known_max) — its codes
  // are written during the next block, or by flush().
  STRATA_KERNEL_INLINE void end_block(size_t begin, size_t cnt, size_t done) {
    if (codes == nullptr) {
      return;
    }
    if (pcnt != 0) {
      for (size_t g = done / 4; g < kVectors / 4; ++g) {
        encode_group(g);
      }
    }
    float* const t = prev;  // encoded: its buffer takes the next block
    prev = cur;
    cur = t;
    const uint32_t max_bits = V::reduce_max(max);
    if (max_bits < detail::kQ8MinScaleBits || max_bits > detail::kQ8MaxScaleBits) {
      // Scale 0, codes 0 (rare): zero values with inv 0 encode to code 0.
      scales[begin / kQ8Block] = 0.0f;
      __builtin_memset(prev, 0, sizeof(float) * kQ8Block);
      pinv = V::set1(0.0f);
    } else {
      const float sc = __builtin_bit_cast(float, max_bits);
      scales[begin / kQ8Block] = sc;
      pinv = V::set1(1.0f / sc);
    }
    pb0 = begin;
    pcnt = cnt;
  }
  STRATA_KERNEL_INLINE void flush() {
    if (codes == nullptr || pcnt == 0) {
      return;
    }
    size_t j = 0;
    for (; (j + 1) * V::kLanes <= pcnt; ++j) {
      encode_vector<false>(j, V::kLanes);
    }
    if (j * V::kLanes < pcnt) {
      encode_vector<true>(j, pcnt - j * V::kLanes);
    }
    pcnt = 0;
  }
};

// Runs step<kTail>(i, cnt) over a segment of n elements: vector by vector,
// or, when a slot is kQ8, block by block (kQ8Block is a multiple of kLanes,
// so only the segment's last block has a tail): each slot's begin_block,
// the block's steps each followed by encode_prev (the block before's codes,
// a vector at a time), end_block, and a final flush.
template <class V, class Step, class... Slots>
inline STRATA_KERNEL_INLINE void run_slots(size_t n, Step&& step, Slots&... slots) {
  if constexpr ((Slots::kBlocked || ...)) {
    for (size_t b0 = 0; b0 < n; b0 += kQ8Block) {
      const size_t cnt = n - b0 < kQ8Block ? n - b0 : kQ8Block;
      (slots.begin_block(b0), ...);
      size_t i = 0, j = 0;
      for (; i + V::kLanes <= cnt; i += V::kLanes, ++j) {
        step.template operator()<false>(b0 + i, V::kLanes);
        (slots.encode_prev(j), ...);
      }
      if (i < cnt) {
        step.template operator()<true>(b0 + i, cnt - i);
        (slots.encode_prev(j), ...);
        ++j;
      }
      (slots.end_block(b0, cnt, j), ...);
    }
    (slots.flush(), ...);
  } else {
    for_each_block<V>(n, step);
  }
}

// ---------------------------------------------------------------- Adam/AdamW
template <class V, DType GD, detail::OutKind OK, class PS, class MS, class VS, class XS>
void adam_run(const detail::AdamConsts& c, const detail::Segment& s, PS p, MS m, VS v, XS vmax) {
  using F = typename V::F;
  const F grad_mul = V::set1(c.grad_mul);
  const F beta1 = V::set1(c.beta1);
  const F one_minus_beta1 = V::set1(c.one_minus_beta1);
  const F beta2 = V::set1(c.beta2);
  const F one_minus_beta2 = V::set1(c.one_minus_beta2);
  const F eps = V::set1(c.eps);
  const F bc2_sqrt = V::set1(c.bc2_sqrt);
  const F inv_bc2_sqrt = V::set1(c.inv_bc2_sqrt);
  const F neg_step = V::set1(c.neg_step_size);
  const F decay = V::set1(c.decay);
  const F wd = V::set1(c.weight_decay);
  // Locals: a vector store may alias any memory, so members of c (and s)
  // would be reloaded after every store.
  const bool decoupled = c.decoupled, l2 = c.l2, amsgrad = c.amsgrad, nearest = c.nearest;
  const void* const grad = s.g;
  void* const out = s.out;
  run_slots<V>(
      s.n,
      [&]<bool kTail>(size_t i, size_t cnt) STRATA_KERNEL_INLINE {
        F pv = p.template load<kTail>(i, cnt);
        F g = V::mul(load_grad<V, GD, kTail>(grad, i, cnt), grad_mul);
        if (decoupled) {
          pv = V::mul(pv, decay);  // param.mul_(1 - lr * weight_decay)
        }
        if (l2) {
          g = V::fma(pv, wd, g);  // grad.add(param, alpha=weight_decay)
        }
        // exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        const F mv = V::fma(g, one_minus_beta1, V::mul(m.template load<kTail>(i, cnt), beta1));
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        const F vv =
            V::fma(V::mul(one_minus_beta2, g), g, V::mul(v.template load<kTail>(i, cnt), beta2));
        F vden = vv;
        if (amsgrad) {
          // torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
          vden = V::max_nan(vmax.template load<kTail>(i, cnt), vv);
          vmax.template store<kTail>(i, vden, cnt);
        }
        // denom = (v.sqrt() / bias_correction2_sqrt).add_(eps); the
        // division by the constant through its reciprocal where that is
        // exact (V::div_by: the same bits, a divide fewer per vector)
        const F root = V::sqrt(vden);
        const F denom =
            V::add(nearest ? V::div_by(root, bc2_sqrt, inv_bc2_sqrt) : V::div(root, bc2_sqrt), eps);
        // param.addcdiv_(exp_avg, denom, value=-step_size)
        pv = V::add(pv, V::div(V::mul(neg_step, mv), denom));
        p.template store<kTail>(i, pv, cnt);
        m.template store<kTail>(i, mv, cnt);
        v.template store<kTail>(i, vv, cnt);
        if constexpr (OK != detail::OutKind::kNone) {
          store_out<V, OK, kTail>(out, i, p.template stored<kTail>(i, pv, cnt), cnt);
        }
      },
      p, m, v, vmax);
}

// ----------------------------------------------------------------------- SGD
template <class V, DType GD, detail::OutKind OK, class PS, class BS>
void sgd_run(const detail::SgdConsts& c, const detail::Segment& s, PS p, BS buf) {
  using F = typename V::F;
  const F grad_mul = V::set1(c.grad_mul);
  const F wd = V::set1(c.weight_decay);
  const F momentum = V::set1(c.momentum);
  const F one_minus_damp = V::set1(c.one_minus_dampening);
  const F neg_lr = V::set1(c.neg_lr);
  const bool has_wd = c.has_weight_decay, has_momentum = c.has_momentum;
  const bool first_step = c.first_step, nesterov = c.nesterov;
  const void* const grad = s.g;
  void* const out = s.out;
  run_slots<V>(
      s.n,
      [&]<bool kTail>(size_t i, size_t cnt) STRATA_KERNEL_INLINE {
        F pv = p.template load<kTail>(i, cnt);
        F d = V::mul(load_grad<V, GD, kTail>(grad, i, cnt), grad_mul);
        if (has_wd) {
          d = V::fma(pv, wd, d);  // d_p.add(param, alpha=weight_decay)
        }
        if (has_momentum) {
          F b;
          if (first_step) {
            b = d;  // torch.clone(d_p)
          } else {
            // buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            b = V::fma(d, one_minus_damp, V::mul(buf.template load<kTail>(i, cnt), momentum));
          }
          buf.template store<kTail>(i, b, cnt);
          d = nesterov ? V::fma(b, momentum, d) : b;  // d_p.add(buf, alpha=momentum)
        }
        pv = V::fma(d, neg_lr, pv);  // param.add_(d_p, alpha=-lr)
        p.template store<kTail>(i, pv, cnt);
        if constexpr (OK != detail::OutKind::kNone) {
          store_out<V, OK, kTail>(out, i, p.template stored<kTail>(i, pv, cnt), cnt);
        }
      },
      p, buf);
}

// ------------------------------------------------------------------- Adagrad
template <class V, DType GD, detail::OutKind OK, class PS, class SS>
void adagrad_run(const detail::AdagradConsts& c, const detail::Segment& s, PS p, SS sum) {
  using F = typename V::F;
  const F grad_mul = V::set1(c.grad_mul);
  const F wd = V::set1(c.weight_decay);
  const F eps = V::set1(c.eps);
  const F neg_clr = V::set1(c.neg_clr);
  const bool has_wd = c.has_weight_decay;
  const void* const grad = s.g;
  void* const out = s.out;
  run_slots<V>(
      s.n,
      [&]<bool kTail>(size_t i, size_t cnt) STRATA_KERNEL_INLINE {
        F pv = p.template load<kTail>(i, cnt);
        F g = V::mul(load_grad<V, GD, kTail>(grad, i, cnt), grad_mul);
        if (has_wd) {
          g = V::fma(pv, wd, g);  // grad.add(param, alpha=weight_decay)
        }
        // state_sum.addcmul_(grad, grad, value=1): fma(1 * g, g, sum), 1 * g == g
        const F sv = V::fma(g, g, sum.template load<kTail>(i, cnt));
        const F stdv = V::add(V::sqrt(sv), eps);            // state_sum.sqrt().add_(eps)
        pv = V::add(pv, V::div(V::mul(neg_clr, g), stdv));  // param.addcdiv_(grad, std, value=-clr)
        sum.template store<kTail>(i, sv, cnt);
        p.template store<kTail>(i, pv, cnt);
        if constexpr (OK != detail::OutKind::kNone) {
          store_out<V, OK, kTail>(out, i, p.template stored<kTail>(i, pv, cnt), cnt);
        }
      },
      p, sum);
}

// ------------------------------------------------------ bandwidth bound loop
// Same arrays, bytes and stores as the optimizers, one multiply-add each:
// s = g * a + s. The driver passes a = 0, so finite state is left as it was
// (a bench can alternate bound and optimizer on the same buffers; compressed
// slots re-encode to the same bits) while the hardware still loads,
// computes and stores every element.
template <class V, DType GD, detail::OutKind OK, int kSlots, class PS, class S1, class SR>
void bound_run(const detail::BoundConsts& c, const detail::Segment& s, PS p, S1 s1, SR s2, SR s3) {
  using F = typename V::F;
  const F a = V::set1(c.a);
  const void* const grad = s.g;
  void* const out = s.out;
  // Like the optimizers: every load of the element first, then every store.
  run_slots<V>(
      s.n,
      [&]<bool kTail>(size_t i, size_t cnt) STRATA_KERNEL_INLINE {
        const F g = load_grad<V, GD, kTail>(grad, i, cnt);
        const F x0 = V::fma(g, a, p.template load<kTail>(i, cnt));
        F x1, x2, x3;
        if constexpr (kSlots > 1) {
          x1 = V::fma(g, a, s1.template load<kTail>(i, cnt));
        }
        if constexpr (kSlots > 2) {
          x2 = V::fma(g, a, s2.template load<kTail>(i, cnt));
        }
        if constexpr (kSlots > 3) {
          x3 = V::fma(g, a, s3.template load<kTail>(i, cnt));
        }
        p.template store<kTail>(i, x0, cnt);
        if constexpr (kSlots > 1) {
          s1.template store<kTail>(i, x1, cnt);
        }
        if constexpr (kSlots > 2) {
          s2.template store<kTail>(i, x2, cnt);
        }
        if constexpr (kSlots > 3) {
          s3.template store<kTail>(i, x3, cnt);
        }
        if constexpr (OK != detail::OutKind::kNone) {
          store_out<V, OK, kTail>(out, i, p.template stored<kTail>(i, x0, cnt), cnt);
        }
      },
      p, s1, s2, s3);
}

// --------------------------------------------------------------------- casts
template <class V, detail::OutKind OK>
void cast_from_f32_run(const float* src, void* dst, size_t n) {
  for_each_block<V>(n, [&]<bool kTail>(size_t i, size_t cnt) STRATA_KERNEL_INLINE {
    store_out<V, OK, kTail>(dst, i, V::template load<kTail>(src + i, cnt), cnt);
  });
}

template <class V, DType GD>
void cast_to_f32_run(const void* src, float* dst, size_t n) {
  for_each_block<V>(n, [&]<bool kTail>(size_t i, size_t cnt) STRATA_KERNEL_INLINE {
    V::template store<kTail>(dst + i, load_grad<V, GD, kTail>(src, i, cnt), cnt);
  });
}

// ------------------------------------------------------- table entry points
// Calls f.template operator()<master, rest>() for the runtime StateKinds.
template <class Fn>
inline void dispatch_kinds(detail::StateKinds kinds, Fn&& f) {
  using detail::SlotKind;
  const bool bf16_master = kinds.master == SlotKind::kBF16;
  switch (kinds.rest) {
    case SlotKind::kF32:
      bf16_master ? f.template operator()<SlotKind::kBF16, SlotKind::kF32>()
                  : f.template operator()<SlotKind::kF32, SlotKind::kF32>();
      break;
    case SlotKind::kBF16:
      bf16_master ? f.template operator()<SlotKind::kBF16, SlotKind::kBF16>()
                  : f.template operator()<SlotKind::kF32, SlotKind::kBF16>();
      break;
    case SlotKind::kQ8:
      bf16_master ? f.template operator()<SlotKind::kBF16, SlotKind::kQ8>()
                  : f.template operator()<SlotKind::kF32, SlotKind::kQ8>();
      break;
  }
}

template <class V>
void adam_entry(const detail::AdamConsts& c, const detail::Segment& s, DType grad,
                detail::OutKind out, detail::StateKinds kinds) {
  dispatch_kinds(kinds, [&]<detail::SlotKind PK, detail::SlotKind RK>() {
    dispatch_types(grad, out, [&]<DType GD, detail::OutKind OK>() {
      alignas(64) float qbuf[3][2 * kQ8Block];  // used by kQ8 slots only
      const SlotIo<V, PK, false> p(s.slot[0], s.scales[0], nullptr);
      const SlotIo<V, RK, true> m(s.slot[1], s.scales[1], qbuf[0]);
      const SlotIo<V, RK, false> v(s.slot[2], s.scales[2], qbuf[1]);
      const SlotIo<V, RK, false> vmax(s.slot[3], s.scales[3], qbuf[2]);
      adam_run<V, GD, OK>(c, s, p, m, v, vmax);
    });
  });
}

template <class V>
void sgd_entry(const detail::SgdConsts& c, const detail::Segment& s, DType grad,
               detail::OutKind out, detail::StateKinds kinds) {
  dispatch_kinds(kinds, [&]<detail::SlotKind PK, detail::SlotKind RK>() {
    dispatch_types(grad, out, [&]<DType GD, detail::OutKind OK>() {
      alignas(64) float qbuf[2 * kQ8Block];
      const SlotIo<V, PK, false> p(s.slot[0], s.scales[0], nullptr);
      const SlotIo<V, RK, true> buf(s.slot[1], s.scales[1], qbuf);  // null without momentum
      sgd_run<V, GD, OK>(c, s, p, buf);
    });
  });
}

template <class V>
void adagrad_entry(const detail::AdagradConsts& c, const detail::Segment& s, DType grad,
                   detail::OutKind out, detail::StateKinds kinds) {
  dispatch_kinds(kinds, [&]<detail::SlotKind PK, detail::SlotKind RK>() {
    dispatch_types(grad, out, [&]<DType GD, detail::OutKind OK>() {
      alignas(64) float qbuf[2 * kQ8Block];
      const SlotIo<V, PK, false> p(s.slot[0], s.scales[0], nullptr);
      const SlotIo<V, RK, false> sum(s.slot[1], s.scales[1], qbuf);
      adagrad_run<V, GD, OK>(c, s, p, sum);
    });
  });
}

template <class V, DType GD, detail::OutKind OK, detail::SlotKind PK, detail::SlotKind RK,
          bool kFirstSigned>
void bound_slots(const detail::BoundConsts& c, const detail::Segment& s) {
  alignas(64) float qbuf[3][2 * kQ8Block];
  const SlotIo<V, PK, false> p(s.slot[0], s.scales[0], nullptr);
  const SlotIo<V, RK, kFirstSigned> s1(s.slot[1], s.scales[1], qbuf[0]);
  const SlotIo<V, RK, false> s2(s.slot[2], s.scales[2], qbuf[1]);
  const SlotIo<V, RK, false> s3(s.slot[3], s.scales[3], qbuf[2]);
  switch (c.slots) {
    case 1:
      bound_run<V, GD, OK, 1>(c, s, p, s1, s2, s3);
      break;
    case 2:
      bound_run<V, GD, OK, 2>(c, s, p, s1, s2, s3);
      break;
    case 3:
      bound_run<V, GD, OK, 3>(c, s, p, s1, s2, s3);
      break;
    default:
      bound_run<V, GD, OK, 4>(c, s, p, s1, s2, s3);
      break;
  }
}

template <class V>
void bound_entry(const detail::BoundConsts& c, const detail::Segment& s, DType grad,
                 detail::OutKind out, detail::StateKinds kinds) {
  dispatch_kinds(kinds, [&]<detail::SlotKind PK, detail::SlotKind RK>() {
    dispatch_types(grad, out, [&]<DType GD, detail::OutKind OK>() {
      if constexpr (RK == detail::SlotKind::kQ8) {
        if (c.first_signed) {
          bound_slots<V, GD, OK, PK, RK, true>(c, s);
        } else {
          bound_slots<V, GD, OK, PK, RK, false>(c, s);
        }
      } else {
        bound_slots<V, GD, OK, PK, RK, false>(c, s);
      }
    });
  });
}

template <class V>
void cast_from_f32_entry(const float* src, void* dst, detail::OutKind out, size_t n) {
  switch (out) {
    case detail::OutKind::kNone:
      break;
    case detail::OutKind::kF32:
      cast_from_f32_run<V, detail::OutKind::kF32>(src, dst, n);
      break;
    case detail::OutKind::kBF16:
      cast_from_f32_run<V, detail::OutKind::kBF16>(src, dst, n);
      break;
    case detail::OutKind::kF16:
      cast_from_f32_run<V, detail::OutKind::kF16>(src, dst, n);
      break;
  }
}

template <class V>
void cast_to_f32_entry(const void* src, DType dtype, float* dst, size_t n) {
  switch (dtype) {
    case DType::kF32:
      cast_to_f32_run<V, DType::kF32>(src, dst, n);
      break;
    case DType::kBF16:
      cast_to_f32_run<V, DType::kBF16>(src, dst, n);
      break;
    case DType::kF16:
      cast_to_f32_run<V, DType::kF16>(src, dst, n);
      break;
  }
}

template <class V>
void q8_encode_entry(SlotDType dtype, const float* in, void* codes, float* scales, size_t n) {
  if (dtype == SlotDType::kQ8S) {
    q8_encode_run<V, true>(in, static_cast<uint8_t*>(codes), scales, n);
  } else {
    q8_encode_run<V, false>(in, static_cast<uint8_t*>(codes), scales, n);
  }
}

template <class V>
void q8_decode_entry(SlotDType dtype, const void* codes, const float* scales, float* out,
                     size_t n) {
  if (dtype == SlotDType::kQ8S) {
    q8_decode_run<V, true>(static_cast<const uint8_t*>(codes), scales, out, n);
  } else {
    q8_decode_run<V, false>(static_cast<const uint8_t*>(codes), scales, out, n);
  }
}
