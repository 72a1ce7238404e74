// One step in flight: the queue of sub-groups whose gradients are final, in
// the order they became ready, and the gate that lets updates run.
//
// Producers (the thread driving the engine, autograd hooks) append to
// `order` and flip the flags under `mu`; the pipeline worker consumes.
// Invariants: every sub-group appears in `order` at most once;
//   closed == (order.size() == number of sub-groups).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <strata/kernels/optimizer.h>
#include <strata/status.h>
#include <strata/tiers/tier.h>

namespace strata::engine {

// A fetch of the next step's record issued by the last step's worker
// (Engine::Impl::carried), handed to the next run's pipeline.
struct CarriedFetch {
  size_t buffer = 0;  // working buffer index
  uint32_t subgroup = 0;
  tiers::TierTicket ticket = 0;
  int64_t start_ns = 0;
  int64_t submitted_ns = 0;
};

struct StepRun {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uint32_t> expected;     // processing order: the last step's ready order (fixed)
  std::vector<uint32_t> order;        // ready sub-groups, in ready order
  std::vector<CarriedFetch> carried;  // fetches this run adopts (the pipeline clears it)
  std::vector<uint8_t> queued;        // per sub-group
  std::vector<uint32_t> waiting;      // per sub-group: parameters not yet ready
  bool closed = false;                // every sub-group is in `order`
  bool gate = false;                  // updates may run (grad_mul known)
  float grad_mul = 1.0f;
  bool cancel = false;            // drop the step (fp16 overflow): no update runs
  bool backward_running = false;  // updates use the backward-time thread pool
  bool collect_stats = false;     // gradient statistics per sub-group as they arrive
  bool updates_done = false;      // worker finished every update (stores may be in flight)
  bool finished = false;          // worker returned
  bool stepped = false;           // step() has been called for this run
  bool from_backward = false;     // begun by begin_backward(): `order` is an observed ready order
  size_t updated = 0;             // updates done, in `expected` order (the pipeline's next_update)
  size_t stats_done = 0;          // sub-groups whose statistics are in `stats`
  std::vector<kernels::GradStats> stats;
  Status status;
  int64_t start_ns = 0;
  int64_t backward_end_ns = 0;
  std::thread worker;
};

}  // namespace strata::engine
