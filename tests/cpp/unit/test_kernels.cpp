// Optimizer kernels: every SIMD variant against the scalar reference bit for
// bit (random sizes, misaligned views, tails, every grad/param dtype and
// optimizer flag), thread-count independence, position independence, values
// against double-precision references of the torch.optim formulas, argument
// checks, and grad_stats.
#include <strata/kernels/cast.h>
#include <strata/kernels/cpu_features.h>
#include <strata/kernels/optimizer.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cfenv>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "unit/test_kernels_util.h"

namespace strata::kernels {
namespace {

using testing::bits_of;
using testing::Buffer;
using testing::first_difference;
using testing::make_record;
using testing::Record;
using testing::simd_isas;

struct Config {
  std::string name;
  OptimizerHyper hyper;
};

OptimizerHyper adam(OptimizerKind kind, double wd, bool amsgrad, bool bias_correction) {
  OptimizerHyper h;
  h.kind = kind;
  h.lr = 1e-2;
  h.weight_decay = wd;
  h.amsgrad = amsgrad;
  h.bias_correction = bias_correction;
  return h;
}

OptimizerHyper sgd(double momentum, double dampening, bool nesterov, double wd) {
  OptimizerHyper h;
  h.kind = OptimizerKind::kSgd;
  h.lr = 0.05;
  h.momentum = momentum;
  h.dampening = dampening;
  h.nesterov = nesterov;
  h.weight_decay = wd;
  return h;
}

OptimizerHyper adagrad(double wd, double lr_decay) {
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdagrad;
  h.lr = 0.1;
  h.eps = 1e-10;
  h.weight_decay = wd;
  h.lr_decay = lr_decay;
  h.initial_accumulator_value = 0.1;
  return h;
}

std::vector<Config> all_configs() {
  std::vector<Config> out;
  for (OptimizerKind kind : {OptimizerKind::kAdam, OptimizerKind::kAdamW}) {
    for (double wd : {0.0, 0.05}) {
      for (bool ams : {false, true}) {
        for (bool bc : {true, false}) {
          out.push_back({std::string(optimizer_name(kind)) + " wd=" + std::to_string(wd) +
                             (ams ? " amsgrad" : "") + (bc ? "" : " no-bias-correction"),
                         adam(kind, wd, ams, bc)});
        }
      }
    }
  }
  out.push_back({"SGD plain", sgd(0.0, 0.0, false, 0.0)});
  out.push_back({"SGD wd", sgd(0.0, 0.0, false, 1e-2)});
  out.push_back({"SGD momentum", sgd(0.9, 0.0, false, 0.0)});
  out.push_back({"SGD momentum dampening wd", sgd(0.9, 0.1, false, 1e-2)});
  out.push_back({"SGD nesterov", sgd(0.9, 0.0, true, 0.0)});
  out.push_back({"SGD nesterov wd", sgd(0.8, 0.0, true, 1e-3)});
  out.push_back({"Adagrad", adagrad(0.0, 0.0)});
  out.push_back({"Adagrad wd lr_decay", adagrad(0.01, 0.01)});
  return out;
}

const DType kDtypes[] = {DType::kF32, DType::kBF16, DType::kF16};

// Runs `steps` steps from `first_step` on a record.
void run_steps(const OptimizerHyper& h, Record& r, int64_t first_step, int steps, float grad_mul,
               DType out_dtype, ThreadPool* pool, Isa isa) {
  for (int k = 0; k < steps; ++k) {
    StepArgs args;
    args.step = first_step + k;
    args.grad_mul = grad_mul;
    StateView view = r.view();
    const Status st = optimizer_step(h, args, view, r.grad.data(), r.grad_dtype, r.copy_out,
                                     out_dtype, pool, isa);
    ASSERT_TRUE(st.ok()) << st.to_string();
  }
}

// ----------------------------------------------------------- SIMD == scalar

TEST(KernelsSimd, EveryVariantEqualsScalarBitForBit) {
  const std::vector<Isa> isas = simd_isas();
  if (isas.empty()) {
    GTEST_SKIP() << "no SIMD variant runs on this CPU (" << cpu_features_string() << ")";
  }
  std::mt19937_64 rng(20240611);
  std::vector<size_t> sizes;
  for (size_t n = 1; n <= 40; ++n) {
    sizes.push_back(n);
  }
  for (int k = 0; k < 8; ++k) {
    sizes.push_back(41 + rng() % 60);  // up to 100
  }
  for (size_t n : {size_t(255), size_t(1023), size_t(4099), size_t(16384 + 17)}) {
    sizes.push_back(n);
  }
  size_t cases = 0;
  for (const Config& cfg : all_configs()) {
    for (DType gd : kDtypes) {
      for (int out = -1; out < 3; ++out) {
        const bool with_out = out >= 0;
        const DType od = with_out ? kDtypes[out] : DType::kF32;
        for (size_t n : sizes) {
          // The big sizes for one out dtype only: the tail logic is the same.
          if (n > 1000 && out != 1) {
            continue;
          }
          const int64_t first_step = 1 + int64_t(rng() % 3);  // SGD: step 1 is special
          const float grad_mul = (rng() % 2) ? 1.0f : 0.37f;
          Record ref = make_record(cfg.hyper, n, gd, od, rng, with_out);
          std::vector<Record> simd(isas.size(), ref);
          for (auto& r : simd) {
            r.bind_outs();
          }
          run_steps(cfg.hyper, ref, first_step, 2, grad_mul, od, nullptr, Isa::kScalar);
          for (size_t k = 0; k < isas.size(); ++k) {
            run_steps(cfg.hyper, simd[k], first_step, 2, grad_mul, od, nullptr, isas[k]);
            const std::string diff = first_difference(ref, simd[k]);
            ASSERT_EQ(diff, "") << cfg.name << " isa " << isa_name(isas[k]) << " grad "
                                << dtype_name(gd) << " out " << (with_out ? dtype_name(od) : "none")
                                << " n " << n << " step " << first_step;
          }
          ++cases;
        }
      }
    }
  }
  EXPECT_GT(cases, 1000u);
}

// The AVX-512 variant divides sqrt(v) by the bias correction through its
// reciprocal (V::div_by, exact only in round-to-nearest): over second moments
// of every exponent, zeros, infinities and NaNs with payloads, for many steps
// and beta2 values, every variant equals the scalar reference's division bit
// for bit, and also with the rounding mode set upward (where the variants
// divide; the kernel relies on the reciprocal form only where Markstein's
// theorem is stated for it, round-to-nearest). p starts at 0 with eps 0, so a
// denominator one ulp off shows in p's bits (dropping the correction step or
// the NaN/inf/zero blend fails this test).
TEST(KernelsSimd, AdamDenominatorOverEveryExponentAndStepEqualsScalar) {
  const std::vector<Isa> isas = simd_isas();
  if (isas.empty()) {
    GTEST_SKIP() << "no SIMD variant runs on this CPU (" << cpu_features_string() << ")";
  }
  std::mt19937_64 rng(1729);
  const size_t n = size_t(1) << 15;
  for (int mode : {FE_TONEAREST, FE_UPWARD}) {
    for (double beta2 : {0.999, 0.95, 0.5}) {
      for (int64_t step : {int64_t(1), int64_t(2), int64_t(7), int64_t(1000), int64_t(123457)}) {
        // No weight decay, eps 0 and p 0: the new p is -step_size * m / denom
        // itself, so a denominator one ulp off shows in its bits.
        OptimizerHyper h = adam(OptimizerKind::kAdamW, 0.0, false, true);
        h.beta2 = beta2;
        h.eps = 0.0;
        Record ref = make_record(h, n, DType::kF32, DType::kF32, rng, false);
        std::fill(ref.slot[0].f32(), ref.slot[0].f32() + n, 0.0f);
        float* v = ref.slot[2].f32();
        for (size_t i = 0; i < n; ++i) {
          // Every biased exponent 0..255 (denormals, inf/NaN at 255), random
          // mantissas; the sign bit clear: v >= 0 or NaN.
          const uint32_t bits = (uint32_t(i % 256) << 23) | uint32_t(rng() & 0x7fffff);
          std::memcpy(&v[i], &bits, 4);
        }
        v[0] = 0.0f;
        v[1] = std::numeric_limits<float>::infinity();
        v[2] = FLT_MAX;
        v[3] = FLT_MIN;
        std::vector<Record> simd(isas.size(), ref);
        ASSERT_EQ(std::fesetround(mode), 0);
        run_steps(h, ref, step, 1, 1.0f, DType::kF32, nullptr, Isa::kScalar);
        for (size_t k = 0; k < isas.size(); ++k) {
          run_steps(h, simd[k], step, 1, 1.0f, DType::kF32, nullptr, isas[k]);
        }
        std::fesetround(FE_TONEAREST);
        for (size_t k = 0; k < isas.size(); ++k) {
          ASSERT_EQ(first_difference(ref, simd[k]), "")
              << "isa " << isa_name(isas[k]) << " beta2 " << beta2 << " step " << step
              << (mode == FE_UPWARD ? " rounding upward" : "");
        }
      }
    }
  }
}

TEST(KernelsSimd, BoundLoopAndCastsEqualScalar) {
  const std::vector<Isa> isas = simd_isas();
  if (isas.empty()) {
    GTEST_SKIP() << "no SIMD variant runs on this CPU";
  }
  std::mt19937_64 rng(7);
  const OptimizerHyper h = adam(OptimizerKind::kAdamW, 0.0, true, true);
  for (DType gd : kDtypes) {
    for (DType od : kDtypes) {
      for (size_t n : {size_t(1), size_t(15), size_t(17), size_t(333), size_t(20000)}) {
        Record ref = make_record(h, n, gd, od, rng, true);
        for (Isa isa : isas) {
          Record r = ref;
          r.bind_outs();
          Record s = ref;
          s.bind_outs();
          ASSERT_TRUE(stream_bound_step(h, s.view(), s.grad.data(), gd, s.copy_out, od, nullptr,
                                        Isa::kScalar)
                          .ok());
          ASSERT_TRUE(
              stream_bound_step(h, r.view(), r.grad.data(), gd, r.copy_out, od, nullptr, isa).ok());
          ASSERT_EQ(first_difference(s, r), "") << isa_name(isa) << " n " << n;
        }
      }
    }
  }
}

// ------------------------------------------------------- threads / position

TEST(Kernels, OneAndTwoThreadsGiveIdenticalResults) {
  std::mt19937_64 rng(99);
  ThreadPool one(1);
  ThreadPool two(2);
  for (const Config& cfg : all_configs()) {
    const size_t n = 3 * 16384 + 123;  // several tiles and a partial one
    Record base = make_record(cfg.hyper, n, DType::kBF16, DType::kBF16, rng, true);
    Record a = base, b = base, c = base;
    a.bind_outs();
    b.bind_outs();
    c.bind_outs();
    run_steps(cfg.hyper, a, 1, 3, 0.5f, DType::kBF16, nullptr, Isa::kAuto);
    run_steps(cfg.hyper, b, 1, 3, 0.5f, DType::kBF16, &one, Isa::kAuto);
    run_steps(cfg.hyper, c, 1, 3, 0.5f, DType::kBF16, &two, Isa::kAuto);
    EXPECT_EQ(first_difference(a, b), "") << cfg.name;
    EXPECT_EQ(first_difference(a, c), "") << cfg.name;
  }
}

TEST(Kernels, ElementResultDoesNotDependOnItsPosition) {
  // The same 50 elements placed at every shift 0..33 of a larger record (so
  // they fall at every vector lane, in the body and in the tail, and at every
  // 4-byte misalignment) give the same bits.
  const OptimizerHyper h = adam(OptimizerKind::kAdamW, 0.01, true, true);
  std::mt19937_64 rng(5);
  const size_t kLen = 50;
  Record src = make_record(h, kLen, DType::kF16, DType::kF16, rng, false);
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      continue;
    }
    std::vector<uint32_t> expect;
    for (size_t shift = 0; shift < 34; ++shift) {
      const size_t n = kLen + shift + (shift % 5);
      Record r = make_record(h, n, DType::kF16, DType::kF16, rng, false);
      for (int s = 0; s < r.slots; ++s) {
        std::copy(src.slot[s].f32(), src.slot[s].f32() + kLen, r.slot[s].f32() + shift);
      }
      std::copy(src.grad.u16(), src.grad.u16() + kLen, r.grad.u16() + shift);
      // A copy-out range that splits the shifted block at a shift-dependent
      // point: segment boundaries move too.
      std::vector<uint16_t> out(kLen);
      CopyOut c;
      c.offset = shift + shift % 7;
      c.n = kLen - shift % 7;
      c.dst = out.data() + shift % 7;
      const Status st = optimizer_step(h, StepArgs{3, 1.0f}, r.view(), r.grad.data(), DType::kF16,
                                       {&c, 1}, DType::kF16, nullptr, isa);
      ASSERT_TRUE(st.ok()) << st.to_string();
      std::vector<uint32_t> got;
      for (int s = 0; s < r.slots; ++s) {
        for (size_t i = 0; i < kLen; ++i) {
          got.push_back(bits_of(r.slot[s].f32()[shift + i]));
        }
      }
      for (size_t i = shift % 7; i < kLen; ++i) {
        EXPECT_EQ(out[i], float_to_fp16_bits(r.slot[0].f32()[shift + i]));
      }
      if (shift == 0) {
        expect = got;
      } else {
        ASSERT_EQ(got, expect) << isa_name(isa) << " shift " << shift;
      }
    }
  }
}

