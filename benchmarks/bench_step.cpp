// strata-bench-step: optimizer steps of the tiered engine against the bounds
// measured in the same process.
//
// For a total size and placement it builds an engine with synthetic, never
// materialised gradients (one deterministic buffer reused by every sub-group,
// so the process holds no full gradient copy and no model), writes the state,
// then alternates: one engine step, the I/O bound (a raw io_uring loop reading
// and writing the same extents of the same swap file at the same block size
// and queue depth, reads and writes concurrently as the pipeline runs them;
// the bytes read are written back unchanged, so the state stays intact) and
// the update bound (the same kernel, threads and element count on resident
// data). Reports medians after a warm-up and ratio_to_bound =
// step / max(io_bound, update_bound).
//
// --state-dtype fp32,bf16,int8_blockwise builds one engine per optimizer
// state dtype (strata.optimizer_state_dtype), each with its own swap file,
// and alternates their steps (a, b, c, a, b, c, ...) so that drift of the
// drive or the machine falls on all of them alike; the summary gives each
// one's median step against the first one's (vs_first).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>

#ifdef STRATA_HAVE_URING
#include <liburing.h>
#endif

#include <strata/engine/engine.h>
#include <strata/kernels/thread_pool.h>

#include "common/bench_util.h"

using namespace strata;
using namespace strata::bench;

namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

struct RawIo {
  int fd = -1;
  size_t block = 1 << 20;
  unsigned depth = 32;
  // 2 x depth block buffers, from huge-page memory like the engine's pool (a
  // disk splits requests over scattered 4 KiB pages, which would handicap
  // the bound).
  char* slots = nullptr;
  size_t nslots = 0, map_bytes = 0;
#ifdef STRATA_HAVE_URING
  io_uring ring{};
  bool ring_ok = false;
#endif

  bool open(const std::string& path, size_t block_size, unsigned qd) {
    block = block_size;
    depth = qd;
    fd = ::open(path.c_str(), O_RDWR | O_DIRECT);
    if (fd < 0) fd = ::open(path.c_str(), O_RDWR);
    if (fd < 0) return false;
    nslots = 2 * size_t(depth);
    map_bytes = (nslots * block + (2u << 20) - 1) / (2u << 20) * (2u << 20);
    void* p = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    madvise(p, map_bytes, MADV_HUGEPAGE);
    std::memset(p, 0, map_bytes);
    slots = static_cast<char*>(p);
#ifdef STRATA_HAVE_URING
    ring_ok = io_uring_queue_init(std::max(depth * 2, 8u), &ring, 0) == 0;
    return ring_ok;
#else
    return false;
#endif
  }
  ~RawIo() {
#ifdef STRATA_HAVE_URING
    if (ring_ok) io_uring_queue_exit(&ring);
#endif
    if (slots) munmap(slots, map_bytes);
    if (fd >= 0) ::close(fd);
  }

  struct Op {
    bool write;
    uint64_t offset;
    size_t len;
    char* buf;
  };

  // Keeps `depth` requests in flight over `ops`, submitted in order; returns
  // false on error.
  bool run(const std::vector<Op>& ops) {
#ifdef STRATA_HAVE_URING
    size_t next = 0, inflight = 0;
    while (next < ops.size() || inflight > 0) {
      while (next < ops.size() && inflight < depth) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);
        if (!sqe) break;
        const Op& op = ops[next++];
        if (op.write) {
          io_uring_prep_write(sqe, fd, op.buf, unsigned(op.len), op.offset);
        } else {
          io_uring_prep_read(sqe, fd, op.buf, unsigned(op.len), op.offset);
        }
        ++inflight;
      }
      io_uring_submit_and_wait(&ring, 1);
      io_uring_cqe* cqe;
      unsigned head, n = 0;
      bool bad = false;
      io_uring_for_each_cqe(&ring, head, cqe) {
        if (cqe->res < 0) bad = true;
        ++n;
      }
      io_uring_cq_advance(&ring, n);
      inflight -= n;
      if (bad) return false;
    }
    return true;
