// strata's CUDA entry points. Without CUDA (not compiled, no driver, no
// device) every entry point must return Unavailable with the reason, never
// crash or abort; with a device, the GPU results must equal the CPU scalar
// kernel bit for bit (finite values) and the pinned pool must register with
// cudaHostRegister. Tests that need a device skip with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <strata/cuda/adam.h>
#include <strata/cuda/device.h>
#include <strata/cuda/gpu_updater.h>
#include <strata/kernels/cast.h>
#include <strata/kernels/optimizer.h>
#include <strata/memory/pin_backend.h>
#include <strata/memory/pinned_pool.h>

#ifdef STRATA_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using strata::Status;
using strata::StatusCode;
namespace cu = strata::cuda;
namespace k = strata::kernels;

bool known_reason(const std::string& m) {
  for (const char* r : {"not compiled with CUDA", "no CUDA driver", "CUDA driver too old",
                        "no device", "CUDA initialisation failed"}) {
    if (m.find(r) != std::string::npos) {
      return true;
    }
  }
  return false;
}

#define SKIP_WITHOUT_DEVICE()                                   \
  do {                                                          \
    const Status _st = cu::cuda_available();                    \
    if (!_st.ok()) {                                            \
      GTEST_SKIP() << "needs a CUDA device: " << _st.message(); \
    }                                                           \
  } while (0)

TEST(CudaDevice, AvailabilityIsOkOrUnavailableWithAReason) {
  const Status st = cu::cuda_available();
  if (st.ok()) {
    auto devs = cu::cuda_devices();
    ASSERT_TRUE(devs.ok()) << devs.status().message();
    ASSERT_FALSE(devs.value().empty());
    EXPECT_FALSE(devs.value()[0].name.empty());
    EXPECT_GT(devs.value()[0].total_memory, 0u);
    return;
  }
  EXPECT_EQ(st.code(), StatusCode::kUnavailable);
  EXPECT_TRUE(known_reason(st.message())) << st.message();
#ifndef STRATA_HAVE_CUDA
  EXPECT_FALSE(cu::cuda_compiled());
  EXPECT_NE(st.message().find("not compiled with CUDA"), std::string::npos) << st.message();
#else
  EXPECT_TRUE(cu::cuda_compiled());
  EXPECT_GT(cu::cuda_runtime_version(), 0);
  // The probe is cached: a second call says the same.
  EXPECT_EQ(cu::cuda_available().message(), st.message());
#endif
  EXPECT_EQ(cu::cuda_devices().status().code(), StatusCode::kUnavailable);
}

// Every entry point answers Unavailable (with the reason) when there is no
// device, before touching any argument.
TEST(CudaDevice, EveryEntryPointIsUnavailableWithoutADevice) {
  const Status avail = cu::cuda_available();
  if (avail.ok()) {
    GTEST_SKIP() << "a CUDA device is present; this checks the machine without one";
  }
  auto expect_unavailable = [&](const Status& st, const char* what) {
    EXPECT_EQ(st.code(), StatusCode::kUnavailable) << what << ": " << st.message();
    EXPECT_TRUE(known_reason(st.message())) << what << ": " << st.message();
  };
  cu::GpuUpdaterOptions o;
  o.max_elements = 1024;
  expect_unavailable(cu::GpuUpdater::create(o).status(), "GpuUpdater::create");
  cu::DeviceAdamArgs a;
  expect_unavailable(cu::adam_step_device(a, nullptr, true), "adam_step_device");
  expect_unavailable(cu::make_cuda_pin_backend().status(), "make_cuda_pin_backend");
  expect_unavailable(cu::time_copy(0, cu::CopyKind::kHostToDevice, nullptr, 4096, 1).status(),
                     "time_copy");
  expect_unavailable(cu::time_adam(0, cu::AdamBenchShape{}, 1).status(), "time_adam");
  expect_unavailable(cu::measure_gpu_rates(cu::GpuRateOptions{}).status(), "measure_gpu_rates");
  expect_unavailable(cu::gpu_memory(0).status(), "gpu_memory");

  // Installing the backend fails and leaves the pool's default alone.
  const auto before = strata::memory::default_pin_backend();
  expect_unavailable(cu::install_cuda_pin_backend(), "install_cuda_pin_backend");
  EXPECT_EQ(strata::memory::default_pin_backend(), before);
  EXPECT_STREQ(strata::memory::default_pin_backend()->name(), "mlock");
}

// ------------------------------------------------------------ with a device
#ifdef STRATA_HAVE_CUDA

struct HostRecord {
  size_t n;
  std::vector<float> slot[4];
  std::vector<uint16_t> grad16;
  std::vector<float> grad32;
};

HostRecord random_host_record(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  HostRecord r;
  r.n = n;
  for (int s = 0; s < 4; ++s) {
    r.slot[s].resize(n);
    for (auto& x : r.slot[s]) {
      x = s == 0 ? d(rng) : s == 1 ? 1e-2f * d(rng) : 1e-4f * std::fabs(d(rng));
    }
  }
  r.grad32.resize(n);
  r.grad16.resize(n);
  for (size_t i = 0; i < n; ++i) {
    r.grad32[i] = d(rng);
    r.grad16[i] = k::float_to_bf16_bits(r.grad32[i]);
  }
  return r;
}