// ------------------------------------------------------------- copy-out

TEST(Kernels, CopyOutRangesInAnyOrderAndOverlapping) {
  std::mt19937_64 rng(11);
  const OptimizerHyper h = adam(OptimizerKind::kAdamW, 0.01, false, true);
  const size_t n = 2 * 16384 + 999;
  for (DType od : kDtypes) {
    Record r = make_record(h, n, DType::kF32, od, rng, false);
    std::vector<Buffer> outs;
    std::vector<CopyOut> ranges;
    for (int k = 0; k < 300; ++k) {
      CopyOut c;
      c.offset = rng() % n;
      c.n = std::min<size_t>(n - c.offset, 1 + rng() % (k % 10 == 0 ? 30000 : 50));
      outs.emplace_back(c.n * dtype_size(od), (rng() % 8) * dtype_size(od));
      ranges.push_back(c);
    }
    ranges.push_back({0, 0, nullptr});  // empty ranges are allowed, dst unused
    outs.emplace_back(0, 0);
    for (size_t k = 0; k < ranges.size(); ++k) {
      ranges[k].dst = ranges[k].n ? outs[k].data() : nullptr;
    }
    ThreadPool pool(2);
    ASSERT_TRUE(optimizer_step(h, StepArgs{1, 1.0f}, r.view(), r.grad.data(), DType::kF32, ranges,
                               od, &pool)
                    .ok());
    const float* master = r.slot[0].f32();
    for (size_t k = 0; k + 1 < ranges.size(); ++k) {
      for (size_t i = 0; i < ranges[k].n; ++i) {
        const float x = master[ranges[k].offset + i];
        switch (od) {
          case DType::kF32:
            ASSERT_EQ(bits_of(outs[k].f32()[i]), bits_of(x)) << "range " << k << " i " << i;
            break;
          case DType::kBF16:
            ASSERT_EQ(outs[k].u16()[i], float_to_bf16_bits(x)) << "range " << k << " i " << i;
            break;
          case DType::kF16:
            ASSERT_EQ(outs[k].u16()[i], float_to_fp16_bits(x)) << "range " << k << " i " << i;
            break;
        }
      }
    }
  }
}

