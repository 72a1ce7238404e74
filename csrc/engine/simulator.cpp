// Discrete-event simulation of one step (see simulator.h). The pipeline
// thread is simulated as straight-line code, a port of run_pipeline() in
// engine.cpp, whose blocking calls advance a simulated clock; the drive is a
// fluid model of one FIFO ring advanced to that clock.
#include <strata/engine/simulator.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <map>

namespace strata::engine {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One FIFO ring in front of a drive. Batches are cut into block requests;
// at most `depth` are in flight and share the drive: reads alone at the read
// rate, writes alone at the write rate, a mix at the duplex rate (or time-
// shared when none is given). Rates are per drive, split evenly among the
// requests in flight of each kind.
class Drive {
 public:
  Drive(const HardwareProfile& hw, size_t block, unsigned depth)
      : R_(hw.nvme_read_bytes_per_s),
        W_(hw.nvme_write_bytes_per_s),
        D_(hw.nvme_duplex_bytes_per_s),
        block_(std::max<size_t>(block, 4096)),
        depth_(std::max(depth, 1u)) {}

  // Submits a batch now or at a later time `at`; returns its ticket.
  uint64_t submit(bool write, uint64_t bytes, double at) {
    const uint64_t t = batches_.size();
    Batch b;
    b.write = write;
    b.bytes = bytes;
    b.submit = std::max(at, now_);
    b.blocks_left = std::max<uint64_t>((bytes + block_ - 1) / block_, 1);
    batches_.push_back(b);
    if (b.submit <= now_) {
      enqueue(t);
    } else {
      future_.emplace(b.submit, t);
    }
    return t;
  }

  double now() const { return now_; }
  // Scales every rate from now on (the caller advanced to now first).
  void set_factor(double f) { factor_ = f; }
  bool in_flight() const { return !inflight_.empty() || !pending_.empty(); }
  bool done(uint64_t t) const { return batches_[t].done_at >= 0; }
  double done_at(uint64_t t) const { return batches_[t].done_at; }
  double submitted_at(uint64_t t) const { return batches_[t].submit; }
  double busy_s() const { return busy_; }
  uint64_t requests() const { return requests_; }

  // Processes every completion and timed submission up to time t.
  void advance_to(double t) {
    while (now_ < t) {
      const double te = next_event();
      if (te > t) {
        progress(t - now_);
        now_ = t;
        return;
      }
      step_to(te);
    }
  }

  // Advances until batch t completes; returns its completion time.
  double run_until_done(uint64_t t) {
    while (!done(t)) {
      const double te = next_event();
      if (te == kInf) {
        return kInf;  // nothing in flight: cannot happen for a submitted batch
      }
      step_to(te);
    }
    return batches_[t].done_at;
  }

  double next_event() const {
    double te = future_.empty() ? kInf : future_.begin()->first;
    if (!inflight_.empty()) {
      double rr, rw;
      rates(&rr, &rw);
      for (const auto& q : inflight_) {
        const double r = q.write ? rw : rr;
        if (r > 0) {
          te = std::min(te, now_ + q.remaining / r);
        }
      }
    }
    return te;
  }

 private:
  struct Batch {
    bool write = false;
    uint64_t bytes = 0;
    double submit = 0;
    uint64_t blocks_left = 0;
    double done_at = -1;
  };
  struct Req {
    uint64_t batch;
    bool write;
    double remaining;  // bytes
  };

  void enqueue(uint64_t t) {
    const Batch& b = batches_[t];
    uint64_t left = b.bytes;
    for (uint64_t k = 0; k < b.blocks_left; ++k) {
      const double len = double(std::min<uint64_t>(left, block_));
      left -= std::min<uint64_t>(left, block_);
      pending_.push_back(Req{t, b.write, std::max(len, 1.0)});
    }
    fill();
  }

  void fill() {
    while (inflight_.size() < depth_ && !pending_.empty()) {
      inflight_.push_back(pending_.front());
      pending_.pop_front();
    }
  }

