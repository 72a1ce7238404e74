// strata/cuda/device.h — is there a CUDA device, and what is it.
//
// CUDA is optional twice over: at build time (csrc/cuda/*.cu are compiled
// only when CMake finds nvcc; the core then carries STRATA_HAVE_CUDA) and at
// run time (the CUDA runtime is linked statically, so a binary built with
// CUDA loads and runs on a machine with no driver and no GPU). Every strata
// CUDA entry point first calls cuda_available() and returns its status, so
// callers see one Unavailable status with the reason and can fall back to
// the CPU:
//   "not compiled with CUDA (...)"   this build has no CUDA code;
//   "no CUDA driver (...)"           libcuda.so.1 is missing (driver version 0);
//   "CUDA driver too old (...)"      the driver predates the runtime strata was built with;
//   "no device (...)"                a driver, but no visible GPU (CUDA_VISIBLE_DEVICES, none
//   installed).
//
// How the CPU-only build gets these functions: csrc/cuda is compiled only
// with nvcc, so there is no .cpp twin to link; instead, when STRATA_HAVE_CUDA
// is not defined, this header defines the entry points inline, returning the
// "not compiled with CUDA" status. In a CUDA build every target that links
// strata_core sees STRATA_HAVE_CUDA (a PUBLIC define) and the .cu files see
// __CUDACC__, so one program never mixes the two definitions.
//
// Nothing here (or anywhere in strata's CUDA code) calls the CUDA runtime
// during static initialisation: the first call of cuda_available() probes
// the driver and caches the answer for the life of the process.
//
// This header and everything it includes compile as C++17: nvcc builds
// csrc/cuda as C++17 (CMAKE_CUDA_STANDARD), while the rest of strata is C++20.
//
// Ownership: values only. Units: bytes (CUDA 13 dropped the clock fields, so
// there are none). Thread-safety: all functions may be called from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <strata/status.h>

#if defined(STRATA_HAVE_CUDA) || defined(__CUDACC__)
#define STRATA_CUDA_ENABLED 1
#else
#define STRATA_CUDA_ENABLED 0
#endif

namespace strata::cuda {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;           // "NVIDIA H200"
  int major = 0, minor = 0;   // compute capability
  uint64_t total_memory = 0;  // bytes
  uint64_t free_memory = 0;   // bytes free when queried (0 if the query failed)
  int multiprocessors = 0;
  int memory_bus_width = 0;  // bits
  int pci_domain = 0, pci_bus = 0, pci_device = 0;
  bool unified_addressing = false;       // pinned host memory is addressable from the device
  bool concurrent_copy_compute = false;  // async engines > 0: copies overlap kernels
  int async_engines = 0;                 // copy engines (2: H2D and D2H run at once)
};

// True when this build contains the CUDA code (says nothing about a device).
constexpr bool cuda_compiled() { return STRATA_CUDA_ENABLED != 0; }

#if STRATA_CUDA_ENABLED

// Ok when a driver and at least one device are there; Unavailable with the
// reason otherwise (see the top of this file). Probed once, then cached.
Status cuda_available();

// Every visible device; Unavailable as cuda_available().
Result<std::vector<CudaDeviceInfo>> cuda_devices();

// Driver and runtime versions as CUDA encodes them (13000 = 13.0); the
// driver's is 0 without a driver.
int cuda_runtime_version();
int cuda_driver_version();

#else

inline constexpr const char* kCudaNotCompiled =
    "not compiled with CUDA (nvcc was not found when strata was built, or STRATA_WITH_CUDA=OFF)";

// Unavailable "<what>: not compiled with CUDA (...)".
inline Status cuda_not_compiled(const char* what) {
  return Status(StatusCode::kUnavailable, std::string(what) + ": " + kCudaNotCompiled);
}

inline Status cuda_available() { return Status(StatusCode::kUnavailable, kCudaNotCompiled); }
inline Result<std::vector<CudaDeviceInfo>> cuda_devices() {
  return cuda_not_compiled("cuda_devices");
}
inline int cuda_runtime_version() { return 0; }
inline int cuda_driver_version() { return 0; }

#endif

}  // namespace strata::cuda
