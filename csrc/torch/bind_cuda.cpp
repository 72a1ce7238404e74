// strata._C's CUDA entry points, for gpu_check.py, tests and the engine's
// Python side. Device memory crosses as integer addresses (tensor.data_ptr()),
// like host memory elsewhere in this module; streams as integers
// (torch.cuda.current_stream().cuda_stream, 0 = the legacy default stream).
//
// Compiled in every build: without CUDA (not compiled in, no driver, no
// device) cuda_available()/cuda_info() answer, and every other function
// raises StrataError("CUDA not available: <reason>").
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include <strata/cuda/adam.h>
#include <strata/cuda/device.h>
#include <strata/cuda/gpu_updater.h>

#include "torch/convert.h"

namespace strata::pybind {

namespace py = pybind11;

namespace {

void require_cuda() {
  const Status st = cuda::cuda_available();
  if (!st.ok()) {
    throw StrataError("CUDA not available: " + st.message());
  }
}

cuda::ElemType elem_from_name(const std::string& name) {
  return cuda::elem_type(dtype_from_name(name));
}

std::vector<cuda::CopyOutRange> copy_out_from_list(const py::list& list) {
  std::vector<cuda::CopyOutRange> out;
  for (const auto& item : list) {
    auto t = item.cast<py::tuple>();
    if (t.size() != 3) {
      throw ConfigError("copy_out entries are (offset, n, dst_address)");
    }
    out.push_back({t[0].cast<size_t>(), t[1].cast<size_t>(),
                   reinterpret_cast<void*>(t[2].cast<uintptr_t>())});
  }
  return out;
}

void slots_from_list(const py::list& slots, float** out) {
  if (slots.size() < 3 || slots.size() > 4) {
    throw ConfigError("Adam needs 3 state slots (master, m, v), 4 with amsgrad; got " +
                      std::to_string(slots.size()));
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    out[i] = reinterpret_cast<float*>(slots[i].cast<uintptr_t>());
  }
}

cuda::AdamStepConsts consts_from(const py::dict& hyper, int64_t step, float grad_mul) {
  kernels::OptimizerHyper h = hyper_from_dict(hyper);
  return unwrap(cuda::adam_step_consts(h, kernels::StepArgs{step, grad_mul}));
}

py::dict device_dict(const cuda::CudaDeviceInfo& d) {
  py::dict o;
  o["index"] = d.index;
  o["name"] = d.name;
  o["capability"] = py::make_tuple(d.major, d.minor);
  o["total_memory"] = d.total_memory;
  o["multiprocessors"] = d.multiprocessors;
  o["memory_bus_width"] = d.memory_bus_width;
  o["pci"] = py::make_tuple(d.pci_domain, d.pci_bus, d.pci_device);
  o["async_engines"] = d.async_engines;
  return o;
}

class PyCudaUpdater {
 public:
  PyCudaUpdater(size_t max_elements, bool amsgrad, int buffers, const std::string& max_grad_dtype,
                size_t max_copy_out, int device) {
    require_cuda();
    cuda::GpuUpdaterOptions o;
    o.device = device;
    o.max_elements = max_elements;
    o.amsgrad = amsgrad;
    o.buffers = buffers;
    o.max_grad_type = elem_from_name(max_grad_dtype);
    o.max_copy_out = max_copy_out;
    auto r = [&] {
      py::gil_scoped_release release;
      return cuda::GpuUpdater::create(o);
    }();
    updater_ = unwrap(std::move(r));
  }