#else
    return false;
#endif
  }

  // Every block of the engine's NVMe extents is read, and written back (the
  // bytes just read) `depth` blocks later, reads and writes alternating, so the
  // drive reads and writes together as the pipeline makes it. Block b uses
  // slot b % (2 x depth): with at most `depth` requests in flight and in-order
  // submission, read b has completed before write b is submitted, and write b
  // before read b + 2 x depth reuses the slot.
  bool pass(const std::vector<engine::Engine::RecordLocation>& recs) {
    struct Block {
      uint64_t offset;
      size_t len;
    };
    std::vector<Block> blocks;
    for (const auto& r : recs) {
      if (r.tier != tiers::TierKind::kNvme) continue;
      for (uint64_t off = 0; off < r.bytes; off += block) {
        blocks.push_back({r.offset + off, size_t(std::min<uint64_t>(block, r.bytes - off))});
      }
    }
    std::vector<Op> ops;
    const size_t lag = depth;
    for (size_t b = 0; b < blocks.size() + lag; ++b) {
      if (b < blocks.size()) {
        ops.push_back({false, blocks[b].offset, blocks[b].len, slots + (b % nslots) * block});
      }
      if (b >= lag) {
        size_t w = b - lag;
        ops.push_back({true, blocks[w].offset, blocks[w].len, slots + (w % nslots) * block});
      }
    }
    return run(ops);
  }
};

}  // namespace

