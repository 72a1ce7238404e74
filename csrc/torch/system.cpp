// strata._C.system_info(): what this machine offers strata, for
// `python -m strata info`; the platform calls Python would otherwise make
// through ctypes (rename_exchange, bind_to_numa_node); and the one count of
// usable CPUs (usable_cpus, backward_update_threads).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include <strata/io/checksum.h>
#include <strata/io/probe.h>
#include <strata/kernels/optimizer.h>
#include <strata/platform/affinity.h>
#include <strata/platform/fs.h>
#include <strata/platform/meminfo.h>
#include <strata/platform/memlock.h>
#include <strata/platform/topology.h>
#include <strata/platform/vm.h>

#include "torch/convert.h"

namespace strata::pybind {

namespace py = pybind11;

static py::dict system_info(const std::string& swap_dir) {
  py::dict d;
  auto u = io::probe_uring();
  d["io_uring_compiled"] = u.compiled;
  d["io_uring_available"] = u.available;
  d["io_uring_reason"] = u.reason;
  if (!swap_dir.empty()) {
    auto r = io::probe_direct_io(swap_dir);
    d["direct_io_path"] = swap_dir;
    if (r.ok()) {
      d["direct_io"] = r.value();
      d["direct_io_error"] = "";
    } else {
      d["direct_io"] = py::none();
      d["direct_io_error"] = r.status().to_string();
    }
  }
  auto topo = platform::read_topology();
  py::list nodes;
  if (topo.ok()) {
    for (const auto& n : topo.value()) {
      py::dict nd;
      nd["id"] = n.id;
      nd["cpus"] = n.cpus;
      nd["mem_total_bytes"] = n.mem_total_bytes;
      nd["mem_free_bytes"] = n.mem_free_bytes;
      nd["distances"] = n.distances;
      nd["cpu_less"] = n.cpu_less;
      nodes.append(nd);
    }
    d["numa_text"] = platform::describe_topology(topo.value());
    d["cxl_nodes"] = platform::cpu_less_nodes(topo.value());
  } else {
    d["numa_text"] = topo.status().to_string();
    d["cxl_nodes"] = std::vector<int>{};
  }
  d["numa_nodes"] = nodes;
  auto ml = platform::memlock_limit();
  d["memlock_soft"] = ml.soft;
  d["memlock_hard"] = ml.hard;
  d["memlock_unlimited"] = ml.unlimited;
  d["cap_ipc_lock"] = ml.cap_ipc_lock;
  auto ma = platform::mem_available_bytes();
  d["mem_available"] = ma.ok() ? ma.value() : 0;
  auto mt = platform::mem_total_bytes();
  d["mem_total"] = mt.ok() ? mt.value() : 0;
  d["simd"] = kernels::isa_name(kernels::detect_isa());
  d["checksum_isa"] = io::hash_isa_name(io::hash_isa());
  d["cpus"] = std::thread::hardware_concurrency();
#ifdef STRATA_HAVE_CUDA
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  return d;
}

// True when swapped, False when the kernel or file system cannot exchange
// (the caller renames twice instead); any other failure is an OSError with
// its errno, as os.rename raises.
static bool rename_exchange_py(const std::string& a, const std::string& b) {
  Status st = platform::rename_exchange(a, b);
  if (st.ok()) {
    return true;
  }
  if (st.code() == StatusCode::kUnavailable) {
    return false;
  }
  throw StrataIOError(st.to_string(), st.sys_errno() ? st.sys_errno() : EIO);
}

static void reset_memory_policy_py() {
  if (int r = platform::set_thread_policy(platform::MemPolicy::kDefault, {}); r != 0) {
    check(Status::from_errno(r, "set_mempolicy MPOL_DEFAULT"));
  }
}

void bind_system(py::module_& m) {
  m.def("system_info", &system_info, py::arg("swap_dir") = "",
        "io_uring, O_DIRECT on swap_dir, NUMA/CXL nodes, memlock, SIMD, memory.");
  m.def("format_bytes", [](uint64_t b) { return platform::format_bytes(b); });
  m.def("rename_exchange", &rename_exchange_py, py::arg("a"), py::arg("b"),
        "Swap two paths atomically (renameat2 RENAME_EXCHANGE). True when swapped, False when "
        "the kernel or file system cannot (ENOSYS, EINVAL, EOPNOTSUPP); OSError otherwise.");
  m.def(
      "bind_to_numa_node",
      [](int node, const std::string& sysfs_root) {
        check(platform::bind_to_numa_node(node, sysfs_root));
      },
      py::arg("node"), py::arg("sysfs_root") = platform::kDefaultSysfsNodeRoot,
      "Run the calling thread on the CPUs of NUMA node `node` (<sysfs_root>/node<N>/cpulist) and "
      "prefer that node for its new memory; threads it starts later inherit both. Raises "
      "ValueError (ConfigError) for a node without CPUs, StrataError/OSError when refused.");
  m.def("usable_cpus", &platform::usable_cpus,
        "CPUs in the calling thread's affinity mask (the online CPUs if unreadable), at least 1.");
  m.def("backward_update_threads", &platform::backward_update_threads, py::arg("compute_threads"),
        "Update threads while backward runs: max(1, usable_cpus() - compute_threads), "
        "compute_threads being torch.get_num_threads().");
  m.def("reset_memory_policy", &reset_memory_policy_py,
        "The default memory policy (local allocation) for the calling thread: undoes the memory "
        "half of bind_to_numa_node.");
}

}  // namespace strata::pybind
