// The GPU kernel's math and launch logic, run on the host: the shared
// __host__ __device__ code of csrc/cuda/adam_math.h and adam_launch.h is
// compiled here by g++ and compared bit for bit with strata's CPU scalar
// kernel (kernels::optimizer_step, Isa::kScalar). What this proves for the
// GPU: the formula, the fp32 scalars, the cast bit rules, the segment plan
// and the block/thread indexing (every element updated exactly once, every
// copy-out written). What it cannot prove: that the device's _rn
// intrinsics round as IEEE says (benchmarks/gpu_check.sh checks the device
// against the CPU on a GPU machine). Needs no CUDA: runs in every build.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <strata/cuda/adam.h>
#include <strata/kernels/cast.h>
#include <strata/kernels/optimizer.h>

#include "cuda/adam_launch.h"
#include "cuda/adam_math.h"

namespace {

using strata::StatusCode;
using strata::cuda::AdamStepConsts;
using strata::cuda::CopyOutRange;
using strata::cuda::ElemType;
namespace cm = strata::cuda::math;
namespace cd = strata::cuda::detail;
namespace k = strata::kernels;

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// ------------------------------------------------------------------ casts
TEST(CudaMath, HalfToFloatEqualsCpuForAll65536Inputs) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto b = uint16_t(h);
    ASSERT_EQ(bits(cm::bf16_bits_to_float(b)), bits(k::bf16_bits_to_float(b))) << "bf16 " << h;
    ASSERT_EQ(bits(cm::fp16_bits_to_float(b)), bits(k::fp16_bits_to_float(b))) << "fp16 " << h;
  }
}

// Every bf16 rounding boundary (all upper halves with the low halves around
// the tie) and every fp16 one (all upper 19 bits with the low 13 around the
// tie), plus random patterns: NaNs, infinities, denormals included.
TEST(CudaMath, FloatToHalfEqualsCpuOnEveryRoundingBoundary) {
  for (uint32_t hi = 0; hi < 65536; ++hi) {
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7FFEu, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) {
      const float x = from_bits(hi << 16 | lo);
      ASSERT_EQ(cm::float_to_bf16_bits(x), k::float_to_bf16_bits(x)) << std::hex << bits(x);
    }
  }
  for (uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (uint32_t lo : {0x0000u, 0x0FFFu, 0x1000u, 0x1001u, 0x1FFFu}) {
      const float x = from_bits(hi << 13 | lo);
      ASSERT_EQ(cm::float_to_fp16_bits(x), k::float_to_fp16_bits(x)) << std::hex << bits(x);
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 1000000; ++i) {
    const float x = from_bits(uint32_t(rng()));
    ASSERT_EQ(cm::float_to_bf16_bits(x), k::float_to_bf16_bits(x)) << std::hex << bits(x);
    ASSERT_EQ(cm::float_to_fp16_bits(x), k::float_to_fp16_bits(x)) << std::hex << bits(x);
  }
}

// ---------------------------------------------------------------- helpers
k::DType to_k(ElemType t) { return k::DType(uint8_t(t)); }

// Values an optimizer meets: mostly ordinary magnitudes, some zeros (both
// signs), denormals, huge values and, when `specials`, inf and NaN.
float random_value(std::mt19937_64& rng, float scale, bool nonneg, bool specials) {
  const uint32_t pick = uint32_t(rng() % 100);
  float x;
  if (pick < 80) {
    std::normal_distribution<float> d(0.0f, scale);
    x = d(rng);
  } else if (pick < 84) {
    x = (rng() & 1) ? 0.0f : -0.0f;
  } else if (pick < 88) {
    x = from_bits(uint32_t(rng() % 0x800000u) | (uint32_t(rng() & 1) << 31));  // denormal
  } else if (pick < 96 || !specials) {
    x = from_bits(uint32_t(rng()) & 0xFF7FFFFFu);  // any finite pattern
  } else if (pick < 98) {
    x = (rng() & 1) ? INFINITY : -INFINITY;
  } else {
    x = from_bits(0x7FC00000u | uint32_t(rng() % 0x400000u) | (uint32_t(rng() & 1) << 31));
  }
  if (nonneg) {
    x = std::fabs(x);
  }
  return x;
}

