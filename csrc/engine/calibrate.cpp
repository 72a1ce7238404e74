// Start-up calibration of the performance model's rates (see calibrate.h).
#include <strata/engine/calibrate.h>
#include <strata/io/checksum.h>

#include <strata/cuda/device.h>
#include <strata/cuda/gpu_rates.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <strata/engine/plan.h>
#include <strata/io/io_engine.h>
#include <strata/io/swap_file.h>
#include <strata/kernels/optimizer.h>
#include <strata/kernels/thread_pool.h>
#include <strata/memory/pinned_pool.h>

namespace strata::engine {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  if (v.empty()) {
    return 0;
  }
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

// max/min of the samples: how noisy the measurement was.
double spread(const std::vector<double>& v) {
  if (v.empty()) {
    return 1;
  }
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  return *lo > 0 ? *hi / *lo : 1;
}

std::string fmt(const char* f, double a, double b = 0, double c = 0) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), f, a, b, c);
  return buf;
}

// Buffers come from a PinnedPool made like the engine's (same pinning,
// huge pages, pre-faulting): the drive's throughput depends on it (a 1 MiB
// O_DIRECT request over 4 KiB pages needs more descriptors than over huge
// pages; on this machine's virtio disk reads ran 1.3-1.5x faster from the
// pool than from malloc'ed memory).
struct Aligned {
  void* p = nullptr;
  memory::PinnedBuffer buf;
  Aligned(memory::PinnedPool* pool, size_t bytes) {
    auto r = pool->allocate(std::max<size_t>(bytes, 4096));
    if (r.ok()) {
      buf = std::move(r).value();
      p = buf.data();
      std::memset(p, 0, bytes);
    }
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

Result<std::unique_ptr<memory::PinnedPool>> make_pool(const CalibrationOptions& o, size_t bytes) {
  memory::PoolOptions po;
  po.pin = o.pin;
  po.allow_unpinned = true;
  po.slab_bytes = std::max<size_t>(bytes, 1 << 20);
  return memory::PinnedPool::create(po);
}

// Times fn() until `seconds` have passed (at least 3 runs after one warm-up)
// and returns the per-run durations.
template <typename Fn>
std::vector<double> repeat(double seconds, Fn&& fn) {
  fn();  // warm-up: page faults, thread start
  std::vector<double> t;
  const double start = now_s();
  while (t.size() < 3 || (now_s() - start < seconds && t.size() < 1000)) {
    const double a = now_s();
    fn();
    t.push_back(now_s() - a);
  }
  return t;
}

// Resident state and gradients for the CPU kernel, from a pool like the
// engine's; run() is one optimizer_step over all of it.
struct CpuBench {
  size_t n = 0, stride = 0;
  std::unique_ptr<memory::PinnedPool> pool_mem;
  std::unique_ptr<Aligned> state, g32, g16;
  kernels::OptimizerHyper h;
  kernels::StateView v;
  Status st;

  Status init(const CalibrationOptions& o) {
    n = std::max<size_t>(o.cpu_numel, 1 << 16);
    stride = slot_stride_for(n);
    const size_t g32_bytes = (n * 4 + 4095) / 4096 * 4096, g16_bytes = (n * 2 + 4095) / 4096 * 4096;
    STRATA_ASSIGN_OR_RETURN(pool_mem,
                            make_pool(o, stride * 3 * sizeof(float) + g32_bytes + g16_bytes));
    state = std::make_unique<Aligned>(pool_mem.get(), stride * 3 * sizeof(float));
    g32 = std::make_unique<Aligned>(pool_mem.get(), n * 4);
    g16 = std::make_unique<Aligned>(pool_mem.get(), n * 2);
    if (!state->p || !g32->p || !g16->p) {
      return Status(StatusCode::kOutOfMemory,
                    "calibration: cannot allocate " + std::to_string(n) + " elements");
    }
    for (size_t i = 0; i < n; ++i) {
      const float g = std::sin(float(i) * 0.37f) * 1e-2f;
      g32->as<float>()[i] = g;
      uint32_t bits;
      std::memcpy(&bits, &g, 4);
      g16->as<uint16_t>()[i] = uint16_t(bits >> 16);
    }
    h.kind = kernels::OptimizerKind::kAdamW;
    h.lr = 1e-4;
    h.weight_decay = 0.01;
    for (int k = 0; k < 3; ++k) {
      v.slot[k] = state->as<float>() + size_t(k) * stride;
    }
    v.n = n;
    return Status::Ok();
  }
  void run(kernels::DType dt, kernels::ThreadPool* p) {
    kernels::StepArgs a;
    a.step = 1;
    const void* g = dt == kernels::DType::kF32 ? g32->p : g16->p;
    Status s = kernels::optimizer_step(h, a, v, g, dt, {}, dt, p);
    if (!s.ok() && st.ok()) {
      st = s;
    }
  }
};

Status calibrate_cpu(const CalibrationOptions& o, CpuBench& cb, kernels::ThreadPool& pool,
                     HardwareProfile& hw) {
  const size_t n = cb.n, stride = cb.stride;
  kernels::ThreadPool one(1);
  auto run = [&](const void* g, kernels::DType dt, kernels::ThreadPool* p) { cb.run(dt, p); };
  const Aligned& state = *cb.state;
  const Aligned& g32 = *cb.g32;
  const Aligned& g16 = *cb.g16;
  Status& st = cb.st;
  const double per = o.seconds_per_test;
  auto t32 = repeat(per, [&] { run(g32.p, kernels::DType::kF32, &pool); });
  auto t16 = repeat(per, [&] { run(g16.p, kernels::DType::kBF16, &pool); });
  auto t1 = repeat(per / 2, [&] { run(g32.p, kernels::DType::kF32, &one); });
  STRATA_RETURN_IF_ERROR(st.with_context("calibration: optimizer_step"));
  hw.cpu_threads = pool.size();
  hw.cpu_update_params_per_s = double(n) / median(t32);
  hw.cpu_update_params_per_s_half = double(n) / median(t16);
  hw.cpu_update_params_per_s_1thread = double(n) / median(t1);
  const std::string isa = kernels::isa_name(kernels::detect_isa());
  const std::string what =
      " AdamW optimizer_step on " + std::to_string(n) + " resident elements, " + isa + ", ";
  hw.sources["cpu_update_params_per_s"] =
      "measured:" + what + std::to_string(pool.size()) + " threads, fp32 grads, median of " +
      std::to_string(t32.size()) + " calls (max/min " + fmt("%.2f", spread(t32)) + ")";
  hw.sources["cpu_update_params_per_s_half"] =
      "measured:" + what + std::to_string(pool.size()) + " threads, bf16 grads, median of " +
      std::to_string(t16.size()) + " calls (max/min " + fmt("%.2f", spread(t16)) + ")";
  hw.sources["cpu_update_params_per_s_1thread"] =
      "measured:" + what + "1 thread, fp32 grads, median of " + std::to_string(t1.size()) +
      " calls (max/min " + fmt("%.2f", spread(t1)) + ")";
  hw.sources["cpu_threads"] =
      "measured: the update pool's size (strata.threads " + std::to_string(o.threads) + ")";

  // Checksums: XXH3 over the state (what SwapFile hashes per record).
  const size_t hbytes = stride * 3 * sizeof(float);
  volatile uint64_t sink = 0;
  auto th = repeat(per / 2, [&] { sink = sink + io::xxh3_64(state.p, hbytes); });
  hw.checksum_bytes_per_s = double(hbytes) / median(th);
  hw.sources["checksum_bytes_per_s"] =
      "measured: XXH3_64bits (" + std::string(io::hash_isa_name(io::hash_isa())) + ") over " +
      std::to_string(hbytes >> 20) + " MiB on one thread, median of " + std::to_string(th.size());
  // Gradient statistics (exact-mode overlap computes them as gradients arrive).
  auto tg =
      repeat(per / 2, [&] { (void)kernels::grad_stats(g32.p, kernels::DType::kF32, n, &pool); });
  hw.grad_stats_params_per_s = double(n) / median(tg);
  hw.sources["grad_stats_params_per_s"] = "measured: grad_stats on " + std::to_string(n) +
                                          " fp32 gradients, " + std::to_string(pool.size()) +
                                          " threads, median of " + std::to_string(tg.size());
  return Status::Ok();
}

Status calibrate_nvme(const CalibrationOptions& o, CpuBench& cb, kernels::ThreadPool& pool,
                      HardwareProfile& hw) {
  const size_t chunk = std::max<size_t>(o.io_chunk_bytes / 4096 * 4096, 4096);
  const size_t chunks = std::max<size_t>((o.io_bytes + chunk - 1) / chunk, 1);
  const size_t bytes = chunks * chunk;
  io::IoOptions io;
  io.block_size = o.block_size;
  io.queue_depth = o.queue_depth;
  io.intra_op_parallelism = o.intra_op_parallelism;
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<io::IoEngine> engine, io::make_io_engine(io));
  io::SwapFileOptions so;
  so.dir = o.swap_dir;
  so.tag = "calibrate";
  so.size = 2 * bytes;   // region A and region B
  so.checksums = false;  // the checksum cost is measured separately
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<io::SwapFile> file,
                          io::SwapFile::create(so, engine.get()));
  std::vector<io::Extent> a, b;
  for (size_t k = 0; k < chunks; ++k) {
    STRATA_ASSIGN_OR_RETURN(io::Extent ea, file->allocate(chunk));
    a.push_back(ea);
  }
  for (size_t k = 0; k < chunks; ++k) {
    STRATA_ASSIGN_OR_RETURN(io::Extent eb, file->allocate(chunk));
    b.push_back(eb);
  }
  STRATA_ASSIGN_OR_RETURN(auto pool_mem, make_pool(o, 2 * bytes));
  Aligned buf_a(pool_mem.get(), bytes), buf_b(pool_mem.get(), bytes);
  if (!buf_a.p || !buf_b.p) {
    return Status(StatusCode::kOutOfMemory, "calibration: cannot allocate I/O buffers");
  }
  for (size_t i = 0; i < bytes; i += 4096) {
    buf_a.as<char>()[i] = char(i >> 12);  // not all zeros
    buf_b.as<char>()[i] = char(~(i >> 12));
  }
  // Fixed buffers like the engine's working buffers (ignored if refused).
  engine->register_buffer(buf_a.p, bytes).ignore();
  engine->register_buffer(buf_b.p, bytes).ignore();

