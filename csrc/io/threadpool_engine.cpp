#include "io/threadpool_engine.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <system_error>

namespace strata::io::detail {

ThreadPoolEngine::ThreadPoolEngine(const IoOptions& options, std::string note)
    : BatchEngine(options, std::move(note)) {}

Result<std::unique_ptr<ThreadPoolEngine>> ThreadPoolEngine::create(const IoOptions& options,
                                                                   std::string note) {
  STRATA_RETURN_IF_ERROR(validate_io_options(options));
  std::unique_ptr<ThreadPoolEngine> e(new ThreadPoolEngine(options, std::move(note)));
  // One request in flight per worker: keep several, like a ring's queue depth,
  // without a thread per queue slot at large depths.
  const unsigned n = std::max(options.intra_op_parallelism, std::min(options.queue_depth, 8u));
  try {
    for (unsigned i = 0; i < n; ++i) {
      e->workers_.emplace_back([raw = e.get()] { raw->run(); });
    }
  } catch (const std::system_error& err) {
    // The destructor joins the workers already started.
    return Status(
        StatusCode::kOutOfMemory,
        std::string("thread pool I/O engine: cannot start worker threads: ") + err.what());
  }
  return e;
}

ThreadPoolEngine::~ThreadPoolEngine() {
  drain();
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : workers_) {
    t.join();
  }
}

void ThreadPoolEngine::dispatch(Batch* batch) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (BlockReq& q : batch->reqs) {
      queue_.push_back(&q);
    }
  }
  if (batch->reqs.size() == 1) {
    cv_.notify_one();
  } else {
    cv_.notify_all();
  }
}

void ThreadPoolEngine::run() {
  for (;;) {
    BlockReq* q = nullptr;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) {
        return;  // stop_ and nothing left
      }
      q = queue_.front();
      queue_.pop_front();
    }
    if (q->batch->failed.load(std::memory_order_relaxed)) {
      skip(q);
      continue;
    }
    if (options_.record_latency) {
      q->start_ns = monotonic_ns();
    }
    finish(q, transfer(q));
  }
}

Status ThreadPoolEngine::transfer(BlockReq* q) {
  while (q->remaining > 0) {
    ssize_t n = q->op == IoOp::kRead ? ::pread(q->fd, q->buf, q->remaining, off_t(q->offset))
                                     : ::pwrite(q->fd, q->buf, q->remaining, off_t(q->offset));
    if (n < 0) {
      const int err = errno;
      if ((err == EINTR || err == EAGAIN) && q->attempts < kMaxAttempts) {
        ++q->attempts;
        count_retry();
        continue;
      }
      return errno_status(*q, err);
    }
    if (n == 0) {
      return q->op == IoOp::kRead ? io_status(*q, EIO, "read past end of file")
                                  : io_status(*q, EIO, "write made no progress");
    }
    if (size_t(n) > q->remaining) {
      return io_status(*q, EIO,
                       "transferred " + std::to_string(n) + " bytes, more than the " +
                           std::to_string(q->remaining) + " asked");
    }
    if (size_t(n) < q->remaining) {
      count_retry();  // a continuation of a short transfer
    }
    q->buf += n;
    q->offset += uint64_t(n);
    q->remaining -= uint32_t(n);
  }
  return Status::Ok();
}

}  // namespace strata::io::detail
