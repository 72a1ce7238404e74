#include "torch/convert.h"

#include <map>
#include <memory>

#include <strata/kernels/thread_pool.h>

namespace strata::pybind {

void register_exceptions(py::module_& m) {
  static py::exception<StrataError> strata_error(m, "StrataError", PyExc_RuntimeError);
  static py::exception<ConfigError> config_error(m, "ConfigError", PyExc_ValueError);
  static py::exception<StrataIOError> io_error(m, "StrataIOError", PyExc_OSError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) {
        std::rethrow_exception(p);
      }
    } catch (const StrataIOError& e) {
      // OSError(errno, message) so that .errno works.
      py::object cls = io_error;
      PyErr_SetObject(cls.ptr(), py::make_tuple(e.errno_, e.what()).ptr());
    } catch (const ConfigError& e) {
      config_error(e.what());
    } catch (const StrataError& e) {
      strata_error(e.what());
    }
  });
}

void throw_status(const Status& st) {
  switch (st.code()) {
    case StatusCode::kInvalidArgument:
      throw ConfigError(st.message());
    case StatusCode::kIoError:
    case StatusCode::kNoSpace:
    case StatusCode::kCorruption:
    case StatusCode::kNotFound:
    case StatusCode::kPermissionDenied:
      if (st.sys_errno() == 0 && st.code() == StatusCode::kNotFound) {
        throw ConfigError(
            st.message());  // a named thing that does not exist (a NUMA node): a setting to fix
      }
      if (st.sys_errno() == 0 && st.code() == StatusCode::kPermissionDenied) {
        throw StrataError(st.to_string());  // e.g. memlock: not an OSError without errno
      }
      throw StrataIOError(st.to_string(), st.sys_errno() ? st.sys_errno() : EIO);
    default:
      throw StrataError(st.to_string());
  }
}

kernels::DType dtype_from_name(const std::string& name) {
  if (name == "float32" || name == "fp32" || name == "torch.float32") return kernels::DType::kF32;
  if (name == "bfloat16" || name == "bf16" || name == "torch.bfloat16")
    return kernels::DType::kBF16;
  if (name == "float16" || name == "fp16" || name == "torch.float16") return kernels::DType::kF16;
  throw ConfigError("unsupported dtype " + name + " (float32, bfloat16, float16)");
}

kernels::OptimizerHyper hyper_from_dict(const py::dict& d) {
  kernels::OptimizerHyper h;
  auto get = [&](const char* k, auto fallback) {
    using T = decltype(fallback);
    return d.contains(k) && !d[k].is_none() ? d[k].cast<T>() : fallback;
  };
  std::string kind = get("kind", std::string("adamw"));
  static const std::map<std::string, kernels::OptimizerKind> kinds = {
      {"adam", kernels::OptimizerKind::kAdam},
      {"adamw", kernels::OptimizerKind::kAdamW},
      {"sgd", kernels::OptimizerKind::kSgd},
      {"adagrad", kernels::OptimizerKind::kAdagrad}};
  auto it = kinds.find(kind);
  if (it == kinds.end()) {
    throw ConfigError("unknown optimizer kind " + kind + " (adam, adamw, sgd, adagrad)");
  }
  h.kind = it->second;
  h.lr = get("lr", h.lr);
  if (d.contains("betas") && !d["betas"].is_none()) {
    auto b = d["betas"].cast<std::pair<double, double>>();
    h.beta1 = b.first;
    h.beta2 = b.second;
  }
  h.eps = get("eps", h.eps);
  h.weight_decay = get("weight_decay", h.weight_decay);
  h.bias_correction = get("bias_correction", h.bias_correction);
  h.amsgrad = get("amsgrad", h.amsgrad);
  h.momentum = get("momentum", h.momentum);
  h.dampening = get("dampening", h.dampening);
  h.nesterov = get("nesterov", h.nesterov);
  h.lr_decay = get("lr_decay", h.lr_decay);
  h.initial_accumulator_value = get("initial_accumulator_value", h.initial_accumulator_value);
  check(kernels::validate_hyper(h));
  return h;
}

