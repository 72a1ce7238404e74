// strata._C.Xxh3: the checkpoint files' extent checksum (XXH3-128, streamed),
// fast enough (tens of GB/s a core) that a checkpoint moves at the drive's
// speed; hashlib's blake2b (about 0.6 GB/s here) was the bottleneck of a save.
// update() takes any buffer-protocol object and releases the GIL while it
// hashes. Not thread-safe: one hasher per extent, used by one thread.
#include <pybind11/pybind11.h>

#include <cstdio>
#include <string>

#include <strata/io/checksum.h>

namespace strata::pybind {

namespace py = pybind11;

namespace {

class Xxh3 {
 public:
  void update(const py::buffer& b) {
    py::buffer_info info = b.request();
    const size_t bytes = size_t(info.size) * size_t(info.itemsize);
    if (bytes >= (1u << 16)) {
      py::gil_scoped_release release;
      state_.update(info.ptr, bytes);
    } else {
      state_.update(info.ptr, bytes);
    }
  }
  std::string hexdigest() const {
    io::Hash128 h = state_.digest();
    char out[33];
    std::snprintf(out, sizeof(out), "%016llx%016llx", static_cast<unsigned long long>(h.high),
                  static_cast<unsigned long long>(h.low));
    return out;
  }

 private:
  io::Xxh3Stream state_;
};

}  // namespace

void bind_checksum(py::module_& m) {
  py::class_<Xxh3>(m, "Xxh3", "Streaming XXH3-128 (checkpoint extent checksums).")
      .def(py::init<>())
      .def("update", &Xxh3::update, py::arg("data"),
           "Adds the bytes of a buffer-protocol object (GIL released for large buffers).")
      .def("hexdigest", &Xxh3::hexdigest, "32 hex digits (high 64 bits first).");
}

}  // namespace strata::pybind