TEST(Kernels, CopyOutLeavesBytesOutsideRangesUntouched) {
  const OptimizerHyper h = adam(OptimizerKind::kAdam, 0.0, false, true);
  std::mt19937_64 rng(3);
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      continue;
    }
    for (size_t len : {size_t(1), size_t(7), size_t(9), size_t(15), size_t(17), size_t(31)}) {
      Record r = make_record(h, 64, DType::kF32, DType::kBF16, rng, false);
      std::vector<uint16_t> out(len + 16, 0xABCD);
      CopyOut c{5, len, out.data() + 8};
      ASSERT_TRUE(optimizer_step(h, StepArgs{}, r.view(), r.grad.data(), DType::kF32, {&c, 1},
                                 DType::kBF16, nullptr, isa)
                      .ok());
      for (size_t i = 0; i < out.size(); ++i) {
        if (i < 8 || i >= 8 + len) {
          EXPECT_EQ(out[i], 0xABCD) << isa_name(isa) << " len " << len << " i " << i;
        } else {
          EXPECT_EQ(out[i], float_to_bf16_bits(r.slot[0].f32()[5 + i - 8]));
        }
      }
    }
  }
}

// ------------------------------------------------- values vs double formulas

TEST(KernelsReference, AdamWHandComputedFirstStep) {
  // p = 1, g = 0.5, lr = 0.1, wd = 0.01, betas (0.9, 0.999), eps 1e-8, step 1:
  //   p = 1 * (1 - 0.1 * 0.01) = 0.999; m = 0.05; v = 0.00025
  //   denom = sqrt(0.00025) / sqrt(0.001) + 1e-8 = 0.5 + 1e-8
  //   p = 0.999 - (0.1 / 0.1) * 0.05 / (0.5 + 1e-8) = 0.899000002
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdamW;
  h.lr = 0.1;
  h.weight_decay = 0.01;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      continue;
    }
    float p = 1.0f, m = 0.0f, v = 0.0f, g = 0.5f;
    StateView s;
    s.slot[0] = &p;
    s.slot[1] = &m;
    s.slot[2] = &v;
    s.n = 1;
    ASSERT_TRUE(
        optimizer_step(h, StepArgs{}, s, &g, DType::kF32, {}, DType::kF32, nullptr, isa).ok());
    EXPECT_NEAR(p, 0.899000002, 1e-7) << isa_name(isa);
    EXPECT_NEAR(m, 0.05, 1e-9);
    EXPECT_NEAR(v, 0.00025, 1e-9);
  }
}

