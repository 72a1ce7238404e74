#include "io/batch_engine.h"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <limits>

#include <strata/platform/clock.h>

namespace strata::io::detail {

uint64_t monotonic_ns() { return uint64_t(platform::steady_ns()); }

namespace {

const char* op_name(IoOp op) { return op == IoOp::kRead ? "read" : "write"; }

bool aligned(uint64_t v) { return v % kDirectAlignment == 0; }

}  // namespace

BatchEngine::BatchEngine(const IoOptions& options, std::string note)
    : options_(options), note_(std::move(note)) {}

BatchEngine::~BatchEngine() = default;

Result<int> BatchEngine::register_file(int fd, std::string path, bool direct) {
  // Catch a bad fd here, with the path, rather than on the first request.
  int flags = fd < 0 ? -1 : ::fcntl(fd, F_GETFL);
  if (flags < 0) {
    return Status::from_errno(EBADF, "register_file " + path + " fd " + std::to_string(fd));
  }
  std::lock_guard<std::mutex> lk(files_mu_);
  int handle = -1;
  for (size_t i = 0; i < files_.size(); ++i) {
    if (!files_[i].live) {
      handle = int(i);
      break;
    }
  }
  if (handle < 0) {
    handle = int(files_.size());
    files_.emplace_back();
  }
  Status st = on_register_file(handle, fd);
  if (!st.ok()) {
    return st.with_context("register_file " + path);
  }
  FileEntry& e = files_[size_t(handle)];
  e.fd = fd;
  e.path = std::move(path);
  e.direct = direct || (flags & O_DIRECT) != 0;
  e.live = true;
  return handle;
}

Status BatchEngine::unregister_file(int file) {
  std::lock_guard<std::mutex> lk(files_mu_);
  if (file < 0 || size_t(file) >= files_.size() || !files_[size_t(file)].live) {
    return invalid_argument("unregister_file: unknown file handle " + std::to_string(file));
  }
  on_unregister_file(file);
  files_[size_t(file)] = FileEntry{};
  return Status::Ok();
}

Result<Ticket> BatchEngine::submit(std::span<const IoRequest> requests) {
  const size_t block = options_.block_size;
  auto batch = std::make_unique<Batch>();
  size_t pieces = 0;
  {
    std::lock_guard<std::mutex> lk(files_mu_);
    // Validate the whole batch before anything is submitted.
    for (const IoRequest& r : requests) {
      if (r.file < 0 || size_t(r.file) >= files_.size() || !files_[size_t(r.file)].live) {
        return invalid_argument("submit: unknown file handle " + std::to_string(r.file));
      }
      const FileEntry& f = files_[size_t(r.file)];
      if (r.op != IoOp::kRead && r.op != IoOp::kWrite) {
        return invalid_argument("submit: bad op on " + f.path);
      }
      if (r.len == 0) {
        continue;
      }
      if (r.buf == nullptr) {
        return invalid_argument(std::string("submit: ") + op_name(r.op) + " " + f.path +
                                " offset " + std::to_string(r.offset) + " len " +
                                std::to_string(r.len) + ": null buffer");
      }
      if (r.offset > std::numeric_limits<uint64_t>::max() - r.len ||
          r.offset + r.len > uint64_t(std::numeric_limits<int64_t>::max())) {
        return invalid_argument(std::string("submit: ") + op_name(r.op) + " " + f.path +
                                " offset " + std::to_string(r.offset) + " len " +
                                std::to_string(r.len) + ": range past the largest file offset");
      }
      if (f.direct &&
          (!aligned(reinterpret_cast<uintptr_t>(r.buf)) || !aligned(r.offset) || !aligned(r.len))) {
        char addr[32];
        std::snprintf(addr, sizeof(addr), "%p", r.buf);
        return invalid_argument(std::string("submit: misaligned O_DIRECT ") + op_name(r.op) + " " +
                                f.path + " offset " + std::to_string(r.offset) + " len " +
                                std::to_string(r.len) + " buf " + addr +
                                ": buf, offset and len must be multiples of 4096");
      }
      pieces += (r.len + block - 1) / block;
    }
    batch->reqs.resize(pieces);
    size_t k = 0;
    for (const IoRequest& r : requests) {
      const int fd = files_[size_t(r.file)].fd;
      for (size_t done = 0; done < r.len; done += block) {
        BlockReq& q = batch->reqs[k++];
        const size_t n = std::min(block, r.len - done);
        q.batch = batch.get();
        q.buf = static_cast<char*>(r.buf) + done;
        q.offset = r.offset + done;
        q.start_offset = q.offset;
        q.remaining = uint32_t(n);
        q.len = uint32_t(n);
        q.file = r.file;
        q.fd = fd;
        q.op = r.op;
      }
    }
  }
  assign_buffers(batch->reqs);
  const Ticket ticket = next_ticket_.fetch_add(1, std::memory_order_relaxed);
  batch->ticket = ticket;
  batch->remaining.store(pieces, std::memory_order_relaxed);
  Batch* raw = batch.get();
  {
    std::lock_guard<std::mutex> lk(mu_);
    raw->done = pieces == 0;
    raw->done_ns = raw->done ? monotonic_ns() : 0;
    batches_.emplace(ticket, std::move(batch));
  }
  if (pieces > 0) {
    dispatch(raw);
  }
  return ticket;
}

Status BatchEngine::wait(Ticket ticket) { return wait_timed(ticket, nullptr); }

Status BatchEngine::wait_timed(Ticket ticket, int64_t* done_ns) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = batches_.find(ticket);
  if (it == batches_.end()) {
    return invalid_argument("wait: unknown ticket " + std::to_string(ticket) +
                            " (never issued or already waited)");
  }
  Batch* b = it->second.get();
  b->cv.wait(lk, [b] { return b->done; });
  Status st = std::move(b->error);
  if (done_ns != nullptr) {
    *done_ns = int64_t(b->done_ns);
  }
  batches_.erase(it);
  return st;
}

