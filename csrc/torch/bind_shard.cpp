// strata._C: the flat parameter space of data-parallel sharding
// (strata/engine/shard.h) for python/strata/layout.py. Dtypes cross as the
// engine's names ("fp32", "bf16", "fp16"; torch's names are accepted too),
// pieces as (param, param_offset, flat_offset, numel) tuples.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include <strata/engine/shard.h>

#include "torch/convert.h"

namespace strata::pybind {

namespace py = pybind11;

namespace {

py::list pieces_py(const std::vector<engine::FlatPiece>& pieces) {
  py::list out;
  for (const auto& p : pieces) {
    out.append(py::make_tuple(p.param, p.param_offset, p.flat_offset, p.numel));
  }
  return out;
}

std::vector<kernels::DType> dtypes_from(const std::vector<std::string>& names) {
  std::vector<kernels::DType> out;
  out.reserve(names.size());
  for (const auto& n : names) {
    out.push_back(dtype_from_name(n));
  }
  return out;
}

}  // namespace

void bind_shard(py::module_& m) {
  m.def("shard_bounds", &engine::shard_bounds, py::arg("total"), py::arg("world"),
        "Rank r of world owns [b[r], b[r+1]) of a flat space of total elements.");
  m.def(
      "shard_slices",
      [](const std::vector<int64_t>& numels, const std::vector<std::string>& dtypes, int world,
         int rank) {
        return pieces_py(engine::shard_slices(numels, dtypes_from(dtypes), world, rank));
      },
      py::arg("numels"), py::arg("dtypes"), py::arg("world"), py::arg("rank"),
      "The pieces (param, param_offset, flat_offset, numel) of the parameters (in the engine's "
      "order; back to back per dtype) that rank owns, sorted by parameter.");
  py::class_<engine::FlatSpace>(m, "FlatSpace")
      .def(py::init([](const py::list& entries, const py::dict& totals) {
             std::vector<engine::FlatEntry> es;
             for (const auto& item : entries) {
               auto t = item.cast<py::tuple>();
               es.push_back(engine::FlatEntry{t[0].cast<size_t>(),
                                              dtype_from_name(t[1].cast<std::string>()),
                                              t[2].cast<size_t>(), t[3].cast<size_t>()});
             }
             std::vector<std::pair<kernels::DType, size_t>> mins;
             for (const auto& [k, v] : totals) {
               mins.emplace_back(dtype_from_name(k.cast<std::string>()), v.cast<size_t>());
             }
             return engine::FlatSpace(std::move(es), mins);
           }),
           py::arg("entries"), py::arg("totals") = py::dict(),
           "Parameters at given places: entries [(param, dtype, offset, numel)]; totals "
           "{dtype: n} lengthens a dtype's space.")
      .def_static(
          "packed",
          [](const std::vector<int64_t>& numels, const std::vector<std::string>& dtypes) {
            return engine::FlatSpace::packed(numels, dtypes_from(dtypes));
          },
          py::arg("numels"), py::arg("dtypes"), "Parameters back to back per dtype, in order.")
      .def_property_readonly("dtypes",
                             [](const engine::FlatSpace& s) {
                               std::vector<std::string> out;
                               for (auto d : s.dtypes()) {
                                 out.emplace_back(kernels::dtype_name(d));
                               }
                               return out;
                             })
      .def(
          "total",
          [](const engine::FlatSpace& s, const std::string& d) {
            return s.total(dtype_from_name(d));
          },
          py::arg("dtype"))
      .def(
          "offsets",
          [](const engine::FlatSpace& s) {
            py::list out;
            for (const auto& e : s.entries()) {
              out.append(py::make_tuple(e.param, kernels::dtype_name(e.dtype), e.offset, e.numel));
            }
            return out;
          },
          "Every entry (param, dtype, offset, numel), by parameter.")
      .def(
          "pieces",
          [](const engine::FlatSpace& s, const std::string& d, size_t lo, size_t hi) {
            return pieces_py(s.pieces(dtype_from_name(d), lo, hi));
          },
          py::arg("dtype"), py::arg("lo"), py::arg("hi"),
          "The parts of the parameters of dtype inside [lo, hi), in space order.")
      .def(
          "bounds",
          [](const engine::FlatSpace& s, const std::string& d, int world) {
            return s.bounds(dtype_from_name(d), world);
          },
          py::arg("dtype"), py::arg("world"))
      .def(
          "shard_slices",
          [](const engine::FlatSpace& s, int world, int rank) {
            return pieces_py(s.shard_slices(world, rank));
          },
          py::arg("world"), py::arg("rank"));
}

}  // namespace strata::pybind