TEST(KernelsReference, AdamWThreeStepsMatchDoubleFormulas) {
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdamW;
  h.lr = 1e-2;
  h.beta1 = 0.9;
  h.beta2 = 0.99;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  const float p0[] = {1.0f, -0.5f, 0.25f, 3.0f, -2.0f, 0.0f, 1e-3f};
  const float grads[3][7] = {{0.5f, -0.1f, 0.0f, 2.0f, -3.0f, 1e-4f, 0.3f},
                             {0.4f, 0.2f, -0.01f, -1.0f, -2.5f, 2e-4f, -0.3f},
                             {-0.6f, 0.05f, 0.02f, 0.5f, -2.0f, -1e-4f, 0.3f}};
  const size_t n = 7;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      continue;
    }
    std::vector<float> p(p0, p0 + n), m(n, 0.0f), v(n, 0.0f);
    std::vector<double> dp(p0, p0 + n), dm(n, 0.0), dv(n, 0.0);
    StateView s;
    s.slot[0] = p.data();
    s.slot[1] = m.data();
    s.slot[2] = v.data();
    s.n = n;
    for (int t = 1; t <= 3; ++t) {
      ASSERT_TRUE(optimizer_step(h, StepArgs{t, 1.0f}, s, grads[t - 1], DType::kF32, {},
                                 DType::kF32, nullptr, isa)
                      .ok());
      const double bc1 = 1.0 - std::pow(h.beta1, t);
      const double bc2 = 1.0 - std::pow(h.beta2, t);
      for (size_t i = 0; i < n; ++i) {
        const double g = grads[t - 1][i];
        dp[i] *= 1.0 - h.lr * h.weight_decay;
        dm[i] = h.beta1 * dm[i] + (1.0 - h.beta1) * g;
        dv[i] = h.beta2 * dv[i] + (1.0 - h.beta2) * g * g;
        const double denom = std::sqrt(dv[i]) / std::sqrt(bc2) + h.eps;
        dp[i] -= h.lr / bc1 * dm[i] / denom;
      }
      for (size_t i = 0; i < n; ++i) {
        EXPECT_NEAR(p[i], dp[i], 1e-6 + 1e-6 * std::fabs(dp[i])) << "step " << t << " i " << i;
        EXPECT_NEAR(m[i], dm[i], 1e-6 * std::fabs(dm[i]) + 1e-12) << "step " << t << " i " << i;
        EXPECT_NEAR(v[i], dv[i], 1e-6 * std::fabs(dv[i]) + 1e-15) << "step " << t << " i " << i;
      }
    }
  }
}

