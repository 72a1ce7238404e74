#include <strata/engine/trace.h>

#include <algorithm>
#include <cstdio>
#include <fstream>

#include <strata/platform/clock.h>

namespace strata::engine {

const char* event_kind_name(EventKind kind) {
  switch (kind) {
    case EventKind::kFetch:
      return "fetch";
    case EventKind::kUpdate:
      return "update";
    case EventKind::kStore:
      return "store";
    case EventKind::kStep:
      return "step";
    case EventKind::kBackward:
      return "backward";
    case EventKind::kForward:
      return "forward";
    case EventKind::kH2D:
      return "h2d";
    case EventKind::kD2H:
      return "d2h";
    case EventKind::kWeightFetch:
      return "weight fetch";
    case EventKind::kWeightStore:
      return "weight store";
  }
  return "?";
}

int64_t now_ns() { return platform::steady_ns(); }

namespace {

using Interval = std::pair<int64_t, int64_t>;

std::vector<Interval> merge(std::vector<Interval> v) {
  std::sort(v.begin(), v.end());
  std::vector<Interval> out;
  for (const auto& iv : v) {
    if (iv.second <= iv.first) {
      continue;
    }
    if (!out.empty() && iv.first <= out.back().second) {
      out.back().second = std::max(out.back().second, iv.second);
    } else {
      out.push_back(iv);
    }
  }
  return out;
}

int64_t total(const std::vector<Interval>& v) {
  int64_t t = 0;
  for (const auto& iv : v) {
    t += iv.second - iv.first;
  }
  return t;
}

int64_t intersection(const std::vector<Interval>& a, const std::vector<Interval>& b) {
  int64_t t = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    int64_t lo = std::max(a[i].first, b[j].first);
    int64_t hi = std::min(a[i].second, b[j].second);
    if (hi > lo) {
      t += hi - lo;
    }
    if (a[i].second < b[j].second) {
      ++i;
    } else {
      ++j;
    }
  }
  return t;
}

}  // namespace

StepBreakdown compute_breakdown(const std::vector<TraceEvent>& events, int64_t step) {
  StepBreakdown b;
  b.step = step;
  std::vector<Interval> io, compute;
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  bool have_step = false;
  for (const auto& e : events) {
    if (e.step != step) {
      continue;
    }
    switch (e.kind) {
      case EventKind::kFetch:
      case EventKind::kH2D:
        io.emplace_back(e.start_ns, e.end_ns);
        b.bytes_fetched += e.bytes;
        break;
      case EventKind::kStore:
      case EventKind::kD2H:
        io.emplace_back(e.start_ns, e.end_ns);
        b.bytes_stored += e.bytes;
        break;
      case EventKind::kUpdate:
        compute.emplace_back(e.start_ns, e.end_ns);
        break;
      case EventKind::kStep:
        lo = e.start_ns;
        hi = e.end_ns;
        have_step = true;
        break;
      default:
        break;
    }
    if (!have_step) {
      lo = std::min(lo, e.start_ns);
      hi = std::max(hi, e.end_ns);
    }
  }
  if (hi <= lo) {
    return b;
  }
  auto mio = merge(io);
  auto mcp = merge(compute);
  int64_t io_t = total(mio), cp_t = total(mcp), ov = intersection(mio, mcp);
  int64_t busy = io_t + cp_t - ov;
  b.wall_s = double(hi - lo) * 1e-9;
  b.io_busy_s = double(io_t) * 1e-9;
  b.compute_busy_s = double(cp_t) * 1e-9;
  b.overlap_s = double(ov) * 1e-9;
  b.stall_s = std::max(0.0, double(hi - lo - busy) * 1e-9);
  return b;
}

nlohmann::json StepBreakdown::to_json() const {
  return {{"step", step},
          {"wall_s", wall_s},
          {"io_busy_s", io_busy_s},
          {"compute_busy_s", compute_busy_s},
          {"overlap_s", overlap_s},
          {"stall_s", stall_s},
          {"bytes_fetched", bytes_fetched},
          {"bytes_stored", bytes_stored}};
}

std::string StepBreakdown::to_string() const {
  char buf[256];
  auto pct = [&](double x) { return wall_s > 0 ? 100.0 * x / wall_s : 0.0; };
  std::snprintf(buf, sizeof(buf),
                "step %lld: %.3f s | I/O busy %.3f s (%.0f%%) | update %.3f s (%.0f%%) | "
                "overlap %.3f s | stall %.3f s",
                (long long)step, wall_s, io_busy_s, pct(io_busy_s), compute_busy_s,
                pct(compute_busy_s), overlap_s, stall_s);
  return buf;
}

