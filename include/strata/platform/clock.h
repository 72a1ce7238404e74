// strata/platform/clock.h — the one clock of timings and traces.
//
// steady_ns(): std::chrono::steady_clock (CLOCK_MONOTONIC on Linux, the
// clock of Python's time.monotonic_ns()) in nanoseconds. Every layer that
// times something (I/O completions, the param tier's transfer log, the
// engine's trace) uses it, so their intervals can be drawn on one axis.
// Thread-safety: any thread.
#pragma once

#include <chrono>
#include <cstdint>

namespace strata::platform {

inline int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace strata::platform
