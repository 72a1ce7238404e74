// strata-bench-io — the I/O engine against its bounds, on one file.
//
// 1. Writes the whole file once (reads of fallocated, never-written extents
//    return zeros without touching the device and would flatter every engine).
// 2. Sweep: for each block size x queue depth x op, in each round, times a
//    raw baseline (the simplest O_DIRECT io_uring loop, written here, not the
//    engine) and then each backend over --pass-size bytes of the file, and
//    prints GB/s, IOPS, p50/p99 per-request latency, CPU s/GB (getrusage
//    user+sys of the whole process / GB) and ratio_to_raw (best of rounds).
// 3. --fio: alternating rounds strata(io_uring), strata(threadpool), fio at
//    --fio-bs/--fio-qd over the whole file, best of each, ratio strata/fio.
//
// GB = 1e9 bytes. Latency: submission to completion of one block request.
#include <fcntl.h>
#if STRATA_HAVE_URING
#include <liburing.h>
#endif
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <strata/io/io_engine.h>
#include <strata/io/probe.h>
#include <nlohmann/json.hpp>

#include "common/bench_util.h"

#if STRATA_HAVE_URING

namespace {

using strata::bench::Args;
using strata::bench::Cell;
using strata::bench::cpu_seconds;
using strata::bench::now_seconds;
using strata::bench::Table;
using namespace strata::io;

constexpr const char* kUsage =
    "strata-bench-io [--path DIR] [--size 4G] [--pass-size 1G] [--block-size 256K,1M,8M]\n"
    "                [--queue-depth 1,8,32,64] [--backend uring,threadpool] [--op read,write]\n"
    "                [--rounds 1] [--ticket-size 64M] [--tickets-in-flight 4] [--json]\n"
    "                [--sweep=false] [--fio] [--fio-bin fio] [--fio-rounds 3] [--fio-bs 1M]\n"
    "                [--fio-qd 32] [--keep] [--no-prefill] [--hugepage=false]\n"
    "Times the strata I/O engine and a raw io_uring loop on DIR/strata-bench-io.dat\n"
    "(written in full first); --fio adds alternating rounds against fio on that file.";

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "strata-bench-io: %s\n", msg.c_str());
  std::exit(1);
}

struct Sample {
  double seconds = 0;
  double cpu = 0;
  uint64_t bytes = 0;
  uint64_t requests = 0;
  double p50_us = 0;
  double p99_us = 0;
  double gbps() const { return seconds > 0 ? double(bytes) / 1e9 / seconds : 0; }
  double iops() const { return seconds > 0 ? double(requests) / seconds : 0; }
  double cpu_per_gb() const { return bytes > 0 ? cpu / (double(bytes) / 1e9) : 0; }
};

void percentiles(std::vector<uint64_t>& ns, Sample* s) {
  if (ns.empty()) {
    return;
  }
  std::sort(ns.begin(), ns.end());
  auto at = [&](double q) {
    size_t i = size_t(q * double(ns.size() - 1) + 0.5);
    return double(ns[std::min(i, ns.size() - 1)]) / 1e3;
  };
  s->p50_us = at(0.50);
  s->p99_us = at(0.99);
}

// Buffers as the pinned pool makes them: anonymous memory, 2 MiB aligned,
// MADV_HUGEPAGE (best effort), pre-faulted. Huge pages matter: a request is
// split at the block layer when its pages are not physically contiguous and
// it needs more than the queue's max_segments (254 on virtio-blk) of them.
bool g_hugepage = true;

struct AlignedMem {
  explicit AlignedMem(size_t n) : size(n) {
    constexpr size_t kHuge = size_t(2) << 20;
    map_len = n + kHuge;
    map = ::mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
      die("cannot map " + std::to_string(n) + " bytes");
    }
    const uintptr_t a = (reinterpret_cast<uintptr_t>(map) + kHuge - 1) / kHuge * kHuge;
    p = reinterpret_cast<void*>(a);
    if (g_hugepage) {
      ::madvise(p, n, MADV_HUGEPAGE);  // best effort, as in the pool
    }
    // Pre-fault, and give writes non-zero data.
    auto* c = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) {
      c[i] = static_cast<unsigned char>(i * 131 + 7);
    }
  }
  ~AlignedMem() { ::munmap(map, map_len); }
  char* data() const { return static_cast<char*>(p); }
  void* map = nullptr;
  size_t map_len = 0;
  void* p = nullptr;
  size_t size;
};