TEST(KernelsReference, AdamL2AmsgradAndNoBiasCorrectionMatchDouble) {
  for (bool bias_correction : {true, false}) {
    OptimizerHyper h;
    h.kind = OptimizerKind::kAdam;
    h.lr = 1e-2;
    h.weight_decay = 0.05;
    h.amsgrad = true;
    h.bias_correction = bias_correction;
    std::mt19937_64 rng(17);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t n = 37;
    std::vector<float> p(n), m(n, 0), v(n, 0), vm(n, 0), g(n);
    for (auto& x : p) {
      x = normal(rng);
    }
    std::vector<double> dp(p.begin(), p.end()), dm(n, 0), dv(n, 0), dvm(n, 0);
    StateView s;
    s.slot[0] = p.data();
    s.slot[1] = m.data();
    s.slot[2] = v.data();
    s.slot[3] = vm.data();
    s.n = n;
    for (int t = 1; t <= 5; ++t) {
      for (size_t i = 0; i < n; ++i) {
        g[i] = (t == 3 ? 0.01f : 1.0f) * normal(rng);  // v shrinks at t = 3: max_v matters
      }
      ASSERT_TRUE(
          optimizer_step(h, StepArgs{t, 1.0f}, s, g.data(), DType::kF32, {}, DType::kF32, nullptr)
              .ok());
      const double bc1 = bias_correction ? 1.0 - std::pow(h.beta1, t) : 1.0;
      const double bc2 = bias_correction ? 1.0 - std::pow(h.beta2, t) : 1.0;
      for (size_t i = 0; i < n; ++i) {
        const double gi = double(g[i]) + h.weight_decay * dp[i];
        dm[i] = h.beta1 * dm[i] + (1.0 - h.beta1) * gi;
        dv[i] = h.beta2 * dv[i] + (1.0 - h.beta2) * gi * gi;
        dvm[i] = std::max(dvm[i], dv[i]);
        dp[i] -= h.lr / bc1 * dm[i] / (std::sqrt(dvm[i]) / std::sqrt(bc2) + h.eps);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      EXPECT_NEAR(p[i], dp[i], 1e-5 + 1e-5 * std::fabs(dp[i])) << i;
      EXPECT_NEAR(vm[i], dvm[i], 1e-5 * dvm[i]) << i;
    }
  }
}

TEST(KernelsReference, SgdMomentumNesterovMatchDouble) {
  for (bool nesterov : {false, true}) {
    const OptimizerHyper h = sgd(0.9, nesterov ? 0.0 : 0.2, nesterov, 1e-2);
    const size_t n = 21;
    std::mt19937_64 rng(23);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    // The momentum buffer starts as garbage: step 1 must overwrite it.
    std::vector<float> p(n), buf(n, 123.0f), g(n);
    for (auto& x : p) {
      x = normal(rng);
    }
    std::vector<double> dp(p.begin(), p.end()), dbuf(n, 0);
    StateView s;
    s.slot[0] = p.data();
    s.slot[1] = buf.data();
    s.n = n;
    for (int t = 1; t <= 4; ++t) {
      for (auto& x : g) {
        x = normal(rng);
      }
      ASSERT_TRUE(
          optimizer_step(h, StepArgs{t, 1.0f}, s, g.data(), DType::kF32, {}, DType::kF32, nullptr)
              .ok());
      for (size_t i = 0; i < n; ++i) {
        double d = double(g[i]) + h.weight_decay * dp[i];
        dbuf[i] = t == 1 ? d : h.momentum * dbuf[i] + (1.0 - h.dampening) * d;
        d = nesterov ? d + h.momentum * dbuf[i] : dbuf[i];
        dp[i] -= h.lr * d;
      }
      for (size_t i = 0; i < n; ++i) {
        ASSERT_NEAR(buf[i], dbuf[i], 1e-5 + 1e-5 * std::fabs(dbuf[i]))
            << "step " << t << " i " << i;
        ASSERT_NEAR(p[i], dp[i], 1e-5 + 1e-5 * std::fabs(dp[i])) << "step " << t << " i " << i;
      }
    }
  }
}

TEST(KernelsReference, AdagradMatchDouble) {
  const OptimizerHyper h = adagrad(0.01, 0.05);
  const size_t n = 19;
  std::mt19937_64 rng(29);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(n), sum(n, initial_slot_value(h, 1)), g(n);
  for (auto& x : p) {
    x = normal(rng);
  }
  std::vector<double> dp(p.begin(), p.end()), dsum(n, h.initial_accumulator_value);
  StateView s;
  s.slot[0] = p.data();
  s.slot[1] = sum.data();
  s.n = n;
  for (int t = 1; t <= 4; ++t) {
    for (auto& x : g) {
      x = normal(rng);
    }
    ASSERT_TRUE(
        optimizer_step(h, StepArgs{t, 1.0f}, s, g.data(), DType::kF32, {}, DType::kF32, nullptr)
            .ok());
    const double clr = h.lr / (1.0 + (t - 1) * h.lr_decay);
    for (size_t i = 0; i < n; ++i) {
      const double gi = double(g[i]) + h.weight_decay * dp[i];
      dsum[i] += gi * gi;
      dp[i] -= clr * gi / (std::sqrt(dsum[i]) + h.eps);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    EXPECT_NEAR(p[i], dp[i], 1e-5 + 1e-5 * std::fabs(dp[i])) << i;
    EXPECT_NEAR(sum[i], dsum[i], 1e-5 * dsum[i]) << i;
  }
}

TEST(KernelsReference, GradMulScalesHalfPrecisionGradients) {
  // fp16 grads scaled by 1024 (loss scaling) with grad_mul 1/1024 give the
  // same bits as unscaled grads with grad_mul 1: both multiplications are
  // exact powers of two.
  const OptimizerHyper h = adam(OptimizerKind::kAdamW, 0.01, false, true);
  std::mt19937_64 rng(31);
  Record a = make_record(h, 301, DType::kF16, DType::kF16, rng, false);
  Record b = a;
  for (size_t i = 0; i < a.n; ++i) {
    const float x = fp16_bits_to_float(a.grad.u16()[i]) * 1024.0f;
    b.grad.u16()[i] = float_to_fp16_bits(x);
    ASSERT_EQ(fp16_bits_to_float(b.grad.u16()[i]), x) << "test data must scale exactly";
  }
  run_steps(h, a, 1, 2, 1.0f, DType::kF16, nullptr, Isa::kAuto);
  run_steps(h, b, 1, 2, 1.0f / 1024.0f, DType::kF16, nullptr, Isa::kAuto);
  EXPECT_EQ(first_difference(a, b), "");
}

// ---------------------------------------------------------------- arguments

TEST(KernelsArgs, BadArgumentsAreInvalidAndTouchNothing) {
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdamW;
  std::vector<float> p(8, 1.0f), m(8, 0.0f), v(8, 0.0f), g(8, 0.5f);
  std::vector<uint16_t> out(8);
  StateView s;
  s.slot[0] = p.data();
  s.slot[1] = m.data();
  s.slot[2] = v.data();
  s.n = 8;
  auto step = [&](const OptimizerHyper& hh, const StateView& ss, const void* grad,
                  std::span<const CopyOut> co, StepArgs args = StepArgs{}, DType gd = DType::kF32,
                  DType od = DType::kBF16) {
    return optimizer_step(hh, args, ss, grad, gd, co, od, nullptr).code();
  };
  const StatusCode kInvalid = StatusCode::kInvalidArgument;
  StateView no_m = s;
  no_m.slot[1] = nullptr;
  EXPECT_EQ(step(h, no_m, g.data(), {}), kInvalid);
  EXPECT_EQ(step(h, s, nullptr, {}), kInvalid);
  OptimizerHyper ams = h;
  ams.amsgrad = true;
  EXPECT_EQ(step(ams, s, g.data(), {}), kInvalid) << "amsgrad needs slot 3";
  CopyOut outside{4, 5, out.data()};
  EXPECT_EQ(step(h, s, g.data(), {&outside, 1}), kInvalid);
  CopyOut huge{1, SIZE_MAX, out.data()};
  EXPECT_EQ(step(h, s, g.data(), {&huge, 1}), kInvalid) << "offset + n overflow";
  CopyOut null_dst{0, 4, nullptr};
  EXPECT_EQ(step(h, s, g.data(), {&null_dst, 1}), kInvalid);
  EXPECT_EQ(step(h, s, g.data(), {}, StepArgs{0, 1.0f}), kInvalid) << "step is 1-based";
  EXPECT_EQ(step(h, s, g.data(), {}, StepArgs{1, INFINITY}), kInvalid);
  EXPECT_EQ(step(h, s, g.data(), {}, StepArgs{}, DType(7)), kInvalid);
  EXPECT_EQ(step(h, s, g.data(), {}, StepArgs{}, DType::kF32, DType(9)), kInvalid);
  EXPECT_EQ(
      optimizer_step(h, StepArgs{}, s, g.data(), DType::kF32, {}, DType::kF32, nullptr, Isa(42))
          .code(),
      kInvalid);
  auto with = [&h](auto edit) {
    OptimizerHyper x = h;
    edit(x);
    return x;
  };
  EXPECT_EQ(step(with([](auto& x) { x.lr = -1; }), s, g.data(), {}), kInvalid);
  EXPECT_EQ(step(with([](auto& x) { x.beta1 = 1.0; }), s, g.data(), {}), kInvalid);
  EXPECT_EQ(step(with([](auto& x) { x.beta2 = -0.1; }), s, g.data(), {}), kInvalid);
  EXPECT_EQ(step(with([](auto& x) { x.eps = NAN; }), s, g.data(), {}), kInvalid);
  EXPECT_EQ(step(with([](auto& x) { x.weight_decay = -1; }), s, g.data(), {}), kInvalid);
  OptimizerHyper nest = sgd(0.0, 0.0, true, 0.0);
  StateView s2 = s;
  s2.slot[2] = nullptr;
  EXPECT_EQ(step(nest, s2, g.data(), {}), kInvalid) << "nesterov without momentum";
  EXPECT_EQ(step(sgd(0.9, 0.1, true, 0.0), s2, g.data(), {}), kInvalid)
      << "nesterov with dampening";
  OptimizerHyper bad_kind = h;
  bad_kind.kind = OptimizerKind(17);
  EXPECT_EQ(step(bad_kind, s, g.data(), {}), kInvalid);
  // Nothing was touched by any of the rejected calls.
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(p[i], 1.0f);
    EXPECT_EQ(m[i], 0.0f);
    EXPECT_EQ(v[i], 0.0f);
  }
}

TEST(KernelsArgs, EmptyRecordIsANoOp) {
  OptimizerHyper h;
  StateView empty;  // all slots null, n = 0
  EXPECT_TRUE(
      optimizer_step(h, StepArgs{}, empty, nullptr, DType::kF32, {}, DType::kF32, nullptr).ok());
  CopyOut none{0, 0, nullptr};
  EXPECT_TRUE(
      optimizer_step(h, StepArgs{}, empty, nullptr, DType::kF32, {&none, 1}, DType::kF32, nullptr)
          .ok());
  CopyOut some{0, 1, &h};
  EXPECT_EQ(
      optimizer_step(h, StepArgs{}, empty, nullptr, DType::kF32, {&some, 1}, DType::kF32, nullptr)
          .code(),
      StatusCode::kInvalidArgument);
}

TEST(KernelsArgs, SgdWithoutMomentumNeedsOnlyTheMaster) {
  const OptimizerHyper h = sgd(0.0, 0.0, false, 0.0);
  EXPECT_EQ(state_slots(h), 1);
  float p = 1.0f, g = 2.0f;
  StateView s;
  s.slot[0] = &p;
  s.n = 1;
  ASSERT_TRUE(optimizer_step(h, StepArgs{}, s, &g, DType::kF32, {}, DType::kF32, nullptr).ok());
  EXPECT_FLOAT_EQ(p, 1.0f - 0.05f * 2.0f);
}

TEST(KernelsArgs, SlotsAndNames) {
  OptimizerHyper h;
  h.kind = OptimizerKind::kAdam;
  EXPECT_EQ(state_slots(h), 3);
  h.amsgrad = true;
  EXPECT_EQ(state_slots(h), 4);
  EXPECT_EQ(state_slots(sgd(0.9, 0, false, 0)), 2);
  EXPECT_EQ(state_slots(adagrad(0, 0)), 2);
  EXPECT_EQ(initial_slot_value(adagrad(0, 0), 1), 0.1f);
  EXPECT_EQ(initial_slot_value(h, 2), 0.0f);
  EXPECT_STREQ(dtype_name(DType::kBF16), "bf16");
  EXPECT_EQ(dtype_size(DType::kF16), 2u);
  EXPECT_STREQ(isa_name(Isa::kAvx512), "avx512");
  EXPECT_TRUE(isa_supported(Isa::kScalar));
  EXPECT_TRUE(isa_supported(detect_isa()));
}

TEST(KernelsArgs, UnsupportedIsaIsUnavailable) {
  Isa missing = Isa::kAuto;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (!isa_supported(isa)) {
      missing = isa;
    }
  }
  if (missing == Isa::kAuto) {
    GTEST_SKIP() << "this CPU runs every variant (" << cpu_features_string() << ")";
  }
  OptimizerHyper h;
  float p = 0, m = 0, v = 0, g = 0;
  StateView s;
  s.slot[0] = &p;
  s.slot[1] = &m;
  s.slot[2] = &v;
  s.n = 1;
  EXPECT_EQ(
      optimizer_step(h, StepArgs{}, s, &g, DType::kF32, {}, DType::kF32, nullptr, missing).code(),
      StatusCode::kUnavailable);
}

