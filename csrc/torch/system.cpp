// strata._C.system_info(): what this machine offers strata, for
// `python -m strata info`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include <strata/io/probe.h>
#include <strata/kernels/optimizer.h>
#include <strata/platform/meminfo.h>
#include <strata/platform/memlock.h>
#include <strata/platform/topology.h>

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
  d["cpus"] = std::thread::hardware_concurrency();
#ifdef STRATA_HAVE_CUDA
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  return d;
}

void bind_system(py::module_& m) {
  m.def("system_info", &system_info, py::arg("swap_dir") = "",
        "io_uring, O_DIRECT on swap_dir, NUMA/CXL nodes, memlock, SIMD, memory.");
  m.def("format_bytes", [](uint64_t b) { return platform::format_bytes(b); });
}

}  // namespace strata::pybind
