// strata/engine/simulator.h — a discrete-event simulation of one step.
//
// Replays the engine's pipeline rules (engine.cpp run_pipeline) in simulated
// time with the rates of a HardwareProfile:
// - one pipeline thread that consumes sub-groups in ready order, keeps
//   buffer_count working buffers, fetches ahead into free buffers, refills
//   the buffer of the store submitted one update earlier (lag 1, waiting for
//   that store), hashes records (checksums) when storing and verifies them
//   when a fetch is waited, and updates with the backward-time thread count
//   while backward runs;
// - one FIFO io_uring ring: each fetch/store is cut into aio.block_size
//   requests, at most aio.queue_depth in flight, served by a drive that
//   shares its bandwidth among the requests in flight (reads at the read
//   rate, writes at the write rate, a mix at the duplex rate);
// - sub-groups becoming ready during backward (eager: updated at once;
//   exact: only prefetched and their gradient statistics computed, updates
//   when backward ends); write-back of the last records drains after the
//   updates (deferred into the next forward);
// - the GPU side (not in the engine yet; the design of the interleave
//   issue): streamed sub-groups leave their working buffer to an H2D copy,
//   the GPU kernel (after backward) and a D2H copy, and their store is
//   submitted (and hashed, off the pipeline thread) when the D2H completes;
//   GPU-resident ones just run the kernel.
//
// Units: seconds from the start of backward (the step starts at
// backward_seconds; without overlap everything starts there), bytes.
// Ownership: plain values. Thread-safety: pure function.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <strata/engine/perf_model.h>
#include <strata/engine/trace.h>
#include <strata/status.h>

namespace strata::engine {

struct SimOptions {
  double backward_s = -1;  // < 0: profile.backward_seconds
  double forward_s = -1;   // < 0: profile.forward_seconds
  bool record_events = true;
};

struct SimEvent {
  EventKind kind = EventKind::kUpdate;  // kFetch, kUpdate, kStore, kH2D, kD2H
  int32_t subgroup = -1;
  const char* resource = "";  // "nvme", "cpu", "gpu", "h2d", "d2h"
  double start_s = 0;         // submit (I/O, copies) or start (updates)
  double end_s = 0;           // completion
  uint64_t bytes = 0;
};

struct SimResult {
  // Same meanings as Prediction (times from the end of backward).
  double updates_done_s = 0;
  double step_s = 0;
  double exposed_s = 0;
  double iteration_s = 0;
  double nvme_busy_s = 0;    // at least one request in flight
  double cpu_busy_s = 0;     // pipeline thread computing (updates, hashing, statistics)
  double worker_wait_s = 0;  // pipeline thread blocked on I/O after the step started
  uint64_t io_requests = 0;  // block requests simulated
  std::vector<SimEvent> events;
  nlohmann::json to_json(bool with_events = false) const;
};

// InvalidArgument for a schedule that does not match the shape or that the
// profile cannot run (same checks as predict_step).
Result<SimResult> simulate_step(const HardwareProfile& hw, const StepShape& shape,
                                const Schedule& schedule, const SimOptions& options = {});

}  // namespace strata::engine
