// strata-bench-gpu: the GPU side against bounds measured in the same run.
//
//   adam       the CUDA Adam/AdamW step on device-resident state, against a
//              device-to-device cudaMemcpyAsync moving the same bytes (a copy
//              of B bytes reads B and writes B, so the copy is sized to half
//              the step's traffic); ratio = copy time / step time.
//   h2d, d2h   copies from/to a buffer of strata's pinned pool (slabs
//              registered with cudaHostRegister) against the same copy from
//              cudaHostAlloc memory; ratio = cudaHostAlloc time / pool time.
//              A pageable (malloc) row shows what pinning buys.
//   pipeline   GpuUpdater: --jobs records of --job-size elements from the pool
//              through H2D -> kernel -> D2H with --buffers device buffers,
//              against the ideal pipeline built from the stage rates measured
//              above: jobs x slowest stage + the other two stages once (fill
//              and drain); ratio = ideal / measured.
//
// Built in every configuration; without CUDA, or without a driver or a
// device, it prints why and exits 0 (a skip, not a result).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <strata/cuda/device.h>
#include <strata/status.h>

#ifdef STRATA_HAVE_CUDA
#include <strata/cuda/gpu_updater.h>
#include <strata/memory/pinned_pool.h>
#endif

#include "common/bench_util.h"

namespace {

namespace bench = strata::bench;

constexpr const char* kUsage =
    "strata-bench-gpu [--device 0] [--sizes 16M,64M] [--grad-dtype fp32,bf16] "
    "[--param-out none,bf16] [--copy-bytes 256M] [--reps 10] [--jobs 8] [--job-size 16M] "
    "[--buffers 3] [--json]";

int skip(bool json, const std::string& reason) {
  if (json) {
    const nlohmann::ordered_json j = {{"bench", "gpu"}, {"skipped", true}, {"reason", reason}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("strata-bench-gpu: SKIPPED (not a result): %s\n", reason.c_str());
  }
  return 0;
}

#ifdef STRATA_HAVE_CUDA

namespace cu = strata::cuda;

bool parse_type(const std::string& s, cu::ElemType* t) {
  if (s == "fp32" || s == "float32") {
    *t = cu::ElemType::kF32;
  } else if (s == "bf16" || s == "bfloat16") {
    *t = cu::ElemType::kBF16;
  } else if (s == "fp16" || s == "float16") {
    *t = cu::ElemType::kF16;
  } else {
    return false;
  }
  return true;
}

template <class T>
T check(strata::Result<T> r, const char* what) {
  if (!r.ok()) {
    std::fprintf(stderr, "strata-bench-gpu: %s: %s\n", what, r.status().message().c_str());
    std::exit(1);
  }
  return std::move(r).value();
}

void check(const strata::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "strata-bench-gpu: %s: %s\n", what, st.message().c_str());
    std::exit(1);
  }
}

