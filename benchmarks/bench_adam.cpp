// strata-bench-adam: the CPU optimizer step against its own memory bound.
//
// For each size, grad dtype and param copy-out dtype, in one process and on
// the SAME buffers, alternating run by run:
//   strata  — optimizer_step with the chosen ISA (default: best the CPU has)
//   scalar  — the same call with the scalar reference
//   bound   — stream_bound_step: the same arrays, bytes read/written per
//             element, tiling, threads and store policy (plain stores, no
//             non-temporal ones in either), one multiply-add per element
// and prints G params/s, effective GB/s (bytes the step must move / time) and
// ratio_to_bound: the median over --iters runs of bound time / kernel time
// of back-to-back pairs (the machine is shared: a pair sees the same load,
// where the fastest-of-N of each can come from different moments).
#include <strata/kernels/cast.h>
#include <strata/kernels/cpu_features.h>
#include <strata/kernels/optimizer.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/bench_util.h"

namespace {

using namespace strata::kernels;
namespace bench = strata::bench;

const char* kUsage =
    "strata-bench-adam [--sizes 1M,4M,16M,64M,256M] [--grad-dtype fp32,bf16,fp16]\n"
    "                  [--param-out none,bf16,fp16,fp32] [--threads 0] [--isa "
    "auto|avx512|avx2|scalar]\n"
    "                  [--optimizer adamw|adam|sgd|adagrad] [--iters 10] [--scalar-iters 1]\n"
    "                  [--scalar-max-size 64M] [--json]\n"
    "  sizes are parameter counts (1M = 2^20); --threads 0 = every usable CPU;\n"
    "  --scalar-iters 0 skips the scalar reference rows; sizes above --scalar-max-size\n"
    "  skip them too (the reference runs ~20x slower than the bound: seconds per run).";

// Anonymous memory with transparent huge pages where the kernel allows them
// (fewer TLB misses for both the kernel and the bound: same buffers).
class Region {
 public:
  explicit Region(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "mmap %zu bytes: %s\n", bytes_, std::strerror(errno));
      std::exit(1);
    }
    madvise(p, bytes_, MADV_HUGEPAGE);
    ptr_ = p;
  }
  ~Region() { munmap(ptr_, bytes_); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  template <class T>
  T* as() {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

bool parse_dtype(const std::string& s, DType* out) {
  if (s == "fp32" || s == "f32") {
    *out = DType::kF32;
  } else if (s == "bf16") {
    *out = DType::kBF16;
  } else if (s == "fp16" || s == "f16") {
    *out = DType::kF16;
  } else {
    return false;
  }
  return true;
}

Isa parse_isa(const std::string& s) {
  if (s == "auto") return Isa::kAuto;
  if (s == "avx512") return Isa::kAvx512;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "scalar") return Isa::kScalar;
  std::fprintf(stderr, "unknown --isa %s\n%s\n", s.c_str(), kUsage);
  std::exit(2);
}

OptimizerHyper parse_optimizer(const std::string& s) {
  OptimizerHyper h;
  h.lr = 1e-4;
  if (s == "adamw") {
    h.kind = OptimizerKind::kAdamW;
    h.weight_decay = 0.01;
  } else if (s == "adam") {
    h.kind = OptimizerKind::kAdam;
  } else if (s == "sgd") {
    h.kind = OptimizerKind::kSgd;
    h.momentum = 0.9;
  } else if (s == "adagrad") {
    h.kind = OptimizerKind::kAdagrad;
  } else {
    std::fprintf(stderr, "unknown --optimizer %s\n%s\n", s.c_str(), kUsage);
    std::exit(2);
  }
  return h;
}

// Cheap deterministic values in [-scale, scale), filled in parallel (first
// touch from the threads that will stream them).
void fill(ThreadPool& pool, size_t n, uint64_t seed, float scale,
          const std::function<void(size_t, float)>& put) {
  const size_t chunk = size_t(1) << 20;
  pool.parallel_for((n + chunk - 1) / chunk, [&](size_t c) {
    uint64_t x = seed + c * 0x9E3779B97F4A7C15ull;
    const size_t end = std::min(n, (c + 1) * chunk);
    for (size_t i = c * chunk; i < end; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      put(i, scale * (float(int32_t(x >> 32)) * (1.0f / 2147483648.0f)));
    }
  });
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

template <class Fn>
double time_once(Fn&& fn) {
  const double t0 = bench::now_seconds();
  fn();
  return bench::now_seconds() - t0;
}

void check(const strata::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.to_string().c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv,
                   {{"sizes", "1M,4M,16M,64M,256M"},
                    {"grad-dtype", "fp32,bf16"},
                    {"param-out", "none,bf16"},
                    {"threads", "0"},
                    {"isa", "auto"},
                    {"optimizer", "adamw"},
                    {"iters", "10"},
                    {"scalar-iters", "1"},
                    {"scalar-max-size", "64M"},
                    {"json", "false"}},
                   kUsage);
  const bool json = args.flag("json");
  const int iters = std::max(1, int(args.number("iters")));
  const int scalar_iters_arg = std::max(0, int(args.number("scalar-iters")));
  const uint64_t scalar_max = args.size("scalar-max-size");
  const Isa isa = parse_isa(args.get("isa"));
  if (!isa_supported(isa)) {
    std::fprintf(stderr, "--isa %s: this CPU cannot run it (%s)\n", args.get("isa").c_str(),
                 cpu_features_string().c_str());
    return 1;
  }
  const Isa run_isa = isa == Isa::kAuto ? detect_isa() : isa;
  const OptimizerHyper hyper = parse_optimizer(args.get("optimizer"));
  const int slots = state_slots(hyper);
  ThreadPool pool(unsigned(args.number("threads")));

  std::vector<DType> grad_dtypes;
  for (const auto& s : args.list("grad-dtype")) {
    DType d;
    if (!parse_dtype(s, &d)) {
      std::fprintf(stderr, "unknown --grad-dtype %s\n", s.c_str());
      return 2;
    }
    grad_dtypes.push_back(d);
  }
  std::vector<std::pair<bool, DType>> param_outs;  // (has copy-out, dtype)
  size_t out_elem_max = 0;
  for (const auto& s : args.list("param-out")) {
    DType d = DType::kF32;
    if (s == "none") {
      param_outs.emplace_back(false, d);
      continue;
    }
    if (!parse_dtype(s, &d)) {
      std::fprintf(stderr, "unknown --param-out %s\n", s.c_str());
      return 2;
    }
    param_outs.emplace_back(true, d);
    out_elem_max = std::max(out_elem_max, dtype_size(d));
  }

  bench::Table table({"kernel", "isa", "grad_dtype", "param_out", "numel", "threads", "time_ms",
                      "gparams_per_s", "gbps", "ratio_to_bound", "best_ratio"},
                     json);
  table.note(std::string("optimizer ") + optimizer_name(hyper.kind) + ", " + std::to_string(slots) +
             " fp32 slots, isa " + isa_name(run_isa) + ", threads " + std::to_string(pool.size()) +
             ", cpu: " + cpu_features_string());
  table.note(std::to_string(iters) + " runs each (scalar: " + std::to_string(scalar_iters_arg) +
             ", up to " + std::to_string(scalar_max) +
             " params); kernel and bound back to back on the same buffers; time_ms = median run;"
             " ratio_to_bound = median over the runs of (bound time / kernel time) of each pair;"
             " best_ratio = fastest bound / fastest kernel");

  int64_t step = 0;
  for (const auto& size_text : args.list("sizes")) {
    const size_t n = bench::parse_size(size_text);
    const int scalar_iters = n <= scalar_max ? scalar_iters_arg : 0;
    std::vector<std::unique_ptr<Region>> state;
    for (int s = 0; s < slots; ++s) {
      state.push_back(std::make_unique<Region>(n * sizeof(float)));
    }
    Region grad(n * sizeof(float));
    Region out(n * std::max<size_t>(out_elem_max, 1));
    StateView view;
    for (int s = 0; s < slots; ++s) {
      view.slot[s] = state[size_t(s)]->as<float>();
      const float init = s == 0 ? 1.0f : initial_slot_value(hyper, s);
      float* x = view.slot[s];
      fill(pool, n, 17 + uint64_t(s), 1.0f,
           [x, s, init](size_t i, float r) { x[i] = s == 0 ? r * init : init; });
    }
    view.n = n;
    // Fault the copy-out pages in once, outside any timing.
    std::memset(out.as<void>(), 0, n * std::max<size_t>(out_elem_max, 1));

    for (DType gd : grad_dtypes) {
      float* g32 = grad.as<float>();
      uint16_t* g16 = grad.as<uint16_t>();
      fill(pool, n, 99, 0.01f, [&](size_t i, float r) {
        switch (gd) {
          case DType::kF32:
            g32[i] = r;
            break;
          case DType::kBF16:
            g16[i] = float_to_bf16_bits(r);
            break;
          case DType::kF16:
            g16[i] = float_to_fp16_bits(r);
            break;
        }
      });
      for (const auto& [has_out, od] : param_outs) {
        CopyOut range{0, n, out.as<void>()};
        const std::span<const CopyOut> copy_out =
            has_out ? std::span<const CopyOut>(&range, 1) : std::span<const CopyOut>();
        const std::string out_name = has_out ? dtype_name(od) : "none";
        const double bytes = double(n) * (8.0 * slots + double(dtype_size(gd)) +
                                          (has_out ? double(dtype_size(od)) : 0.0));
        auto run_kernel = [&](Isa which) {
          check(optimizer_step(hyper, StepArgs{++step, 1.0f}, view, grad.as<void>(), gd, copy_out,
                               od, &pool, which),
                "optimizer_step");
        };
        auto run_bound = [&] {
          check(stream_bound_step(hyper, view, grad.as<void>(), gd, copy_out, od, &pool, run_isa),
                "stream_bound_step");
        };
        // Warm-up: page tables, frequency, pool threads.
        run_bound();
        run_kernel(run_isa);
        std::vector<double> bound_times, kernel_times, scalar_times, pair_ratios;
        for (int it = 0; it < iters; ++it) {
          // Alternate which of the pair runs first, so neither always gets
          // the caches and DRAM pages the other one left.
          double tb = 0, tk = 0;
          if (it % 2 == 0) {
            tb = time_once(run_bound);
            tk = time_once([&] { run_kernel(run_isa); });
          } else {
            tk = time_once([&] { run_kernel(run_isa); });
            tb = time_once(run_bound);
          }
          bound_times.push_back(tb);
          kernel_times.push_back(tk);
          pair_ratios.push_back(tb / tk);
          if (it < scalar_iters) {
            scalar_times.push_back(time_once([&] { run_kernel(Isa::kScalar); }));
          }
        }
        const double bound_t = median(bound_times);
        auto row = [&](const char* kernel, const char* isa_text, double t, double ratio,
                       double best_ratio) {
          table.row({{"kernel", std::string(kernel)},
                     {"isa", std::string(isa_text)},
                     {"grad_dtype", std::string(dtype_name(gd))},
                     {"param_out", out_name},
                     {"numel", int64_t(n)},
                     {"threads", int64_t(pool.size())},
                     {"time_ms", t * 1e3},
                     {"gparams_per_s", double(n) / t * 1e-9},
                     {"gbps", bytes / t * 1e-9},
                     {"ratio_to_bound", ratio},
                     {"best_ratio", best_ratio}});
        };
        row("strata", isa_name(run_isa), median(kernel_times), median(pair_ratios),
            min_of(bound_times) / min_of(kernel_times));
        if (!scalar_times.empty()) {
          row("scalar", "scalar", median(scalar_times), bound_t / median(scalar_times),
              min_of(bound_times) / min_of(scalar_times));
        }
        row("bound", isa_name(run_isa), bound_t, 1.0, 1.0);
      }
    }
  }
  return 0;
}