struct Record {
  size_t n = 0;
  std::vector<float> slot[4];
  std::vector<uint16_t> g16;
  std::vector<float> g32;
  float* ptr[4] = {nullptr, nullptr, nullptr, nullptr};
  void link() {
    for (int s = 0; s < 4; ++s) {
      ptr[s] = slot[s].data();
    }
  }
  const void* grad(ElemType t) const {
    return t == ElemType::kF32 ? static_cast<const void*>(g32.data()) : g16.data();
  }
};

Record random_record(size_t n, ElemType gt, uint64_t seed, bool specials) {
  std::mt19937_64 rng(seed);
  Record r;
  r.n = n;
  for (int s = 0; s < 4; ++s) {
    r.slot[s].resize(n);
    for (size_t i = 0; i < n; ++i) {
      const float scale = s == 0 ? 1.0f : s == 1 ? 1e-2f : 1e-4f;
      r.slot[s][i] = random_value(rng, scale, s >= 2, specials && s == 0);
    }
  }
  r.g32.resize(n);
  r.g16.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const float g = random_value(rng, 1.0f, false, specials);
    r.g32[i] = g;
    r.g16[i] = gt == ElemType::kBF16 ? k::float_to_bf16_bits(g) : k::float_to_fp16_bits(g);
  }
  r.link();
  return r;
}

struct Hyper {
  k::OptimizerHyper h;
  k::StepArgs args;
};

std::vector<Hyper> hyper_cases() {
  std::vector<Hyper> out;
  for (auto kind : {k::OptimizerKind::kAdamW, k::OptimizerKind::kAdam}) {
    for (double wd : {0.0, 0.01, 0.1}) {
      for (bool ams : {false, true}) {
        for (bool bc : {true, false}) {
          Hyper c;
          c.h.kind = kind;
          c.h.lr = 1e-3;
          c.h.weight_decay = wd;
          c.h.amsgrad = ams;
          c.h.bias_correction = bc;
          c.args = k::StepArgs{int64_t(1 + out.size() * 7), out.size() % 3 == 0 ? 1.0f : 0.37f};
          out.push_back(c);
        }
      }
    }
  }
  Hyper odd;  // unusual betas, large lr, large step
  odd.h.lr = 0.5;
  odd.h.beta1 = 0.5;
  odd.h.beta2 = 0.75;
  odd.h.eps = 1e-3;
  odd.args = k::StepArgs{100000, 1024.0f};
  out.push_back(odd);
  return out;
}

void expect_same_bits(const std::vector<float>& got, const std::vector<float>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(bits(got[i]), bits(want[i]))
        << what << "[" << i << "]: " << got[i] << " vs CPU " << want[i];
  }
}

// --------------------------------------------------- per-element formula
TEST(CudaMath, AdamElementEqualsCpuScalarKernelBitForBit) {
  const size_t n = 4099;
  for (const Hyper& hc : hyper_cases()) {
    for (ElemType gt : {ElemType::kF32, ElemType::kBF16, ElemType::kF16}) {
      SCOPED_TRACE(std::string(k::optimizer_name(hc.h.kind)) + " wd " +
                   std::to_string(hc.h.weight_decay) + " amsgrad " + std::to_string(hc.h.amsgrad) +
                   " bc " + std::to_string(hc.h.bias_correction) + " grad " +
                   strata::cuda::elem_type_name(gt));
      const Record base = random_record(n, gt, 1000 + hc.args.step + int(gt), true);
      Record cpu = base, gpu = base;
      cpu.link();
      k::StateView view;
      for (int s = 0; s < 4; ++s) {
        view.slot[s] = cpu.ptr[s];
      }
      view.n = n;
      ASSERT_TRUE(k::optimizer_step(hc.h, hc.args, view, cpu.grad(gt), to_k(gt), {}, k::DType::kF32,
                                    nullptr, k::Isa::kScalar)
                      .ok());
      auto consts = strata::cuda::adam_step_consts(hc.h, hc.args);
      ASSERT_TRUE(consts.ok()) << consts.status().message();
      for (size_t i = 0; i < n; ++i) {
        cm::AdamElem e{gpu.slot[0][i], gpu.slot[1][i], gpu.slot[2][i], gpu.slot[3][i]};
        float g = 0.0f;
        switch (gt) {
          case ElemType::kF32:
            g = cm::load_elem<ElemType::kF32>(gpu.g32.data(), i);
            break;
          case ElemType::kBF16:
            g = cm::load_elem<ElemType::kBF16>(gpu.g16.data(), i);
            break;
          case ElemType::kF16:
            g = cm::load_elem<ElemType::kF16>(gpu.g16.data(), i);
            break;
        }
        cm::adam_element(consts.value(), g, e);
        gpu.slot[0][i] = e.p;
        gpu.slot[1][i] = e.m;
        gpu.slot[2][i] = e.v;
        gpu.slot[3][i] = e.vmax;
      }
      const int slots = hc.h.amsgrad ? 4 : 3;
      for (int s = 0; s < slots; ++s) {
        expect_same_bits(gpu.slot[s], cpu.slot[s], "slot " + std::to_string(s));
      }
    }
  }
}