TEST(CpuFeatures, ConsistentWithDetectedIsa) {
  const CpuFeatures& f = cpu_features();
  EXPECT_TRUE(f.sse2);  // x86-64 baseline
  if (detect_isa() == Isa::kAvx512) {
    EXPECT_TRUE(f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.os_avx512);
  }
  if (f.can_run_avx512()) {
    EXPECT_TRUE(f.can_run_avx2());
  }
  EXPECT_FALSE(cpu_features_string().empty());
}

// --------------------------------------------------------------- grad_stats

// The documented reference order, written out independently in the test.
double reference_sum_sq(const std::vector<float>& x) {
  double total = 0.0;
  for (size_t begin = 0; begin < x.size(); begin += kGradStatsChunk) {
    double lane[32] = {};
    const size_t end = std::min(x.size(), begin + kGradStatsChunk);
    for (size_t i = begin; i < end; ++i) {
      lane[(i - begin) % 32] += double(x[i]) * double(x[i]);
    }
    for (size_t w = 16; w >= 1; w /= 2) {
      for (size_t j = 0; j < w; ++j) {
        lane[j] = lane[j] + lane[j + w];
      }
    }
    total += lane[0];
  }
  return total;
}

TEST(GradStats, BitIdenticalAcrossThreadsAndIsasAndEqualToTheReferenceOrder) {
  std::mt19937_64 rng(41);
  ThreadPool one(1), two(2), three(3);
  for (DType dt : kDtypes) {
    for (size_t n : {size_t(0), size_t(1), size_t(31), size_t(33), size_t(1000), kGradStatsChunk,
                     kGradStatsChunk + 1, 3 * kGradStatsChunk + 77}) {
      Buffer g(n * dtype_size(dt), (rng() % 8) * dtype_size(dt));
      testing::fill_grad(g, dt, n, rng, 1.0f);
      std::vector<float> as_f32(n);
      ASSERT_TRUE(cast_to_f32(g.data(), dt, as_f32.data(), n, nullptr, Isa::kScalar).ok());
      const double expect = reference_sum_sq(as_f32);
      double plain = 0.0;
      for (float x : as_f32) {
        plain += double(x) * double(x);
      }
      EXPECT_NEAR(expect, plain, 1e-12 * plain);
      for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
        if (!isa_supported(isa)) {
          continue;
        }
        for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &one, &two, &three}) {
          GradStats st;
          ASSERT_TRUE(grad_stats_checked(g.data(), dt, n, pool, isa, &st).ok());
          ASSERT_EQ(st.sum_sq, expect) << dtype_name(dt) << " n " << n << " " << isa_name(isa)
                                       << " threads " << (pool ? pool->size() : 0);
          ASSERT_FALSE(st.nonfinite);
        }
      }
    }
  }
}

