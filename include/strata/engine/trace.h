// strata/engine/trace.h — what each stage of a step did, and when.
//
// Every fetch, update and store records (sub-group, tier, kind, bytes, start,
// end). A fetch or store runs from its submit to the completion of its I/O
// as the I/O engine saw it (IoEngine::wait_timed), not to the moment the
// pipeline waited for it; checksum verification is not part of it. The trace keeps the events of
// the last `keep_steps` steps, computes a step breakdown (I/O busy, compute busy, overlap, stall)
// and writes a Chrome/Perfetto trace JSON (chrome://tracing, ui.perfetto.dev).
//
// Units: nanoseconds on the steady clock; bytes.
// Thread-safety: record() is internally locked; the rest is for the thread
//   that drives the engine.
#pragma once

#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <strata/status.h>

namespace strata::engine {

// kWeightFetch / kWeightStore: the param tier's transfers (stage 3), outside
// the optimizer step's breakdown.
enum class EventKind : uint8_t {
  kFetch,
  kUpdate,
  kStore,
  kStep,
  kBackward,
  kForward,
  kH2D,
  kD2H,
  kWeightFetch,
  kWeightStore
};
const char* event_kind_name(EventKind kind);

struct TraceEvent {
  EventKind kind;
  int64_t step = 0;
  int32_t subgroup = -1;
  const char* tier = "";  // static string (tier_name) or ""
  uint64_t bytes = 0;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
};

struct StepBreakdown {
  int64_t step = 0;
  double wall_s = 0;     // the step's own interval
  double io_busy_s = 0;  // union of fetch and store intervals
  double compute_busy_s = 0;
  double overlap_s = 0;  // I/O and compute both busy
  double stall_s = 0;    // neither busy
  uint64_t bytes_fetched = 0, bytes_stored = 0;
  nlohmann::json to_json() const;
  std::string to_string() const;
};

int64_t now_ns();

class Trace {
 public:
  explicit Trace(size_t keep_steps = 1) : keep_steps_(keep_steps ? keep_steps : 1) {}
  void set_keep_steps(size_t n) { keep_steps_ = n ? n : 1; }
  void begin_step(int64_t step);
  void record(const TraceEvent& event);
  void end_step();

  // Breakdown of the newest complete step (empty step 0 before any).
  StepBreakdown last_breakdown() const;
  std::vector<TraceEvent> events() const;  // kept steps, in record order
  nlohmann::json chrome_json() const;
  Status write_chrome(const std::string& path) const;

 private:
  size_t keep_steps_;
  mutable std::mutex mu_;
  std::deque<std::vector<TraceEvent>> steps_;
  std::vector<TraceEvent> current_;
  int64_t current_step_ = -1;
  StepBreakdown last_;
};

StepBreakdown compute_breakdown(const std::vector<TraceEvent>& events, int64_t step);

}  // namespace strata::engine