  // Per-request rates (bytes/s) of reads and writes for the current mix.
  void rates(double* rr, double* rw) const {
    size_t nr = 0, nw = 0;
    for (const auto& q : inflight_) {
      (q.write ? nw : nr) += 1;
    }
    *rr = *rw = 0;
    const double n = double(nr + nw);
    if (nr && !nw) {
      *rr = R_ * factor_ / double(nr);
    } else if (nw && !nr) {
      *rw = W_ * factor_ / double(nw);
    } else if (nr && nw) {
      if (D_ > 0) {
        double tr = D_ * double(nr) / n, tw = D_ * double(nw) / n;
        if (tr > R_) {
          tw = std::min(W_, tw + tr - R_);
          tr = R_;
        }
        if (tw > W_) {
          tr = std::min(R_, tr + tw - W_);
          tw = W_;
        }
        *rr = tr * factor_ / double(nr);
        *rw = tw * factor_ / double(nw);
      } else {
        // Time-shared: each request gets 1/n of the drive's time.
        *rr = R_ * factor_ / n;
        *rw = W_ * factor_ / n;
      }
    }
  }

  void progress(double dt) {
    if (dt <= 0 || inflight_.empty()) {
      return;
    }
    double rr, rw;
    rates(&rr, &rw);
    for (auto& q : inflight_) {
      q.remaining -= (q.write ? rw : rr) * dt;
    }
    busy_ += dt;
  }

  void step_to(double te) {
    progress(te - now_);
    now_ = te;
    // Timed submissions due now.
    while (!future_.empty() && future_.begin()->first <= now_) {
      const uint64_t t = future_.begin()->second;
      future_.erase(future_.begin());
      enqueue(t);
    }
    // Completions (a request within a byte of its end is done: rounding).
    bool any = false;
    for (size_t k = 0; k < inflight_.size();) {
      if (inflight_[k].remaining <= 1.0) {
        Batch& b = batches_[inflight_[k].batch];
        if (--b.blocks_left == 0) {
          b.done_at = now_;
        }
        ++requests_;
        inflight_[k] = inflight_.back();
        inflight_.pop_back();
        any = true;
      } else {
        ++k;
      }
    }
    if (any) {
      // Keep FIFO service order among the survivors stable for determinism.
      fill();
    }
  }

  double R_, W_, D_;
  double factor_ = 1.0;
  size_t block_;
  unsigned depth_;
  double now_ = 0;
  double busy_ = 0;
  uint64_t requests_ = 0;
  std::vector<Batch> batches_;
  std::deque<Req> pending_;
  std::vector<Req> inflight_;
  std::multimap<double, uint64_t> future_;
};

struct Sim {
  const HardwareProfile& hw;
  const StepShape& shape;
  const Schedule& sched;
  const SimOptions& opt;
  double B = 0;
  unsigned full_threads = 1, bw_threads = 1;
  Drive drive;
  SimResult res;

  double now = 0;
  double step_start = 0;
  // GPU streams (FIFO servers).
  double h2d_free = 0, d2h_free = 0, gpu_free = 0;
  double gpu_last = 0;  // last GPU-side completion that the step waits for

  enum class BufState { kFree, kFetching, kStoring, kGpu };
  struct Buf {
    BufState state = BufState::kFree;
    size_t item = 0;
    uint64_t ticket = 0;  // fetch or store batch
    uint64_t seq = 0;     // store order
    double gpu_done = 0;  // kGpu: when the D2H completes and the store is submitted
  };
  std::vector<Buf> bufs;
  std::vector<int> buf_of;
  std::vector<uint64_t> pending_stores;  // GPU stores (submitted in the future) and unfinished ones
  uint64_t store_seq = 0;

  Sim(const HardwareProfile& h, const StepShape& s, const Schedule& sc, const SimOptions& o)
      : hw(h), shape(s), sched(sc), opt(o), drive(h, s.io_block_bytes, s.io_queue_depth) {}

