// Slab setup and teardown; see slab.h.
#include "memory/slab.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include <strata/log.h>
#include <strata/platform/meminfo.h>

#include "memory/dcheck.h"

namespace strata::memory::detail {

void dcheck_fail(const char* cond, const std::string& msg, const char* file, int line) {
  log_message(LogLevel::kFatal, std::string("DCHECK failed at ") + file + ":" +
                                    std::to_string(line) + ": " + cond + ": " + msg);
  std::abort();
}

std::string describe_nodes(const std::vector<int>& nodes) {
  std::string out = nodes.size() == 1 ? "node " : "nodes ";
  for (size_t i = 0; i < nodes.size(); ++i) {
    out += (i ? "," : "") + std::to_string(nodes[i]);
  }
  return out;
}

Result<Slab> Slab::map(size_t bytes, const SlabSpec& spec) {
  if (bytes == 0) {
    return invalid_argument("slab of 0 bytes");
  }
  Slab slab;
  size_t size = platform::round_up(bytes, platform::kPageSize);
  size_t align = size >= platform::kHugePageSize ? platform::kHugePageSize : platform::kPageSize;
  void* p = nullptr;
  int r = platform::map_anonymous(size, align, &p);
  if (r != 0) {
    return Status::from_errno(r, "mmap slab of " + platform::format_bytes(size));
  }
  slab.data_ = static_cast<char*>(p);
  slab.size_ = size;
  // From here on `slab` unmaps on every early return.
  if (!spec.nodes.empty()) {
    r = platform::bind_memory(p, size, spec.policy, spec.nodes);
    if (r != 0) {
      return Status::from_errno(r, std::string("mbind ") + platform::format_bytes(size) + " to " +
                                       describe_nodes(spec.nodes) + " (" +
                                       platform::mem_policy_name(spec.policy) + ")");
    }
  }
  if (spec.hugepage) {
    // Best effort: THP may be compiled out or set to "never".
    slab.hugepage_ = platform::advise_hugepage(p, size) == 0;
  }
  if (spec.dontfork) {
    r = platform::advise_dontfork(p, size);
    if (r != 0) {
      return Status::from_errno(r, "madvise(MADV_DONTFORK) " + platform::format_bytes(size));
    }
  }
  if (spec.prefault) {
    r = platform::prefault(p, size, spec.prefault_threads);
    if (r != 0) {
      std::string where = spec.nodes.empty() ? "" : " on " + describe_nodes(spec.nodes);
      return Status::from_errno(r, "pre-fault " + platform::format_bytes(size) + where);
    }
  }
  return slab;
}

Slab& Slab::operator=(Slab&& other) noexcept {
  if (this != &other) {
    release();
    data_ = other.data_;
    size_ = other.size_;
    hugepage_ = other.hugepage_;
    pin_ = std::move(other.pin_);
    other.data_ = nullptr;
    other.size_ = 0;
    other.pin_ = nullptr;
  }
  return *this;
}

Status Slab::pin(std::shared_ptr<PinBackend> backend) {
  STRATA_DCHECK(pin_ == nullptr, "slab pinned twice");
  STRATA_RETURN_IF_ERROR(backend->pin(data_, size_));
  pin_ = std::move(backend);
  return Status::Ok();
}

void Slab::release() {
  if (data_ == nullptr) {
    return;
  }
  if (pin_) {
    // A failed unpin leaves nothing to undo: munmap drops the lock anyway.
    pin_->unpin(data_, size_).ignore();
    pin_ = nullptr;
  }
  int r = platform::unmap(data_, size_);
  STRATA_DCHECK(r == 0, "munmap of a slab failed");
  (void)r;
  data_ = nullptr;
  size_ = 0;
}

}  // namespace strata::memory::detail