TEST(GradStats, DetectsInfAndNanAnywhere) {
  const size_t n = 2 * kGradStatsChunk + 45;
  ThreadPool two(2);
  struct Special {
    DType dtype;
    uint32_t bits;
  };
  const Special specials[] = {
      {DType::kF32, 0x7F800000u}, {DType::kF32, 0xFF800000u}, {DType::kF32, 0x7FC00000u},
      {DType::kF32, 0xFF800001u}, {DType::kBF16, 0x7F80u},    {DType::kBF16, 0xFF80u},
      {DType::kBF16, 0x7FC0u},    {DType::kBF16, 0x7F81u},    {DType::kF16, 0x7C00u},
      {DType::kF16, 0xFC00u},     {DType::kF16, 0x7E00u},     {DType::kF16, 0x7C01u}};
  for (const Special& sp : specials) {
    for (size_t pos : {size_t(0), size_t(17), kGradStatsChunk - 1, kGradStatsChunk + 5, n - 1}) {
      Buffer g(n * dtype_size(sp.dtype), 0);  // zeros
      if (sp.dtype == DType::kF32) {
        g.f32()[pos] = testing::float_of(sp.bits);
      } else {
        g.u16()[pos] = uint16_t(sp.bits);
      }
      for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
        if (!isa_supported(isa)) {
          continue;
        }
        const GradStats st = grad_stats(g.data(), sp.dtype, n, &two, isa);
        EXPECT_TRUE(st.nonfinite) << dtype_name(sp.dtype) << " bits " << sp.bits << " pos " << pos
                                  << " " << isa_name(isa);
        EXPECT_FALSE(std::isfinite(st.sum_sq));
      }
    }
  }
}