// The bound: the simplest O_DIRECT io_uring loop (plain buffers, one SQE per
// block, submit-and-wait, reap, refill), as fio's io_uring engine runs.
Sample raw_uring(int fd, IoOp op, size_t bs, unsigned qd, uint64_t start, uint64_t bytes, char* mem,
                 size_t mem_bytes) {
  io_uring ring;
  int rc = io_uring_queue_init(qd, &ring, 0);
  if (rc < 0) {
    die(std::string("raw loop: io_uring_queue_init: ") + std::strerror(-rc));
  }
  const uint64_t n = bytes / bs;
  std::vector<double> t0(qd);
  std::vector<unsigned> free_slots(qd);
  for (unsigned i = 0; i < qd; ++i) {
    free_slots[i] = i;
  }
  std::vector<uint64_t> lat;
  lat.reserve(n);
  uint64_t next = 0, done = 0;
  unsigned inflight = 0;
  Sample s;
  const double c0 = cpu_seconds();
  const double w0 = now_seconds();
  while (done < n) {
    while (inflight < qd && next < n) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      const unsigned slot = free_slots.back();
      free_slots.pop_back();
      // Depth slots share the buffer when qd * bs exceeds it (reads land in
      // the same memory; the data is not looked at).
      char* buf = mem + size_t(slot) % std::max<size_t>(1, mem_bytes / bs) * bs;
      const uint64_t off = start + next * bs;
      if (op == IoOp::kRead) {
        io_uring_prep_read(sqe, fd, buf, unsigned(bs), off);
      } else {
        io_uring_prep_write(sqe, fd, buf, unsigned(bs), off);
      }
      io_uring_sqe_set_data64(sqe, slot);
      t0[slot] = now_seconds();
      ++next;
      ++inflight;
    }
    rc = io_uring_submit_and_wait(&ring, 1);
    if (rc < 0 && rc != -EINTR) {
      die(std::string("raw loop: io_uring_submit_and_wait: ") + std::strerror(-rc));
    }
    unsigned head, seen = 0;
    io_uring_cqe* cqe;
    const double now = now_seconds();
    io_uring_for_each_cqe(&ring, head, cqe) {
      ++seen;
      if (cqe->res != int(bs)) {
        die("raw loop: request returned " + std::to_string(cqe->res));
      }
      const unsigned slot = unsigned(io_uring_cqe_get_data64(cqe));
      lat.push_back(uint64_t((now - t0[slot]) * 1e9));
      free_slots.push_back(slot);
      --inflight;
      ++done;
    }
    io_uring_cq_advance(&ring, seen);
  }
  s.seconds = now_seconds() - w0;
  s.cpu = cpu_seconds() - c0;
  io_uring_queue_exit(&ring);
  s.bytes = n * bs;
  s.requests = n;
  percentiles(lat, &s);
  return s;
}