Config config_from_text(const std::string& text, bool check_paths, int world_size) {
  ParseOptions o;
  o.check_paths = check_paths;
  o.world_size = world_size;
  return unwrap(Config::parse_text(text, "config", o));
}

Config parse_config_handle(const std::string& text, const std::string& auto_values, int world_size,
                           bool check_paths, const std::string& name) {
  ParseOptions o;
  o.check_paths = check_paths;
  o.auto_values = nlohmann::json::parse(auto_values, nullptr, false);
  if (o.auto_values.is_discarded()) {
    throw ConfigError("auto_values is not valid JSON");
  }
  o.world_size = world_size;
  return unwrap(Config::parse_text(text, name, o));
}

py::tuple parse_config_py(const std::string& text, const std::string& auto_values, int world_size,
                          bool check_paths, const std::string& name) {
  Config c = parse_config_handle(text, auto_values, world_size, check_paths, name);
  return py::make_tuple(c.json().dump(), c.warnings());
}

py::list config_schema_py() {
  py::list out;
  for (const auto& k : config_schema()) {
    py::dict d;
    d["path"] = k.path;
    d["type"] = key_type_name(k.type);
    d["default"] = k.default_value.is_null() ? py::none() : py::cast(k.default_value.dump());
    d["description"] = k.description;
    d["allowed"] = k.allowed;
    d["min"] = k.min ? py::cast(*k.min) : py::none();
    d["max"] = k.max ? py::cast(*k.max) : py::none();
    d["allow_auto"] = k.allow_auto;
    d["support"] = k.support == KeySupport::kHonoured          ? "honoured"
                   : k.support == KeySupport::kAcceptedIgnored ? "accepted-ignored"
                                                               : "deprecated-alias";
    d["alias_of"] = k.alias_of;
    d["note"] = k.note;
    out.append(d);
  }
  return out;
}

static kernels::Isa isa_from_name(const std::string& s) {
  if (s == "auto") return kernels::Isa::kAuto;
  if (s == "scalar") return kernels::Isa::kScalar;
  if (s == "avx2") return kernels::Isa::kAvx2;
  if (s == "avx512") return kernels::Isa::kAvx512;
  throw ConfigError("unknown isa " + s + " (auto, scalar, avx2, avx512)");
}

void optimizer_step_py(const py::dict& hyper, int64_t step, float grad_mul, const py::list& slots,
                       size_t n, uintptr_t grad, const std::string& grad_dtype,
                       const py::list& copy_out, const std::string& param_dtype, unsigned threads,
                       const std::string& isa) {
  kernels::OptimizerHyper h = hyper_from_dict(hyper);
  kernels::StateView v;
  v.n = n;
  if (slots.size() > 4) {
    throw ConfigError("at most 4 state slots");
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    v.slot[i] = reinterpret_cast<float*>(slots[i].cast<uintptr_t>());
  }
  std::vector<kernels::CopyOut> outs;
  for (const auto& c : copy_out) {
    auto t = c.cast<py::tuple>();
    outs.push_back({t[0].cast<size_t>(), t[1].cast<size_t>(),
                    reinterpret_cast<void*>(t[2].cast<uintptr_t>())});
  }
  kernels::StepArgs a;
  a.step = step;
  a.grad_mul = grad_mul;
  auto gd = dtype_from_name(grad_dtype);
  auto pd = dtype_from_name(param_dtype);
  auto is = isa_from_name(isa);
  Status st;
  {
    py::gil_scoped_release release;
    // A pool per call keeps the entry point stateless; tests and benches
    // that care about thread start-up use the C++ bench instead.
    std::unique_ptr<kernels::ThreadPool> pool;
    if (threads != 1) {
      pool = std::make_unique<kernels::ThreadPool>(threads);
    }
    st = kernels::optimizer_step(h, a, v, reinterpret_cast<const void*>(grad), gd, outs, pd,
                                 pool.get(), is);
  }
  check(st);
}

