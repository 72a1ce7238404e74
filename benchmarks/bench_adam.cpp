// strata-bench-adam: the CPU optimizer step against the machine's memory bound.
//
// For each size, grad dtype and param copy-out dtype, in one process,
// rotating run by run:
//   strata      — optimizer_step with the chosen ISA (default: best the CPU has)
//   scalar      — the same call with the scalar reference
//   own_loop    — stream_bound_step: the project's own streaming loop on the
//                 kernel's buffers, tiling and thread pool (shares them, so it
//                 shares whatever slows them: not a bound, a diagnostic)
//   indep_bound — plain::Bound below: a loop that shares no code with the
//                 kernel path (own arrays, own threads, static partition), the
//                 same bytes read and written per element, one multiply-add
//                 per array, plain stores (no non-temporal ones in either)
// and prints G params/s, effective GB/s (bytes the step must move / time),
// ratio_to_bound = the median over --iters runs of (independent bound time /
// kernel time) of each round, and ratio_to_own the same against own_loop
// (the machine is shared: a round sees one load, where the fastest-of-N of
// each can come from different moments). The ratio that counts is
// ratio_to_bound.
#include <strata/engine/plan.h>
#include <strata/kernels/cast.h>
#include <strata/kernels/cpu_features.h>
#include <strata/kernels/optimizer.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/bench_util.h"
#include "common/plain_bound.h"

