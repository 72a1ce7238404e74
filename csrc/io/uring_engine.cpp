#include "io/uring_engine.h"

#if STRATA_HAVE_URING

#include <linux/capability.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <system_error>

#include <strata/log.h>

namespace strata::io::detail {

namespace {

// user_data of the eventfd read armed in every ring, and of cancel requests;
// BlockReq pointers are never this small.
constexpr uint64_t kEventTag = 1;
constexpr uint64_t kCancelTag = 2;

// io_uring_enter results that say nothing is wrong with the ring.
bool transient_enter_error(int rc) {
  return rc == -EINTR || rc == -EAGAIN || rc == -EBUSY || rc == -ETIME;
}

bool has_cap_ipc_lock() {
  __user_cap_header_struct hdr{};
  hdr.version = _LINUX_CAPABILITY_VERSION_3;
  hdr.pid = 0;
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capget, &hdr, data) != 0) {
    return false;
  }
  return (data[CAP_IPC_LOCK / 32].effective & (1u << (CAP_IPC_LOCK % 32))) != 0;
}

// Intrusive list of the pieces the kernel holds, so that a ring that breaks
// can fail them instead of losing them.
void list_push(BlockReq*& head, BlockReq* q) {
  q->prev = nullptr;
  q->next = head;
  if (head != nullptr) {
    head->prev = q;
  }
  head = q;
}

void list_remove(BlockReq*& head, BlockReq* q) {
  if (q->prev != nullptr) {
    q->prev->next = q->next;
  } else {
    head = q->next;
  }
  if (q->next != nullptr) {
    q->next->prev = q->prev;
  }
  q->prev = q->next = nullptr;
}

}  // namespace

int create_ring(unsigned entries, io_uring* ring, bool* coop_taskrun) {
  io_uring_params p{};
#ifdef IORING_SETUP_COOP_TASKRUN
  // Completions are posted when the worker next enters the kernel (it always
  // does, to wait) instead of by an interrupt per request.
  p.flags = IORING_SETUP_COOP_TASKRUN;
  int rc = io_uring_queue_init_params(entries, ring, &p);
  if (rc == 0) {
    *coop_taskrun = true;
    return 0;
  }
  if (rc != -EINVAL) {
    return rc;
  }
  p = io_uring_params{};
#endif
  *coop_taskrun = false;
  return io_uring_queue_init_params(entries, ring, &p);
}

Status probe_ring_caps(io_uring* ring, UringCaps* caps) {
  io_uring_probe* probe = io_uring_get_probe_ring(ring);
  if (probe == nullptr) {
    // Kernels before 5.6 have no probe, nor IORING_OP_READ/WRITE; they do
    // have READV/WRITEV and READ_FIXED/WRITE_FIXED (5.1).
    caps->rw_ops = false;
    caps->fixed_ops = true;
    return Status::Ok();
  }
  const bool readv = io_uring_opcode_supported(probe, IORING_OP_READV) &&
                     io_uring_opcode_supported(probe, IORING_OP_WRITEV);
  caps->rw_ops = io_uring_opcode_supported(probe, IORING_OP_READ) &&
                 io_uring_opcode_supported(probe, IORING_OP_WRITE);
  caps->fixed_ops = io_uring_opcode_supported(probe, IORING_OP_READ_FIXED) &&
                    io_uring_opcode_supported(probe, IORING_OP_WRITE_FIXED);
  io_uring_free_probe(probe);
  if (!caps->rw_ops && !readv) {
    return Status(StatusCode::kUnavailable,
                  "io_uring lacks IORING_OP_READ/WRITE and IORING_OP_READV/WRITEV");
  }
  return Status::Ok();
}

UringEngine::UringEngine(const IoOptions& options, std::string note)
    : BatchEngine(options, std::move(note)) {}

Result<std::unique_ptr<UringEngine>> UringEngine::create(const IoOptions& options,
                                                         std::string note) {
  STRATA_RETURN_IF_ERROR(validate_io_options(options));
  std::unique_ptr<UringEngine> e(new UringEngine(options, std::move(note)));
  STRATA_RETURN_IF_ERROR(e->init());
  return e;
}

