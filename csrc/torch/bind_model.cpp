// strata._C: the performance model, the scheduler, the simulator and the
// calibration, for `python -m strata plan --hardware` and for scripts that
// compare measured steps with predicted ones.
//
// Profiles cross as dicts (or a path to a JSON file); results come back as
// dicts built from the same JSON the C++ side writes. Errors become the
// module's exceptions (ConfigError for bad configs and profiles). Long calls
// (calibration, simulation) release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include <strata/config.h>
#include <strata/engine/calibrate.h>
#include <strata/engine/perf_model.h>
#include <strata/engine/plan.h>
#include <strata/engine/simulator.h>

#include "torch/convert.h"

namespace strata::pybind {

namespace py = pybind11;
using nlohmann::json;

namespace {

py::object to_py(const json& j) { return py::module_::import("json").attr("loads")(j.dump()); }

json from_py(const py::handle& obj) {
  const std::string text = py::module_::import("json").attr("dumps")(obj).cast<std::string>();
  return json::parse(text);
}

// A profile given as a dict, or as the path of a JSON file.
engine::HardwareProfile profile_from(const py::object& profile) {
  if (py::isinstance<py::str>(profile)) {
    return unwrap(engine::load_hardware_profile(profile.cast<std::string>()));
  }
  if (py::isinstance<py::dict>(profile)) {
    return unwrap(engine::hardware_profile_from_json(from_py(profile), "(dict)"));
  }
  throw ConfigError("hardware profile must be a dict or the path of a JSON file");
}

engine::Plan plan_from(const Config& c, const py::list& params, const std::vector<int>& slots,
                       bool gpu, uint64_t mem_available) {
  engine::PlanInputs in;
  for (const auto& p : params) {
    in.params.push_back(plan_param_from(p));
  }
  in.slots = slots;
  in.gpu_available = gpu;
  in.mem_available = mem_available;
  return unwrap(engine::build_plan(c, in));
}

engine::OverlapMode overlap_from(const std::string& s) {
  if (s == "off") {
    return engine::OverlapMode::kOff;
  }
  if (s == "eager") {
    return engine::OverlapMode::kEager;
  }
  if (s == "exact") {
    return engine::OverlapMode::kExact;
  }
  throw ConfigError("overlap must be off, eager or exact, not \"" + s + "\"");
}

// A schedule described by a dict: {"split": "all-cpu" | "static" | "gap",
// "ratio": r, "gap_k": k, "gpu_every": bool, "overlap": "off|eager|exact",
// "backward_threads": t}.
engine::Schedule schedule_from(const py::dict& d, size_t n) {
  const std::string split = d.contains("split") ? d["split"].cast<std::string>() : "all-cpu";
  engine::Schedule s;
  if (split == "all-cpu") {
    s = engine::all_cpu_schedule(n);
  } else if (split == "static") {
    s = engine::static_ratio_schedule(n, d.contains("ratio") ? d["ratio"].cast<double>() : 1.0);
  } else if (split == "gap") {
    s = engine::interleave_schedule(n, d.contains("gap_k") ? d["gap_k"].cast<int>() : 1,
                                    d.contains("gpu_every") ? d["gpu_every"].cast<bool>() : true);
  } else {
    throw ConfigError("schedule split must be all-cpu, static or gap, not \"" + split + "\"");
  }
  if (d.contains("overlap")) {
    s.overlap = overlap_from(d["overlap"].cast<std::string>());
  }
  if (d.contains("backward_threads")) {
    s.backward_threads = d["backward_threads"].cast<unsigned>();
  }
  return s;
}

json shape_summary(const engine::StepShape& shape) {
  uint64_t nvme = 0;
  for (const auto& sg : shape.subgroups) {
    nvme += sg.tier == tiers::TierKind::kNvme ? sg.record_bytes : 0;
  }
  return {{"subgroups", shape.subgroups.size()},       {"params", shape.total_numel()},
          {"state_bytes", shape.total_record_bytes()}, {"nvme_bytes", nvme},
          {"buffer_count", shape.buffer_count},        {"checksums", shape.checksums},
          {"model_on_gpu", shape.model_on_gpu}};
}

py::dict predict_step_py(const py::object& config, const py::list& params,
                         const std::vector<int>& slots, const py::object& profile,
                         double backward_s, double forward_s, py::object gpu,
                         uint64_t mem_available, bool simulate) {
  const Config c = config_arg(config);
  const engine::HardwareProfile hw = profile_from(profile);
  const bool on_gpu = gpu.is_none() ? hw.has_gpu() : gpu.cast<bool>();
  const engine::Plan plan = plan_from(c, params, slots, on_gpu, mem_available);
  const engine::StepShape shape = engine::step_shape_from_plan(plan, c, on_gpu);
  engine::ChooseOptions o = engine::choose_options_from_config(c, hw);
  o.predict.backward_s = backward_s;
  o.predict.forward_s = forward_s;
  json out;
  {
    Result<engine::ScheduleChoice> choice = [&] {
      py::gil_scoped_release release;
      return engine::choose_schedule(hw, shape, o);
    }();
    engine::ScheduleChoice ch = unwrap(std::move(choice));
    out = ch.to_json();
    out["table"] = ch.to_string();
    if (simulate) {
      engine::SimOptions so;
      so.backward_s = backward_s;
      so.forward_s = forward_s;
      so.record_events = false;
      Result<engine::SimResult> sim = [&] {
        py::gil_scoped_release release;
        return engine::simulate_step(hw, shape, ch.chosen, so);
      }();
      out["simulated"] = unwrap(std::move(sim)).to_json(false);
    }
  }
  out["shape"] = shape_summary(shape);
  out["profile"] = engine::hardware_profile_to_json(hw);
  out["schedule_mode"] = o.auto_schedule ? "auto" : "static";
  return to_py(out);
}

py::dict simulate_step_py(const py::object& config, const py::list& params,
                          const std::vector<int>& slots, const py::object& profile,
                          const py::dict& schedule, double backward_s, double forward_s,
                          py::object gpu, uint64_t mem_available, bool events) {
  const Config c = config_arg(config);
  const engine::HardwareProfile hw = profile_from(profile);
  const bool on_gpu = gpu.is_none() ? hw.has_gpu() : gpu.cast<bool>();
  const engine::Plan plan = plan_from(c, params, slots, on_gpu, mem_available);
  const engine::StepShape shape = engine::step_shape_from_plan(plan, c, on_gpu);
  const engine::Schedule s = schedule_from(schedule, shape.subgroups.size());
  engine::SimOptions so;
  so.backward_s = backward_s;
  so.forward_s = forward_s;
  so.record_events = events;
  engine::PredictOptions po;
  po.backward_s = backward_s;
  po.forward_s = forward_s;
  Result<engine::SimResult> sim = [&] {
    py::gil_scoped_release release;
    return engine::simulate_step(hw, shape, s, so);
  }();
  json out = unwrap(std::move(sim)).to_json(events);
  out["model"] = engine::predict_step(hw, shape, s, po).to_json();
  out["schedule"] = {{"name", s.name},
                     {"overlap", engine::overlap_mode_name(s.overlap)},
                     {"cpu_fraction", s.cpu_fraction()}};
  out["shape"] = shape_summary(shape);
  return to_py(out);
}

py::dict calibrate_py(const py::object& config, py::object swap_dir, double seconds,
                      uint64_t io_bytes) {
  const Config c = config_arg(config);
  engine::CalibrationOptions o = engine::calibration_options_from_config(c);
  if (!swap_dir.is_none()) {
    o.swap_dir = swap_dir.cast<std::string>();
  }
  if (seconds > 0) {
    o.seconds_per_test = seconds;
  }
  if (io_bytes > 0) {
    o.io_bytes = io_bytes;
  }
  Result<engine::HardwareProfile> r = [&] {
    py::gil_scoped_release release;
    return engine::calibrate(o);
  }();
  return to_py(engine::hardware_profile_to_json(unwrap(std::move(r))));
}

}  // namespace

void bind_model(py::module_& m) {
  m.def(
      "load_hardware_profile",
      [](const std::string& path) {
        return to_py(engine::hardware_profile_to_json(unwrap(engine::load_hardware_profile(path))));
      },
      py::arg("path"),
      "Read and validate a hardware-profile JSON; returns it with every key filled.");
  m.def(
      "save_hardware_profile",
      [](const py::object& profile, const std::string& path) {
        check(engine::save_hardware_profile(profile_from(profile), path));
      },
      py::arg("profile"), py::arg("path"),
      "Validate a profile (dict or path) and write it as JSON.");
  m.def("calibrate", &calibrate_py, py::arg("config") = py::str("{}"),
        py::arg("swap_dir") = py::none(), py::arg("seconds") = 0.0, py::arg("io_bytes") = 0,
        "Measure this machine's rates (CPU update, checksums, NVMe on swap_dir or the config's "
        "nvme_path); "
        "returns a hardware-profile dict with the origin of every figure under 'sources'.");
  m.def(
      "predict_step", &predict_step_py, py::arg("config"), py::arg("params"), py::arg("slots"),
      py::arg("profile"), py::arg("backward_seconds") = -1.0, py::arg("forward_seconds") = -1.0,
      py::arg("gpu") = py::none(), py::arg("mem_available") = 0, py::arg("simulate") = true,
      "Plan the sub-groups for params [(numel, dtype, group)], let the scheduler choose the "
      "CPU/GPU split "
      "and overlap (strata.schedule) with the profile's rates, and return the choice, every "
      "candidate, "
      "the readable table and (simulate=True) the simulator's prediction of the chosen schedule.");
  m.def(
      "simulate_step", &simulate_step_py, py::arg("config"), py::arg("params"), py::arg("slots"),
      py::arg("profile"), py::arg("schedule") = py::dict(), py::arg("backward_seconds") = -1.0,
      py::arg("forward_seconds") = -1.0, py::arg("gpu") = py::none(), py::arg("mem_available") = 0,
      py::arg("events") = false,
      "Simulate one step of a given schedule {split: all-cpu|static|gap, ratio, gap_k, gpu_every, "
      "overlap: "
      "off|eager|exact, backward_threads}; returns times (seconds after backward), busy times, the "
      "closed-form model's prediction and (events=True) every simulated fetch/update/store.");
}

}  // namespace strata::pybind