// ------------------------------------------ whole launch, emulated on host
template <ElemType GT, ElemType PT>
void run_blocks(const AdamStepConsts& c, const cd::RecordPtrs& r, const cd::LaunchPlan& plan) {
  for (uint64_t b = 0; b < plan.update_blocks; ++b) {
    for (uint32_t t = 0; t < cd::kThreads; ++t) {
      cd::adam_block<GT, PT>(c, r, plan.update.data(), uint32_t(plan.update.size()), b, t);
    }
  }
  for (uint64_t b = 0; b < plan.copy_blocks; ++b) {
    for (uint32_t t = 0; t < cd::kThreads; ++t) {
      cd::copy_block<PT>(r.p, plan.copy.data(), uint32_t(plan.copy.size()), b, t);
    }
  }
}

template <ElemType GT>
void run_blocks_pt(ElemType pt, const AdamStepConsts& c, const cd::RecordPtrs& r,
                   const cd::LaunchPlan& plan) {
  switch (pt) {
    case ElemType::kF32:
      run_blocks<GT, ElemType::kF32>(c, r, plan);
      break;
    case ElemType::kBF16:
      run_blocks<GT, ElemType::kBF16>(c, r, plan);
      break;
    case ElemType::kF16:
      run_blocks<GT, ElemType::kF16>(c, r, plan);
      break;
  }
}

// What the GPU runs for one step, block by block and thread by thread.
strata::Status emulate_gpu_step(const AdamStepConsts& c, Record& rec, ElemType gt,
                                const std::vector<CopyOutRange>& co, ElemType pt) {
  STRATA_RETURN_IF_ERROR(
      cd::check_step("emulated", c, rec.ptr, rec.n, rec.grad(gt), gt, co.data(), co.size(), pt));
  cd::LaunchPlan plan;
  STRATA_RETURN_IF_ERROR(cd::plan_launch(rec.n, co.data(), co.size(), &plan));
  cd::RecordPtrs r;
  r.p = rec.ptr[0];
  r.m = rec.ptr[1];
  r.v = rec.ptr[2];
  r.vmax = c.amsgrad ? rec.ptr[3] : nullptr;
  r.g = rec.grad(gt);
  switch (gt) {
    case ElemType::kF32:
      run_blocks_pt<ElemType::kF32>(pt, c, r, plan);
      break;
    case ElemType::kBF16:
      run_blocks_pt<ElemType::kBF16>(pt, c, r, plan);
      break;
    case ElemType::kF16:
      run_blocks_pt<ElemType::kF16>(pt, c, r, plan);
      break;
  }
  return strata::Status::Ok();
}

// Random copy-out ranges over [0, n): sorted runs, unsorted, overlapping,
// empty, touching the ends. Destinations are slices of one output buffer
// per range (so overlapping ranges each get their own copy).
struct CopyOuts {
  std::vector<std::vector<uint8_t>> cpu_dst, gpu_dst;
  std::vector<k::CopyOut> cpu;
  std::vector<CopyOutRange> gpu;
};

