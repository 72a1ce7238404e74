// strata._C — the one Python binding.
//
// Tensors cross this boundary as (address, numel, dtype) triples that
// python/strata checks (contiguous, CPU, dtype) before calling in; they become
// spans here and nowhere else. The module includes no torch header, so it does
// not depend on the ABI of the torch it runs beside. Status errors become
// Python exceptions: ConfigError (ValueError), StrataIOError (OSError),
// StrataError (RuntimeError). Long calls release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <thread>

#include <strata/config.h>
#include <strata/engine/engine.h>
#include <strata/engine/plan.h>
#include <strata/kernels/optimizer.h>
#include <strata/kernels/thread_pool.h>

#include "torch/convert.h"
#include "torch/param_store_py.h"

namespace py = pybind11;
using namespace strata;

namespace strata::pybind {

void bind_system(py::module_& m);
void bind_model(py::module_& m);
void bind_cuda(py::module_& m);
void bind_log(py::module_& m);
void bind_shard(py::module_& m);
void bind_checksum(py::module_& m);
void bind_param_store(py::module_& m);

namespace {

struct EngineHolder {
  std::shared_ptr<tiers::ParamStore> param_store;  // declared first: outlives the engine
  std::unique_ptr<engine::Engine> engine;
};

// A writable byte view of an engine-owned buffer; keeps the engine alive.
struct HostBuffer {
  std::shared_ptr<EngineHolder> owner;
  void* data;
  size_t bytes;
};

class PyEngine;
void walk_records(PyEngine& s, const py::function& fn, const py::object& params, bool write,
                  bool overwrite);

class PyEngine {
 public:
  // `config` is the handle Python parsed (strata._C.Config): the engine reads
  // its typed fields; nothing is serialised or parsed again here.
  // A parameter whose address (params[i][4]) is None gets a host copy from the
  // engine's pool; `fill_host_copy(i, buffer)` gives it its first values (the
  // buffer is valid during the call only; host_copy(i) returns it for good).
  // params[i][7], when given and not None: the parameter's record in
  // `param_store` (ZeRO stage 3); its address (params[i][4]) is then ignored.
  PyEngine(const Config& config, const py::list& params, const py::list& groups, int rank,
           const std::string& tag, const py::object& progress, const py::object& fill_host_copy,
           const py::object& param_store, bool release_grads) {
    engine::EngineOptions o;
    std::shared_ptr<tiers::ParamStore> store;
    if (!param_store.is_none()) {
      store = param_store.cast<PyParamStore&>().store;
      if (!store) {
        throw StrataError("the param store is closed");
      }
      o.param_store = store.get();
    }
    o.release_grads = release_grads;
    if (!progress.is_none()) {
      // The callable is released with the GIL held, wherever the options die.
      std::shared_ptr<py::object> cb(new py::object(progress), [](py::object* p) {
        py::gil_scoped_acquire gil;
        delete p;
      });
      o.progress = [cb](const char* phase, uint64_t done, uint64_t total) {
        py::gil_scoped_acquire gil;
        try {
          (*cb)(phase, done, total);
        } catch (py::error_already_set& e) {
          e.discard_as_unraisable("strata engine progress callback");
        }
      };
    }
    o.config = config;
    for (const auto& item : params) {
      auto t = item.cast<py::tuple>();
      engine::ParamInfo p;
      p.name = t[0].cast<std::string>();
      p.numel = t[1].cast<int64_t>();
      p.dtype = dtype_from_name(t[2].cast<std::string>());
      p.group = t[3].cast<int>();
      if (t.size() > 7 && !t[7].is_none()) {
        p.store_id = t[7].cast<int64_t>();
      } else if (t[4].is_none()) {
        p.host_copy = true;
      } else {
        p.data = reinterpret_cast<void*>(t[4].cast<uintptr_t>());
      }
      if (t.size() > 5 && !t[5].is_none()) {  // the parameter's device memory (GPU updates)
        p.device_data = reinterpret_cast<void*>(t[5].cast<uintptr_t>());
        p.device = t.size() > 6 ? t[6].cast<int>() : 0;
      }
      o.params.push_back(std::move(p));
    }
    for (const auto& p : o.params) {
      param_bytes_.push_back(size_t(p.numel) * kernels::dtype_size(p.dtype));
    }
    if (!fill_host_copy.is_none()) {
      std::shared_ptr<py::object> cb(new py::object(fill_host_copy), [](py::object* p) {
        py::gil_scoped_acquire gil;
        delete p;
      });
      o.fill_host_copy = [cb, bytes = param_bytes_](size_t i, void* data) -> Status {
        py::gil_scoped_acquire gil;
        try {
          (*cb)(i, HostBuffer{nullptr, data, bytes.at(i)});
        } catch (py::error_already_set& e) {
          return Status(StatusCode::kInternal, std::string("filling a host copy: ") + e.what());
        }
        return Status::Ok();
      };
    }
    for (const auto& g : groups) {
      o.groups.push_back(hyper_from_dict(g.cast<py::dict>()));
    }
    o.rank = rank;
    o.tag = tag;
    auto result = [&] {
      py::gil_scoped_release release;
      return engine::Engine::create(std::move(o));
    }();
    holder_ = std::make_shared<EngineHolder>();
    holder_->param_store = std::move(store);
    holder_->engine = unwrap(std::move(result));
  }