Status UringEngine::init() {
  const unsigned n = std::max(1u, options_.intra_op_parallelism);
  // One slot more than the queue depth for the eventfd read.
  const unsigned entries = options_.queue_depth + 1;
  for (unsigned i = 0; i < n; ++i) {
    auto r = std::make_unique<Ring>();
    bool coop = false;
    int rc = create_ring(entries, &r->ring, &coop);
    if (rc < 0) {
      return Status::from_errno(rc, "io_uring_queue_init(" + std::to_string(entries) + ")");
    }
    r->ring_ok = true;
    if (i == 0) {
      STRATA_RETURN_IF_ERROR(probe_ring_caps(&r->ring, &caps_));
      caps_.coop_taskrun = coop;
    }
    r->event_fd = ::eventfd(0, EFD_CLOEXEC);
    if (r->event_fd < 0) {
      return Status::from_errno(errno, "eventfd for io_uring worker");
    }
    rings_.push_back(std::move(r));
  }

  // Fixed files: a sparse table (5.19), else a table of -1 (older kernels);
  // without either, requests use plain fds.
  fixed_files_ = true;
  for (auto& r : rings_) {
    int rc = io_uring_register_files_sparse(&r->ring, kFileSlots);
    if (rc < 0) {
      std::vector<int> empty(kFileSlots, -1);
      rc = io_uring_register_files(&r->ring, empty.data(), kFileSlots);
    }
    if (rc < 0) {
      fixed_files_ = false;
    }
  }
  if (!fixed_files_) {
    for (auto& r : rings_) {
      io_uring_unregister_files(&r->ring);
    }
  }

  // Fixed buffers: a sparse table (5.19) lets regions come and go with
  // updates; older kernels re-register the whole table.
  sparse_buffers_ = caps_.fixed_ops;
  if (caps_.fixed_ops) {
    for (auto& r : rings_) {
      if (io_uring_register_buffers_sparse(&r->ring, kBufferSlots) < 0) {
        sparse_buffers_ = false;
      }
    }
    if (!sparse_buffers_) {
      for (auto& r : rings_) {
        io_uring_unregister_buffers(&r->ring);
      }
    }
  }
  slot_used_.assign(kBufferSlots, false);

  try {
    for (auto& r : rings_) {
      Ring* raw = r.get();
      r->thread = std::thread([this, raw] { run(*raw); });
    }
  } catch (const std::system_error& err) {
    return Status(StatusCode::kOutOfMemory,
                  std::string("io_uring engine: cannot start worker threads: ") + err.what());
  }
  std::string note =
      "io_uring: " + std::to_string(rings_.size()) + " ring(s), queue depth " +
      std::to_string(options_.queue_depth) + ", block " + std::to_string(options_.block_size) +
      " B" + (fixed_files_ ? ", fixed files" : ", plain fds") +
      (caps_.fixed_ops ? ", fixed buffers on register_buffer()" : "") +
      (caps_.rw_ops ? "" : ", READV/WRITEV") + (caps_.coop_taskrun ? ", COOP_TASKRUN" : "");
  if (!backend_note().empty()) {
    note = backend_note() + "; " + note;
  }
  set_note(std::move(note));
  return Status::Ok();
}

UringEngine::~UringEngine() {
  drain();
  for (auto& r : rings_) {
    {
      std::lock_guard<std::mutex> lk(r->mu);
      r->stop = true;
    }
    r->cv.notify_all();
    if (r->thread.joinable()) {
      uint64_t one = 1;
      // A failed write leaves the worker asleep only if the eventfd is gone,
      // which cannot happen while we own it.
      [[maybe_unused]] ssize_t w = ::write(r->event_fd, &one, sizeof(one));
      r->thread.join();
    }
  }
  for (auto& r : rings_) {
    if (r->ring_ok) {
      io_uring_queue_exit(&r->ring);
    }
    if (r->event_fd >= 0) {
      ::close(r->event_fd);
    }
  }
}

Status UringEngine::on_register_file(int handle, int fd) {
  if (!fixed_files_ || handle >= int(kFileSlots)) {
    return Status::Ok();  // requests use the plain fd
  }
  for (size_t i = 0; i < rings_.size(); ++i) {
    int rc = io_uring_register_files_update(&rings_[i]->ring, unsigned(handle), &fd, 1);
    if (rc < 0) {
      int none = -1;
      for (size_t j = 0; j < i; ++j) {
        io_uring_register_files_update(&rings_[j]->ring, unsigned(handle), &none, 1);
      }
      return Status::from_errno(rc, "io_uring_register_files_update fd " + std::to_string(fd));
    }
  }
  return Status::Ok();
}

