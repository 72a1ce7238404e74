// strata._C.ParamStore: the param tier (tiers/param_store.h) for
// strata.zero.Init and the stage-3 parameter window. Blocking calls release
// the GIL. Buffers handed to Python (staging, resident records) keep the
// store alive.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <strata/config.h>
#include <strata/tiers/param_store.h>

#include "torch/convert.h"
#include "torch/param_store_py.h"

namespace py = pybind11;

namespace strata::pybind {
namespace {

// A 4 KiB-aligned staging buffer (buffer protocol, writable).
struct StagingBuffer {
  std::shared_ptr<tiers::ParamStore> store;
  memory::PinnedBuffer buf;
};

// A resident record's memory (host param tier).
struct RecordView {
  std::shared_ptr<tiers::ParamStore> store;
  void* data;
  size_t bytes;
};

tiers::ParamStore& live(PyParamStore& s) {
  if (!s.store) {
    throw StrataError("the param store is closed");
  }
  return *s.store;
}

py::dict stats_dict(const tiers::ParamStoreStats& st) {
  py::dict d;
  d["records"] = st.records;
  d["bytes"] = st.bytes;
  d["record_bytes"] = st.record_bytes;
  d["bytes_fetched"] = st.bytes_fetched;
  d["bytes_stored"] = st.bytes_stored;
  d["fetches"] = st.fetches;
  d["stores"] = st.stores;
  d["staging_in_use"] = st.staging_in_use;
  d["staging_peak"] = st.staging_peak;
  d["files"] = st.files;
  d["path"] = st.path;
  return d;
}

}  // namespace

void bind_param_store(py::module_& m) {
  py::class_<StagingBuffer>(m, "StagingBuffer", py::buffer_protocol())
      .def_buffer([](StagingBuffer& b) {
        return py::buffer_info(b.buf.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(b.buf.size())}, {py::ssize_t(1)}, false);
      })
      .def_property_readonly("address",
                             [](const StagingBuffer& b) { return uintptr_t(b.buf.data()); })
      .def_property_readonly("nbytes", [](const StagingBuffer& b) { return b.buf.size(); });
  py::class_<RecordView>(m, "ParamRecord", py::buffer_protocol())
      .def_buffer([](RecordView& b) {
        return py::buffer_info(b.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(b.bytes)}, {py::ssize_t(1)}, false);
      })
      .def_property_readonly("address", [](const RecordView& b) { return uintptr_t(b.data); });

  py::class_<PyParamStore>(m, "ParamStore",
                           "The param tier: one record per parameter (its model-dtype bytes), on "
                           "the tier offload_param.device names.")
      .def(py::init([](const Config& config, const std::string& tag) {
             auto opts = unwrap(tiers::param_store_options(config, tag));
             auto made = [&] {
               py::gil_scoped_release release;
               return tiers::ParamStore::create(opts);
             }();
             return PyParamStore{std::shared_ptr<tiers::ParamStore>(unwrap(std::move(made)))};
           }),
           py::arg("config"), py::arg("tag") = "param")
      .def_property_readonly("resident", [](PyParamStore& s) { return live(s).resident(); })
      .def_property_readonly(
          "kind", [](PyParamStore& s) { return std::string(tiers::tier_name(live(s).kind())); })
      .def("__len__", [](PyParamStore& s) { return live(s).count(); })
      .def(
          "add",
          [](PyParamStore& s, uintptr_t address, size_t bytes) {
            tiers::ParamStore& st = live(s);
            py::gil_scoped_release release;
            return unwrap(st.add(bytes, reinterpret_cast<const void*>(address)));
          },
          py::arg("address"), py::arg("bytes"),
          "Adds a record holding `bytes` bytes copied from host memory at `address` (0: zeros); "
          "returns its id.")
      .def("bytes", [](PyParamStore& s, uint32_t id) { return live(s).bytes(id); })
      .def("record_bytes", [](PyParamStore& s, uint32_t id) { return live(s).record_bytes(id); })
      .def(
          "record",
          [](PyParamStore& s, uint32_t id) {
            tiers::ParamStore& st = live(s);
            void* d = st.data(id);
            if (d == nullptr) {
              throw StrataError("param store: record " + std::to_string(id) +
                                " is not resident (the store is on " + tiers::tier_name(st.kind()) +
                                ")");
            }
            return RecordView{s.store, d, st.bytes(id)};
          },
          py::arg("id"), "A resident record's memory (host tier): the parameter's bytes.")
      .def(
          "staging",
          [](PyParamStore& s, size_t bytes) {
            tiers::ParamStore& st = live(s);
            auto b = [&] {
              py::gil_scoped_release release;
              return st.staging(bytes);
            }();
            return StagingBuffer{s.store, unwrap(std::move(b))};
          },
          py::arg("bytes"), "A 4 KiB-aligned buffer of at least `bytes` (rounded up to 4 KiB).")
      .def(
          "submit_fetch",
          [](PyParamStore& s, uint32_t id, StagingBuffer& b) {
            tiers::ParamStore& st = live(s);
            if (b.buf.size() < st.record_bytes(id)) {
              throw StrataError("param store: staging buffer of " + std::to_string(b.buf.size()) +
                                " bytes for record " + std::to_string(id) + " of " +
                                std::to_string(st.record_bytes(id)));
            }
            py::gil_scoped_release release;
            return unwrap(st.submit_fetch(id, b.buf.data()));
          },
          py::arg("id"), py::arg("buffer"), "Starts reading record `id` into `buffer`; a ticket.")
      .def(
          "wait",
          [](PyParamStore& s, uint64_t ticket) {
            tiers::ParamStore& st = live(s);
            py::gil_scoped_release release;
            check(st.wait(ticket));
          },
          py::arg("ticket"))
      .def(
          "poll",
          [](PyParamStore& s, uint64_t ticket) {
            tiers::ParamStore& st = live(s);
            return unwrap(st.poll(ticket));
          },
          py::arg("ticket"),
          "True when the ticket's transfer completed (wait() then returns at once); "
          "never blocks.")
      .def(
          "fetch",
          [](PyParamStore& s, uint32_t id, StagingBuffer& b) {
            tiers::ParamStore& st = live(s);
            if (b.buf.size() < st.record_bytes(id)) {
              throw StrataError("param store: staging buffer too small for record " +
                                std::to_string(id));
            }
            py::gil_scoped_release release;
            check(st.fetch(id, b.buf.data()));
          },
          py::arg("id"), py::arg("buffer"))
      .def(
          "store",
          [](PyParamStore& s, uint32_t id, StagingBuffer& b) {
            tiers::ParamStore& st = live(s);
            if (b.buf.size() < st.record_bytes(id)) {
              throw StrataError("param store: staging buffer too small for record " +
                                std::to_string(id));
            }
            py::gil_scoped_release release;
            check(st.store(id, b.buf.data()));
          },
          py::arg("id"), py::arg("buffer"), "Writes `buffer` to record `id` and waits.")
      .def("flush",
           [](PyParamStore& s) {
             tiers::ParamStore& st = live(s);
             py::gil_scoped_release release;
             check(st.flush());
           })
      .def(
          "trim_staging", [](PyParamStore& s) { return live(s).trim_staging(); },
          "Unmaps staging memory no buffer uses; the bytes released.")
      .def("stats", [](PyParamStore& s) { return stats_dict(live(s).stats()); })
      .def("describe", [](PyParamStore& s) { return live(s).describe(); })
      .def_property_readonly("closed", [](PyParamStore& s) { return !s.store; })
      .def(
          "close",
          [](PyParamStore& s) {
            if (!s.store) {
              return;
            }
            Status st = [&] {
              py::gil_scoped_release release;
              return s.store->flush();
            }();
            // The store itself goes (swap files removed) with the last holder:
            // an engine, a staging buffer, or a record a model still views.
            s.store.reset();
            check(st);
          },
          "Waits for the writes in flight and lets the store go. Its memory and swap files are "
          "released when nothing holds them any more (an engine, a staging buffer, a model's "
          "view of a host record).");
}

}  // namespace strata::pybind