int run(const bench::Args& args, bool json) {
  const int device = int(args.number("device"));
  const int reps = std::max(1, int(args.number("reps")));
  auto devs = check(cu::cuda_devices(), "cuda_devices");
  if (device < 0 || size_t(device) >= devs.size()) {
    std::fprintf(stderr, "--device %d: %zu device(s) visible\n", device, devs.size());
    return 2;
  }
  bench::Table table(
      {"test", "variant", "grad", "out", "bytes", "time_ms", "gbps", "bound", "bound_ms", "ratio"},
      json);
  table.note("device " + std::to_string(device) + ": " + devs[size_t(device)].name + ", CUDA " +
             std::to_string(cu::cuda_runtime_version()) + " runtime, driver " +
             std::to_string(cu::cuda_driver_version()));
  table.note("times are the best of " + std::to_string(reps) +
             " repetitions (CUDA events); gbps = bytes / time; ratio = bound time / time "
             "(pipeline: ideal / measured)");

  // ---------------------------------------------------------------- adam
  std::vector<cu::ElemType> grads;
  for (const auto& s : args.list("grad-dtype")) {
    cu::ElemType t;
    if (!parse_type(s, &t)) {
      std::fprintf(stderr, "unknown --grad-dtype %s\n", s.c_str());
      return 2;
    }
    grads.push_back(t);
  }
  std::vector<std::pair<bool, cu::ElemType>> outs;
  for (const auto& s : args.list("param-out")) {
    cu::ElemType t = cu::ElemType::kF32;
    if (s != "none" && !parse_type(s, &t)) {
      std::fprintf(stderr, "unknown --param-out %s\n", s.c_str());
      return 2;
    }
    outs.emplace_back(s != "none", t);
  }
  for (const auto& size_text : args.list("sizes")) {
    const size_t n = bench::parse_size(size_text);
    for (cu::ElemType g : grads) {
      for (const auto& [has_out, o] : outs) {
        cu::AdamBenchShape shape;
        shape.n = n;
        shape.grad_type = g;
        shape.copy_out = has_out;
        shape.param_type = o;
        const double bytes = double(cu::adam_traffic_bytes(shape));
        const cu::Timing adam = check(cu::time_adam(device, shape, reps), "time_adam");
        const cu::Timing copy = check(
            cu::time_copy(device, cu::CopyKind::kDeviceToDevice, nullptr, size_t(bytes / 2), reps),
            "time_copy d2d");
        table.row({{"test", std::string("adam")},
                   {"variant", std::string("n=") + size_text},
                   {"grad", std::string(cu::elem_type_name(g))},
                   {"out", std::string(has_out ? cu::elem_type_name(o) : "none")},
                   {"bytes", int64_t(bytes)},
                   {"time_ms", adam.best_s * 1e3},
                   {"gbps", bytes / adam.best_s * 1e-9},
                   {"bound", std::string("d2d copy")},
                   {"bound_ms", copy.best_s * 1e3},
                   {"ratio", copy.best_s / adam.best_s}});
      }
    }
  }

  // -------------------------------------------------------------- copies
  check(cu::install_cuda_pin_backend(), "install_cuda_pin_backend");
  const size_t copy_bytes = args.size("copy-bytes");
  const size_t job_n = args.size("job-size");
  const int jobs = std::max(1, int(args.number("jobs")));
  const int buffers = std::max(1, int(args.number("buffers")));
  const int records = buffers + 1;  // distinct host records, so in-flight jobs never share one
  const size_t record_bytes = job_n * 16;  // [master | m | v] + fp32 grads
  strata::memory::PoolOptions po;
  po.slab_bytes = std::max(copy_bytes, size_t(records) * record_bytes) + 4096;
  po.allow_unpinned = false;
  auto pool = check(strata::memory::PinnedPool::create(po), "PinnedPool::create");
  auto host = check(pool->allocate(copy_bytes), "pool allocate");
  std::memset(host.data(), 1, copy_bytes);
  std::vector<unsigned char> pageable(copy_bytes, 1);
  cu::Timing pool_t[2], ref_t[2];
  const cu::CopyKind kinds[2] = {cu::CopyKind::kHostToDevice, cu::CopyKind::kDeviceToHost};
  const char* names[2] = {"h2d", "d2h"};
  for (int d = 0; d < 2; ++d) {
    pool_t[d] = check(cu::time_copy(device, kinds[d], host.data(), copy_bytes, reps), "time_copy");
    ref_t[d] = check(cu::time_copy(device, kinds[d], nullptr, copy_bytes, reps), "time_copy");
    const cu::Timing pageable_t =
        check(cu::time_copy(device, kinds[d], pageable.data(), copy_bytes, reps), "time_copy");
    for (int v = 0; v < 2; ++v) {
      const cu::Timing& t = v == 0 ? pool_t[d] : pageable_t;
      table.row({{"test", std::string(names[d])},
                 {"variant", std::string(v == 0 ? "pool" : "pageable")},
                 {"grad", std::string("-")},
                 {"out", std::string("-")},
                 {"bytes", int64_t(copy_bytes)},
                 {"time_ms", t.best_s * 1e3},
                 {"gbps", double(copy_bytes) / t.best_s * 1e-9},
                 {"bound", std::string("cudaHostAlloc")},
                 {"bound_ms", ref_t[d].best_s * 1e3},
                 {"ratio", ref_t[d].best_s / t.best_s}});
    }
  }
  host.reset();

  // ------------------------------------------------------------ pipeline
  cu::GpuUpdaterOptions uo;
  uo.device = device;
  uo.max_elements = job_n;
  uo.buffers = buffers;
  auto updater = check(cu::GpuUpdater::create(uo), "GpuUpdater::create");
  std::vector<strata::memory::PinnedBuffer> recs;
  for (int r = 0; r < records; ++r) {
    recs.push_back(check(pool->allocate(record_bytes), "pool allocate"));
    float* f = recs.back().as<float>();
    for (size_t i = 0; i < job_n; ++i) {
      f[i] = 0.5f;               // master
      f[job_n + i] = 0.0f;       // m
      f[2 * job_n + i] = 0.0f;   // v
      f[3 * job_n + i] = 1e-3f;  // grad
    }
  }
  auto submit_all = [&](int count) {
    cu::GpuUpdater::Ticket last = 0;
    for (int j = 0; j < count; ++j) {
      float* f = recs[size_t(j % records)].as<float>();
      cu::GpuJob job;
      job.consts =
          cu::make_adam_step_consts(true, 1e-3, 0.9, 0.999, 1e-8, 0.0, true, false, j + 1, 1.0f);
      for (int s = 0; s < 3; ++s) {
        job.host_slot[s] = f + size_t(s) * job_n;
      }
      job.n = job_n;
      job.grad = f + 3 * job_n;
      last = check(updater->submit(job), "submit");
    }
    check(updater->wait(last), "wait");
  };
  submit_all(buffers);  // warm-up
  double best = 1e30;
  for (int r = 0; r < std::min(reps, 3); ++r) {
    const double t0 = bench::now_seconds();
    submit_all(jobs);
    best = std::min(best, bench::now_seconds() - t0);
  }
  cu::AdamBenchShape shape;
  shape.n = job_n;
  const cu::Timing kernel = check(cu::time_adam(device, shape, reps), "time_adam");
  const double h2d_s = double(job_n) * 16 / (double(copy_bytes) / pool_t[0].best_s);
  const double d2h_s = double(job_n) * 12 / (double(copy_bytes) / pool_t[1].best_s);
  const double slowest = std::max({h2d_s, d2h_s, kernel.best_s});
  const double ideal = jobs * slowest + (h2d_s + d2h_s + kernel.best_s - slowest);
  const double moved = double(jobs) * double(job_n) * 28;
  table.row({{"test", std::string("pipeline")},
             {"variant",
              std::to_string(jobs) + "x" + args.get("job-size") + " K" + std::to_string(buffers)},
             {"grad", std::string("fp32")},
             {"out", std::string("none")},
             {"bytes", int64_t(moved)},
             {"time_ms", best * 1e3},
             {"gbps", moved / best * 1e-9},
             {"bound", std::string("ideal pipe")},
             {"bound_ms", ideal * 1e3},
             {"ratio", ideal / best}});
  table.note("pipeline stages per job: H2D " + std::to_string(h2d_s * 1e3) + " ms, kernel " +
             std::to_string(kernel.best_s * 1e3) + " ms, D2H " + std::to_string(d2h_s * 1e3) +
             " ms");
  updater.reset();
  recs.clear();
  strata::memory::set_default_pin_backend(nullptr);
  return 0;
}

#endif  // STRATA_HAVE_CUDA

}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv,
                   {{"device", "0"},
                    {"sizes", "16M,64M"},
                    {"grad-dtype", "fp32,bf16"},
                    {"param-out", "none,bf16"},
                    {"copy-bytes", "256M"},
                    {"reps", "10"},
                    {"jobs", "8"},
                    {"job-size", "16M"},
                    {"buffers", "3"},
                    {"json", "false"}},
                   kUsage);
  const bool json = args.flag("json");
#ifdef STRATA_HAVE_CUDA
  const strata::Status st = strata::cuda::cuda_available();
  if (!st.ok()) {
    return skip(json, st.message());
  }
  return run(args, json);
#else
  return skip(json, strata::cuda::cuda_available().message());
#endif
}
