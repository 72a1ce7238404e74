// The core's log sink (strata/log.h) routed to Python's logging, under the
// "strata" logger: kInfo → INFO, kWarning → WARNING, kError → ERROR.
//
// GIL discipline: a thread that holds the GIL logs at once; a Python thread
// inside a long call that released the GIL takes it back to log. A strata
// worker thread (I/O ring, step pipeline) never waits for the GIL, because
// the thread holding it may be waiting for that worker (close() joins the I/O
// workers): its messages are queued and delivered, in order, by the next
// message or binding call on a Python thread (flush_log()). Fatal messages
// and messages during interpreter shutdown go to stderr directly.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <strata/log.h>

#include "torch/convert.h"

namespace strata::pybind {

namespace {

std::mutex pending_mu;
std::vector<std::pair<LogLevel, std::string>> pending;  // guarded by pending_mu

int python_level(LogLevel level) {
  switch (level) {
    case LogLevel::kInfo:
      return 20;
    case LogLevel::kWarning:
      return 30;
    default:
      return 40;
  }
}

bool python_gone() {
#if PY_VERSION_HEX >= 0x030D0000
  return !Py_IsInitialized() || Py_IsFinalizing();
#else
  return !Py_IsInitialized() || _Py_IsFinalizing();
#endif
}

// GIL held.
void emit(LogLevel level, const std::string& message) {
  try {
    py::module_::import("logging").attr("getLogger")("strata").attr("log")(python_level(level),
                                                                           message);
  } catch (py::error_already_set& e) {
    e.discard_as_unraisable("strata log sink");
    stderr_log_sink(level, message, nullptr);
  }
}

// GIL held.
void flush_pending() {
  std::vector<std::pair<LogLevel, std::string>> batch;
  {
    std::lock_guard<std::mutex> lock(pending_mu);
    batch.swap(pending);
  }
  for (const auto& [level, message] : batch) {
    emit(level, message);
  }
}

void python_sink(LogLevel level, std::string_view message, void* /*arg*/) {
  if (level == LogLevel::kFatal || python_gone()) {
    stderr_log_sink(level, message, nullptr);
    return;
  }
  if (PyGILState_Check()) {
    flush_pending();
    emit(level, std::string(message));
    return;
  }
  if (PyGILState_GetThisThreadState() != nullptr) {
    py::gil_scoped_acquire gil;
    flush_pending();
    emit(level, std::string(message));
    return;
  }
  std::lock_guard<std::mutex> lock(pending_mu);
  pending.emplace_back(level, std::string(message));
}

}  // namespace

void flush_log() {
  if (!python_gone() && PyGILState_Check()) {
    bool any;
    {
      std::lock_guard<std::mutex> lock(pending_mu);
      any = !pending.empty();
    }
    if (any) {
      flush_pending();
    }
  }
}

void bind_log(py::module_& m) {
  set_log_sink(python_sink, nullptr);
  m.def("flush_log", &flush_log,
        "Delivers to logging the core's messages queued by its worker threads (done by every "
        "call that can fail, too).");
  m.def(
      "_log_for_testing",
      [](int level, const std::string& message, bool from_worker) {
        const LogLevel l = LogLevel(std::min(std::max(level, 0), 2));
        if (!from_worker) {
          log_message(l, message);
          return;
        }
        py::gil_scoped_release release;
        std::thread([l, message] { log_message(l, message); }).join();
      },
      py::arg("level"), py::arg("message"), py::arg("from_worker") = false,
      "Tests: sends a message through the core's log sink, from this thread or a C++ worker "
      "thread (level 0 info, 1 warning, 2 error).");
}

}  // namespace strata::pybind