void UringEngine::on_unregister_file(int handle) {
  if (!fixed_files_ || handle >= int(kFileSlots)) {
    return;
  }
  int none = -1;
  for (auto& r : rings_) {
    io_uring_register_files_update(&r->ring, unsigned(handle), &none, 1);
  }
}

void UringEngine::assign_buffers(std::vector<BlockReq>& reqs) const {
  std::shared_lock<std::shared_mutex> lk(regions_mu_);
  if (regions_.empty()) {
    return;
  }
  for (BlockReq& q : reqs) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(q.buf);
    auto it = std::upper_bound(regions_.begin(), regions_.end(), p,
                               [](uintptr_t v, const Region& r) { return v < r.base; });
    if (it == regions_.begin()) {
      continue;
    }
    --it;
    // A piece straddling two registered pieces, or past the region, uses a
    // plain read/write.
    if (p + q.len <= it->base + it->len) {
      q.buf_index = it->index;
    }
  }
}

Status UringEngine::update_buffer_slots(const std::vector<int>& slots,
                                        const std::vector<iovec>& iovs) {
  for (size_t i = 0; i < rings_.size(); ++i) {
    for (size_t k = 0; k < slots.size(); ++k) {
      __u64 tag = 0;
      int rc = io_uring_register_buffers_update_tag(&rings_[i]->ring, unsigned(slots[k]), &iovs[k],
                                                    &tag, 1);
      if (rc < 0) {
        // Roll back what this call set, in every ring.
        iovec empty{};
        for (size_t j = 0; j <= i; ++j) {
          for (size_t m = 0; m < (j == i ? k : slots.size()); ++m) {
            io_uring_register_buffers_update_tag(&rings_[j]->ring, unsigned(slots[m]), &empty, &tag,
                                                 1);
          }
        }
        return Status::from_errno(rc, "io_uring_register_buffers_update");
      }
    }
  }
  return Status::Ok();
}

Status UringEngine::reregister_all_buffers() {
  std::vector<iovec> table;
  std::vector<Region> regions;
  {
    std::shared_lock<std::shared_mutex> lk(regions_mu_);
    regions = regions_;
  }
  for (Region& r : regions) {
    r.index = int(table.size());
    table.push_back(iovec{reinterpret_cast<void*>(r.base), r.len});
  }
  for (auto& r : rings_) {
    io_uring_unregister_buffers(&r->ring);
    if (!table.empty()) {
      int rc = io_uring_register_buffers(&r->ring, table.data(), unsigned(table.size()));
      if (rc < 0) {
        for (auto& q : rings_) {
          io_uring_unregister_buffers(&q->ring);
        }
        std::unique_lock<std::shared_mutex> lk(regions_mu_);
        regions_.clear();
        return Status::from_errno(rc, "io_uring_register_buffers");
      }
    }
  }
  std::unique_lock<std::shared_mutex> lk(regions_mu_);
  regions_ = std::move(regions);
  return Status::Ok();
}