  engine::Engine& e() {
    if (!holder_ || !holder_->engine) {
      throw StrataError("the engine is closed");
    }
    return *holder_->engine;
  }

  py::object host_copy(size_t i) {
    void* data = e().host_copy(i);
    if (data == nullptr) {
      return py::none();
    }
    return py::cast(HostBuffer{holder_, data, param_bytes_.at(i)});
  }

  HostBuffer grad_arena(const std::string& dtype) {
    auto d = dtype_from_name(dtype);
    for (const auto& a : e().grad_arenas()) {
      if (a.dtype == d) {
        return HostBuffer{holder_, a.data, a.numel * kernels::dtype_size(d)};
      }
    }
    throw ConfigError("no gradient arena of dtype " + dtype);
  }

  void step(float grad_mul) {
    Status st;
    {
      py::gil_scoped_release release;
      st = e().step(grad_mul);
    }
    check(st);
  }

  void close() {
    if (holder_ && holder_->engine) {
      Status st;
      {
        py::gil_scoped_release release;
        st = holder_->engine->close();
      }
      holder_->engine.reset();
      holder_->param_store.reset();
      check(st);
    }
  }

  std::shared_ptr<EngineHolder> holder_;
  std::vector<size_t> param_bytes_;  // per parameter: numel * dtype size
};

// The by-record walks for Python: the walk runs without the GIL; each visit
// takes it, hands Python the slices and a memoryview of the record, and a
// Python exception stops the walk and is re-raised as itself afterwards.
void walk_records(PyEngine& s, const py::function& fn, const py::object& params, bool write,
                  bool overwrite) {
  std::vector<size_t> which;
  if (!params.is_none()) {
    for (const auto& p : params) {
      which.push_back(p.cast<size_t>());
    }
    if (which.empty()) {
      return;  // nothing asked for (an empty list is not "all")
    }
  }
  std::unique_ptr<py::error_already_set> raised;
  auto visit = [&](const engine::Engine::RecordView& v) -> Status {
    py::gil_scoped_acquire gil;
    try {
      py::list slices;
      for (const auto& sl : v.slices) {
        slices.append(
            py::make_tuple(sl.param, sl.param_offset, sl.record_offset, sl.numel, v.slot_stride));
      }
      auto mv = py::memoryview::from_memory(
          v.data, py::ssize_t(v.slot_stride * size_t(v.slots) * sizeof(float)), false);
      fn(slices, mv);
      return Status::Ok();
    } catch (py::error_already_set& e) {
      raised = std::make_unique<py::error_already_set>(std::move(e));
      return Status(StatusCode::kAborted, "the Python visitor raised");
    }
  };
  Status st;
  {
    py::gil_scoped_release release;
    st = write ? s.e().write_records(which, overwrite, visit) : s.e().read_records(which, visit);
  }
  if (raised) {
    throw std::move(*raised);
  }
  check(st);
}

}  // namespace
}  // namespace strata::pybind

using namespace strata::pybind;