void Trace::begin_step(int64_t step) {
  std::lock_guard<std::mutex> lock(mu_);
  // Events recorded since the last step ended (its forward, weight fetches)
  // belong to this one.
  current_step_ = step;
}

void Trace::record(const TraceEvent& event) {
  std::lock_guard<std::mutex> lock(mu_);
  current_.push_back(event);
}

void Trace::end_step() {
  std::lock_guard<std::mutex> lock(mu_);
  // Events of a later step (its forward began before this one's write-back
  // ended) stay for it.
  std::vector<TraceEvent> mine, later;
  for (auto& e : current_) {
    (e.step > current_step_ ? later : mine).push_back(e);
  }
  last_ = compute_breakdown(mine, current_step_);
  steps_.push_back(std::move(mine));
  current_ = std::move(later);
  while (steps_.size() > keep_steps_) {
    steps_.pop_front();
  }
}

StepBreakdown Trace::last_breakdown() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_;
}

std::vector<TraceEvent> Trace::events() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<TraceEvent> out;
  for (const auto& s : steps_) {
    out.insert(out.end(), s.begin(), s.end());
  }
  return out;
}

nlohmann::json Trace::chrome_json() const {
  auto evs = events();
  int64_t t0 = INT64_MAX;
  for (const auto& e : evs) {
    t0 = std::min(t0, e.start_ns);
  }
  // One lane (tid) per resource.
  auto lane = [](const TraceEvent& e) -> std::pair<int, std::string> {
    std::string tier = e.tier ? e.tier : "";
    switch (e.kind) {
      case EventKind::kFetch:
        return {tier == "cxl" ? 3 : 1, tier == "cxl" ? "CXL fetch" : "NVMe read"};
      case EventKind::kStore:
        return {tier == "cxl" ? 4 : 2, tier == "cxl" ? "CXL store" : "NVMe write"};
      case EventKind::kUpdate:
        return {tier == "gpu" ? 6 : 5, tier == "gpu" ? "GPU update" : "CPU update"};
      case EventKind::kStep:
        return {0, "step"};
      case EventKind::kBackward:
        return {8, "backward"};
      case EventKind::kForward:
        return {7, "forward"};
      case EventKind::kH2D:
        return {9, "H2D"};
      case EventKind::kD2H:
        return {10, "D2H"};
      case EventKind::kWeightFetch:
        return {12, "weight read"};
      case EventKind::kWeightStore:
        return {13, "weight write"};
    }
    return {11, "other"};
  };
  nlohmann::json out = nlohmann::json::array();
  std::vector<bool> named(16, false);
  for (const auto& e : evs) {
    auto [tid, lname] = lane(e);
    if (!named[size_t(tid)]) {
      named[size_t(tid)] = true;
      out.push_back({{"name", "thread_name"},
                     {"ph", "M"},
                     {"pid", 1},
                     {"tid", tid},
                     {"args", {{"name", lname}}}});
      out.push_back({{"name", "thread_sort_index"},
                     {"ph", "M"},
                     {"pid", 1},
                     {"tid", tid},
                     {"args", {{"sort_index", tid}}}});
    }
    std::string name = std::string(event_kind_name(e.kind));
    if (e.subgroup >= 0) {
      const bool weight = e.kind == EventKind::kWeightFetch || e.kind == EventKind::kWeightStore;
      name += (weight ? " p" : " sg") + std::to_string(e.subgroup);  // record id for weights
    }
    out.push_back({{"name", name},
                   {"cat", event_kind_name(e.kind)},
                   {"ph", "X"},
                   {"pid", 1},
                   {"tid", tid},
                   {"ts", double(e.start_ns - t0) / 1000.0},
                   {"dur", double(e.end_ns - e.start_ns) / 1000.0},
                   {"args",
                    {{"step", e.step},
                     {"subgroup", e.subgroup},
                     {"tier", e.tier ? e.tier : ""},
                     {"bytes", e.bytes}}}});
  }
  return {{"traceEvents", out},
          {"displayTimeUnit", "ms"},
          {"otherData", {{"producer", "strata"}, {"breakdown", last_breakdown().to_json()}}}};
}

Status Trace::write_chrome(const std::string& path) const {
  std::ofstream f(path);
  if (!f) {
    return Status::from_errno(errno, "open trace " + path);
  }
  f << chrome_json().dump();
  if (!f) {
    return Status::from_errno(errno, "write trace " + path);
  }
  return Status::Ok();
}

}  // namespace strata::engine