CopyOuts random_copy_outs(size_t n, ElemType pt, uint64_t seed, int mode) {
  std::mt19937_64 rng(seed);
  std::vector<std::pair<size_t, size_t>> ranges;  // offset, length
  if (mode == 0) {
    ranges.push_back({0, n});  // one tensor: the whole record
  } else if (mode == 1) {
    size_t pos = 0;  // a model's tensors, back to back, some skipped (frozen)
    while (pos < n) {
      const size_t len = std::min(n - pos, size_t(1 + rng() % 3000));
      if (rng() % 4 != 0) {
        ranges.push_back({pos, len});
      }
      pos += len;
    }
  } else {
    for (int i = 0; i < 12; ++i) {  // anything goes
      const size_t off = rng() % (n + 1);
      const size_t len = rng() % 3 == 0 ? 0 : rng() % (n - off + 1);
      ranges.push_back({off, len});
    }
    ranges.push_back({n, 0});
  }
  if (mode != 0) {
    std::shuffle(ranges.begin(), ranges.end(), rng);
  }
  CopyOuts out;
  const size_t es = strata::cuda::elem_size(pt);
  for (const auto& [off, len] : ranges) {
    out.cpu_dst.emplace_back(len * es + 8, uint8_t(0xAB));
    out.gpu_dst.emplace_back(len * es + 8, uint8_t(0xAB));
  }
  for (size_t i = 0; i < ranges.size(); ++i) {
    out.cpu.push_back(k::CopyOut{ranges[i].first, ranges[i].second, out.cpu_dst[i].data()});
    out.gpu.push_back(CopyOutRange{ranges[i].first, ranges[i].second, out.gpu_dst[i].data()});
  }
  return out;
}