Status UringEngine::register_buffer(void* base, size_t len) {
  if (!caps_.fixed_ops) {
    return Status(StatusCode::kUnavailable,
                  "register_buffer: this kernel's io_uring has no READ_FIXED/WRITE_FIXED");
  }
  if (base == nullptr || len == 0) {
    return invalid_argument("register_buffer: empty region");
  }
  std::lock_guard<std::mutex> lk(buffers_mu_);
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  {
    std::shared_lock<std::shared_mutex> rl(regions_mu_);
    for (const Region& r : regions_) {
      if (b < r.base + r.len && r.base < b + len) {
        return invalid_argument("register_buffer: region overlaps one already registered");
      }
    }
  }
  // The kernel charges pinned pages to RLIMIT_MEMLOCK once per ring unless the
  // process has CAP_IPC_LOCK; say so before it answers a bare ENOMEM.
  rlimit rl{};
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
      !has_cap_ipc_lock()) {
    const uint64_t need = (registered_bytes_ + len) * rings_.size();
    if (need > rl.rlim_cur) {
      return Status(StatusCode::kPermissionDenied,
                    "register_buffer: RLIMIT_MEMLOCK is " + std::to_string(rl.rlim_cur) +
                        " bytes; registering " + std::to_string(len) + " more bytes in " +
                        std::to_string(rings_.size()) + " ring(s) needs " + std::to_string(need) +
                        " (raise `ulimit -l` / LimitMEMLOCK, or grant CAP_IPC_LOCK); I/O "
                        "continues without fixed buffers");
    }
  }
  std::vector<Region> pieces;
  for (size_t off = 0; off < len; off += max_piece_) {
    Region r;
    r.base = b + off;
    r.len = std::min(max_piece_, len - off);
    r.owner = b;
    pieces.push_back(r);
  }
  if (sparse_buffers_) {
    std::vector<int> slots;
    std::vector<iovec> iovs;
    for (size_t s = 0; s < slot_used_.size() && slots.size() < pieces.size(); ++s) {
      if (!slot_used_[s]) {
        slots.push_back(int(s));
      }
    }
    if (slots.size() < pieces.size()) {
      return Status(StatusCode::kOutOfMemory, "register_buffer: all " +
                                                  std::to_string(kBufferSlots) +
                                                  " fixed buffer slots are in use");
    }
    for (size_t k = 0; k < pieces.size(); ++k) {
      pieces[k].index = slots[k];
      iovs.push_back(iovec{reinterpret_cast<void*>(pieces[k].base), pieces[k].len});
    }
    Status st = update_buffer_slots(slots, iovs);
    if (!st.ok()) {
      return st.with_context("register_buffer " + std::to_string(len) + " bytes");
    }
    for (int s : slots) {
      slot_used_[size_t(s)] = true;
    }
    std::unique_lock<std::shared_mutex> wl(regions_mu_);
    regions_.insert(regions_.end(), pieces.begin(), pieces.end());
    std::sort(regions_.begin(), regions_.end(),
              [](const Region& x, const Region& y) { return x.base < y.base; });
  } else {
    {
      std::unique_lock<std::shared_mutex> wl(regions_mu_);
      regions_.insert(regions_.end(), pieces.begin(), pieces.end());
      std::sort(regions_.begin(), regions_.end(),
                [](const Region& x, const Region& y) { return x.base < y.base; });
    }
    Status st = reregister_all_buffers();
    if (!st.ok()) {
      registered_bytes_ = 0;
      return st.with_context("register_buffer " + std::to_string(len) + " bytes");
    }
  }
  registered_bytes_ += len;
  return Status::Ok();
}

Status UringEngine::unregister_buffer(void* base) {
  std::lock_guard<std::mutex> lk(buffers_mu_);
  const uintptr_t b = reinterpret_cast<uintptr_t>(base);
  std::vector<Region> removed;
  {
    std::unique_lock<std::shared_mutex> wl(regions_mu_);
    auto keep = std::stable_partition(regions_.begin(), regions_.end(),
                                      [b](const Region& r) { return r.owner != b; });
    removed.assign(keep, regions_.end());
    regions_.erase(keep, regions_.end());
  }
  if (removed.empty()) {
    return invalid_argument("unregister_buffer: region was not registered");
  }
  size_t bytes = 0;
  for (const Region& r : removed) {
    bytes += r.len;
  }
  registered_bytes_ -= std::min<uint64_t>(registered_bytes_, bytes);
  if (!sparse_buffers_) {
    return reregister_all_buffers();
  }
  std::vector<int> slots;
  std::vector<iovec> iovs;
  for (const Region& r : removed) {
    slots.push_back(r.index);
    iovs.push_back(iovec{});
    slot_used_[size_t(r.index)] = false;
  }
  return update_buffer_slots(slots, iovs);
}

void UringEngine::wake(Ring& r) {
  uint64_t one = 1;
  // eventfd writes fail only on counter overflow (2^64-2 pending wakes).
  [[maybe_unused]] ssize_t w = ::write(r.event_fd, &one, sizeof(one));
}