// The engine: the pass is cut into tickets of ticket_bytes, up to
// tickets_in_flight outstanding (a pipeline's pattern). Requests reuse a
// buffer of qd*bs bytes, like fio's per-depth buffers.
Sample engine_pass(IoEngine* engine, int handle, IoOp op, size_t bs, unsigned qd, uint64_t start,
                   uint64_t bytes, char* mem, size_t mem_bytes, uint64_t ticket_bytes,
                   unsigned tickets_in_flight) {
  engine->take_latencies_ns();
  const uint64_t n = bytes / bs;
  // Enough pieces per ticket that the tickets outstanding while one is being
  // replaced still cover the queue depth.
  const uint64_t cover =
      tickets_in_flight > 1 ? (qd + tickets_in_flight - 2) / (tickets_in_flight - 1) : qd;
  const uint64_t per_ticket = std::max<uint64_t>({1, ticket_bytes / bs, cover});
  const size_t slots = std::max<size_t>(1, mem_bytes / bs);
  std::vector<Ticket> outstanding;
  std::vector<IoRequest> reqs;
  Sample s;
  const double c0 = cpu_seconds();
  const double w0 = now_seconds();
  uint64_t k = 0;
  size_t head = 0;
  while (k < n || head < outstanding.size()) {
    if (k < n && outstanding.size() - head < tickets_in_flight) {
      reqs.clear();
      for (uint64_t j = 0; j < per_ticket && k < n; ++j, ++k) {
        reqs.push_back(IoRequest{op, handle, mem + (k % slots) * bs, bs, start + k * bs});
      }
      auto t = engine->submit(reqs);
      if (!t.ok()) {
        die("submit: " + t.status().to_string());
      }
      outstanding.push_back(*t);
      continue;
    }
    strata::Status st = engine->wait(outstanding[head++]);
    if (!st.ok()) {
      die("wait: " + st.to_string());
    }
  }
  s.seconds = now_seconds() - w0;
  s.cpu = cpu_seconds() - c0;
  s.bytes = n * bs;
  s.requests = n;
  std::vector<uint64_t> lat = engine->take_latencies_ns();
  percentiles(lat, &s);
  return s;
}

struct Fio {
  bool ok = false;
  Sample s;
  std::string command;
  std::string error;
};

Fio run_fio(const std::string& bin, const std::string& file, IoOp op, size_t bs, unsigned qd,
            uint64_t size) {
  Fio f;
  f.command = bin + " --name=x --filename=" + file +
              " --ioengine=io_uring --direct=1 --bs=" + std::to_string(bs) +
              " --iodepth=" + std::to_string(qd) +
              " --rw=" + (op == IoOp::kRead ? "read" : "write") +
              " --size=" + std::to_string(size) + " --output-format=json";
  FILE* p = ::popen((f.command + " 2>/dev/null").c_str(), "r");
  if (p == nullptr) {
    f.error = "popen failed";
    return f;
  }
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) {
    out.append(buf, n);
  }
  const int rc = ::pclose(p);
  const size_t brace = out.find('{');
  if (rc != 0 || brace == std::string::npos) {
    f.error = "fio exited with " + std::to_string(rc);
    return f;
  }
  auto j = nlohmann::json::parse(out.substr(brace), nullptr, false);
  if (j.is_discarded() || !j.contains("jobs") || j["jobs"].empty()) {
    f.error = "cannot parse fio output";
    return f;
  }
  const auto& job = j["jobs"][0];
  const auto& side = job[op == IoOp::kRead ? "read" : "write"];
  f.s.bytes = side.value("io_bytes", uint64_t(0));
  f.s.seconds = double(side.value("runtime", uint64_t(0))) / 1e3;
  f.s.requests = side.value("total_ios", uint64_t(0));
  f.s.cpu = (job.value("usr_cpu", 0.0) + job.value("sys_cpu", 0.0)) / 100.0 * f.s.seconds;
  if (side.contains("clat_ns") && side["clat_ns"].contains("percentile")) {
    const auto& pct = side["clat_ns"]["percentile"];
    f.s.p50_us = pct.value("50.000000", 0.0) / 1e3;
    f.s.p99_us = pct.value("99.000000", 0.0) / 1e3;
  }
  f.ok = f.s.bytes > 0 && f.s.seconds > 0;
  if (!f.ok) {
    f.error = "fio reported no I/O";
  }
  return f;
}

std::vector<size_t> sizes(const Args& a, const char* name) {
  std::vector<size_t> out;
  for (const std::string& s : a.list(name)) {
    out.push_back(size_t(strata::bench::parse_size(s)));
  }
  return out;
}

const char* op_name(IoOp op) { return op == IoOp::kRead ? "read" : "write"; }

std::unique_ptr<IoEngine> make_engine(const std::string& backend, size_t bs, unsigned qd) {
  IoOptions o;
  o.backend = backend == "uring" ? IoOptions::Backend::kUring : IoOptions::Backend::kThreadPool;
  o.block_size = bs;
  o.queue_depth = qd;
  o.record_latency = true;
  auto e = make_io_engine(o);
  if (!e.ok()) {
    die("engine " + backend + ": " + e.status().to_string());
  }
  return std::move(e).value();
}

