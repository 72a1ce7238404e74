// strata/status.h — error values for the whole core.
//
// Core APIs return [[nodiscard]] Status or Result<T>; nothing in the core
// throws or exits on a runtime error. errno becomes a Status in exactly one
// place, Status::from_errno(), with the context of the failing call
// ("pread /x.swap offset 4096 len 1048576: Input/output error").
//
// Thread-safety: Status and Result are values; distinct objects may be used
// from distinct threads freely.
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace strata {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // bad config, bad call; the message names what and why
  kNotFound,            // file, key, NUMA node that does not exist
  kIoError,             // EIO and other I/O failures
  kNoSpace,             // ENOSPC, not enough disk or pool space (retryable)
  kUnavailable,         // capability missing (io_uring refused, no GPU); callers may fall back
  kPermissionDenied,    // EACCES/EPERM, memlock limit
  kCorruption,          // checksum mismatch, bad manifest
  kOutOfMemory,         // ENOMEM, pinned pool exhausted
  kFailedPrecondition,  // wrong state (engine poisoned by an earlier fault, closed)
  kAborted,             // interrupted by the user (Ctrl-C)
  kInternal,            // a broken invariant
};

const char* status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message, int sys_errno = 0, bool retryable = false)
      : code_(code), errno_(sys_errno), retryable_(retryable), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  // Maps an errno value (positive or negative, as io_uring returns it) to a
  // Status: "<context>: <strerror>". ENOSPC and EAGAIN are retryable.
  static Status from_errno(int err, std::string_view context);

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  int sys_errno() const { return errno_; }
  bool retryable() const { return retryable_; }
  const std::string& message() const { return message_; }
  // "IoError: pread /x offset 0 len 4096: Input/output error"
  std::string to_string() const;

  // Returns a copy whose message is "<context>: <message>".
  Status with_context(std::string_view context) const;

  // Explicitly drop a Status (e.g. cleanup after an earlier error).
  void ignore() const {}

 private:
  StatusCode code_ = StatusCode::kOk;
  int errno_ = 0;
  bool retryable_ = false;
  std::string message_;
};

inline Status invalid_argument(std::string msg) {
  return Status(StatusCode::kInvalidArgument, std::move(msg));
}
inline Status internal_error(std::string msg) {
  return Status(StatusCode::kInternal, std::move(msg));
}

// Result<T>: a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) {
      v_ = Status(StatusCode::kInternal, "Result constructed from an OK status");
    }
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace strata

#define STRATA_CONCAT_INNER_(a, b) a##b
#define STRATA_CONCAT_(a, b) STRATA_CONCAT_INNER_(a, b)

#define STRATA_RETURN_IF_ERROR(expr) \
  do {                               \
    ::strata::Status _st = (expr);   \
    if (!_st.ok()) {                 \
      return _st;                    \
    }                                \
  } while (0)

#define STRATA_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) {                                    \
    return tmp.status();                              \
  }                                                   \
  lhs = std::move(tmp).value()

// STRATA_ASSIGN_OR_RETURN(auto x, make_x());
#define STRATA_ASSIGN_OR_RETURN(lhs, expr) \
  STRATA_ASSIGN_OR_RETURN_IMPL_(STRATA_CONCAT_(_strata_res_, __LINE__), lhs, expr)