TEST(GradStats, LargestFiniteValuesAreNotFlagged) {
  // The nonfinite flag is !isfinite(sum): squares of finite inputs must not
  // overflow the double sum.
  const size_t n = 100000;
  std::vector<float> f32(n, FLT_MAX);
  std::vector<uint16_t> bf16(n, 0xFF7F), fp16(n, 0x7BFF);  // -max bf16, max fp16
  for (auto [ptr, dt] : {std::pair<const void*, DType>{f32.data(), DType::kF32},
                         {bf16.data(), DType::kBF16},
                         {fp16.data(), DType::kF16}}) {
    const GradStats st = grad_stats(ptr, dt, n, nullptr);
    EXPECT_FALSE(st.nonfinite) << dtype_name(dt);
    EXPECT_TRUE(std::isfinite(st.sum_sq));
  }
}

TEST(GradStats, NullInputAndBadArguments) {
  GradStats st;
  EXPECT_TRUE(grad_stats_checked(nullptr, DType::kF32, 0, nullptr, Isa::kAuto, &st).ok());
  EXPECT_EQ(st.sum_sq, 0.0);
  EXPECT_FALSE(st.nonfinite);
  EXPECT_EQ(grad_stats_checked(nullptr, DType::kF32, 5, nullptr, Isa::kAuto, &st).code(),
            StatusCode::kInvalidArgument);
  const GradStats bad = grad_stats(nullptr, DType::kBF16, 5, nullptr);
  EXPECT_TRUE(bad.nonfinite);
  float x = 1.0f;
  EXPECT_EQ(grad_stats_checked(&x, DType(5), 1, nullptr, Isa::kAuto, &st).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(grad_stats_checked(&x, DType::kF32, 1, nullptr, Isa(9), &st).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(grad_stats(&x, DType::kF32, 1, nullptr, Isa(9)).sum_sq, 1.0) << "falls back to auto";
}

}  // namespace
}  // namespace strata::kernels
