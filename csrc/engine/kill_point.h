// Test hook: STRATA_TEST_KILL_AT=<point>:<n> makes the process SIGKILL itself
// the n-th time (1-based) it reaches <point>, so crash-safety tests cover each
// phase deterministically rather than by luck of timing. Points in the engine:
// "engine_update" (before a sub-group's update), "engine_store" (after a
// store was submitted, before it completes). Other points live in Python.
// Without the variable this costs one branch per call.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace strata::engine {

inline void kill_point(const char* point) {
  static const std::string spec = [] {
    const char* v = std::getenv("STRATA_TEST_KILL_AT");
    return std::string(v ? v : "");
  }();
  if (spec.empty()) {
    return;
  }
  auto colon = spec.rfind(':');
  if (colon == std::string::npos || spec.compare(0, colon, point) != 0) {
    return;
  }
  static std::atomic<long> count{0};
  long target = std::strtol(spec.c_str() + colon + 1, nullptr, 10);
  if (++count == target) {
    ::kill(::getpid(), SIGKILL);
  }
}

}  // namespace strata::engine
