// Usable CPUs and binding a thread to a NUMA node; see strata/platform/affinity.h.
#include <strata/platform/affinity.h>

#include <sched.h>

#include <cerrno>
#include <memory>
#include <thread>

#include <strata/platform/vm.h>

namespace strata::platform {

namespace {

struct CpuSetFree {
  void operator()(cpu_set_t* set) const { CPU_FREE(set); }
};

}  // namespace

unsigned usable_cpus() {
  // Grow the set past cpu_set_t's 1024 CPUs until the kernel's mask fits
  // (sched_getaffinity answers EINVAL while the set is too small).
  for (int count = CPU_SETSIZE; count <= (1 << 20); count *= 2) {
    std::unique_ptr<cpu_set_t, CpuSetFree> set(CPU_ALLOC(count));
    if (!set) {
      break;
    }
    const size_t bytes = CPU_ALLOC_SIZE(count);
    CPU_ZERO_S(bytes, set.get());
    if (sched_getaffinity(0, bytes, set.get()) == 0) {
      const int n = CPU_COUNT_S(bytes, set.get());
      if (n > 0) {
        return unsigned(n);
      }
      break;
    }
    if (errno != EINVAL) {
      break;
    }
  }
  const unsigned online = std::thread::hardware_concurrency();
  return online > 0 ? online : 1u;
}

unsigned backward_update_threads(unsigned compute_threads) {
  const unsigned usable = usable_cpus();
  return usable > compute_threads ? usable - compute_threads : 1u;
}

Status bind_to_numa_node(int node, const std::string& sysfs_root) {
  const std::string what = "NUMA node " + std::to_string(node);
  if (node < 0 || node >= kMaxNumaNodes) {
    return invalid_argument(what + ": not a node id (0.." + std::to_string(kMaxNumaNodes - 1) +
                            ")");
  }
  auto cpus = node_cpus(node, sysfs_root);
  if (!cpus.ok()) {
    if (cpus.status().code() == StatusCode::kNotFound) {
      return Status(StatusCode::kNotFound,
                    what + ": no CPUs to bind to (" + cpus.status().message() + ")");
    }
    return cpus.status().with_context(what);
  }
  if (cpus->empty()) {
    return Status(StatusCode::kNotFound, what + ": no CPUs to bind to (memory-only node)");
  }
  // Sized for the highest CPU, not cpu_set_t's fixed 1024.
  const int count = cpus->back() + 1;  // ascending
  std::unique_ptr<cpu_set_t, CpuSetFree> set(CPU_ALLOC(count));
  if (!set) {
    return Status::from_errno(ENOMEM, what + ": CPU_ALLOC(" + std::to_string(count) + ")");
  }
  const size_t bytes = CPU_ALLOC_SIZE(count);
  CPU_ZERO_S(bytes, set.get());
  for (int cpu : *cpus) {
    CPU_SET_S(cpu, bytes, set.get());
  }
  if (sched_setaffinity(0, bytes, set.get()) != 0) {
    const int err = errno;
    return Status::from_errno(err, what + ": sched_setaffinity to CPUs " + format_cpulist(*cpus));
  }
  const int nodes[] = {node};
  if (int r = set_thread_policy(MemPolicy::kPreferred, nodes); r != 0) {
    return Status::from_errno(r, what + ": CPUs bound, set_mempolicy MPOL_PREFERRED");
  }
  return Status::Ok();
}

}  // namespace strata::platform