int main(int argc, char** argv) {
  Args args(
      argc, argv,
      {{"params", "512M"},
       {"config", ""},
       {"path", "strata_swap"},
       {"device", "nvme"},
       {"steps", "5"},
       {"warmup", "1"},
       {"sub-group-size", "0"},
       {"buffer-count", "0"},
       {"grad-dtype", "bf16"},
       {"state-dtype", "fp32"},
       {"threads", "0"},
       {"tensor-size", "64M"},
       {"verify", "2"},
       {"json", "false"}},
      "strata-bench-step [--params 512M] [--config ds.json] [--path DIR] [--device nvme|cpu|cxl]\n"
      "  [--steps 5] [--warmup 1] [--sub-group-size N] [--buffer-count N] [--grad-dtype "
      "bf16|fp32]\n"
      "  [--state-dtype fp32[,bf16[,int8_blockwise]]] [--threads 0] [--tensor-size 64M]\n"
      "  [--verify K sampled sub-groups] [--json]\n"
      "Sizes take K/M/G suffixes as powers of 1024 (512M params = 536870912).\n"
      "Several state dtypes: one engine each (own swap file under --path), steps alternating.");
  const bool json = args.flag("json");
  nlohmann::json cfg_json = nlohmann::json::object();
  if (!args.get("config").empty()) {
    std::ifstream f(args.get("config"));
    cfg_json = nlohmann::json::parse(f, nullptr, false, true);
    if (cfg_json.is_discarded()) {
      std::cerr << "cannot parse " << args.get("config") << "\n";
      return 2;
    }
  } else {
    cfg_json = {{"zero_optimization",
                 {{"sub_group_size", 16 << 20}, {"offload_optimizer", {{"buffer_count", 4}}}}},
                {"aio", {{"block_size", 1 << 20}, {"queue_depth", 32}}}};
  }
  auto& off = cfg_json["zero_optimization"]["offload_optimizer"];
  off["device"] = args.get("device");
  if (args.get("device") == "nvme" || off.contains("nvme_path")) {
    ::mkdir(args.get("path").c_str(), 0755);
    off["nvme_path"] = args.get("path");
  }
  if (args.size("sub-group-size"))
    cfg_json["zero_optimization"]["sub_group_size"] = args.size("sub-group-size");
  if (args.size("buffer-count")) off["buffer_count"] = args.size("buffer-count");
  cfg_json["strata"]["threads"] = int(args.number("threads"));
  std::vector<std::string> states;
  {
    std::string list = args.get("state-dtype") + ",";
    for (size_t a = 0, b; (b = list.find(',', a)) != std::string::npos; a = b + 1) {
      if (b > a) states.push_back(list.substr(a, b - a));
    }
  }
  if (states.empty()) {
    std::cerr << "--state-dtype: give at least one of fp32, bf16, int8_blockwise\n";
    return 2;
  }
  const uint64_t total = args.size("params");
  const uint64_t tensor = std::max<uint64_t>(args.size("tensor-size"), 1);
  const kernels::DType gd =
      args.get("grad-dtype") == "fp32" ? kernels::DType::kF32 : kernels::DType::kBF16;
  kernels::OptimizerHyper h;
  h.kind = kernels::OptimizerKind::kAdamW;
  h.lr = 1e-4f;
  h.weight_decay = 0.01f;

  // One engine per state dtype, each with its own config (and swap file).
  struct Run {
    std::string state;
    Config cfg;
    std::unique_ptr<engine::Engine> eng;
    std::vector<engine::Engine::RecordLocation> locs;
    std::unique_ptr<RawIo> raw;
    bool raw_ok = false;
    double init_s = 0;
    std::vector<char> resident;  // one record of the bound's size, in the engine's layout
    engine::SubGroup bound_sg;
    std::vector<double> steps, ios, ups;
  };
  std::vector<Run> runs(states.size());
  size_t max_numel = 0;
  for (size_t r = 0; r < states.size(); ++r) {
    nlohmann::json j = cfg_json;
    j["strata"]["optimizer_state_dtype"] = states[r];
    if (states.size() > 1 && off.contains("nvme_path")) {
      const std::string sub = args.get("path") + "/" + states[r];
      ::mkdir(sub.c_str(), 0755);
      j["zero_optimization"]["offload_optimizer"]["nvme_path"] = sub;
    }
    auto cfg = Config::parse(j);
    if (!cfg.ok()) {
      std::cerr << cfg.status().to_string() << "\n";
      return 2;
    }
    runs[r].state = states[r];
    runs[r].cfg = cfg.value();
    max_numel = std::max(max_numel, size_t(std::min<uint64_t>(
                                        total, uint64_t(cfg.value().typed().zero.sub_group_size))));
  }
  // One deterministic gradient buffer, as large as the largest sub-group.
  std::vector<uint16_t> g16;
  std::vector<float> g32;
  if (gd == kernels::DType::kF32) {
    g32.resize(max_numel);
    for (size_t k = 0; k < max_numel; ++k) g32[k] = std::sin(float(k) * 0.37f) * 1e-2f;
  } else {
    g16.resize(max_numel);
    for (size_t k = 0; k < max_numel; ++k) {
      float f = std::sin(float(k) * 0.37f) * 1e-2f;
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      g16[k] = uint16_t(bits >> 16);  // truncation is fine for synthetic data
    }
  }
  const void* gptr = gd == kernels::DType::kF32 ? static_cast<const void*>(g32.data()) : g16.data();

  // A StateView of a record laid out as sg (the engine's own layout rule).
  auto view_of = [](const engine::SubGroup& sg, char* rec) {
    return engine::state_view(sg, 3, rec);
  };

  Table table({"state", "step", "step_s", "io_bound_s", "update_bound_s", "ratio", "GB_moved"},
              json);
  for (Run& run : runs) {
    engine::EngineOptions o;
    o.config = run.cfg;
    for (uint64_t done = 0, i = 0; done < total; ++i) {
      uint64_t n = std::min(tensor, total - done);
      o.params.push_back({"t" + std::to_string(i), int64_t(n), gd, 0, nullptr});
      done += n;
    }
    o.groups = {h};
    o.grad_source = [gptr](const engine::SubGroup&) { return gptr; };
    double t0 = now_seconds();
    auto er = engine::Engine::create(std::move(o));
    if (!er.ok()) {
      std::cerr << "engine (" << run.state << "): " << er.status().to_string() << "\n";
      return 1;
    }
    run.eng = std::move(er).value();
    run.init_s = now_seconds() - t0;
    auto& eng = *run.eng;
    const auto& plan = eng.plan();
    run.locs = eng.record_locations();
    std::string placement;
    for (const auto& t : plan.tiers) {
      if (!placement.empty()) placement += "+";
      placement += tiers::tier_name(t.tier);
    }
    table.note(run.state + ": params " + std::to_string(total) + " (" +
               format_bytes(double(plan.bytes_on(tiers::TierKind::kNvme) +
                                   plan.bytes_on(tiers::TierKind::kHost) +
                                   plan.bytes_on(tiers::TierKind::kCxl))) +
               " of state, " + std::to_string(plan.state_bytes_per_element).substr(0, 5) +
               " bytes per parameter), placement " + placement + ", sub_group_size " +
               std::to_string(plan.sub_group_size) + ", buffer_count " +
               std::to_string(plan.buffer_count) + ", " + std::to_string(plan.subgroups.size()) +
               " sub-groups, init " + std::to_string(run.init_s) + " s");
    auto st0 = eng.stats();
    table.note(run.state + ": io backend " + st0.io_backend +
               (st0.io_note.empty() ? "" : " (" + st0.io_note + ")") + ", swap file " +
               st0.swap_file_path + ", kernel " + st0.isa + " x" + std::to_string(st0.threads) +
               " threads");
    if (!st0.swap_file_path.empty()) {
      run.raw = std::make_unique<RawIo>();
      run.raw_ok = run.raw->open(st0.swap_file_path, size_t(run.cfg.typed().aio.block_size),
                                 unsigned(run.cfg.typed().aio.queue_depth));
      if (!run.raw_ok) table.note("raw io_uring loop unavailable: no I/O bound measured");
    }
    // Resident data for the update bound: a record of up to 4M elements (48
    // MiB in fp32, beyond the caches) in this engine's layout, updated
    // repeatedly until `total` elements are done.
    run.bound_sg = eng.subgroups().front();
    run.bound_sg.numel = std::min<size_t>(max_numel, size_t(4) << 20);
    run.bound_sg.slot_stride = engine::slot_stride_for(run.bound_sg.numel);
    engine::lay_out_record(run.bound_sg, {run.bound_sg.slot_dtype[0], run.bound_sg.slot_dtype[1],
                                          run.bound_sg.slot_dtype[2]});
    run.resident.assign(run.bound_sg.record_bytes, 0);
  }
  kernels::ThreadPool pool(runs.front().eng->stats().threads);
  auto update_bound = [&](Run& run) {
    double s = now_seconds();
    kernels::StateView v = view_of(run.bound_sg, run.resident.data());
    const size_t cap = v.n;
    uint64_t left = total;
    kernels::StepArgs a;
    while (left > 0) {
      v.n = size_t(std::min<uint64_t>(left, cap));
      (void)kernels::optimizer_step(h, a, v, gptr, gd, {}, gd, &pool);
      left -= v.n;
    }
    return now_seconds() - s;
  };

  const int nsteps = int(args.number("steps")), warm = int(args.number("warmup"));
  for (int s = 0; s < warm + nsteps; ++s) {
    for (Run& run : runs) {
      auto& eng = *run.eng;
      // A step ends when its write-back is done: sync() waits for the stores
      // the engine defers into the next forward, so the step is timed whole
      // and the raw pass below never races the engine's writes.
      double a = now_seconds();
      Status st = eng.step();
      if (st.ok()) st = eng.sync();
      double step_s = now_seconds() - a;
      if (!st.ok()) {
        std::cerr << "step (" << run.state << "): " << st.to_string() << "\n";
        return 1;
      }
      double io_s = 0;
      if (run.raw_ok) {
        double b = now_seconds();
        if (!run.raw->pass(run.locs)) {
          std::cerr << "raw I/O pass failed\n";
          return 1;
        }
        io_s = now_seconds() - b;
      }
      double up_s = update_bound(run);
      double bound = std::max(io_s, up_s);
      table.row({{"state", run.state},
                 {"step", int64_t(s)},
                 {"step_s", step_s},
                 {"io_bound_s", io_s},
                 {"update_bound_s", up_s},
                 {"ratio", bound > 0 ? step_s / bound : 0.0},
                 {"GB_moved", double(eng.plan().nvme_bytes) * 2 / 1e9},
                 {"warmup", int64_t(s < warm)}});
      if (s >= warm) {
        run.steps.push_back(step_s);
        run.ios.push_back(io_s);
        run.ups.push_back(up_s);
      }
    }
  }
  // Peak RSS of the run so far (engines, bounds); the verification below
  // allocates two record-sized references of its own and is not counted.
  const uint64_t peak_rss = peak_rss_bytes();
  for (Run& run : runs) {
    table.note(run.state +
               ": last step breakdown: " + run.eng->trace().last_breakdown().to_string());
  }

  // Verification: sampled sub-groups against the scalar reference, on the
  // engine's own record format.
  int verify = int(args.number("verify"));
  int verified = 0, mismatched = 0;
  for (Run& run : runs) {
    if (verify <= 0) break;
    std::mt19937 rng(7);
    const auto& sgs = run.eng->subgroups();
    for (int k = 0; k < verify; ++k) {
      const auto& sg = sgs[k == 0 ? 0 : (k == 1 ? sgs.size() - 1 : rng() % sgs.size())];
      std::vector<float> rec(sg.record_bytes / 4), ref(sg.record_bytes / 4, 0.0f);
      if (!run.eng->read_record(sg.id, rec.data()).ok()) {
        ++mismatched;
        continue;
      }
      kernels::StateView v = view_of(sg, reinterpret_cast<char*>(ref.data()));
      for (int s = 1; s <= warm + nsteps; ++s) {
        kernels::StepArgs a;
        a.step = s;
        (void)kernels::optimizer_step(h, a, v, gptr, gd, {}, gd, nullptr, kernels::Isa::kScalar);
      }
      ++verified;
      mismatched += std::memcmp(rec.data(), ref.data(), sg.record_bytes) != 0;
    }
  }
  if (verify > 0) {
    table.note("verified " + std::to_string(verified) +
               " sampled sub-groups against the scalar reference: " +
               (mismatched ? std::to_string(mismatched) + " MISMATCHED" : "bit-identical"));
  }

  Table summary({"state", "params", "placement", "step_s", "io_bound_s", "update_bound_s",
                 "ratio_to_bound", "vs_first", "pool", "peak_rss"},
                json);
  const double first = median(runs.front().steps);
  Status cst = Status::Ok();
  for (Run& run : runs) {
    auto st = run.eng->stats();
    std::string placement;
    for (const auto& t : run.eng->plan().tiers) {
      if (!placement.empty()) placement += "+";
      placement += tiers::tier_name(t.tier);
    }
    double ms = median(run.steps), mio = median(run.ios), mup = median(run.ups);
    double bound = std::max(mio, mup);
    summary.row({{"state", run.state},
                 {"params", int64_t(total)},
                 {"placement", placement},
                 {"step_seconds", ms},
                 {"step_s", ms},
                 {"io_bound_seconds", mio},
                 {"io_bound_s", mio},
                 {"compute_bound_seconds", mup},
                 {"update_bound_s", mup},
                 {"ratio_to_bound", bound > 0 ? ms / bound : 0.0},
                 {"vs_first", first > 0 ? ms / first : 0.0},
                 {"state_bytes_per_param", run.eng->plan().state_bytes_per_element},
                 {"pinned_pool_bytes", int64_t(st.pool_reserved)},
                 {"pool", format_bytes(double(st.pool_reserved))},
                 {"peak_rss_bytes", int64_t(peak_rss)},
                 {"peak_rss", format_bytes(double(peak_rss))},
                 {"verified_mismatches", int64_t(mismatched)}});
    Status c = run.eng->close();
    if (cst.ok() && !c.ok()) cst = c;
  }
  return (cst.ok() && mismatched == 0) ? 0 : 1;
}