void UringEngine::dispatch(Batch* batch) {
  const size_t nr = rings_.size();
  auto hand = [this](Ring& r, BlockReq* const* reqs, size_t count, size_t stride) {
    bool need_wake = false;
    Status broken;
    {
      std::lock_guard<std::mutex> lk(r.mu);
      if (r.broken.ok()) {
        for (size_t i = 0; i < count; ++i) {
          r.incoming.push_back(reqs[i * stride]);
        }
        need_wake = r.wake_wanted;
        r.wake_wanted = false;
      } else {
        broken = r.broken;
      }
    }
    if (!broken.ok()) {
      for (size_t i = 0; i < count; ++i) {
        finish(reqs[i * stride], broken.with_context(describe(*reqs[i * stride])));
      }
    } else if (need_wake) {
      wake(r);
    }
  };
  std::vector<BlockReq*> ptrs(batch->reqs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) {
    ptrs[i] = &batch->reqs[i];
  }
  if (nr == 1) {
    hand(*rings_[0], ptrs.data(), ptrs.size(), 1);
    return;
  }
  // Spread the pieces round robin, starting where the last batch stopped, so
  // one-piece batches also use every ring.
  const size_t start = next_ring_.fetch_add(unsigned(ptrs.size()), std::memory_order_relaxed);
  for (size_t k = 0; k < nr && k < ptrs.size(); ++k) {
    const size_t ring = (start + k) % nr;
    const size_t count = (ptrs.size() - k + nr - 1) / nr;
    hand(*rings_[ring], ptrs.data() + k, count, nr);
  }
}

void UringEngine::fail_all(const Status& status, std::deque<BlockReq*>& pending) {
  for (BlockReq* p : pending) {
    finish(p, status.with_context(describe(*p)));
  }
  pending.clear();
}

void UringEngine::fail_enter_for_testing(int err, int times) {
  for (auto& r : rings_) {
    r->forced_left.store(times, std::memory_order_relaxed);
    r->forced_errno.store(err, std::memory_order_release);
    wake(*r);
  }
}

int UringEngine::enter(Ring& r, unsigned wait_nr) {
  const int forced = r.forced_errno.load(std::memory_order_acquire);
  if (forced != 0) {
    // Only this worker consumes the seam once it is set.
    const int left = r.forced_left.load(std::memory_order_relaxed);
    if (left > 0) {
      r.forced_left.store(left - 1, std::memory_order_relaxed);
      if (left == 1) {
        r.forced_errno.store(0, std::memory_order_relaxed);
      }
    }
    return -forced;
  }
  return io_uring_submit_and_wait(&r.ring, wait_nr);
}