  uint64_t submit(const py::dict& hyper, int64_t step, float grad_mul, const py::list& slots,
                  size_t n, uintptr_t grad, const std::string& grad_dtype, const py::list& copy_out,
                  const std::string& param_dtype, bool grad_on_device, uintptr_t after_stream) {
    cuda::GpuJob job;
    job.consts = consts_from(hyper, step, grad_mul);
    slots_from_list(slots, job.host_slot);
    job.n = n;
    job.grad = reinterpret_cast<const void*>(grad);
    job.grad_type = elem_from_name(grad_dtype);
    job.grad_on_device = grad_on_device;
    const auto ranges = copy_out_from_list(copy_out);
    job.copy_out = ranges.data();
    job.copy_out_count = ranges.size();
    job.param_type = elem_from_name(param_dtype);
    job.after_stream = reinterpret_cast<void*>(after_stream);
    auto r = [&] {
      py::gil_scoped_release release;
      return u().submit(job);
    }();
    return unwrap(std::move(r));
  }

  void wait(uint64_t t) {
    Status st;
    {
      py::gil_scoped_release release;
      st = u().wait(t);
    }
    check(st);
  }

  void wait_all() {
    Status st;
    {
      py::gil_scoped_release release;
      st = u().wait_all();
    }
    check(st);
  }

  bool done(uint64_t t) { return unwrap(u().done(t)); }
  void stream_wait(uint64_t t, uintptr_t stream) {
    check(u().stream_wait(t, reinterpret_cast<void*>(stream)));
  }

  py::dict job_times(uint64_t t) {
    auto r = [&] {
      py::gil_scoped_release release;
      return u().job_times(t);
    }();
    const cuda::GpuJobTimes jt = unwrap(std::move(r));
    py::dict d;
    d["h2d_ms"] = jt.h2d_ms;
    d["kernel_ms"] = jt.kernel_ms;
    d["d2h_ms"] = jt.d2h_ms;
    d["total_ms"] = jt.total_ms;
    return d;
  }

  py::dict stats() {
    const cuda::GpuUpdaterStats s = u().stats();
    py::dict d;
    d["jobs"] = s.jobs;
    d["elements"] = s.elements;
    d["bytes_h2d"] = s.bytes_h2d;
    d["bytes_d2h"] = s.bytes_d2h;
    d["device_bytes"] = s.device_bytes;
    return d;
  }

  void close() {
    py::gil_scoped_release release;
    updater_.reset();  // waits for in-flight jobs
  }