PYBIND11_MODULE(_C, m) {
  m.doc() = "strata core binding (torch-free)";
  register_exceptions(m);
  bind_checksum(m);
  bind_param_store(m);
  bind_log(m);  // the core's messages go to logging.getLogger("strata") from here on
  m.attr("__version__") = STRATA_VERSION;

  py::class_<HostBuffer>(m, "HostBuffer", py::buffer_protocol())
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(b.bytes)}, {py::ssize_t(1)}, false);
      })
      .def_property_readonly("address", [](const HostBuffer& b) { return uintptr_t(b.data); })
      .def_property_readonly("nbytes", [](const HostBuffer& b) { return b.bytes; });

  // ---- config ----
  // The parsed configuration as a handle: Python parses once and hands this
  // object to Engine (and to build_plan / predict_step).
  py::class_<Config>(m, "Config")
      .def_static("parse", &parse_config_handle, py::arg("text"), py::arg("auto_values") = "{}",
                  py::arg("world_size") = 1, py::arg("check_paths") = true,
                  py::arg("name") = "config",
                  "Validate JSON text (comments allowed; `name` is used in messages); returns the "
                  "parsed configuration. Raises ConfigError.")
      .def(
          "json", [](const Config& c) { return c.json().dump(); },
          "The config with defaults filled in, as JSON text.")
      .def_property_readonly("warnings", [](const Config& c) { return c.warnings(); })
      .def(
          "with_default",
          [](const Config& c, const std::string& path) { return unwrap(c.with_default(path)); },
          py::arg("path"), "A copy with the key at `path` set back to its schema default.");
  m.def("parse_config", &parse_config_py, py::arg("text"), py::arg("auto_values") = "{}",
        py::arg("world_size") = 1, py::arg("check_paths") = true, py::arg("name") = "config",
        "Validate JSON text (comments allowed; `name` is used in messages, e.g. the file);\n"
        "returns (filled_json_text, warnings). Raises ConfigError.");
  m.def("config_schema", &config_schema_py, "The schema table as a list of dicts.");
  m.def(
      "config_markdown", [] { return config_schema_markdown(); },
      "docs/config.md as generated from the schema table.");

  // ---- kernels ----
  m.def("detect_isa", [] { return std::string(kernels::isa_name(kernels::detect_isa())); });
  m.def("slot_stride_for", &engine::slot_stride_for, py::arg("numel"),
        "Floats between the slots of a record of numel elements (the engine's layout).");
  m.def(
      "engine_features",
      [] {
        py::dict d;
        // The engine updates sub-groups on the GPU when offload_optimizer.ratio < 1, the
        // model is on the GPU and this build has CUDA (and a device is there at run time).
        d["gpu_update"] = bool(STRATA_CUDA_ENABLED);
        return d;
      },
      "What this build's engine can do.");
  m.def("optimizer_step", &optimizer_step_py, py::arg("hyper"), py::arg("step"),
        py::arg("grad_mul"), py::arg("slots"), py::arg("n"), py::arg("grad"), py::arg("grad_dtype"),
        py::arg("copy_out"), py::arg("param_dtype"), py::arg("threads") = 1,
        py::arg("isa") = "auto",
        "One optimizer step on raw buffers (addresses as ints). For tests and benches.");
  m.def("grad_stats", &grad_stats_py, py::arg("grad"), py::arg("dtype"), py::arg("n"),
        py::arg("threads") = 1, "(sum of squares, any inf/nan) over a gradient buffer.");

  // ---- plan ----
  m.def("build_plan", &build_plan_py, py::arg("config"), py::arg("params"), py::arg("slots"),
        py::arg("gpu_available") = false, py::arg("mem_available") = 0,
        "Plan without a model: params is a list of (numel, dtype, group[, host_copy]) — "
        "host_copy: a device parameter whose host copy the engine keeps in its pool. Returns "
        "(text, json).");

  // ---- engine ----
  py::class_<PyEngine>(m, "Engine")
      .def(py::init<const Config&, const py::list&, const py::list&, int, const std::string&,
                    const py::object&, const py::object&, const py::object&, bool>(),
           py::arg("config"), py::arg("params"), py::arg("groups"), py::arg("rank") = 0,
           py::arg("tag") = "", py::arg("progress") = py::none(),
           py::arg("fill_host_copy") = py::none(), py::arg("param_store") = py::none(),
           py::arg("release_grads") = false)
      .def("grad_arena", &PyEngine::grad_arena, py::arg("dtype"))
      .def("host_copy", &PyEngine::host_copy, py::arg("param"),
           "The host copy (a writable buffer) the engine keeps for a parameter given without "
           "host memory, from its pool; None for the others.")
      .def("grad_offset", [](PyEngine& s, size_t i) { return s.e().grad_offset(i); })
      .def("grad_dtype",
           [](PyEngine& s, size_t i) {
             return std::string(kernels::dtype_name(s.e().grad_dtype(i)));
           })
      .def("zero_grads",
           [](PyEngine& s) {
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().zero_grads();
             }
             check(st);
           })
      .def("set_hyper", [](PyEngine& s, int g,
                           const py::dict& h) { check(s.e().set_hyper(g, hyper_from_dict(h))); })
      .def("step", &PyEngine::step, py::arg("grad_mul") = 1.0f)
      .def(
          "begin_backward",
          [](PyEngine& s, bool eager, float grad_mul, unsigned threads) {
            engine::Engine::BackwardOptions o;
            o.eager_update = eager;
            o.grad_mul = grad_mul;
            o.threads = threads;
            Status st;
            {
              py::gil_scoped_release release;
              st = s.e().begin_backward(o);
            }
            check(st);
          },
          py::arg("eager"), py::arg("grad_mul") = 1.0f, py::arg("threads") = 1)
      .def("mark_param_ready", [](PyEngine& s, size_t i) { s.e().mark_param_ready(i); })
      .def(
          "wait_grad_room", [](PyEngine& s) { return s.e().wait_grad_room(); },
          py::call_guard<py::gil_scoped_release>(),
          "Back-pressure for a gradient hook (release_grads): waits while the sub-groups\n"
          "ready and not yet updated are at the cap; returns the seconds waited.")
      .def(
          "populate_grad", [](PyEngine& s, size_t i) { check(s.e().populate_grad(i)); },
          py::call_guard<py::gil_scoped_release>(),
          "release_grads: maps parameter i's gradient pages before a hook adds into them.")
      .def("end_backward", [](PyEngine& s) { check(s.e().end_backward()); })
      .def("cancel_step",
           [](PyEngine& s) {
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().cancel_step();
             }
             check(st);
           })
      .def("sync",
           [](PyEngine& s) {
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().sync();
             }
             check(st);
           })
      .def("grad_stats",
           [](PyEngine& s) {
             Result<kernels::GradStats> r = [&] {
               py::gil_scoped_release release;
               return s.e().grad_stats();
             }();
             auto g = unwrap(std::move(r));
             return py::make_tuple(g.sum_sq, g.nonfinite);
           })
      .def("read_record",
           [](PyEngine& s, uint32_t id) {
             // The stored bytes of one sub-group record (tests, tools): every
             // slot as the tier holds it, compressed or not.
             if (id >= s.e().subgroups().size()) {
               throw py::index_error("read_record: no sub-group " + std::to_string(id));
             }
             std::vector<float> buf(s.e().subgroups()[id].record_bytes / sizeof(float));
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().read_record(id, buf.data());
             }
             check(st);
             return py::bytes(reinterpret_cast<const char*>(buf.data()), buf.size() * 4);
           })
      .def("read_param_state",
           [](PyEngine& s, size_t i, int slot, uintptr_t out) {
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().read_param_state(i, slot, reinterpret_cast<float*>(out));
             }
             check(st);
           })
      .def("write_param_state",
           [](PyEngine& s, size_t i, int slot, uintptr_t in) {
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().write_param_state(i, slot, reinterpret_cast<const float*>(in));
             }
             check(st);
           })
      .def(
          "read_param_states",
          [](PyEngine& s, size_t i, const std::vector<uintptr_t>& outs) {
            std::vector<float*> p;
            for (auto a : outs) p.push_back(reinterpret_cast<float*>(a));
            Status st;
            {
              py::gil_scoped_release release;
              st = s.e().read_param_states(i, p);
            }
            check(st);
          },
          "Every slot of one parameter in one pass over its records: outs[k] receives slot k "
          "(0 = master), or is 0 to skip it.")
      .def("write_param_states",
           [](PyEngine& s, size_t i, const std::vector<uintptr_t>& ins) {
             std::vector<const float*> p;
             for (auto a : ins) p.push_back(reinterpret_cast<const float*>(a));
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().write_param_states(i, p);
             }
             check(st);
           })
      .def(
          "read_records",
          [](PyEngine& s, const py::function& fn, const py::object& params) {
            walk_records(s, fn, params, false, false);
          },
          py::arg("visit"), py::arg("params") = py::none(),
          "Calls visit(slices, record) once per sub-group record holding any of params "
          "(engine parameter indices; None: all), in swap-file order, fetches running "
          "ahead. slices: [(param, param_offset, record_offset, numel, slot_stride)]; record: "
          "a writable memoryview of the record's float32 values (slot k of a slice at "
          "k * slot_stride + record_offset), valid only during the call.")
      .def(
          "write_records",
          [](PyEngine& s, const py::function& fn, const py::object& params, bool overwrite) {
            walk_records(s, fn, params, true, overwrite);
          },
          py::arg("visit"), py::arg("params") = py::none(), py::arg("overwrite") = false,
          "As read_records, and each record is stored back after visit changed it. "
          "overwrite=True: visit writes every slot of every slice, so records holding only "
          "those parameters are not fetched first.")
      .def(
          "copy_state_from",
          [](PyEngine& s, PyEngine& src,
             const std::vector<std::tuple<size_t, size_t, int>>& copies) {
            std::vector<engine::Engine::StateCopy> c;
            for (const auto& [d, sp, first] : copies) {
              c.push_back({d, sp, first});
            }
            Status st;
            {
              py::gil_scoped_release release;
              st = s.e().copy_state_from(src.e(), c);
            }
            check(st);
          },
          py::arg("src"), py::arg("copies"),
          "Carries state over from engine src: copies = [(dst_param, src_param, first_slot)], "
          "each record of this engine written once.")
      .def("param_count", [](PyEngine& s) { return s.e().param_count(); })
      .def("param_numel", [](PyEngine& s, size_t i) { return s.e().param_numel(i); })
      .def("param_slots", [](PyEngine& s, size_t i) { return s.e().param_slots(i); })
      .def("sync_master_from_params",
           [](PyEngine& s) {
             Status st;
             {
               py::gil_scoped_release release;
               st = s.e().sync_master_from_params();
             }
             check(st);
           })
      .def("step_count", [](PyEngine& s, int g) { return s.e().step_count(g); })
      .def("set_step_count",
           [](PyEngine& s, int g, int64_t n) {
             Status st;
             {
               py::gil_scoped_release release;  // joins the step in flight
               st = s.e().set_step_count(g, n);
             }
             check(st);
           })
      .def("clear_error", [](PyEngine& s) { check(s.e().clear_error()); })
      .def("error", [](PyEngine& s) { return s.e().error().to_string(); })
      .def("plan_text", [](PyEngine& s) { return s.e().plan().to_string(); })
      .def("plan_json", [](PyEngine& s) { return s.e().plan().to_json().dump(); })
      .def("subgroups", [](PyEngine& s) { return subgroups_py(s.e()); })
      .def(
          "set_model_stream",
          [](PyEngine& s, uintptr_t stream) {
            s.e().set_model_stream(reinterpret_cast<void*>(stream));
          },
          py::arg("stream"),
          "The cudaStream_t (as an int; 0: none) of the model's work, for GPU updates.")
      .def("stats", [](PyEngine& s) { return stats_py(s.e()); })
      .def("breakdown", [](PyEngine& s) { return s.e().trace().last_breakdown().to_json().dump(); })
      .def("trace_json", [](PyEngine& s) { return s.e().trace().chrome_json().dump(); })
      .def(
          "record_forward",
          [](PyEngine& s, int64_t start_ns, int64_t end_ns) {
            s.e().record_phase(engine::EventKind::kForward, start_ns, end_ns);
          },
          py::arg("start_ns"), py::arg("end_ns"),
          "The model's forward into the trace (time.monotonic_ns() / steady_clock).")
      .def("write_trace",
           [](PyEngine& s, const std::string& path) { check(s.e().trace().write_chrome(path)); })
      .def("close", &PyEngine::close)
      .def_property_readonly("closed",
                             [](PyEngine& s) { return !s.holder_ || !s.holder_->engine; });

  bind_system(m);
  bind_model(m);
  bind_shard(m);
  bind_cuda(m);
}