  bool fetch_tier(size_t i) const {
    const auto& sg = shape.subgroups[i];
    return sg.tier == tiers::TierKind::kNvme && sched.device[i] != UpdateDevice::kGpuResident;
  }
  // CPU work runs slower while the drive has requests in flight.
  double cpu_factor() const { return drive.in_flight() ? hw.io_factor() : 1.0; }
  double hash_s(size_t i) const {
    if (!shape.checksums || hw.checksum_bytes_per_s <= 0 || !fetch_tier(i)) {
      return 0;
    }
    // 1 MiB chunks over the update threads in force.
    return double(shape.subgroups[i].record_bytes) / hw.checksum_rate(threads_now());
  }
  unsigned threads_now() const { return now < B ? bw_threads : full_threads; }

  void record(EventKind kind, size_t item, const char* resource, double start, double end,
              uint64_t bytes) {
    if (opt.record_events) {
      res.events.push_back(SimEvent{kind, int32_t(item), resource, start, end, bytes});
    }
  }

  // The pipeline thread computes for dt seconds on `threads` threads; the
  // drive slows in proportion to the cores taken: by nvme_cpu_busy_factor
  // (measured with every update thread busy) scaled by threads / cores.
  void busy(double dt, unsigned threads = 1) {
    if (dt <= 0) {
      return;
    }
    drive.advance_to(now);
    const double share = std::min(1.0, double(threads) / double(full_threads));
    drive.set_factor(1.0 - (1.0 - hw.busy_factor()) * share);
    drive.advance_to(now + dt);
    drive.set_factor(1.0);
    now += dt;
    res.cpu_busy_s += dt;
  }
  // The pipeline thread sleeps until time t.
  void idle_until(double t) {
    if (t <= now) {
      return;
    }
    drive.advance_to(t);
    now = t;
  }
  void wait_ticket(uint64_t t) {
    drive.advance_to(now);
    if (!drive.done(t)) {
      const double at = drive.run_until_done(t);
      if (now >= step_start) {
        res.worker_wait_s += at - now;
      }
      now = at;
    }
  }

  // GPU buffers whose D2H completed become stores (in completion order).
  void settle_gpu_buffers() {
    for (;;) {
      int pick = -1;
      for (size_t b = 0; b < bufs.size(); ++b) {
        if (bufs[b].state == BufState::kGpu && bufs[b].gpu_done <= now &&
            (pick < 0 || bufs[b].gpu_done < bufs[size_t(pick)].gpu_done)) {
          pick = int(b);
        }
      }
      if (pick < 0) {
        return;
      }
      bufs[size_t(pick)].state = BufState::kStoring;
      bufs[size_t(pick)].seq = store_seq++;
    }
  }

  void finish(size_t b) {
    Buf& buf = bufs[b];
    if (buf.state == BufState::kFree) {
      return;
    }
    if (buf.state == BufState::kGpu) {
      idle_until(buf.gpu_done);
      settle_gpu_buffers();
    }
    const bool fetching = buf.state == BufState::kFetching;
    buf.state = BufState::kFree;
    wait_ticket(buf.ticket);
    const size_t i = buf.item;
    const uint64_t bytes = shape.subgroups[i].record_bytes;
    if (fetching) {
      record(EventKind::kFetch, i, "nvme", drive.submitted_at(buf.ticket),
             drive.done_at(buf.ticket), bytes);
      // The record's chunks are verified as the update reaches them
      // (step_in_slices): one hash from DRAM; the store's hash of the same
      // chunks right after their update reads them from cache and is not
      // counted.
      busy(hash_s(i), threads_now());
    } else {
      record(EventKind::kStore, i, "nvme", drive.submitted_at(buf.ticket),
             drive.done_at(buf.ticket), bytes);
    }
  }

