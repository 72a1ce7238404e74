// strata/platform/affinity.h — binding the calling thread to one NUMA node
// (its CPUs and its memory), for one data-parallel rank per node.
//
// Thread-safety: bind_to_numa_node changes the calling thread's CPU affinity
//   and memory policy only; threads it starts afterwards inherit both, other
//   threads keep theirs.
#pragma once

#include <string>

#include <strata/platform/topology.h>
#include <strata/status.h>

namespace strata::platform {

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
