// IoEngine conveniences, option checks and the backend factory.
#include <strata/io/io_engine.h>
#include <strata/io/probe.h>

#include <algorithm>
#include <chrono>

#include "io/threadpool_engine.h"
#include "io/uring_engine.h"

namespace strata::io {

Status IoEngine::wait_timed(Ticket ticket, int64_t* done_ns) {
  Status st = wait(ticket);
  if (done_ns != nullptr) {
    *done_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                   std::chrono::steady_clock::now().time_since_epoch())
                   .count();
  }
  return st;
}

Status IoEngine::read(int file, void* buf, size_t len, uint64_t offset) {
  IoRequest r{IoOp::kRead, file, buf, len, offset};
  STRATA_ASSIGN_OR_RETURN(Ticket t, submit(std::span<const IoRequest>(&r, 1)));
  return wait(t);
}

Status IoEngine::write(int file, const void* buf, size_t len, uint64_t offset) {
  // The engine never writes through buf for a write request.
  IoRequest r{IoOp::kWrite, file, const_cast<void*>(buf), len, offset};
  STRATA_ASSIGN_OR_RETURN(Ticket t, submit(std::span<const IoRequest>(&r, 1)));
  return wait(t);
}

IoOptions io_options_from(const AioConfig& aio) {
  IoOptions o;
  o.block_size = size_t(aio.block_size);
  o.queue_depth = unsigned(aio.queue_depth);
  o.intra_op_parallelism = unsigned(aio.intra_op_parallelism);
  o.single_submit = aio.single_submit;
  o.overlap_events = aio.overlap_events;
  return o;
}

// The ranges are the schema's (engine_config.h), so a config that parsed is
// always accepted here; these checks are for options built by hand.
Status validate_io_options(const IoOptions& o) {
  if (o.queue_depth < 1 || o.queue_depth > kMaxQueueDepth) {
    return invalid_argument("aio.queue_depth must be in [1, " + std::to_string(kMaxQueueDepth) +
                            "], got " + std::to_string(o.queue_depth));
  }
  if (o.block_size < kDirectAlignment || o.block_size > kMaxBlockSize ||
      o.block_size % kDirectAlignment != 0) {
    return invalid_argument("aio.block_size must be a multiple of 4096 in [4096, 1 GiB], got " +
                            std::to_string(o.block_size));
  }
  if (o.intra_op_parallelism < 1 || o.intra_op_parallelism > kMaxIntraOpParallelism) {
    return invalid_argument("aio.intra_op_parallelism must be in [1, " +
                            std::to_string(kMaxIntraOpParallelism) + "], got " +
                            std::to_string(o.intra_op_parallelism));
  }
  if (o.backend != IoOptions::Backend::kAuto && o.backend != IoOptions::Backend::kUring &&
      o.backend != IoOptions::Backend::kThreadPool) {
    return invalid_argument("IoOptions::backend: unknown value");
  }
  return Status::Ok();
}

UringProbe probe_uring() {
  UringProbe p;
#if STRATA_HAVE_URING
  p.compiled = true;
  io_uring ring{};
  bool coop = false;
  int rc = detail::create_ring(4, &ring, &coop);
  if (rc < 0) {
    p.reason = Status::from_errno(rc, "io_uring_queue_init").message();
    return p;
  }
  detail::UringCaps caps;
  Status st = detail::probe_ring_caps(&ring, &caps);
  io_uring_queue_exit(&ring);
  if (!st.ok()) {
    p.reason = st.message();
    return p;
  }
  p.available = true;
  p.reason = std::string(caps.rw_ops ? "READ/WRITE" : "READV/WRITEV") +
             (caps.fixed_ops ? ", READ_FIXED/WRITE_FIXED" : "") + (coop ? ", COOP_TASKRUN" : "");
#else
  p.reason = "built without liburing (STRATA_WITH_URING=OFF)";
#endif
  return p;
}

namespace {

Result<std::unique_ptr<IoEngine>> make_threadpool(const IoOptions& options, std::string note) {
  STRATA_ASSIGN_OR_RETURN(auto e, detail::ThreadPoolEngine::create(options, std::move(note)));
  std::unique_ptr<IoEngine> out = std::move(e);
  return out;
}

}  // namespace

Result<std::unique_ptr<IoEngine>> make_io_engine_with_probe(const IoOptions& options,
                                                            const UringProbe& probe) {
  STRATA_RETURN_IF_ERROR(validate_io_options(options));
  using Backend = IoOptions::Backend;
  const unsigned threads =
      std::max(options.intra_op_parallelism, std::min(options.queue_depth, 8u));
  const std::string tp = "threadpool: " + std::to_string(threads) + " pread/pwrite worker(s)";
  if (options.backend == Backend::kThreadPool) {
    return make_threadpool(options, tp + " (requested)");
  }
  std::string refused;
  if (!probe.available) {
    refused = probe.reason.empty() ? "io_uring unavailable" : probe.reason;
  } else {
#if STRATA_HAVE_URING
    auto e = detail::UringEngine::create(options, "");
    if (e.ok()) {
      std::unique_ptr<IoEngine> out = std::move(e).value();
      return out;
    }
    refused = e.status().message();
#else
    refused = "built without liburing";
#endif
  }
  if (options.backend == Backend::kUring) {
    return Status(StatusCode::kUnavailable,
                  "io_uring backend requested but unavailable: " + refused);
  }
  return make_threadpool(options, "io_uring unavailable (" + refused + "); fell back to " + tp);
}

Result<std::unique_ptr<IoEngine>> make_io_engine(const IoOptions& options) {
  if (options.backend == IoOptions::Backend::kThreadPool) {
    return make_io_engine_with_probe(options, UringProbe{});
  }
  // Creating the engine's own rings is the real probe; a prior probe ring
  // would only cost time, so claim availability and let creation decide.
  UringProbe assume;
#if STRATA_HAVE_URING
  assume.compiled = true;
  assume.available = true;
#else
  assume.reason = "built without liburing (STRATA_WITH_URING=OFF)";
#endif
  return make_io_engine_with_probe(options, assume);
}

}  // namespace strata::io