void expect_bits(const float* got, const float* want, size_t n, const std::string& what) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t a, b;
    std::memcpy(&a, got + i, 4);
    std::memcpy(&b, want + i, 4);
    ASSERT_EQ(a, b) << what << "[" << i << "]: GPU " << got[i] << " vs CPU " << want[i];
  }
}

TEST(CudaGpu, DeviceStepEqualsCpuScalarKernel) {
  SKIP_WITHOUT_DEVICE();
  const size_t n = 1000003;
  k::OptimizerHyper h;
  h.weight_decay = 0.01;
  h.amsgrad = true;
  const k::StepArgs args{5, 0.5f};
  HostRecord cpu = random_host_record(n, 11);
  HostRecord gpu_in = cpu;
  // CPU reference with bf16 grads and bf16 copy-out of two ranges.
  std::vector<uint16_t> cpu_out(n), gpu_out(n);
  const k::CopyOut co[2] = {{0, n / 3, cpu_out.data()}, {n / 3, n - n / 3, cpu_out.data() + n / 3}};
  k::StateView view;
  for (int s = 0; s < 4; ++s) {
    view.slot[s] = cpu.slot[s].data();
  }
  view.n = n;
  ASSERT_TRUE(k::optimizer_step(h, args, view, cpu.grad16.data(), k::DType::kBF16, co,
                                k::DType::kBF16, nullptr, k::Isa::kScalar)
                  .ok());
  // The same on the device.
  float* d_slot[4] = {};
  void* d_grad = nullptr;
  void* d_out = nullptr;
  for (int s = 0; s < 4; ++s) {
    ASSERT_EQ(cudaMalloc(&d_slot[s], n * 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_slot[s], gpu_in.slot[s].data(), n * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ASSERT_EQ(cudaMalloc(&d_grad, n * 2), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_grad, gpu_in.grad16.data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_out, n * 2), cudaSuccess);
  cu::DeviceAdamArgs a;
  a.consts = cu::adam_step_consts(h, args).value();
  for (int s = 0; s < 4; ++s) {
    a.slot[s] = d_slot[s];
  }
  a.n = n;
  a.grad = d_grad;
  a.grad_type = cu::ElemType::kBF16;
  const cu::CopyOutRange ranges[2] = {{0, n / 3, d_out},
                                      {n / 3, n - n / 3, static_cast<uint16_t*>(d_out) + n / 3}};
  a.copy_out = ranges;
  a.copy_out_count = 2;
  a.param_type = cu::ElemType::kBF16;
  ASSERT_TRUE(cu::adam_step_device(a, nullptr, true).ok());
  std::vector<float> back(n);
  for (int s = 0; s < 4; ++s) {
    ASSERT_EQ(cudaMemcpy(back.data(), d_slot[s], n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    expect_bits(back.data(), cpu.slot[s].data(), n, "slot " + std::to_string(s));
    cudaFree(d_slot[s]);
  }
  ASSERT_EQ(cudaMemcpy(gpu_out.data(), d_out, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(gpu_out, cpu_out);
  cudaFree(d_grad);
  cudaFree(d_out);
}

TEST(CudaGpu, UpdaterPipelineEqualsCpuOverManyJobs) {
  SKIP_WITHOUT_DEVICE();
  ASSERT_TRUE(cu::install_cuda_pin_backend().ok());
  strata::memory::PoolOptions po;
  po.slab_bytes = size_t(64) << 20;
  auto pool = strata::memory::PinnedPool::create(po);
  ASSERT_TRUE(pool.ok()) << pool.status().message();
  const size_t n = 300007;
  const int jobs = 7;
  cu::GpuUpdaterOptions o;
  o.max_elements = n;
  o.buffers = 3;
  auto up = cu::GpuUpdater::create(o);
  ASSERT_TRUE(up.ok()) << up.status().message();
  k::OptimizerHyper h;
  h.weight_decay = 0.1;
  std::vector<HostRecord> cpu;
  std::vector<strata::memory::PinnedBuffer> host;
  std::vector<cu::GpuUpdater::Ticket> tickets;
  float* d_params = nullptr;
  ASSERT_EQ(cudaMalloc(&d_params, n * 4 * jobs), cudaSuccess);
  for (int j = 0; j < jobs; ++j) {
    cpu.push_back(random_host_record(n, 100 + j));
    auto buf = pool.value()->allocate(n * 4 * 3 + n * 4);
    ASSERT_TRUE(buf.ok());
    float* f = buf.value().as<float>();
    for (int s = 0; s < 3; ++s) {
      std::memcpy(f + s * n, cpu[j].slot[s].data(), n * 4);
    }
    std::memcpy(f + 3 * n, cpu[j].grad32.data(), n * 4);
    host.push_back(std::move(buf).value());
    cu::GpuJob job;
    job.consts = cu::adam_step_consts(h, k::StepArgs{j + 1, 1.0f}).value();
    for (int s = 0; s < 3; ++s) {
      job.host_slot[s] = f + s * n;
    }
    job.n = n;
    job.grad = f + 3 * n;
    const cu::CopyOutRange r{0, n, d_params + size_t(j) * n};
    job.copy_out = &r;
    job.copy_out_count = 1;
    job.param_type = cu::ElemType::kF32;
    auto t = up.value()->submit(job);
    ASSERT_TRUE(t.ok()) << t.status().message();
    tickets.push_back(t.value());
  }
  ASSERT_TRUE(up.value()->wait_all().ok());
  std::vector<float> params(n);
  for (int j = 0; j < jobs; ++j) {
    k::StateView view;
    for (int s = 0; s < 3; ++s) {
      view.slot[s] = cpu[j].slot[s].data();
    }
    view.n = n;
    ASSERT_TRUE(k::optimizer_step(h, k::StepArgs{j + 1, 1.0f}, view, cpu[j].grad32.data(),
                                  k::DType::kF32, {}, k::DType::kF32, nullptr, k::Isa::kScalar)
                    .ok());
    const float* f = host[j].as<float>();
    for (int s = 0; s < 3; ++s) {
      expect_bits(f + s * n, cpu[j].slot[s].data(), n,
                  "job " + std::to_string(j) + " slot " + std::to_string(s));
    }
    ASSERT_EQ(cudaMemcpy(params.data(), d_params + size_t(j) * n, n * 4, cudaMemcpyDeviceToHost),
              cudaSuccess);
    expect_bits(params.data(), cpu[j].slot[0].data(), n, "copy-out of job " + std::to_string(j));
    auto done = up.value()->done(tickets[j]);
    ASSERT_TRUE(done.ok() && done.value());
  }
  auto times = up.value()->job_times(tickets.back());
  ASSERT_TRUE(times.ok()) << times.status().message();
  EXPECT_GT(times.value().total_ms, 0.0f);
  EXPECT_EQ(up.value()->job_times(tickets.front()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(up.value()->wait(jobs + 1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(pool.value()->stats().pinned, true);
  cudaFree(d_params);
  host.clear();
  strata::memory::set_default_pin_backend(nullptr);
}

TEST(CudaGpu, UpdaterRejectsBadJobsAndKeepsWorking) {
  SKIP_WITHOUT_DEVICE();
  cu::GpuUpdaterOptions o;
  o.max_elements = 1000;
  auto up = cu::GpuUpdater::create(o);
  ASSERT_TRUE(up.ok()) << up.status().message();
  std::vector<float> rec(4 * 1001, 0.0f);
  cu::GpuJob job;
  job.consts = cu::make_adam_step_consts(true, 1e-3, 0.9, 0.999, 1e-8, 0.0, true, false, 1, 1.0f);
  for (int s = 0; s < 3; ++s) {
    job.host_slot[s] = rec.data() + s * 1001;
  }
  job.grad = rec.data() + 3 * 1001;
  job.n = 1001;  // > max_elements
  EXPECT_EQ(up.value()->submit(job).status().code(), StatusCode::kInvalidArgument);
  job.n = 1000;
  job.consts.amsgrad = true;  // no room for max_v
  EXPECT_EQ(up.value()->submit(job).status().code(), StatusCode::kInvalidArgument);
  job.consts.amsgrad = false;
  auto t = up.value()->submit(job);  // pageable host memory: slow, still correct
  ASSERT_TRUE(t.ok()) << t.status().message();
  EXPECT_TRUE(up.value()->wait(t.value()).ok());
}

TEST(CudaGpu, PinBackendRegistersPoolSlabs) {
  SKIP_WITHOUT_DEVICE();
  auto backend = cu::make_cuda_pin_backend();
  ASSERT_TRUE(backend.ok());
  EXPECT_FALSE(backend.value()->uses_memlock());
  strata::memory::PoolOptions po;
  po.slab_bytes = size_t(8) << 20;
  po.pin_backend = backend.value();
  po.allow_unpinned = false;
  auto pool = strata::memory::PinnedPool::create(po);
  ASSERT_TRUE(pool.ok()) << pool.status().message();
  auto buf = pool.value()->allocate(1 << 20);
  ASSERT_TRUE(buf.ok()) << buf.status().message();
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, buf.value().data()), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);
  EXPECT_TRUE(pool.value()->stats().pinned);
}

TEST(CudaGpu, RatesArePositive) {
  SKIP_WITHOUT_DEVICE();
  cu::GpuRateOptions o;
  o.copy_bytes = size_t(16) << 20;
  o.adam_elements = size_t(1) << 20;
  o.reps = 2;
  auto r = cu::measure_gpu_rates(o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_GT(r.value().h2d_gbps, 0.0);
  EXPECT_GT(r.value().d2h_gbps, 0.0);
  EXPECT_GT(r.value().d2d_gbps, 0.0);
  EXPECT_GT(r.value().adam_params_per_s, 0.0);
}

#endif  // STRATA_HAVE_CUDA

}  // namespace
