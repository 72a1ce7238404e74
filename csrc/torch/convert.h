// Private helpers of the binding: Status → Python exceptions, dicts → structs.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include <strata/config.h>
#include <strata/engine/engine.h>
#include <strata/kernels/optimizer.h>
#include <strata/status.h>

namespace strata::pybind {

namespace py = pybind11;

struct StrataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct StrataIOError : std::runtime_error {
  StrataIOError(const std::string& msg, int err) : std::runtime_error(msg), errno_(err) {}
  int errno_;
};

void register_exceptions(py::module_& m);
[[noreturn]] void throw_status(const Status& st);
// Delivers the core's log messages queued by worker threads (log_sink.cpp);
// a no-op unless this thread holds the GIL.
void flush_log();
inline void check(const Status& st) {
  flush_log();  // what the core said before a failure comes before the exception
  if (!st.ok()) {
    throw_status(st);
  }
}
template <typename T>
T unwrap(Result<T>&& r) {
  flush_log();
  if (!r.ok()) {
    throw_status(r.status());
  }
  return std::move(r).value();
}

kernels::DType dtype_from_name(const std::string& name);
kernels::OptimizerHyper hyper_from_dict(const py::dict& d);
Config config_from_text(const std::string& text, bool check_paths = true, int world_size = 1);

Config parse_config_handle(const std::string& text, const std::string& auto_values, int world_size,
                           bool check_paths, const std::string& name);
py::tuple parse_config_py(const std::string& text, const std::string& auto_values, int world_size,
                          bool check_paths, const std::string& name);
py::list config_schema_py();
void optimizer_step_py(const py::dict& hyper, int64_t step, float grad_mul, const py::list& slots,
                       size_t n, uintptr_t grad, const std::string& grad_dtype,
                       const py::list& copy_out, const std::string& param_dtype, unsigned threads,
                       const std::string& isa);
py::tuple grad_stats_py(uintptr_t grad, const std::string& dtype, size_t n, unsigned threads);
// A Config handle (strata._C.Config) as is, or JSON text parsed without the
// path checks (tools that inspect a config meant for another machine).
Config config_arg(const py::object& config);
// A parameter of a plan given without a model: (numel, dtype, group[, host_copy]).
engine::PlanParam plan_param_from(const py::handle& item);
py::tuple build_plan_py(const py::object& config, const py::list& params,
                        const std::vector<int>& slots, bool gpu_available, uint64_t mem_available);
py::list subgroups_py(engine::Engine& e);
py::dict stats_py(engine::Engine& e);

}  // namespace strata::pybind