void UringEngine::quiesce(Ring& r, const Status& status, BlockReq*& inflight_head,
                          unsigned& inflight, bool& event_armed) {
  // io_uring_enter failures in a row before the ring counts as not enterable.
  constexpr unsigned kMaxEnterFailures = 100;
  unsigned cancels = 0;  // cancel SQEs whose CQE has not come
  bool cancel_queued = false;
  bool cancel_any = true;  // IORING_ASYNC_CANCEL_ANY (5.19); else one cancel per request
  bool entering = true;
  unsigned enter_failures = 0;
  const auto start = std::chrono::steady_clock::now();
  bool warned = false;

  auto done = [&](BlockReq* q) {
    list_remove(inflight_head, q);
    --inflight;
    finish(q, status.with_context(describe(*q)));
  };
  auto queue_cancels = [&] {
    if (cancel_any) {
      io_uring_sqe* sqe = io_uring_get_sqe(&r.ring);
      if (sqe == nullptr) {
        return false;
      }
      io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
      io_uring_sqe_set_data64(sqe, kCancelTag);
      ++cancels;
      return true;
    }
    // One cancel per request (and the eventfd read); what does not fit in
    // the SQ is queued on the next round (cancelling twice is harmless).
    bool all = true;
    auto cancel_one = [&](uint64_t target) {
      io_uring_sqe* sqe = io_uring_get_sqe(&r.ring);
      if (sqe == nullptr) {
        all = false;
        return;
      }
      io_uring_prep_cancel64(sqe, target, 0);
      io_uring_sqe_set_data64(sqe, kCancelTag);
      ++cancels;
    };
    for (BlockReq* q = inflight_head; q != nullptr && all; q = q->next) {
      cancel_one(reinterpret_cast<uint64_t>(q));
    }
    if (event_armed && all) {
      cancel_one(kEventTag);
    }
    return all;
  };
  // Once the ring cannot be entered, the SQEs it never consumed will never
  // run: what they carry is not the kernel's.
  auto drop_unconsumed = [&] {
    const unsigned head = io_uring_smp_load_acquire(r.ring.sq.khead);
    for (unsigned i = head; i != r.ring.sq.sqe_tail; ++i) {
      const io_uring_sqe& sqe = r.ring.sq.sqes[r.ring.sq.array[i & r.ring.sq.ring_mask]];
      const uint64_t tag = sqe.user_data;
      if (tag == kEventTag) {
        event_armed = false;
      } else if (tag == kCancelTag) {
        --cancels;
      } else {
        done(reinterpret_cast<BlockReq*>(tag));
      }
    }
  };

  while (inflight > 0 || event_armed || cancels > 0) {
    if (entering && !cancel_queued) {
      cancel_queued = queue_cancels();
    }
    if (entering) {
      const int rc = enter(r, 1);
      if (rc < 0 && !transient_enter_error(rc)) {
        if (++enter_failures >= kMaxEnterFailures) {
          entering = false;
          drop_unconsumed();
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
      } else {
        enter_failures = 0;
      }
    } else {
      // Any syscall runs the task work that posts completions (COOP_TASKRUN).
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&r.ring, head, cqe) {
      ++seen;
      const uint64_t tag = io_uring_cqe_get_data64(cqe);
      if (tag == kEventTag) {
        event_armed = false;
      } else if (tag == kCancelTag) {
        --cancels;
        if (cancel_any && cqe->res == -EINVAL) {
          cancel_any = false;  // a kernel before 5.19: cancel one by one
          cancel_queued = false;
        }
      } else {
        done(static_cast<BlockReq*>(io_uring_cqe_get_data(cqe)));
      }
    }
    io_uring_cq_advance(&r.ring, seen);
    if (!warned && std::chrono::steady_clock::now() - start > std::chrono::seconds(5)) {
      warned = true;
      log_message(LogLevel::kWarning,
                  "io_uring ring broken: " + std::to_string(inflight) +
                      " request(s) still held by the kernel after 5 s; their buffers are "
                      "handed back when it completes them");
    }
  }
}

void UringEngine::run(Ring& r) {
  std::vector<BlockReq*> incoming;
  std::deque<BlockReq*> pending;
  BlockReq* inflight_head = nullptr;
  unsigned inflight = 0;
  bool event_armed = false;
  unsigned event_failures = 0;
  const unsigned qd = options_.queue_depth;

  auto prep = [&](io_uring_sqe* sqe, BlockReq* q) {
    int fd = q->fd;
    unsigned flags = 0;
    if (fixed_files_ && q->file < int(kFileSlots)) {
      fd = q->file;
      flags |= IOSQE_FIXED_FILE;
    }
    const bool read = q->op == IoOp::kRead;
    if (q->buf_index >= 0) {
      if (read) {
        io_uring_prep_read_fixed(sqe, fd, q->buf, q->remaining, q->offset, q->buf_index);
      } else {
        io_uring_prep_write_fixed(sqe, fd, q->buf, q->remaining, q->offset, q->buf_index);
      }
    } else if (caps_.rw_ops) {
      if (read) {
        io_uring_prep_read(sqe, fd, q->buf, q->remaining, q->offset);
      } else {
        io_uring_prep_write(sqe, fd, q->buf, q->remaining, q->offset);
      }
    } else {
      q->iov = iovec{q->buf, q->remaining};
      if (read) {
        io_uring_prep_readv(sqe, fd, &q->iov, 1, q->offset);
      } else {
        io_uring_prep_writev(sqe, fd, &q->iov, 1, q->offset);
      }
    }
    io_uring_sqe_set_flags(sqe, flags);
    io_uring_sqe_set_data(sqe, q);
    if (options_.record_latency && q->start_ns == 0) {
      q->start_ns = monotonic_ns();
    }
  };

  auto complete = [&](io_uring_cqe* cqe) {
    BlockReq* q = static_cast<BlockReq*>(io_uring_cqe_get_data(cqe));
    list_remove(inflight_head, q);
    --inflight;
    const int res = cqe->res;
    if (res == -EINTR || res == -EAGAIN) {
      if (q->attempts < kMaxAttempts) {
        ++q->attempts;
        count_retry();
        pending.push_front(q);
        return;
      }
      finish(q, errno_status(*q, -res));
      return;
    }
    if (res < 0) {
      finish(q, errno_status(*q, -res));
      return;
    }
    if (uint32_t(res) > q->remaining) {
      finish(q, io_status(*q, EIO,
                          "kernel reported " + std::to_string(res) + " bytes, more than the " +
                              std::to_string(q->remaining) + " asked"));
      return;
    }
    if (res == 0) {
      finish(q, q->op == IoOp::kRead ? io_status(*q, EIO, "read past end of file")
                                     : io_status(*q, EIO, "write made no progress"));
      return;
    }
    q->buf += res;
    q->offset += uint64_t(res);
    q->remaining -= uint32_t(res);
    if (q->remaining > 0) {
      // Short transfer: continue from where it stopped, before newer work.
      count_retry();
      pending.push_front(q);
      return;
    }
    finish(q, Status::Ok());
  };

  for (;;) {
    bool stop = false;
    {
      std::lock_guard<std::mutex> lk(r.mu);
      incoming.swap(r.incoming);
      stop = r.stop;
    }
    for (BlockReq* q : incoming) {
      pending.push_back(q);
    }
    incoming.clear();
    if (stop && pending.empty() && inflight == 0) {
      break;
    }

    if (!event_armed) {
      io_uring_sqe* sqe = io_uring_get_sqe(&r.ring);
      if (sqe != nullptr) {
        if (caps_.rw_ops) {
          io_uring_prep_read(sqe, r.event_fd, &r.event_value, sizeof(r.event_value), 0);
        } else {
          r.event_iov = iovec{&r.event_value, sizeof(r.event_value)};
          io_uring_prep_readv(sqe, r.event_fd, &r.event_iov, 1, 0);
        }
        io_uring_sqe_set_data64(sqe, kEventTag);
        event_armed = true;
      }
    }

    // Fill the queue. Without overlap_events, a new window starts only when
    // the previous one has fully completed.
    const bool may_fill = options_.overlap_events || inflight == 0;
    while (may_fill && inflight < qd && !pending.empty()) {
      BlockReq* q = pending.front();
      if (q->batch->failed.load(std::memory_order_relaxed)) {
        pending.pop_front();
        skip(q);
        continue;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&r.ring);
      if (sqe == nullptr) {
        break;  // SQ full: submitted below, refilled next round
      }
      pending.pop_front();
      prep(sqe, q);
      list_push(inflight_head, q);
      ++inflight;
      if (options_.single_submit) {
        count_submit_call();
        int rc;
        do {
          rc = io_uring_submit(&r.ring);
        } while (rc == -EINTR);
      }
    }

    // Block for a completion unless work is waiting that could start now.
    unsigned wait_nr = 1;
    const bool can_start = !pending.empty() && inflight < qd && may_fill;
    {
      std::lock_guard<std::mutex> lk(r.mu);
      if (!r.incoming.empty() || r.stop || can_start) {
        wait_nr = 0;
        r.wake_wanted = false;
      } else {
        // A new submission should wake us only if it could start at once.
        r.wake_wanted = inflight < qd;
      }
    }
    if (wait_nr == 1 && inflight == 0 && !event_armed) {
      wait_nr = 0;  // nothing could complete: do not block
    }
    count_submit_call();
    const int rc = enter(r, wait_nr);

    // Reap every completion available, in one pass.
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&r.ring, head, cqe) {
      ++seen;
      if (io_uring_cqe_get_data64(cqe) == kEventTag) {
        event_armed = false;
        if (cqe->res < 0 && cqe->res != -EINTR && cqe->res != -EAGAIN && cqe->res != -ECANCELED) {
          ++event_failures;
        } else {
          event_failures = 0;
        }
        continue;
      }
      complete(cqe);
    }
    io_uring_cq_advance(&r.ring, seen);

    Status fatal;
    if (rc < 0 && !transient_enter_error(rc)) {
      fatal = Status::from_errno(rc, "io_uring_enter");
    } else if (event_failures > 100) {
      fatal = Status(StatusCode::kInternal, "io_uring worker: eventfd read keeps failing");
    } else if (rc < 0 && seen == 0 && rc != -EINTR) {
      // The kernel is short of resources: back off instead of spinning.
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (!fatal.ok()) {
      log_message(LogLevel::kError,
                  "io_uring ring broken (" + fatal.to_string() + "); failing its requests");
      {
        std::lock_guard<std::mutex> lk(r.mu);
        r.broken = fatal;
        for (BlockReq* q : r.incoming) {
          pending.push_back(q);
        }
        r.incoming.clear();
      }
      // The kernel may still own the in-flight requests' buffers (a DMA into
      // one may be running): the caller gets them back only once it is done.
      quiesce(r, fatal, inflight_head, inflight, event_armed);
      fail_all(fatal, pending);
      std::unique_lock<std::mutex> lk(r.mu);
      r.cv.wait(lk, [&r] { return r.stop; });
      return;
    }
  }
}

}  // namespace strata::io::detail

#endif  // STRATA_HAVE_URING