 private:
  cuda::GpuUpdater& u() {
    if (!updater_) {
      throw StrataError("the CUDA updater is closed");
    }
    return *updater_;
  }
  std::unique_ptr<cuda::GpuUpdater> updater_;
};

}  // namespace

void bind_cuda(py::module_& m) {
  m.def(
      "cuda_available",
      [] {
        const Status st = cuda::cuda_available();
        return py::make_tuple(st.ok(), st.ok() ? std::string() : st.message());
      },
      "(True, '') when a CUDA device is usable, else (False, reason).");

  m.def(
      "cuda_info",
      [] {
        py::dict d;
        const Status st = cuda::cuda_available();
        d["compiled"] = cuda::cuda_compiled();
        d["available"] = st.ok();
        d["reason"] = st.ok() ? std::string() : st.message();
        d["runtime_version"] = cuda::cuda_runtime_version();
        d["driver_version"] = cuda::cuda_driver_version();
        py::list devs;
        if (st.ok()) {
          auto r = cuda::cuda_devices();
          if (r.ok()) {
            for (const auto& dev : r.value()) {
              devs.append(device_dict(dev));
            }
          }
        }
        d["devices"] = devs;
        return d;
      },
      "What strata's CUDA code sees: compiled in, usable, why not, versions, devices. Never "
      "raises.");

  m.def(
      "cuda_devices",
      [] {
        require_cuda();
        py::list out;
        for (const auto& d : unwrap(cuda::cuda_devices())) {
          out.append(device_dict(d));
        }
        return out;
      },
      "Visible CUDA devices (raises StrataError without CUDA).");

  m.def(
      "cuda_adam_step",
      [](const py::dict& hyper, int64_t step, float grad_mul, const py::list& slots, size_t n,
         uintptr_t grad, const std::string& grad_dtype, const py::list& copy_out,
         const std::string& param_dtype, uintptr_t stream, bool synchronize) {
        require_cuda();
        cuda::DeviceAdamArgs a;
        a.consts = consts_from(hyper, step, grad_mul);
        slots_from_list(slots, a.slot);
        a.n = n;
        a.grad = reinterpret_cast<const void*>(grad);
        a.grad_type = elem_from_name(grad_dtype);
        const auto ranges = copy_out_from_list(copy_out);
        a.copy_out = ranges.data();
        a.copy_out_count = ranges.size();
        a.param_type = elem_from_name(param_dtype);
        Status st;
        {
          py::gil_scoped_release release;
          st = cuda::adam_step_device(a, reinterpret_cast<void*>(stream), synchronize);
        }
        check(st);
      },
      py::arg("hyper"), py::arg("step"), py::arg("grad_mul"), py::arg("slots"), py::arg("n"),
      py::arg("grad"), py::arg("grad_dtype"), py::arg("copy_out"), py::arg("param_dtype"),
      py::arg("stream") = 0, py::arg("synchronize") = true,
      "One Adam/AdamW step on device memory (addresses as ints), the CPU kernel's semantics.");

  m.def(
      "measure_gpu_rates",
      [](size_t copy_bytes, size_t adam_elements, int reps, int device, uintptr_t host) {
        require_cuda();
        cuda::GpuRateOptions o;
        o.device = device;
        o.copy_bytes = copy_bytes;
        o.adam_elements = adam_elements;
        o.reps = reps;
        o.host = reinterpret_cast<void*>(host);
        auto r = [&] {
          py::gil_scoped_release release;
          return cuda::measure_gpu_rates(o);
        }();
        const cuda::GpuRates g = unwrap(std::move(r));
        py::dict d;
        d["device_name"] = g.device_name;
        d["h2d_gbps"] = g.h2d_gbps;
        d["d2h_gbps"] = g.d2h_gbps;
        d["d2d_gbps"] = g.d2d_gbps;
        d["adam_params_per_s"] = g.adam_params_per_s;
        d["adam_gbps"] = g.adam_gbps;
        d["free_memory"] = g.free_memory;
        d["total_memory"] = g.total_memory;
        return d;
      },
      py::arg("copy_bytes") = size_t(256) << 20, py::arg("adam_elements") = size_t(32) << 20,
      py::arg("reps") = 5, py::arg("device") = 0, py::arg("host") = 0,
      "Pinned H2D/D2H, device-to-device and CUDA Adam rates (GB/s, params/s).");

  m.def(
      "install_cuda_pin_backend",
      [] {
        require_cuda();
        check(cuda::install_cuda_pin_backend());
      },
      "Pools created from now on pin their slabs with cudaHostRegister.");

  py::class_<PyCudaUpdater>(m, "CudaUpdater")
      .def(py::init<size_t, bool, int, const std::string&, size_t, int>(), py::arg("max_elements"),
           py::arg("amsgrad") = false, py::arg("buffers") = 2,
           py::arg("max_grad_dtype") = "float32", py::arg("max_copy_out") = 4096,
           py::arg("device") = 0)
      .def("submit", &PyCudaUpdater::submit, py::arg("hyper"), py::arg("step"), py::arg("grad_mul"),
           py::arg("slots"), py::arg("n"), py::arg("grad"), py::arg("grad_dtype"),
           py::arg("copy_out"), py::arg("param_dtype"), py::arg("grad_on_device") = false,
           py::arg("after_stream") = 0,
           "Enqueue one job on host (pinned) state; returns its ticket.")
      .def("wait", &PyCudaUpdater::wait, py::arg("ticket"))
      .def("wait_all", &PyCudaUpdater::wait_all)
      .def("done", &PyCudaUpdater::done, py::arg("ticket"))
      .def("stream_wait", &PyCudaUpdater::stream_wait, py::arg("ticket"), py::arg("stream"))
      .def("job_times", &PyCudaUpdater::job_times, py::arg("ticket"))
      .def("stats", &PyCudaUpdater::stats)
      .def("close", &PyCudaUpdater::close);
}

}  // namespace strata::pybind
