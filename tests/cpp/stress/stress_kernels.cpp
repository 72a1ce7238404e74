// Long-running kernel checks (label `stress`): every fp32 bit pattern through
// each SIMD cast against the scalar rules, large random records with random
// copy-out layouts on 1..3 threads against the single-threaded scalar
// reference, and grad_stats on large inputs.
#include <strata/kernels/cast.h>
#include <strata/kernels/optimizer.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <vector>

#include "unit/test_kernels_util.h"

namespace strata::kernels {
namespace {

using testing::bits_of;
using testing::first_difference;
using testing::make_record;
using testing::Record;
using testing::simd_isas;

TEST(KernelsStress, EveryFloatBitPatternCastsLikeTheScalarRules) {
  const std::vector<Isa> isas = simd_isas();
  if (isas.empty()) {
    GTEST_SKIP() << "no SIMD variant runs on this CPU";
  }
  ThreadPool pool;
  const size_t kBlock = size_t(1) << 20;
  const size_t blocks = (size_t(1) << 32) / kBlock;
  std::atomic<uint64_t> mismatches{0};
  std::atomic<uint64_t> first_bad{~uint64_t(0)};
  pool.parallel_for(blocks, [&](size_t b) {
    std::vector<float> in(kBlock);
    std::vector<uint16_t> got(kBlock);
    for (size_t i = 0; i < kBlock; ++i) {
      in[i] = testing::float_of(uint32_t(b * kBlock + i));
    }
    for (Isa isa : isas) {
      for (DType dt : {DType::kBF16, DType::kF16}) {
        if (!cast_from_f32(in.data(), got.data(), dt, kBlock, nullptr, isa).ok()) {
          mismatches.fetch_add(1);
          return;
        }
        for (size_t i = 0; i < kBlock; ++i) {
          const uint16_t want =
              dt == DType::kBF16 ? float_to_bf16_bits(in[i]) : float_to_fp16_bits(in[i]);
          if (got[i] != want) {
            mismatches.fetch_add(1);
            uint64_t bits = b * kBlock + i;
            uint64_t cur = first_bad.load();
            while (bits < cur && !first_bad.compare_exchange_weak(cur, bits)) {
            }
          }
        }
      }
    }
  });
  EXPECT_EQ(mismatches.load(), 0u) << "first bad fp32 bits 0x" << std::hex << first_bad.load();
}

TEST(KernelsStress, LargeRandomRecordsEqualScalarOnAnyThreadCount) {
  std::vector<Isa> isas = simd_isas();
  isas.push_back(Isa::kScalar);
  ThreadPool one(1), two(2), three(3);
  ThreadPool* pools[] = {&one, &two, &three};
  std::mt19937_64 rng(777);
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
  for (int round = 0; round < 24; ++round) {
    OptimizerHyper h;
    switch (round % 4) {
      case 0:
        h.kind = OptimizerKind::kAdamW;
        h.weight_decay = 0.01;
        h.amsgrad = round % 8 == 0;
        break;
      case 1:
        h.kind = OptimizerKind::kAdam;
        h.weight_decay = 0.001;
        h.bias_correction = round % 8 != 1;
        break;
      case 2:
        h.kind = OptimizerKind::kSgd;
        h.momentum = 0.9;
        h.nesterov = round % 8 == 2;
        h.weight_decay = 1e-4;
        break;
      default:
        h.kind = OptimizerKind::kAdagrad;
        h.lr_decay = 0.001;
        break;
    }
    const size_t n = 1 + rng() % 400000;
    const DType gd = dtypes[rng() % 3];
    const DType od = dtypes[rng() % 3];
    Record ref = make_record(h, n, gd, od, rng, true);
    Record work = ref;
    work.bind_outs();
    const int64_t step = 1 + int64_t(rng() % 1000);
    const float grad_mul = 1.0f / float(1 + rng() % 1000);
    ASSERT_TRUE(optimizer_step(h, StepArgs{step, grad_mul}, ref.view(), ref.grad.data(), gd,
                               ref.copy_out, od, nullptr, Isa::kScalar)
                    .ok());
    const Isa isa = isas[size_t(round) % isas.size()];
    ThreadPool* pool = pools[size_t(round) % 3];
    ASSERT_TRUE(optimizer_step(h, StepArgs{step, grad_mul}, work.view(), work.grad.data(), gd,
                               work.copy_out, od, pool, isa)
                    .ok());
    ASSERT_EQ(first_difference(ref, work), "")
        << optimizer_name(h.kind) << " n " << n << " " << isa_name(isa) << " threads "
        << pool->size() << " grad " << dtype_name(gd) << " out " << dtype_name(od);
  }
}

TEST(KernelsStress, GradStatsLargeInputIdenticalEverywhere) {
  std::mt19937_64 rng(4242);
  const size_t n = 9 * kGradStatsChunk + 12345;
  ThreadPool one(1), two(2), four(4);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    testing::Buffer g(n * dtype_size(dt), dtype_size(dt) * (rng() % 7));
    testing::fill_grad(g, dt, n, rng, 3.0f);
    const GradStats want = grad_stats(g.data(), dt, n, nullptr, Isa::kScalar);
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
      if (!isa_supported(isa)) {
        continue;
      }
      for (ThreadPool* pool : {&one, &two, &four}) {
        const GradStats got = grad_stats(g.data(), dt, n, pool, isa);
        ASSERT_EQ(got.sum_sq, want.sum_sq) << dtype_name(dt) << " " << isa_name(isa);
        ASSERT_EQ(got.nonfinite, want.nonfinite);
      }
    }
  }
}

}  // namespace
}  // namespace strata::kernels