namespace {

using namespace strata::kernels;
namespace bench = strata::bench;
namespace plain = strata::bench::plain;
static_assert(plain::kScaleBlock == kQ8Block);

const char* kUsage =
    "strata-bench-adam [--sizes 1M,4M,16M,64M,256M] [--grad-dtype fp32,bf16,fp16]\n"
    "                  [--param-out none,bf16,fp16,fp32] [--threads 0] [--isa "
    "auto|avx512|avx2|scalar]\n"
    "                  [--optimizer adamw|adam|sgd|adagrad] [--iters 10] [--scalar-iters 1]\n"
    "                  [--scalar-max-size 64M] [--huge-pages on|off]\n"
    "                  [--slot-skew on|sub-page|off] [--state-dtype fp32|bf16|int8_blockwise]\n"
    "                  [--json]\n"
    "  sizes are parameter counts (1M = 2^20); --threads 0 = every usable CPU (a list\n"
    "  such as 1,2 runs each count in turn);\n"
    "  --state-dtype: how the slots after the master are stored (slot_dtype_for: bf16,\n"
    "  or 8-bit blockwise codes + one fp32 scale per 256); the independent bound then\n"
    "  moves the same compressed bytes (fp32 master, 2- or 1-byte moments, scales);\n"
    "  --scalar-iters 0 skips the scalar reference rows; sizes above --scalar-max-size\n"
    "  skip them too (the reference runs ~20x slower than the bound: seconds per run);\n"
    "  --huge-pages: THP advice for the kernel's buffers and the independent bound's\n"
    "  own aligned_alloc arrays (2 MiB-aligned when on);\n"
    "  the kernel's state is one record laid out as the engine's (engine/plan.h),\n"
    "  followed in the same mapping by the gradient and the copy-out, each one more\n"
    "  slot stride on; --slot-skew sub-page spaces them by 4 KiB multiples + 1088 B\n"
    "  (the first fix of issue 17: page numbers still equal modulo 2^16, which AMD's\n"
    "  L1 way predictor hashes), off by exact multiples of 4 KiB (the layout before\n"
    "  issue 17, whose cache-set aliasing cost up to 2.3x).";

// The kernel's buffers: anonymous memory, with transparent huge pages where
// the kernel allows them when `huge` (like the engine's pool slabs), 4 KiB
// pages otherwise (--huge-pages off: to see whether the page size or the
// 2 MiB-aligned, same-offset layout it brings costs anything on a machine).
class Region {
 public:
  Region(size_t bytes, bool huge) : bytes_(std::max<size_t>(bytes, 1)) {
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "mmap %zu bytes: %s\n", bytes_, std::strerror(errno));
      std::exit(1);
    }
    madvise(p, bytes_, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
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

// A compressed slot of n elements, all `value`, encoded in parallel (first
// touch from the pool's threads) a chunk at a time: chunks start at block
// boundaries, so each encodes like its part of the whole slot.
void encode_constant(ThreadPool& pool, SlotDType dtype, float value, size_t n, void* packed,
                     float* scales) {
  const size_t chunk = size_t(1) << 20;
  static_assert((size_t(1) << 20) % kQ8Block == 0);
  const size_t elem = dtype == SlotDType::kBF16 ? 2 : 1;
  pool.parallel_for((n + chunk - 1) / chunk, [&](size_t c) {
    const size_t begin = c * chunk, count = std::min(n, begin + chunk) - begin;
    const std::vector<float> src(count, value);
    check(encode_slot(dtype, src.data(), static_cast<unsigned char*>(packed) + begin * elem,
                      scales == nullptr ? nullptr : scales + begin / kQ8Block, count, nullptr),
          "encode_slot");
  });
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
                    {"huge-pages", "on"},
                    {"slot-skew", "on"},
                    {"state-dtype", "fp32"},
                    {"json", "false"}},
                   kUsage);
  const bool json = args.flag("json");
  const int iters = std::max(1, int(args.number("iters")));
  const int scalar_iters_arg = std::max(0, int(args.number("scalar-iters")));
  const uint64_t scalar_max = args.size("scalar-max-size");
  const Isa isa = parse_isa(args.get("isa"));
  const bool huge = args.get("huge-pages") != "off";
  const std::string skew = args.get("slot-skew");
  if (skew != "on" && skew != "sub-page" && skew != "off") {
    std::fprintf(stderr, "unknown --slot-skew %s\n%s\n", skew.c_str(), kUsage);
    return 2;
  }
  if (!isa_supported(isa)) {
    std::fprintf(stderr, "--isa %s: this CPU cannot run it (%s)\n", args.get("isa").c_str(),
                 cpu_features_string().c_str());
    return 1;
  }
  const Isa run_isa = isa == Isa::kAuto ? detect_isa() : isa;
  const OptimizerHyper hyper = parse_optimizer(args.get("optimizer"));
  const int slots = state_slots(hyper);
  const std::string state_text = args.get("state-dtype");
  StateDType state_dtype = StateDType::kF32;
  if (state_text == "bf16") {
    state_dtype = StateDType::kBF16;
  } else if (state_text == "int8_blockwise") {
    state_dtype = StateDType::kInt8Blockwise;
  } else if (state_text != "fp32") {
    std::fprintf(stderr, "unknown --state-dtype %s\n%s\n", state_text.c_str(), kUsage);
    return 2;
  }
  const bool compressed = state_dtype != StateDType::kF32;
  SlotDType slot_dtype[4];
  std::string slot_names;
  for (int k = 0; k < 4; ++k) {
    slot_dtype[k] = slot_dtype_for(hyper, k, state_dtype, false);
    if (k < slots) {
      slot_names += std::string(k ? ", " : "") + slot_dtype_name(slot_dtype[k]);
    }
  }
  // Bytes one element of the slots moves (read + write), scales included.
  double state_bytes = 0.0;
  for (int k = 0; k < slots; ++k) {
    const SlotDType d = slot_dtype[k];
    state_bytes += 2.0 * (d == SlotDType::kF32    ? 4.0
                          : d == SlotDType::kBF16 ? 2.0
                                                  : 1.0 + 4.0 / double(kQ8Block));
  }
  const int moment_bytes = state_dtype == StateDType::kBF16            ? 2
                           : state_dtype == StateDType::kInt8Blockwise ? 1
                                                                       : 4;
  std::vector<unsigned> thread_counts;
  for (const auto& t : args.list("threads")) {
    thread_counts.push_back(unsigned(std::stoul(t)));
  }

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