  // run_pipeline's pump(): fetch known sub-groups into free buffers, or into
  // the buffer of the oldest store unless it is the newest (lag 1).
  std::vector<size_t> to_fetch;
  size_t to_fetch_head = 0;
  void pump(bool force) {
    const size_t nb = bufs.size();
    while (to_fetch_head < to_fetch.size()) {
      settle_gpu_buffers();
      int chosen = -1;
      for (size_t b = 0; b < nb; ++b) {
        if (bufs[b].state == BufState::kFree) {
          chosen = int(b);
          break;
        }
      }
      if (chosen < 0) {
        uint64_t best = UINT64_MAX;
        for (size_t b = 0; b < nb; ++b) {
          if (bufs[b].state == BufState::kStoring && bufs[b].seq < best) {
            best = bufs[b].seq;
            chosen = int(b);
          }
        }
        if (chosen < 0) {
          // Every buffer is with the GPU (or fetching): a forced pump waits
          // for the first D2H to complete.
          double first = kInf;
          for (const auto& bf : bufs) {
            if (bf.state == BufState::kGpu) {
              first = std::min(first, bf.gpu_done);
            }
          }
          if (!force || first == kInf) {
            return;
          }
          idle_until(first);
          continue;
        }
        if (!force && nb >= 2 && best + 1 == store_seq) {
          return;
        }
        finish(size_t(chosen));
      }
      const size_t i = to_fetch[to_fetch_head++];
      Buf& buf = bufs[size_t(chosen)];
      buf.item = i;
      buf.ticket = drive.submit(false, shape.subgroups[i].record_bytes, now);
      buf.state = BufState::kFetching;
      buf_of[i] = chosen;
      force = false;
    }
  }

  // GPU side of a sub-group: H2D (streamed), kernel after backward, D2H.
  // Returns when the D2H (or the kernel) completes.
  double gpu_path(size_t i, double t) {
    const auto& sg = shape.subgroups[i];
    const double b = double(sg.record_bytes);
    if (sched.device[i] == UpdateDevice::kGpuStreamed) {
      double& h = hw.pcie_duplex ? h2d_free : d2h_free;
      const double s = std::max(t, h);
      h = s + b / hw.h2d_bytes_per_s;
      record(EventKind::kH2D, i, "h2d", s, h, sg.record_bytes);
      t = h;
    }
    const double gs = std::max({t, gpu_free, B});
    gpu_free = gs + double(sg.numel) / hw.gpu_update_params_per_s;
    record(EventKind::kUpdate, i, "gpu", gs, gpu_free, sg.numel);
    t = gpu_free;
    if (sched.device[i] == UpdateDevice::kGpuStreamed) {
      const double s = std::max(t, d2h_free);
      d2h_free = s + b / hw.d2h_bytes_per_s;
      record(EventKind::kD2H, i, "d2h", s, d2h_free, sg.record_bytes);
      t = d2h_free;
    }
    gpu_last = std::max(gpu_last, t);
    return t;
  }

  double cpu_update(size_t i) {
    const auto& sg = shape.subgroups[i];
    const double rate = hw.cpu_rate(sg.grad_dtype, threads_now()) * cpu_factor();
    const double dt = double(sg.numel) / rate;
    const double s = now;
    busy(dt, threads_now());
    record(EventKind::kUpdate, i, "cpu", s, now, sg.numel);
    double done = now;
    if (shape.model_on_gpu && hw.has_gpu()) {
      // New parameters to the model on the GPU (copy stream; the pipeline
      // thread moves on).
      const double hs = std::max(now, h2d_free);
      h2d_free = hs + double(sg.numel) * double(shape.param_bytes) / hw.h2d_bytes_per_s;
      record(EventKind::kH2D, i, "h2d", hs, h2d_free, sg.numel * shape.param_bytes);
      gpu_last = std::max(gpu_last, h2d_free);
      done = h2d_free;
    }
    return done;
  }

