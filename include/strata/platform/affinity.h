// strata/platform/affinity.h — the CPUs this process may run on, how many of
// them the optimizer's update threads get while backward runs, and binding the
// calling thread to one NUMA node (its CPUs and its memory), for one
// data-parallel rank per node.
//
// Units: counts of CPUs (logical CPUs, as sched_getaffinity counts them).
// Thread-safety: usable_cpus and backward_update_threads read the calling
//   thread's affinity mask and nothing else. bind_to_numa_node changes the
//   calling thread's CPU affinity and memory policy only; threads it starts
//   afterwards inherit both, other threads keep theirs.
#pragma once

#include <string>

#include <strata/platform/topology.h>
#include <strata/status.h>

namespace strata::platform {

// CPUs in the calling thread's affinity mask (sched_getaffinity: what taskset,
// cgroup cpusets and bind_to_numa_node leave it), at least 1; the online CPU
// count (std::thread::hardware_concurrency) when the mask cannot be read. The
// one count of "cores" in strata: the kernel pool's default size, prefault's
// cap, and the base of backward_update_threads.
unsigned usable_cpus();

// Update threads while backward runs: the usable CPUs that torch's intra-op
// threads (`compute_threads`, torch.get_num_threads()) leave free, at least 1:
// max(1, usable_cpus() - compute_threads).
unsigned backward_update_threads(unsigned compute_threads);

// Runs the calling thread on the CPUs of NUMA node `node` (sched_setaffinity)
// and makes it prefer that node for the pages it faults in from now on
// (vm.h's set_thread_policy(kPreferred): set_mempolicy through the raw
// syscall, with or without libnuma). Threads started afterwards inherit
// both: the engine's update threads run there, and the pinned pool,
// pre-faulted by this thread, lands there. The CPUs are those of
// <sysfs_root>/node<N>/cpulist. set_thread_policy(MemPolicy::kDefault, {})
// undoes the memory half.
// Errors, each naming the node:
//   InvalidArgument: `node` outside [0, kMaxNumaNodes);
//   NotFound: "NUMA node 5: no CPUs to bind to (...)" when the cpulist is
//     missing or empty (a memory-only node); nothing changed;
//   sched_setaffinity's errno Status ("NUMA node 0: sched_setaffinity to
//     CPUs 0-3: ..."); nothing changed;
//   set_mempolicy's errno Status ("NUMA node 0: CPUs bound, set_mempolicy
//     MPOL_PREFERRED: ..."; Unavailable with ENOSYS on a kernel without
//     CONFIG_NUMA); the CPU binding stays.
[[nodiscard]] Status bind_to_numa_node(int node,
                                       const std::string& sysfs_root = kDefaultSysfsNodeRoot);

}  // namespace strata::platform