Result<bool> BatchEngine::poll(Ticket ticket) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = batches_.find(ticket);
  if (it == batches_.end()) {
    return invalid_argument("poll: unknown ticket " + std::to_string(ticket) +
                            " (never issued or already waited)");
  }
  return it->second->done;
}

void BatchEngine::drain() {
  std::unique_lock<std::mutex> lk(mu_);
  ++drainers_;
  drain_cv_.wait(lk, [this] {
    for (const auto& [t, b] : batches_) {
      if (!b->done) {
        return false;
      }
    }
    return true;
  });
  --drainers_;
}

IoStats BatchEngine::stats() const {
  IoStats s;
  s.bytes_read = bytes_read_.load(std::memory_order_relaxed);
  s.bytes_written = bytes_written_.load(std::memory_order_relaxed);
  s.read_ops = read_ops_.load(std::memory_order_relaxed);
  s.write_ops = write_ops_.load(std::memory_order_relaxed);
  s.retries = retries_.load(std::memory_order_relaxed);
  s.errors = errors_.load(std::memory_order_relaxed);
  s.fixed_buffer_ops = fixed_ops_.load(std::memory_order_relaxed);
  s.submit_calls = submit_calls_.load(std::memory_order_relaxed);
  return s;
}

std::vector<uint64_t> BatchEngine::take_latencies_ns() {
  std::lock_guard<std::mutex> lk(latency_mu_);
  std::vector<uint64_t> out;
  out.swap(latencies_);
  return out;
}

void BatchEngine::finish(BlockReq* req, const Status& status) {
  Batch* b = req->batch;
  if (status.ok()) {
    if (req->op == IoOp::kRead) {
      bytes_read_.fetch_add(req->len, std::memory_order_relaxed);
      read_ops_.fetch_add(1, std::memory_order_relaxed);
    } else {
      bytes_written_.fetch_add(req->len, std::memory_order_relaxed);
      write_ops_.fetch_add(1, std::memory_order_relaxed);
    }
    if (req->buf_index >= 0) {
      fixed_ops_.fetch_add(1, std::memory_order_relaxed);
    }
    if (options_.record_latency) {
      const uint64_t dt = monotonic_ns() - req->start_ns;
      std::lock_guard<std::mutex> lk(latency_mu_);
      latencies_.push_back(dt);
    }
  } else {
    errors_.fetch_add(1, std::memory_order_relaxed);
    b->failed.store(true, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lk(mu_);
    if (b->error.ok()) {
      b->error = status;
    }
  }
  skip(req);
}

void BatchEngine::skip(BlockReq* req) {
  Batch* b = req->batch;
  if (b->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    // Notify under the lock: the waiter frees the Batch (and its cv) as soon
    // as it can take mu_ after seeing done.
    std::lock_guard<std::mutex> lk(mu_);
    b->done = true;
    b->done_ns = monotonic_ns();
    b->cv.notify_all();
    if (drainers_ > 0) {
      drain_cv_.notify_all();
    }
  }
}

std::string BatchEngine::describe(const BlockReq& req) const {
  std::string path;
  {
    std::lock_guard<std::mutex> lk(files_mu_);
    if (req.file >= 0 && size_t(req.file) < files_.size()) {
      path = files_[size_t(req.file)].path;
    }
  }
  if (path.empty()) {
    path = "<file " + std::to_string(req.file) + ">";
  }
  std::string s = std::string(op_name(req.op)) + " " + path + " offset " +
                  std::to_string(req.start_offset) + " len " + std::to_string(req.len);
  const uint32_t moved = req.len - req.remaining;
  if (moved > 0) {
    s += " (failed after " + std::to_string(moved) + " bytes)";
  }
  return s;
}

Status BatchEngine::errno_status(const BlockReq& req, int err) const {
  return Status::from_errno(err, describe(req));
}

Status BatchEngine::io_status(const BlockReq& req, int err, const std::string& what) const {
  return Status(StatusCode::kIoError, describe(req) + ": " + what, err);
}

}  // namespace strata::io::detail