  Status run() {
    const size_t n = shape.subgroups.size();
    B = opt.backward_s >= 0 ? opt.backward_s : hw.backward_seconds;
    const double F = opt.forward_s >= 0 ? opt.forward_s : hw.forward_seconds;
    full_threads = std::max(hw.cpu_threads, 1u);
    bw_threads = std::max(1u, std::min(sched.backward_threads, full_threads));
    const bool eager = sched.overlap == OverlapMode::kEager;
    const bool exact = sched.overlap == OverlapMode::kExact;
    const bool off = sched.overlap == OverlapMode::kOff;

    // Arrival of each sub-group at the pipeline: its ready time (spread over
    // backward by elements when not given), after its gradients reached the
    // host when the model is on a GPU; everything at B without overlap.
    std::vector<double> arrive(n);
    {
      double total = 0, cum = 0;
      for (const auto& sg : shape.subgroups) {
        total += double(sg.numel);
      }
      double grad_link = 0;
      for (size_t i = 0; i < n; ++i) {
        const auto& sg = shape.subgroups[i];
        cum += double(sg.numel);
        double r = sg.ready_s >= 0 ? std::min(sg.ready_s, B) : (total > 0 ? B * cum / total : B);
        if (shape.model_on_gpu && hw.has_gpu() && sched.device[i] == UpdateDevice::kCpu) {
          const double s = std::max(r, grad_link);
          grad_link = s + double(sg.numel) * double(kernels::dtype_size(sg.grad_dtype)) /
                              hw.d2h_bytes_per_s;
          record(EventKind::kD2H, i, "d2h", s, grad_link,
                 sg.numel * kernels::dtype_size(sg.grad_dtype));
          r = grad_link;
        }
        arrive[i] = off ? std::max(B, r) : r;
      }
      d2h_free = grad_link;
    }
    // Ready order (stable by index for ties).
    std::vector<size_t> by_time(n);
    for (size_t i = 0; i < n; ++i) {
      by_time[i] = i;
    }
    std::stable_sort(by_time.begin(), by_time.end(),
                     [&](size_t a, size_t b) { return arrive[a] < arrive[b]; });

    step_start = off ? B : 0;
    now = step_start;
    drive.advance_to(now);
    const size_t nb = shape.buffer_count;  // >= 1: simulate_step checks it via predict_step
    bool any_fetch = false;
    for (size_t i = 0; i < n; ++i) {
      any_fetch = any_fetch || fetch_tier(i);
    }
    bufs.assign(any_fetch ? nb : 0, Buf{});
    buf_of.assign(n, -1);

    if (off && shape.grad_stats && hw.grad_stats_params_per_s > 0) {
      // grad_stats() over every sub-group before step() (clipping / fp16).
      double total = 0;
      for (const auto& sg : shape.subgroups) {
        total += double(sg.numel);
      }
      busy(total / hw.stats_rate(), full_threads);
    }
    std::vector<size_t> order;
    size_t next_update = 0;
    double updates_done = now;
    for (;;) {
      // Wait: new sub-groups, or (gate open and) updates to run or the end.
      size_t arrived = 0;
      bool gate = false, closed = false;
      for (;;) {
        arrived = 0;
        while (arrived < n && arrive[by_time[arrived]] <= now) {
          ++arrived;
        }
        gate = eager || now >= B;
        closed = arrived == n;
        if (arrived > order.size() || (gate && (next_update < order.size() || closed))) {
          break;
        }
        double next = arrived < n ? arrive[by_time[arrived]] : kInf;
        if (!gate) {
          next = std::min(next, B);
        }
        idle_until(next);
      }
      const size_t known_before = order.size();
      for (size_t k = known_before; k < arrived; ++k) {
        order.push_back(by_time[k]);
        if (fetch_tier(by_time[k])) {
          to_fetch.push_back(by_time[k]);
        }
      }
      pump(false);
      if (exact && hw.grad_stats_params_per_s > 0) {
        // Gradient statistics of the new sub-groups (the pipeline thread's
        // pool: backward threads while backward runs).
        for (size_t k = known_before; k < order.size(); ++k) {
          const unsigned t = threads_now();
          busy(double(shape.subgroups[order[k]].numel) / hw.stats_rate(t), t);
        }
      }
      if (!gate) {
        continue;
      }
      while (next_update < order.size()) {
        const size_t i = order[next_update];
        const UpdateDevice dev = sched.device[i];
        if (!fetch_tier(i)) {
          if (dev == UpdateDevice::kCpu) {
            updates_done = std::max(updates_done, cpu_update(i));
          } else {
            updates_done = std::max(updates_done, gpu_path(i, now));
          }
          ++next_update;
          continue;
        }
        if (buf_of[i] < 0) {
          pump(true);  // no buffer was free: make one
        }
        const size_t b = size_t(buf_of[i]);
        finish(b);
        Buf& buf = bufs[b];
        buf.item = i;
        if (dev == UpdateDevice::kCpu) {
          updates_done = std::max(updates_done, cpu_update(i));
          buf.ticket = drive.submit(true, shape.subgroups[i].record_bytes, now);
          buf.state = BufState::kStoring;
          buf.seq = store_seq++;
        } else {
          const double t = gpu_path(i, now);
          updates_done = std::max(updates_done, t);
          buf.gpu_done = t;
          buf.ticket = drive.submit(true, shape.subgroups[i].record_bytes, t);
          buf.state = BufState::kGpu;
        }
        buf_of[i] = -1;
        ++next_update;
        pump(false);
      }
      if (closed && next_update == order.size()) {
        break;
      }
    }
    updates_done = std::max({updates_done, now, gpu_last});
    // Drain: stores complete in the background until the next sync point.
    for (size_t b = 0; b < bufs.size(); ++b) {
      finish(b);
    }
    const double end = std::max(now, updates_done);
    res.updates_done_s = std::max(0.0, updates_done - B);
    res.step_s = std::max(res.updates_done_s, end - B);
    res.exposed_s = res.updates_done_s + std::max(0.0, res.step_s - res.updates_done_s - F);
    res.iteration_s = (B > 0 || F > 0) ? F + B + res.exposed_s : 0;
    res.nvme_busy_s = drive.busy_s();
    res.io_requests = drive.requests();
    std::stable_sort(res.events.begin(), res.events.end(),
                     [](const SimEvent& a, const SimEvent& b) { return a.start_s < b.start_s; });
    return Status::Ok();
  }
};

}  // namespace

