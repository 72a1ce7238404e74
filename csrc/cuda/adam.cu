// The CUDA Adam/AdamW kernels: thin __global__ wrappers around the block
// bodies of adam_launch.h (which the unit tests also run on the host), the
// launch for a plan, and adam_step_device() for state already on the device.
//
// Instantiations: gradient type x parameter type (3 x 3) for the update
// pass, parameter type (3) for the copy pass — few, small kernels, so the
// build stays quick on two cores.
#include <cuda_runtime.h>

#include <string>

#include "cuda/adam_launch.h"
#include "cuda/cuda_util.h"

namespace strata::cuda {
namespace detail {
namespace {

template <ElemType GT, ElemType PT>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(AdamStepConsts c, RecordPtrs r, const Seg* segs, uint32_t nsegs) {
  adam_block<GT, PT>(c, r, segs, nsegs, blockIdx.x, threadIdx.x);
}

template <ElemType PT>
__global__ void __launch_bounds__(kThreads)
    copy_kernel(const float* master, const Seg* segs, uint32_t nsegs) {
  copy_block<PT>(master, segs, nsegs, blockIdx.x, threadIdx.x);
}

template <ElemType GT>
void launch_update(const AdamStepConsts& c, const RecordPtrs& r, ElemType param_type,
                   const Seg* segs, uint32_t nsegs, uint64_t blocks, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (param_type) {
    case ElemType::kF32:
      adam_kernel<GT, ElemType::kF32><<<grid, kThreads, 0, s>>>(c, r, segs, nsegs);
      break;
    case ElemType::kBF16:
      adam_kernel<GT, ElemType::kBF16><<<grid, kThreads, 0, s>>>(c, r, segs, nsegs);
      break;
    case ElemType::kF16:
      adam_kernel<GT, ElemType::kF16><<<grid, kThreads, 0, s>>>(c, r, segs, nsegs);
      break;
  }
}

}  // namespace

Status launch_adam(const AdamStepConsts& c, const RecordPtrs& r, ElemType grad_type,
                   ElemType param_type, const LaunchPlan& plan, const Seg* d_update,
                   const Seg* d_copy, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (plan.update_blocks > 0) {
    const uint32_t nsegs = static_cast<uint32_t>(plan.update.size());
    switch (grad_type) {
      case ElemType::kF32:
        launch_update<ElemType::kF32>(c, r, param_type, d_update, nsegs, plan.update_blocks, s);
        break;
      case ElemType::kBF16:
        launch_update<ElemType::kBF16>(c, r, param_type, d_update, nsegs, plan.update_blocks, s);
        break;
      case ElemType::kF16:
        launch_update<ElemType::kF16>(c, r, param_type, d_update, nsegs, plan.update_blocks, s);
        break;
    }
    STRATA_CUDA_CHECK(cudaGetLastError(), "Adam kernel launch");
  }
  if (plan.copy_blocks > 0) {
    const dim3 grid(static_cast<unsigned>(plan.copy_blocks));
    const uint32_t nsegs = static_cast<uint32_t>(plan.copy.size());
    switch (param_type) {
      case ElemType::kF32:
        copy_kernel<ElemType::kF32><<<grid, kThreads, 0, s>>>(r.p, d_copy, nsegs);
        break;
      case ElemType::kBF16:
        copy_kernel<ElemType::kBF16><<<grid, kThreads, 0, s>>>(r.p, d_copy, nsegs);
        break;
      case ElemType::kF16:
        copy_kernel<ElemType::kF16><<<grid, kThreads, 0, s>>>(r.p, d_copy, nsegs);
        break;
    }
    STRATA_CUDA_CHECK(cudaGetLastError(), "copy-out kernel launch");
  }
  return Status::Ok();
}

}  // namespace detail

Status adam_step_device(const DeviceAdamArgs& a, void* stream, bool synchronize) {
  STRATA_RETURN_IF_ERROR(detail::require_device("adam_step_device"));
  STRATA_RETURN_IF_ERROR(detail::check_step("adam_step_device", a.consts, a.slot, a.n, a.grad,
                                            a.grad_type, a.copy_out, a.copy_out_count,
                                            a.param_type));
  if (a.n == 0) {
    return Status::Ok();
  }
  detail::LaunchPlan plan;
  STRATA_RETURN_IF_ERROR(detail::plan_launch(a.n, a.copy_out, a.copy_out_count, &plan));
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  // The segment table goes to stream-ordered device memory: no device-wide
  // synchronisation, freed after the kernels in stream order. The source is
  // pageable; cudaMemcpyAsync stages it before returning, so the vectors may
  // die with this frame.
  std::vector<detail::Seg> table(plan.update);
  table.insert(table.end(), plan.copy.begin(), plan.copy.end());
  const size_t bytes = table.size() * sizeof(detail::Seg);
  void* d_table = nullptr;
  STRATA_CUDA_CHECK(cudaMallocAsync(&d_table, bytes, s), "adam_step_device: cudaMallocAsync");
  auto enqueue = [&]() -> Status {
    STRATA_CUDA_CHECK(cudaMemcpyAsync(d_table, table.data(), bytes, cudaMemcpyHostToDevice, s),
                      "adam_step_device: segment table H2D");
    const auto* d_update = static_cast<const detail::Seg*>(d_table);
    detail::RecordPtrs r;
    r.p = a.slot[0];
    r.m = a.slot[1];
    r.v = a.slot[2];
    r.vmax = a.consts.amsgrad ? a.slot[3] : nullptr;
    r.g = a.grad;
    return detail::launch_adam(a.consts, r, a.grad_type, a.param_type, plan, d_update,
                               d_update + plan.update.size(), stream);
  };
  const Status st = enqueue();
  const cudaError_t free_err = cudaFreeAsync(d_table, s);
  STRATA_RETURN_IF_ERROR(st);
  STRATA_CUDA_CHECK(free_err, "adam_step_device: cudaFreeAsync");
  if (synchronize) {
    STRATA_CUDA_CHECK(cudaStreamSynchronize(s), "adam_step_device: cudaStreamSynchronize");
  }
  return Status::Ok();
}

}  // namespace strata::cuda