std::vector<std::pair<std::string, Cell>> row(const std::string& op, const std::string& backend,
                                              size_t bs, unsigned qd, const Sample& s, double ratio,
                                              int rounds) {
  return {{"op", op},
          {"backend", backend},
          {"block_size", int64_t(bs)},
          {"queue_depth", int64_t(qd)},
          {"gbps", s.gbps()},
          {"iops", s.iops()},
          {"p50_us", s.p50_us},
          {"p99_us", s.p99_us},
          {"cpu_s_per_gb", s.cpu_per_gb()},
          {"ratio_to_raw", ratio},
          {"bytes", int64_t(s.bytes)},
          {"rounds", int64_t(rounds)}};
}

}  // namespace

int main(int argc, char** argv) {
  struct stat st {};
  const std::string default_dir = ::stat("./strata_swap", &st) == 0 ? "./strata_swap" : "/tmp";
  Args args(argc, argv,
            {{"path", default_dir},
             {"size", "4G"},
             {"pass-size", "1G"},
             {"block-size", "256K,1M,8M"},
             {"queue-depth", "1,8,32,64"},
             {"backend", "uring,threadpool"},
             {"op", "read,write"},
             {"rounds", "1"},
             {"ticket-size", "64M"},
             {"tickets-in-flight", "4"},
             {"json", "false"},
             {"sweep", "true"},
             {"fio", "false"},
             {"fio-bin", "fio"},
             {"fio-rounds", "3"},
             {"fio-bs", "1M"},
             {"fio-qd", "32"},
             {"keep", "false"},
             {"no-prefill", "false"},
             {"hugepage", "true"}},
            kUsage);
  const bool json = args.flag("json");
  g_hugepage = args.flag("hugepage");
  const std::string dir = args.get("path");
  const uint64_t size = args.size("size") / (8 << 20) * (8 << 20);
  const uint64_t pass = std::min<uint64_t>(args.size("pass-size"), size);
  const int rounds = std::max(1, int(args.number("rounds")));
  const uint64_t ticket_bytes = args.size("ticket-size");
  const unsigned tickets_in_flight = std::max(1u, unsigned(args.number("tickets-in-flight")));
  if (size == 0) {
    die("--size must be at least 8M");
  }
  std::vector<IoOp> ops;
  for (const std::string& o : args.list("op")) {
    if (o == "read") {
      ops.push_back(IoOp::kRead);
    } else if (o == "write") {
      ops.push_back(IoOp::kWrite);
    } else {
      die("--op takes read,write");
    }
  }
  std::vector<std::string> backends = args.list("backend");
  for (const std::string& b : backends) {
    if (b != "uring" && b != "threadpool") {
      die("--backend takes uring,threadpool");
    }
  }

  Table table({"op", "backend", "block_size", "queue_depth", "gbps", "iops", "p50_us", "p99_us",
               "cpu_s_per_gb", "ratio_to_raw"},
              json);
  const UringProbe probe = probe_uring();
  if (!probe.available) {
    die("io_uring unavailable (" + probe.reason + "): the raw baseline needs it");
  }
  const std::string file = dir + "/strata-bench-io.dat";
  const int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_DIRECT, 0600);
  if (fd < 0) {
    die("open " + file + " with O_DIRECT: " + std::strerror(errno));
  }
  table.note("file " + file + ", " + strata::bench::format_bytes(double(size)) + ", pass " +
             strata::bench::format_bytes(double(pass)) + "; GB = 1e9 bytes; best of " +
             std::to_string(rounds) + " round(s); buffers " +
             (g_hugepage ? "MADV_HUGEPAGE" : "4 KiB pages"));

  // 1. Write the whole file once, so that reads touch the device.
  if (!args.flag("no-prefill")) {
    if (::fallocate(fd, 0, 0, off_t(size)) != 0) {
      die("fallocate " + file + ": " + std::strerror(errno));
    }
    AlignedMem mem(32u << 20);
    Sample s = raw_uring(fd, IoOp::kWrite, 1 << 20, 32, 0, size, mem.data(), mem.size);
    table.note("prefill: wrote " + strata::bench::format_bytes(double(s.bytes)) + " at " +
               std::to_string(s.gbps()) + " GB/s");
  } else {
    struct stat fst {};
    if (::fstat(fd, &fst) != 0 || uint64_t(fst.st_size) < size) {
      die("--no-prefill: " + file + " is smaller than --size");
    }
  }

  // 2. Sweep.
  if (args.flag("sweep")) {
    for (size_t bs : sizes(args, "block-size")) {
      for (const std::string& qs : args.list("queue-depth")) {
        const unsigned qd = unsigned(std::stoul(qs));
        const size_t mem_bytes = std::min<size_t>(size_t(qd) * bs, size_t(256) << 20);
        AlignedMem mem(std::max(mem_bytes, bs));
        const uint64_t bytes = pass / bs * bs;
        if (bytes == 0) {
          continue;
        }
        std::vector<std::unique_ptr<IoEngine>> engines;
        std::vector<int> handles;
        for (const std::string& b : backends) {
          engines.push_back(make_engine(b, bs, qd));
          auto h = engines.back()->register_file(fd, file, true);
          if (!h.ok()) {
            die(h.status().to_string());
          }
          handles.push_back(*h);
          strata::Status rs = engines.back()->register_buffer(mem.data(), mem.size);
          if (!rs.ok()) {
            table.note(b + ": no fixed buffers: " + rs.to_string());
          }
          table.note(std::string(b) + ": " + engines.back()->backend_note());
        }
        for (IoOp op : ops) {
          Sample best_raw;
          std::vector<Sample> best(backends.size());
          // Rotate through the file so consecutive passes do not hit the
          // same range (the device's own cache).
          uint64_t start = 0;
          for (int r = 0; r < rounds; ++r) {
            auto next_start = [&] {
              const uint64_t s0 = start;
              start = (size - bytes) == 0 ? 0 : (start + bytes) % (size - bytes + 1) / bs * bs;
              return s0;
            };
            Sample raw = raw_uring(fd, op, bs, qd, next_start(), bytes, mem.data(), mem.size);
            if (raw.gbps() > best_raw.gbps()) {
              best_raw = raw;
            }
            for (size_t i = 0; i < engines.size(); ++i) {
              Sample s = engine_pass(engines[i].get(), handles[i], op, bs, qd, next_start(), bytes,
                                     mem.data(), mem.size, std::max<uint64_t>(ticket_bytes, bs),
                                     tickets_in_flight);
              if (s.gbps() > best[i].gbps()) {
                best[i] = s;
              }
            }
          }
          table.row(row(op_name(op), "raw", bs, qd, best_raw, 1.0, rounds));
          for (size_t i = 0; i < engines.size(); ++i) {
            table.row(row(op_name(op), backends[i], bs, qd, best[i],
                          best_raw.gbps() > 0 ? best[i].gbps() / best_raw.gbps() : 0, rounds));
          }
        }
        for (size_t i = 0; i < engines.size(); ++i) {
          engines[i]->unregister_buffer(mem.data()).ignore();
          engines[i]->unregister_file(handles[i]).ignore();
        }
      }
    }
  }

  // 3. Alternating rounds against fio on the same file.
  if (args.flag("fio")) {
    const size_t bs = size_t(args.size("fio-bs"));
    const unsigned qd = unsigned(args.number("fio-qd"));
    const int fio_rounds = std::max(1, int(args.number("fio-rounds")));
    const uint64_t bytes = size / bs * bs;
    AlignedMem mem(std::min<size_t>(size_t(qd) * bs, size_t(256) << 20));
    auto uring = make_engine("uring", bs, qd);
    auto tp = make_engine("threadpool", bs, qd);
    auto hu = uring->register_file(fd, file, true);
    auto ht = tp->register_file(fd, file, true);
    if (!hu.ok() || !ht.ok()) {
      die("register_file failed");
    }
    if (strata::Status rs = uring->register_buffer(mem.data(), mem.size); !rs.ok()) {
      table.note("uring: no fixed buffers: " + rs.to_string());
    }
    table.note("fio comparison: " + std::to_string(fio_rounds) +
               " alternating rounds (strata io_uring, strata threadpool, fio), " +
               strata::bench::format_bytes(double(bytes)) + " per pass");
    for (IoOp op : ops) {
      Sample best_u, best_t, best_f;
      std::vector<Sample> all_u, all_t, all_f;
      std::string cmd;
      for (int r = 0; r < fio_rounds; ++r) {
        Sample u = engine_pass(uring.get(), *hu, op, bs, qd, 0, bytes, mem.data(), mem.size,
                               std::max<uint64_t>(ticket_bytes, bs), tickets_in_flight);
        Sample t = engine_pass(tp.get(), *ht, op, bs, qd, 0, bytes, mem.data(), mem.size,
                               std::max<uint64_t>(ticket_bytes, bs), tickets_in_flight);
        Fio f = run_fio(args.get("fio-bin"), file, op, bs, qd, bytes);
        if (!f.ok) {
          die("fio: " + f.error + " (" + f.command + ")");
        }
        cmd = f.command;
        table.note(std::string(op_name(op)) + " round " + std::to_string(r + 1) + ": strata " +
                   std::to_string(u.gbps()) + " GB/s " + std::to_string(u.cpu_per_gb()) +
                   " cpu s/GB; threadpool " + std::to_string(t.gbps()) + " GB/s " +
                   std::to_string(t.cpu_per_gb()) + " cpu s/GB; fio " + std::to_string(f.s.gbps()) +
                   " GB/s " + std::to_string(f.s.cpu_per_gb()) + " cpu s/GB");
        all_u.push_back(u);
        all_t.push_back(t);
        all_f.push_back(f.s);
        if (u.gbps() > best_u.gbps()) best_u = u;
        if (t.gbps() > best_t.gbps()) best_t = t;
        if (f.s.gbps() > best_f.gbps()) best_f = f.s;
      }
      table.note("fio command: " + cmd);
      auto median = [](std::vector<Sample> v, bool cpu) {
        std::sort(v.begin(), v.end(), [cpu](const Sample& a, const Sample& b) {
          return cpu ? a.cpu_per_gb() < b.cpu_per_gb() : a.gbps() < b.gbps();
        });
        const Sample& m = v[v.size() / 2];
        return cpu ? m.cpu_per_gb() : m.gbps();
      };
      char med[256];
      std::snprintf(med, sizeof(med),
                    "%s medians: strata %.3f GB/s %.4f cpu s/GB; threadpool %.3f GB/s %.4f cpu "
                    "s/GB; fio %.3f GB/s %.4f cpu s/GB",
                    op_name(op), median(all_u, false), median(all_u, true), median(all_t, false),
                    median(all_t, true), median(all_f, false), median(all_f, true));
      table.note(med);
      auto fio_row = [&](const std::string& backend, const Sample& s) {
        auto cells = row(op_name(op), backend, bs, qd, s,
                         best_f.gbps() > 0 ? s.gbps() / best_f.gbps() : 0, fio_rounds);
        cells.push_back({"ratio_to_fio", best_f.gbps() > 0 ? s.gbps() / best_f.gbps() : 0.0});
        cells.push_back({"cpu_ratio_to_fio",
                         best_f.cpu_per_gb() > 0 ? s.cpu_per_gb() / best_f.cpu_per_gb() : 0.0});
        table.row(cells);
      };
      fio_row("fio", best_f);
      fio_row("uring", best_u);
      fio_row("threadpool", best_t);
    }
    uring->unregister_buffer(mem.data()).ignore();
    uring->unregister_file(*hu).ignore();
    tp->unregister_file(*ht).ignore();
  }

  ::close(fd);
  if (!args.flag("keep")) {
    ::unlink(file.c_str());
  }
  return 0;
}

#else  // !STRATA_HAVE_URING

int main() {
  std::fprintf(stderr,
               "strata-bench-io: built without liburing; the raw baseline needs io_uring\n");
  return 1;
}

#endif