nlohmann::json SimResult::to_json(bool with_events) const {
  nlohmann::json j;
  j["updates_done_s"] = updates_done_s;
  j["step_s"] = step_s;
  j["exposed_s"] = exposed_s;
  j["iteration_s"] = iteration_s;
  j["nvme_busy_s"] = nvme_busy_s;
  j["cpu_busy_s"] = cpu_busy_s;
  j["worker_wait_s"] = worker_wait_s;
  j["io_requests"] = io_requests;
  if (with_events) {
    j["events"] = nlohmann::json::array();
    for (const auto& e : events) {
      j["events"].push_back({{"kind", event_kind_name(e.kind)},
                             {"subgroup", e.subgroup},
                             {"resource", e.resource},
                             {"start_s", e.start_s},
                             {"end_s", e.end_s},
                             {"bytes", e.bytes}});
    }
  }
  return j;
}

Result<SimResult> simulate_step(const HardwareProfile& hw, const StepShape& shape,
                                const Schedule& schedule, const SimOptions& options) {
  PredictOptions po;
  po.backward_s = options.backward_s;
  po.forward_s = options.forward_s;
  Prediction check = predict_step(hw, shape, schedule, po);
  if (!check.feasible) {
    return invalid_argument("simulate_step: " + check.infeasible_reason);
  }
  Sim sim(hw, shape, schedule, options);
  STRATA_RETURN_IF_ERROR(sim.run());
  return std::move(sim.res);
}

}  // namespace strata::engine