  // Submits every chunk of `ops` (in order, one batch each, as the pipeline
  // submits whole records) and waits for all.
  struct Op {
    bool write;
    const io::Extent* e;
    char* buf;
  };
  auto pass = [&](const std::vector<Op>& ops) -> Result<double> {
    const double t0 = now_s();
    std::vector<io::Ticket> tickets;
    for (const auto& op : ops) {
      auto t = op.write ? file->submit_write(*op.e, op.buf) : file->submit_read(*op.e, op.buf);
      if (!t.ok()) {
        for (auto tk : tickets) {
          engine->wait(tk).ignore();
        }
        return t.status();
      }
      tickets.push_back(t.value());
    }
    Status st;
    for (auto tk : tickets) {
      Status s = engine->wait(tk);
      if (st.ok()) {
        st = s;
      }
    }
    STRATA_RETURN_IF_ERROR(st);
    return now_s() - t0;
  };
  auto seq = [&](bool write, const std::vector<io::Extent>& ext, const Aligned& buf) {
    std::vector<Op> ops;
    for (size_t k = 0; k < ext.size(); ++k) {
      ops.push_back(Op{write, &ext[k], buf.as<char>() + k * chunk});
    }
    return ops;
  };
  // Write both regions first: reads must hit written extents.
  STRATA_RETURN_IF_ERROR(
      pass(seq(true, a, buf_a)).status().with_context("calibration: write " + file->path()));
  STRATA_RETURN_IF_ERROR(
      pass(seq(true, b, buf_b)).status().with_context("calibration: write " + file->path()));
  std::vector<double> tw, tr, tm;
  for (unsigned r = 0; r < std::max(o.io_repeats, 1u); ++r) {
    STRATA_ASSIGN_OR_RETURN(double w, pass(seq(true, r % 2 ? b : a, r % 2 ? buf_b : buf_a)));
    tw.push_back(w);
    STRATA_ASSIGN_OR_RETURN(double rd, pass(seq(false, r % 2 ? a : b, r % 2 ? buf_a : buf_b)));
    tr.push_back(rd);
    // Mixed: read region A while writing region B, chunk by chunk
    // interleaved so the ring keeps both kinds in flight.
    std::vector<Op> mixed;
    for (size_t k = 0; k < chunks; ++k) {
      mixed.push_back(Op{false, &a[k], buf_a.as<char>() + k * chunk});
      mixed.push_back(Op{true, &b[k], buf_b.as<char>() + k * chunk});
    }
    STRATA_ASSIGN_OR_RETURN(double m, pass(mixed));
    tm.push_back(m);
  }
  // Both at once: a mixed pass on another thread while this one runs the
  // CPU kernel with the engine's threads. On a small machine the I/O path
  // (io_uring worker, interrupts) and the update threads slow each other.
  // Rounds alternate "alone" and "together" so that drift from other load on
  // the machine cancels in the ratios.
  std::vector<double> cpu_ratio, io_ratio;
  {
    std::vector<Op> mixed;
    for (size_t k = 0; k < chunks; ++k) {
      mixed.push_back(Op{false, &a[k], buf_a.as<char>() + k * chunk});
      mixed.push_back(Op{true, &b[k], buf_b.as<char>() + k * chunk});
    }
    for (unsigned r = 0; r < std::max(o.io_repeats, 1u); ++r) {
      auto alone_cpu =
          repeat(o.seconds_per_test / 4, [&] { cb.run(kernels::DType::kBF16, &pool); });
      STRATA_ASSIGN_OR_RETURN(double alone_io, pass(mixed));
      std::atomic<bool> done{false};
      Result<double> together_io = 0.0;
      std::thread streamer([&] {
        together_io = pass(mixed);
        done = true;
      });
      std::vector<double> together_cpu;
      while (!done.load() || together_cpu.empty()) {
        const double t0 = now_s();
        cb.run(kernels::DType::kBF16, &pool);
        together_cpu.push_back(now_s() - t0);
      }
      streamer.join();
      STRATA_RETURN_IF_ERROR(together_io.status());
      STRATA_RETURN_IF_ERROR(cb.st);
      cpu_ratio.push_back(median(alone_cpu) / median(together_cpu));
      io_ratio.push_back(alone_io / together_io.value());
    }
  }
  engine->unregister_buffer(buf_a.p).ignore();
  engine->unregister_buffer(buf_b.p).ignore();
  hw.cpu_update_io_factor = std::clamp(median(cpu_ratio), 0.05, 1.0);
  hw.sources["cpu_update_io_factor"] =
      "measured: bf16 optimizer_step rate while a mixed NVMe pass streams on another thread, over "
      "the rate "
      "without, median of " +
      std::to_string(cpu_ratio.size()) + " alternating rounds";
  hw.nvme_cpu_busy_factor = std::clamp(median(io_ratio), 0.05, 1.0);
  hw.sources["nvme_cpu_busy_factor"] =
      "measured: mixed NVMe pass rate while the bf16 optimizer_step runs with " +
      std::to_string(pool.size()) + " threads, over the rate without, median of " +
      std::to_string(io_ratio.size()) + " alternating rounds";
  hw.nvme_write_bytes_per_s = double(bytes) / median(tw);
  hw.nvme_read_bytes_per_s = double(bytes) / median(tr);
  hw.nvme_duplex_bytes_per_s = double(2 * bytes) / median(tm);
  const std::string how = std::string(engine->backend_name()) +
                          (file->direct() ? ", O_DIRECT" : ", buffered") + ", block " +
                          std::to_string(o.block_size) + ", depth " +
                          std::to_string(o.queue_depth) + ", " + std::to_string(chunks) + " x " +
                          std::to_string(chunk >> 20) + " MiB extents in " + o.swap_dir;
  hw.sources["nvme_write_bytes_per_s"] =
      "measured: " + std::to_string(bytes >> 20) + " MiB written, " + how + ", median of " +
      std::to_string(tw.size()) + " (max/min " + fmt("%.2f", spread(tw)) + ")";
  hw.sources["nvme_read_bytes_per_s"] =
      "measured: " + std::to_string(bytes >> 20) + " MiB read back (written just before), " + how +
      ", median of " + std::to_string(tr.size()) + " (max/min " + fmt("%.2f", spread(tr)) + ")";
  hw.sources["nvme_duplex_bytes_per_s"] =
      "measured: " + std::to_string(bytes >> 20) + " MiB read while " +
      std::to_string(bytes >> 20) + " MiB written, extents interleaved, " + how + ", median of " +
      std::to_string(tm.size()) + " (max/min " + fmt("%.2f", spread(tm)) + ")";
  return Status::Ok();  // the SwapFile removes its file
}

}  // namespace

