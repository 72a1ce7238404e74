// Test hook: STRATA_TEST_KILL_AT=<point>:<n> makes the process SIGKILL itself
// the n-th time (1-based) it reaches <point>, so crash-safety tests cover each
// phase deterministically rather than by luck of timing. Several points may be
// given, comma-separated, as python/strata/testing/kill_points.py reads the same
// variable. Points in the engine: "engine_update" (before a sub-group's
// update), "engine_store" (after a store was submitted, before it completes);
// tests/python/test_checkpoint_resume.py arms both. Other points live in
// Python. Without the variable this costs one branch per call.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <string>

namespace strata::engine {

namespace detail {

struct KillSpec {
  std::string point;
  long target = 0;
  std::atomic<long> count{0};
  KillSpec(std::string p, long t) : point(std::move(p)), target(t) {}
};

// Parsed once from STRATA_TEST_KILL_AT; entries that are not point:index are
// ignored here (the Python side reports them).
inline std::deque<KillSpec>& kill_specs() {
  static std::deque<KillSpec> specs = [] {
    std::deque<KillSpec> out;
    const char* v = std::getenv("STRATA_TEST_KILL_AT");
    std::string all = v ? v : "";
    size_t start = 0;
    while (start < all.size()) {
      size_t end = all.find(',', start);
      if (end == std::string::npos) {
        end = all.size();
      }
      std::string item = all.substr(start, end - start);
      const size_t colon = item.rfind(':');
      if (colon != std::string::npos && colon > 0) {
        out.emplace_back(item.substr(0, colon), std::strtol(item.c_str() + colon + 1, nullptr, 10));
      }
      start = end + 1;
    }
    return out;
  }();
  return specs;
}

}  // namespace detail

inline void kill_point(const char* point) {
  auto& specs = detail::kill_specs();
  if (specs.empty()) {
    return;
  }
  for (auto& s : specs) {
    if (s.point == point && ++s.count == s.target) {
      ::kill(::getpid(), SIGKILL);
    }
  }
}

}  // namespace strata::engine