py::tuple grad_stats_py(uintptr_t grad, const std::string& dtype, size_t n, unsigned threads) {
  auto d = dtype_from_name(dtype);
  kernels::GradStats g;
  {
    py::gil_scoped_release release;
    std::unique_ptr<kernels::ThreadPool> pool;
    if (threads != 1) {
      pool = std::make_unique<kernels::ThreadPool>(threads);
    }
    g = kernels::grad_stats(reinterpret_cast<const void*>(grad), d, n, pool.get());
  }
  return py::make_tuple(g.sum_sq, g.nonfinite);
}

Config config_arg(const py::object& config) {
  if (py::isinstance<Config>(config)) {
    return config.cast<Config>();
  }
  return config_from_text(config.cast<std::string>(), /*check_paths=*/false);
}

engine::PlanParam plan_param_from(const py::handle& item) {
  auto t = item.cast<py::tuple>();
  return {t[0].cast<int64_t>(), dtype_from_name(t[1].cast<std::string>()), t[2].cast<int>(),
          t.size() > 3 && t[3].cast<bool>()};
}

py::tuple build_plan_py(const py::object& config, const py::list& params,
                        const std::vector<int>& slots, bool gpu_available, uint64_t mem_available) {
  const Config c = config_arg(config);
  engine::PlanInputs in;
  for (const auto& p : params) {
    in.params.push_back(plan_param_from(p));
  }
  in.slots = slots;
  in.gpu_available = gpu_available;
  in.mem_available = mem_available;
  engine::Plan plan = unwrap(engine::build_plan(c, in));
  return py::make_tuple(plan.to_string(), plan.to_json().dump());
}

py::list subgroups_py(engine::Engine& e) {
  py::list out;
  for (const auto& sg : e.subgroups()) {
    py::dict d;
    d["id"] = sg.id;
    d["group"] = sg.group;
    d["dtype"] = kernels::dtype_name(sg.dtype);
    d["grad_dtype"] = kernels::dtype_name(sg.grad_dtype);
    d["update"] = e.gpu_updated(sg.id) ? "gpu" : "cpu";
    d["numel"] = sg.numel;
    d["record_bytes"] = sg.record_bytes;
    py::list slot_dtypes;  // how each state slot is stored (master first)
    for (int k = 0; k < e.param_slots(sg.segments.front().param); ++k) {
      slot_dtypes.append(kernels::slot_dtype_name(sg.slot_dtype[size_t(k)]));
    }
    d["slot_dtypes"] = slot_dtypes;
    d["grad_offset"] = sg.grad_offset;
    d["tier"] = tiers::tier_name(sg.tier);
    py::list segs;
    for (const auto& s : sg.segments) {
      segs.append(py::make_tuple(s.param, s.param_offset, s.offset, s.numel));
    }
    d["segments"] = segs;
    out.append(d);
  }
  return out;
}

py::dict stats_py(engine::Engine& e) {
  auto s = e.stats();
  py::dict d;
  d["steps"] = s.steps;
  d["bytes_fetched"] = s.bytes_fetched;
  d["bytes_prefetched_unused"] = s.bytes_prefetched_unused;
  d["records_verified_in_backward"] = s.records_verified_in_backward;
  d["bytes_stored"] = s.bytes_stored;
  d["io_bytes_read"] = s.io_bytes_read;
  d["io_bytes_written"] = s.io_bytes_written;
  d["registered_buffers"] = s.registered_buffers;
  d["unregistered_buffers"] = s.unregistered_buffers;
  d["pool_reserved"] = s.pool_reserved;
  d["pool_requested"] = s.pool_requested;
  d["pool_peak"] = s.pool_peak;
  d["pool_pinned"] = s.pool_pinned;
  d["swap_file_bytes"] = s.swap_file_bytes;
  d["swap_file_path"] = s.swap_file_path;
  d["io_backend"] = s.io_backend;
  d["io_note"] = s.io_note;
  d["isa"] = s.isa;
  d["threads"] = s.threads;
  return d;
}

}  // namespace strata::pybind