TEST(CudaMath, EmulatedLaunchEqualsCpuKernelWithCopyOut) {
  const std::vector<size_t> sizes = {1, 255, 1024, 1025, 4097, 70001};
  int case_no = 0;
  for (size_t n : sizes) {
    for (ElemType gt : {ElemType::kF32, ElemType::kBF16, ElemType::kF16}) {
      for (ElemType pt : {ElemType::kF32, ElemType::kBF16, ElemType::kF16}) {
        for (int mode = 0; mode < 3; ++mode) {
          ++case_no;
          Hyper hc = hyper_cases()[size_t(case_no) % hyper_cases().size()];
          SCOPED_TRACE("n " + std::to_string(n) + " grad " + strata::cuda::elem_type_name(gt) +
                       " param " + strata::cuda::elem_type_name(pt) + " ranges mode " +
                       std::to_string(mode) + " amsgrad " + std::to_string(hc.h.amsgrad));
          const Record base = random_record(n, gt, 77 + case_no, false);
          Record cpu = base, gpu = base;
          cpu.link();
          gpu.link();
          CopyOuts co = random_copy_outs(n, pt, 500 + case_no, mode);
          k::StateView view;
          for (int s = 0; s < 4; ++s) {
            view.slot[s] = cpu.ptr[s];
          }
          view.n = n;
          ASSERT_TRUE(k::optimizer_step(hc.h, hc.args, view, cpu.grad(gt), to_k(gt), co.cpu,
                                        to_k(pt), nullptr, k::Isa::kScalar)
                          .ok());
          auto consts = strata::cuda::adam_step_consts(hc.h, hc.args);
          ASSERT_TRUE(consts.ok());
          ASSERT_TRUE(emulate_gpu_step(consts.value(), gpu, gt, co.gpu, pt).ok());
          for (int s = 0; s < (hc.h.amsgrad ? 4 : 3); ++s) {
            expect_same_bits(gpu.slot[s], cpu.slot[s], "slot " + std::to_string(s));
          }
          for (size_t i = 0; i < co.cpu_dst.size(); ++i) {
            // Bytes past each range (0xAB guard) must be untouched on both.
            ASSERT_EQ(co.gpu_dst[i], co.cpu_dst[i]) << "copy-out range " << i;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------- plan
TEST(CudaLaunchPlan, UpdatePassPartitionsTheRecordAndOverlapsGoToTheCopyPass) {
  int a = 0, b = 0, c = 0;
  const std::vector<CopyOutRange> ranges = {
      {5000, 100, &a}, {0, 10, &b}, {50, 0, &c}, {5050, 20, &c}, {9990, 10, &a}};
  cd::LaunchPlan plan;
  ASSERT_TRUE(cd::plan_launch(10000, ranges.data(), ranges.size(), &plan).ok());
  // [0,10) b | [10,5000) - | [5000,5100) a | [5100,9990) - | [9990,10000) a
  ASSERT_EQ(plan.update.size(), 5u);
  uint64_t pos = 0, blocks = 0;
  for (const cd::Seg& s : plan.update) {
    EXPECT_EQ(s.begin, pos);
    EXPECT_EQ(s.first_block, blocks);
    pos += s.len;
    blocks += cd::blocks_for(s.len);
  }
  EXPECT_EQ(pos, 10000u);
  EXPECT_EQ(plan.update_blocks, blocks);
  EXPECT_EQ(plan.update[0].dst, &b);
  EXPECT_EQ(plan.update[1].dst, nullptr);
  EXPECT_EQ(plan.update[2].dst, &a);
  EXPECT_EQ(plan.update[4].dst, &a);
  ASSERT_EQ(plan.copy.size(), 1u);  // [5050, 5070) overlaps [5000, 5100)
  EXPECT_EQ(plan.copy[0].begin, 5050u);
  EXPECT_EQ(plan.copy[0].len, 20u);
  EXPECT_EQ(plan.copy_blocks, 1u);
  // Every block finds the segment that holds it.
  for (uint64_t blk = 0; blk < plan.update_blocks; ++blk) {
    const uint32_t s = cd::find_segment(plan.update.data(), uint32_t(plan.update.size()), blk);
    EXPECT_LE(plan.update[s].first_block, blk);
    EXPECT_LT(blk, plan.update[s].first_block + cd::blocks_for(plan.update[s].len));
  }
}

TEST(CudaLaunchPlan, NoCopyOutIsOneSegment) {
  cd::LaunchPlan plan;
  ASSERT_TRUE(cd::plan_launch(3 * cd::kTile + 1, nullptr, 0, &plan).ok());
  ASSERT_EQ(plan.update.size(), 1u);
  EXPECT_EQ(plan.update_blocks, 4u);
  EXPECT_EQ(plan.copy_blocks, 0u);
  ASSERT_TRUE(cd::plan_launch(0, nullptr, 0, &plan).ok());
  EXPECT_EQ(plan.update_blocks, 0u);
}

// ------------------------------------------------------------- arguments
TEST(CudaArgs, BadArgumentsAreInvalidArgumentNamingTheField) {
  float p = 0, m = 0, v = 0, g = 0;
  float* slots[4] = {&p, &m, &v, nullptr};
  AdamStepConsts c;
  auto code = [&](const AdamStepConsts& cc, float* const* s, size_t n, const void* grad,
                  ElemType gt, const CopyOutRange* co, size_t count,
                  ElemType pt) { return cd::check_step("t", cc, s, n, grad, gt, co, count, pt); };
  EXPECT_TRUE(code(c, slots, 1, &g, ElemType::kF32, nullptr, 0, ElemType::kF32).ok());
  AdamStepConsts ams = c;
  ams.amsgrad = true;
  auto st = code(ams, slots, 1, &g, ElemType::kF32, nullptr, 0, ElemType::kF32);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("amsgrad"), std::string::npos) << st.message();
  EXPECT_EQ(code(c, slots, 1, nullptr, ElemType::kF32, nullptr, 0, ElemType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code(c, slots, 1, &g, ElemType(7), nullptr, 0, ElemType::kF32).code(),
            StatusCode::kInvalidArgument);
  CopyOutRange outside{1, 1, &g};
  st = code(c, slots, 1, &g, ElemType::kF32, &outside, 1, ElemType::kF32);
  EXPECT_NE(st.message().find("outside the record"), std::string::npos) << st.message();
  CopyOutRange no_dst{0, 1, nullptr};
  EXPECT_EQ(code(c, slots, 1, &g, ElemType::kF32, &no_dst, 1, ElemType::kF32).code(),
            StatusCode::kInvalidArgument);
  AdamStepConsts inf = c;
  inf.grad_mul = INFINITY;
  EXPECT_EQ(code(inf, slots, 1, &g, ElemType::kF32, nullptr, 0, ElemType::kF32).code(),
            StatusCode::kInvalidArgument);
  // n == 0 needs no pointers, as on the CPU.
  float* none[4] = {nullptr, nullptr, nullptr, nullptr};
  EXPECT_TRUE(code(c, none, 0, nullptr, ElemType::kF32, nullptr, 0, ElemType::kF32).ok());
}

TEST(CudaArgs, StepConstsCheckLikeTheCpuKernel) {
  k::OptimizerHyper h;
  h.kind = k::OptimizerKind::kSgd;
  EXPECT_EQ(strata::cuda::adam_step_consts(h, {}).status().code(), StatusCode::kUnavailable);
  h.kind = k::OptimizerKind::kAdamW;
  EXPECT_EQ(strata::cuda::adam_step_consts(h, k::StepArgs{0, 1.0f}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(strata::cuda::adam_step_consts(h, k::StepArgs{1, NAN}).status().code(),
            StatusCode::kInvalidArgument);
  h.beta2 = 1.0;
  EXPECT_EQ(strata::cuda::adam_step_consts(h, {}).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
