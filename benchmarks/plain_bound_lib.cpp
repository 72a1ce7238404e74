// libstrata_plain_bound.so: the independent memory bound (common/plain_bound.h)
// behind a C ABI, so benchmarks/bench_cpu_adam.py can run it in the same
// rounds as strata's kernel and DeepSpeed's cpu_adam (through ctypes).
//
// Ownership: strata_plain_bound_new returns a Bound the caller frees with
// strata_plain_bound_free (its arrays and threads go with it). Units: n in
// elements, bytes per element for the gradient, copy-out and moments, seconds
// from strata_plain_bound_run. Thread-safety: one call at a time per Bound.
// Links nothing of strata's core.
#include <cstddef>
#include <new>

#include "common/plain_bound.h"

using strata::bench::plain::Bound;

extern "C" {

// rw fp32 state arrays read and written (3 for Adam: master, m, v);
// grad_bytes 4 or 2; out_bytes 0, 2 or 4; moment_bytes 4 (all fp32), 2 or 1;
// huge != 0: 2 MiB-aligned arrays advised MADV_HUGEPAGE. nullptr on bad input.
__attribute__((visibility("default"))) void* strata_plain_bound_new(size_t n, int rw,
                                                                    int grad_bytes, int out_bytes,
                                                                    unsigned threads, int huge,
                                                                    int moment_bytes) {
  if (n == 0 || rw < 1 || rw > 4 || (grad_bytes != 2 && grad_bytes != 4) ||
      (out_bytes != 0 && out_bytes != 2 && out_bytes != 4) ||
      (moment_bytes != 1 && moment_bytes != 2 && moment_bytes != 4)) {
    return nullptr;
  }
  return new (std::nothrow) Bound(n, rw, grad_bytes, out_bytes, threads, huge != 0, moment_bytes);
}

// One pass over all n elements on every thread; wall seconds.
__attribute__((visibility("default"))) double strata_plain_bound_run(void* bound) {
  return static_cast<Bound*>(bound)->run_seconds();
}

// The vector ISA the loop was compiled for ("avx512", "avx2", "sse2").
__attribute__((visibility("default"))) const char* strata_plain_bound_isa(void* bound) {
  return static_cast<Bound*>(bound)->isa();
}

__attribute__((visibility("default"))) void strata_plain_bound_free(void* bound) {
  delete static_cast<Bound*>(bound);
}

}  // extern "C"