  std::vector<std::string> columns = {"kernel", "isa", "grad_dtype", "param_out"};
  if (compressed) {
    columns.push_back("state_dtype");
  }
  for (const char* c : {"numel", "threads", "time_ms", "gparams_per_s", "gbps", "ratio_to_bound",
                        "ratio_to_own", "best_ratio"}) {
    columns.push_back(c);
  }
  bench::Table table(columns, json);
  for (unsigned thread_count : thread_counts) {
    ThreadPool pool(thread_count);
    table.note(
        std::string("optimizer ") + optimizer_name(hyper.kind) + ", " + std::to_string(slots) +
        (compressed ? " slots (" + slot_names + ")" : std::string(" fp32 slots")) + ", isa " +
        isa_name(run_isa) + ", threads " + std::to_string(pool.size()) +
        ", cpu: " + cpu_features_string() +
        ", kernel and bound buffers: " + (huge ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE") + ", slots " +
        (skew == "on"         ? "skewed (the engine's layout)"
         : skew == "sub-page" ? "skewed within a page only (--slot-skew sub-page)"
                              : "unskewed (--slot-skew off)") +
        "; grad and copy-out follow the record at the same stride");
    table.note(
        std::to_string(iters) + " rounds each (scalar: " + std::to_string(scalar_iters_arg) +
        ", up to " + std::to_string(scalar_max) +
        " params); a round runs kernel, own_loop and indep_bound back to back, order rotated;"
        " time_ms = median run; ratio_to_bound = median over the rounds of (indep_bound time /"
        " kernel time); ratio_to_own = the same against own_loop (the kernel path's own loop,"
        " not independent); best_ratio = fastest indep_bound / fastest kernel");

    int64_t step = 0;
    for (const auto& size_text : args.list("sizes")) {
      const size_t n = bench::parse_size(size_text);
      const int scalar_iters = n <= scalar_max ? scalar_iters_arg : 0;
      // The state as the engine holds it: one record, slot k at k * slot_stride
      // (engine/plan.h), so the layout measured is the engine's own. The
      // gradient and the copy-out follow in the same mapping at slots
      // `slots` and `slots + 1` of the same stride: separate mappings of
      // power-of-two sizes land exactly 2^28 bytes apart for 64M elements, and
      // their streams then alias each other in the L1 (see plan.cpp), a cost of
      // the bench's allocation, not of the kernel.
      const size_t stride = skew == "on"         ? strata::engine::slot_stride_for(n)
                            : skew == "sub-page" ? (n + 1023) / 1024 * 1024 + 272
                                                 : (n + 1023) / 1024 * 1024;
      const size_t out_bytes = n * std::max<size_t>(out_elem_max, 1);
      // Slot k's first byte. fp32 state: k * stride * 4. Compressed state
      // (--state-dtype) with --slot-skew on: where the engine puts it
      // (engine::lay_out_record: each packed slot rounded up to 4 KiB plus
      // the 1088-byte skew); with sub-page / off: at the fp32 slot starts.
      // The gradient follows the record's last slot at one stride, the
      // copy-out one stride further.
      size_t slot_at[4] = {0, 0, 0, 0};
      size_t grad_at = size_t(slots) * stride * sizeof(float);
      for (int s = 0; s < slots; ++s) {
        slot_at[s] = size_t(s) * stride * sizeof(float);
      }
      if (compressed && skew == "on") {
        strata::engine::SubGroup sg;
        sg.numel = n;
        sg.slot_stride = stride;
        strata::engine::lay_out_record(sg, std::vector<SlotDType>(slot_dtype, slot_dtype + slots));
        for (int s = 0; s < slots; ++s) {
          slot_at[s] = sg.slot_offset[size_t(s)];
        }
        grad_at = sg.record_bytes + 1088;
      }
      Region record(grad_at + stride * sizeof(float) + out_bytes, huge);
      auto* const base = record.as<unsigned char>();
      void* const grad_base = base + grad_at;
      void* const out_base = base + grad_at + stride * sizeof(float);
      StateView view;
      for (int s = 0; s < slots; ++s) {
        float* const x = reinterpret_cast<float*>(base + slot_at[s]);
        const float init = s == 0 ? 1.0f : initial_slot_value(hyper, s);
        if (slot_dtype[s] == SlotDType::kF32) {
          view.slot[s] = x;
          fill(pool, n, 17 + uint64_t(s), 1.0f,
               [x, s, init](size_t i, float r) { x[i] = s == 0 ? r * init : init; });
          continue;
        }
        // A compressed slot: its codes, then (q8) its scales.
        const SlotDType d = slot_dtype[s];
        auto* const bytes = reinterpret_cast<unsigned char*>(x);
        view.dtype[s] = d;
        view.packed[s] = bytes;
        view.scales[s] =
            d == SlotDType::kBF16 ? nullptr : reinterpret_cast<float*>(bytes + q8_scales_offset(n));
        encode_constant(pool, d, init, n, view.packed[s], view.scales[s]);
      }
      view.n = n;
      // Fault the copy-out pages in once, outside any timing.
      std::memset(out_base, 0, out_bytes);

      for (DType gd : grad_dtypes) {
        float* g32 = static_cast<float*>(grad_base);
        uint16_t* g16 = static_cast<uint16_t*>(grad_base);
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
          CopyOut range{0, n, out_base};
          const std::span<const CopyOut> copy_out =
              has_out ? std::span<const CopyOut>(&range, 1) : std::span<const CopyOut>();
          const std::string out_name = has_out ? dtype_name(od) : "none";
          const double bytes = double(n) * (state_bytes + double(dtype_size(gd)) +
                                            (has_out ? double(dtype_size(od)) : 0.0));
          auto run_kernel = [&](Isa which) {
            check(optimizer_step(hyper, StepArgs{++step, 1.0f}, view, grad_base, gd, copy_out, od,
                                 &pool, which),
                  "optimizer_step");
          };
          auto run_bound = [&] {
            check(stream_bound_step(hyper, view, grad_base, gd, copy_out, od, &pool, run_isa),
                  "stream_bound_step");
          };
          plain::Bound indep(n, slots, int(dtype_size(gd)), has_out ? int(dtype_size(od)) : 0,
                             pool.size(), huge, moment_bytes);
          // Warm-up: page tables, frequency, pool threads.
          run_bound();
          run_kernel(run_isa);
          indep.run_seconds();
          std::vector<double> bound_times, indep_times, kernel_times, scalar_times, ratios,
              own_ratios, own_to_indep;
          for (int it = 0; it < iters; ++it) {
            // Rotate the order, so none of the three always gets the caches
            // and DRAM pages another one left.
            double tb = 0, tk = 0, ti = 0;
            for (int k = 0; k < 3; ++k) {
              switch ((it + k) % 3) {
                case 0:
                  tk = time_once([&] { run_kernel(run_isa); });
                  break;
                case 1:
                  tb = time_once(run_bound);
                  break;
                default:
                  ti = indep.run_seconds();
                  break;
              }
            }
            bound_times.push_back(tb);
            indep_times.push_back(ti);
            kernel_times.push_back(tk);
            ratios.push_back(ti / tk);
            own_ratios.push_back(tb / tk);
            own_to_indep.push_back(ti / tb);
            if (it < scalar_iters) {
              scalar_times.push_back(time_once([&] { run_kernel(Isa::kScalar); }));
            }
          }
          const double bound_t = median(bound_times);
          const double indep_t = median(indep_times);
          auto row = [&](const char* kernel, const char* isa_text, double t, double ratio,
                         double own_ratio, double best_ratio) {
            std::vector<std::pair<std::string, bench::Cell>> cells = {
                {"kernel", std::string(kernel)},
                {"isa", std::string(isa_text)},
                {"grad_dtype", std::string(dtype_name(gd))},
                {"param_out", out_name}};
            if (compressed) {
              cells.emplace_back("state_dtype", state_text);
            }
            cells.insert(cells.end(), {{"numel", int64_t(n)},
                                       {"threads", int64_t(pool.size())},
                                       {"time_ms", t * 1e3},
                                       {"gparams_per_s", double(n) / t * 1e-9},
                                       {"gbps", bytes / t * 1e-9},
                                       {"ratio_to_bound", ratio},
                                       {"ratio_to_own", own_ratio},
                                       {"best_ratio", best_ratio}});
            table.row(cells);
          };
          row("strata", isa_name(run_isa), median(kernel_times), median(ratios), median(own_ratios),
              min_of(indep_times) / min_of(kernel_times));
          if (!scalar_times.empty()) {
            const double ts = median(scalar_times);
            row("scalar", "scalar", ts, indep_t / ts, bound_t / ts,
                min_of(indep_times) / min_of(scalar_times));
          }
          row("own_loop", isa_name(run_isa), bound_t, median(own_to_indep), 1.0,
              min_of(indep_times) / min_of(bound_times));
          row("indep_bound", indep.isa(), indep_t, 1.0, bound_t / indep_t, 1.0);
        }
      }
    }
  }
  return 0;
}
