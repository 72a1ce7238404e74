#include <strata/io/fault_injection.h>

#include <fcntl.h>

#include <algorithm>
#include <cerrno>

#include <strata/platform/clock.h>

namespace strata::io {

namespace {

const char* op_name(IoOp op) { return op == IoOp::kRead ? "read" : "write"; }

bool matches(Fault::Match m, IoOp op) {
  switch (m) {
    case Fault::Match::kAny:
      return true;
    case Fault::Match::kRead:
      return op == IoOp::kRead;
    case Fault::Match::kWrite:
      return op == IoOp::kWrite;
  }
  return false;
}

}  // namespace

FaultInjectionEngine::FaultInjectionEngine(IoEngine* inner, size_t block_size)
    : inner_(inner), block_size_(std::max<size_t>(block_size, 1)) {
  note_ = std::string("fault injection over ") + inner_->backend_name() + " (" +
          inner_->backend_note() + ")";
}

FaultInjectionEngine::FaultInjectionEngine(std::unique_ptr<IoEngine> inner, size_t block_size)
    : FaultInjectionEngine(inner.get(), block_size) {
  owned_ = std::move(inner);
}

FaultInjectionEngine::~FaultInjectionEngine() {
  // Outstanding inner batches use caller buffers: finish them before an owned
  // inner engine goes (its destructor drains too; a borrowed one is the
  // owner's business).
  inner_->drain();
}

void FaultInjectionEngine::add_fault(const Fault& fault) {
  std::lock_guard<std::mutex> lk(mu_);
  faults_.push_back(FaultState{fault, 0});
}

void FaultInjectionEngine::clear_faults() {
  std::lock_guard<std::mutex> lk(mu_);
  faults_.clear();
}

uint64_t FaultInjectionEngine::block_ops_seen() const {
  std::lock_guard<std::mutex> lk(mu_);
  return ops_;
}

uint64_t FaultInjectionEngine::submits_seen() const {
  std::lock_guard<std::mutex> lk(mu_);
  return submits_;
}

uint64_t FaultInjectionEngine::faults_fired() const {
  std::lock_guard<std::mutex> lk(mu_);
  return fired_;
}

const char* FaultInjectionEngine::backend_name() const { return inner_->backend_name(); }

Result<int> FaultInjectionEngine::register_file(int fd, std::string path, bool direct) {
  const int flags = fd < 0 ? -1 : ::fcntl(fd, F_GETFL);
  const bool is_direct = direct || (flags >= 0 && (flags & O_DIRECT) != 0);
  STRATA_ASSIGN_OR_RETURN(int handle, inner_->register_file(fd, path, direct));
  std::lock_guard<std::mutex> lk(mu_);
  files_[handle] = FileInfo{std::move(path), is_direct};
  return handle;
}

Status FaultInjectionEngine::unregister_file(int file) {
  STRATA_RETURN_IF_ERROR(inner_->unregister_file(file));
  std::lock_guard<std::mutex> lk(mu_);
  files_.erase(file);
  return Status::Ok();
}

Status FaultInjectionEngine::register_buffer(void* base, size_t len) {
  return inner_->register_buffer(base, len);
}

Status FaultInjectionEngine::unregister_buffer(void* base) {
  return inner_->unregister_buffer(base);
}

const Fault* FaultInjectionEngine::hit(Fault::Scope scope, IoOp op, uint64_t any_index,
                                       uint64_t read_index, uint64_t write_index) {
  for (FaultState& s : faults_) {
    const Fault& f = s.fault;
    if (f.scope != scope || !matches(f.match, op)) {
      continue;
    }
    const uint64_t index = f.match == Fault::Match::kAny    ? any_index
                           : f.match == Fault::Match::kRead ? read_index
                                                            : write_index;
    if (index >= f.at_op && (f.count == 0 || index - f.at_op < f.count)) {
      ++s.fired;
      return &f;
    }
  }
  return nullptr;
}

Status FaultInjectionEngine::injected_error(const Fault& fault, IoOp op, int file, uint64_t offset,
                                            size_t len, size_t moved) const {
  auto it = files_.find(file);
  const std::string path =
      it == files_.end() ? "<file " + std::to_string(file) + ">" : it->second.path;
  const std::string what = std::string(op_name(op)) + " " + path + " offset " +
                           std::to_string(offset) + " len " + std::to_string(len);
  switch (fault.kind) {
    case Fault::Kind::kEio:
      return Status::from_errno(EIO, what + " (injected fault)");
    case Fault::Kind::kEnospc:
      return Status::from_errno(ENOSPC, what + " (injected fault)");
    case Fault::Kind::kShort:
      return Status(StatusCode::kIoError,
                    what + ": short " + op_name(op) + ", " + std::to_string(moved) + " of " +
                        std::to_string(len) + " bytes moved (injected fault)",
                    EIO);
  }
  return internal_error("unknown fault kind");
}

Result<Ticket> FaultInjectionEngine::submit(std::span<const IoRequest> batch) {
  std::lock_guard<std::mutex> lk(mu_);
  // Does the whole submit fail? A batch counts as a read (write) submit when
  // all its requests are reads (writes).
  bool all_read = !batch.empty();
  bool all_write = !batch.empty();
  for (const IoRequest& r : batch) {
    all_read = all_read && r.op == IoOp::kRead;
    all_write = all_write && r.op == IoOp::kWrite;
  }
  const uint64_t submit_index = submits_++;
  const uint64_t read_submit = all_read ? read_submits_++ : UINT64_MAX;
  const uint64_t write_submit = all_write ? write_submits_++ : UINT64_MAX;
  const Fault* sf = nullptr;
  for (IoOp op : {IoOp::kRead, IoOp::kWrite}) {
    if ((op == IoOp::kRead && !all_read) || (op == IoOp::kWrite && !all_write)) {
      continue;
    }
    sf = hit(Fault::Scope::kSubmit, op, submit_index, read_submit, write_submit);
    if (sf != nullptr) {
      break;
    }
  }
  if (sf == nullptr && !all_read && !all_write && !batch.empty()) {
    // Mixed batch: only kAny faults can match it.
    for (FaultState& s : faults_) {
      const Fault& f = s.fault;
      if (f.scope == Fault::Scope::kSubmit && f.match == Fault::Match::kAny &&
          submit_index >= f.at_op && (f.count == 0 || submit_index - f.at_op < f.count)) {
        ++s.fired;
        sf = &f;
        break;
      }
    }
  }
  bool shorten_last = false;
  if (sf != nullptr) {
    ++fired_;
    if (sf->kind != Fault::Kind::kShort) {
      const IoRequest& r = batch.front();
      return injected_error(*sf, r.op, r.file, r.offset, r.len, 0)
          .with_context("submit (injected fault)");
    }
    shorten_last = true;
  }

  // Cut into block ops, as the engines do, and apply block faults.
  std::vector<IoRequest> out;
  Status injected;
  for (const IoRequest& r : batch) {
    auto fi = files_.find(r.file);
    const bool direct = fi != files_.end() && fi->second.direct;
    for (size_t done = 0; done < r.len; done += block_size_) {
      const size_t n = std::min(block_size_, r.len - done);
      IoRequest piece{r.op, r.file, static_cast<char*>(r.buf) + done, n, r.offset + done};
      const uint64_t any = ops_++;
      const uint64_t ri = r.op == IoOp::kRead ? read_ops_++ : UINT64_MAX;
      const uint64_t wi = r.op == IoOp::kWrite ? write_ops_++ : UINT64_MAX;
      const Fault* f = hit(Fault::Scope::kBlockOp, r.op, any, ri, wi);
      if (f == nullptr) {
        out.push_back(piece);
        continue;
      }
      ++fired_;
      size_t moved = 0;
      if (f->kind == Fault::Kind::kShort) {
        moved = direct ? n / 2 / kDirectAlignment * kDirectAlignment : n / 2;
        if (moved > 0) {
          IoRequest part = piece;
          part.len = moved;
          out.push_back(part);
        }
      }
      if (injected.ok()) {
        injected = injected_error(*f, r.op, r.file, piece.offset, n, moved);
      }
    }
    if (r.len == 0) {
      out.push_back(r);  // let the inner engine validate it
    }
  }
  if (shorten_last && !out.empty()) {
    IoRequest& last = out.back();
    auto fi = files_.find(last.file);
    const bool direct = fi != files_.end() && fi->second.direct;
    const size_t n = last.len;
    const size_t moved = direct ? n / 2 / kDirectAlignment * kDirectAlignment : n / 2;
    if (injected.ok()) {
      injected = injected_error(*sf, last.op, last.file, last.offset, n, moved);
    }
    if (moved == 0) {
      out.pop_back();
    } else {
      last.len = moved;
    }
  }

  Pending p;
  p.injected = std::move(injected);
  if (!out.empty()) {
    STRATA_ASSIGN_OR_RETURN(p.inner, inner_->submit(out));
  }
  const Ticket t = next_ticket_++;
  pending_.emplace(t, std::move(p));
  return t;
}

Status FaultInjectionEngine::wait(Ticket ticket) { return wait_timed(ticket, nullptr); }

Status FaultInjectionEngine::wait_timed(Ticket ticket, int64_t* done_ns) {
  Pending p;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = pending_.find(ticket);
    if (it == pending_.end()) {
      return invalid_argument("wait: unknown ticket " + std::to_string(ticket) +
                              " (never issued or already waited)");
    }
    p = std::move(it->second);
    pending_.erase(it);
  }
  Status inner = Status::Ok();
  if (p.inner != 0) {
    inner = inner_->wait_timed(p.inner, done_ns);
  } else if (done_ns != nullptr) {  // nothing reached the inner engine: done at once
    *done_ns = platform::steady_ns();
  }
  return p.injected.ok() ? inner : p.injected;
}

Result<bool> FaultInjectionEngine::poll(Ticket ticket) {
  Ticket inner = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = pending_.find(ticket);
    if (it == pending_.end()) {
      return invalid_argument("poll: unknown ticket " + std::to_string(ticket) +
                              " (never issued or already waited)");
    }
    inner = it->second.inner;
  }
  if (inner == 0) {
    return true;
  }
  return inner_->poll(inner);
}

void FaultInjectionEngine::drain() { inner_->drain(); }

IoStats FaultInjectionEngine::stats() const { return inner_->stats(); }

std::vector<uint64_t> FaultInjectionEngine::take_latencies_ns() {
  return inner_->take_latencies_ns();
}

}  // namespace strata::io