CalibrationOptions calibration_options_from_config(const Config& config) {
  const EngineConfig& c = config.typed();
  CalibrationOptions o;
  o.swap_dir = c.zero.offload.nvme_path.value_or(std::string());
  o.block_size = size_t(c.aio.block_size);
  o.queue_depth = unsigned(c.aio.queue_depth);
  o.intra_op_parallelism = unsigned(c.aio.intra_op_parallelism);
  o.threads = unsigned(c.strata.threads);
  o.pin = c.zero.offload.pin_memory;
  return o;
}

Result<HardwareProfile> calibrate(const CalibrationOptions& o) {
  HardwareProfile hw;
  hw.name = "calibrated at start-up";
  CpuBench cb;
  STRATA_RETURN_IF_ERROR(cb.init(o));
  kernels::ThreadPool pool(o.threads);
  STRATA_RETURN_IF_ERROR(calibrate_cpu(o, cb, pool, hw));
  if (!o.swap_dir.empty()) {
    STRATA_RETURN_IF_ERROR(
        calibrate_nvme(o, cb, pool, hw).with_context("NVMe calibration in " + o.swap_dir));
  } else {
    hw.sources["nvme_read_bytes_per_s"] = "not measured: no swap directory";
  }
  if (!o.gpu) {
    hw.sources["gpu_update_params_per_s"] = "not measured (not asked for)";
  } else if (Status avail = cuda::cuda_available(); !avail.ok()) {
    hw.sources["gpu_update_params_per_s"] = "no GPU: " + avail.message();
  } else {
    cuda::GpuRateOptions go;
    go.copy_bytes = size_t(64) << 20;
    go.adam_elements = size_t(8) << 20;
    go.reps = 3;
    auto rates = cuda::measure_gpu_rates(go);
    if (!rates.ok()) {
      hw.sources["gpu_update_params_per_s"] = "not measured: " + rates.status().message();
    } else {
      const std::string what = "measured: " + rates->device_name +
                               ", pinned copies of 64 MiB, "
                               "AdamW over 8M fp32 parameters (median of 3)";
      hw.h2d_bytes_per_s = rates->h2d_gbps * 1e9;
      hw.d2h_bytes_per_s = rates->d2h_gbps * 1e9;
      hw.gpu_update_params_per_s = rates->adam_params_per_s;
      hw.gpu_free_bytes = rates->free_memory / 2;  // leave the model and torch room
      hw.sources["h2d_bytes_per_s"] = what;
      hw.sources["d2h_bytes_per_s"] = what;
      hw.sources["gpu_update_params_per_s"] = what;
      hw.sources["gpu_free_bytes"] = "measured: half the device's free memory";
    }
  }
  return hw;
}

}  // namespace strata::engine
