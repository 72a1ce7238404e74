#include <strata/status.h>

#include <cstring>

namespace strata {

const char* status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kInvalidArgument:
      return "InvalidArgument";
    case StatusCode::kNotFound:
      return "NotFound";
    case StatusCode::kIoError:
      return "IoError";
    case StatusCode::kNoSpace:
      return "NoSpace";
    case StatusCode::kUnavailable:
      return "Unavailable";
    case StatusCode::kPermissionDenied:
      return "PermissionDenied";
    case StatusCode::kCorruption:
      return "Corruption";
    case StatusCode::kOutOfMemory:
      return "OutOfMemory";
    case StatusCode::kFailedPrecondition:
      return "FailedPrecondition";
    case StatusCode::kAborted:
      return "Aborted";
    case StatusCode::kInternal:
      return "Internal";
  }
  return "Unknown";
}

Status Status::from_errno(int err, std::string_view context) {
  if (err < 0) {
    err = -err;
  }
  char buf[128];
  // GNU strerror_r returns a pointer that may or may not be buf.
  const char* text = strerror_r(err, buf, sizeof(buf));
  std::string msg(context);
  msg += ": ";
  msg += text;
  StatusCode code = StatusCode::kIoError;
  bool retryable = false;
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      code = StatusCode::kNoSpace;
      retryable = true;
      break;
    case EAGAIN:
    case EINTR:
      code = StatusCode::kUnavailable;
      retryable = true;
      break;
    case ENOENT:
      code = StatusCode::kNotFound;
      break;
    case EACCES:
    case EPERM:
    case EROFS:
      code = StatusCode::kPermissionDenied;
      break;
    case ENOMEM:
      code = StatusCode::kOutOfMemory;
      break;
    case EINVAL:
    case EBADF:
    case ENAMETOOLONG:
    case ELOOP:
    case EISDIR:
    case ENOTDIR:
      code = StatusCode::kInvalidArgument;
      break;
    case ENOSYS:
    case EOPNOTSUPP:
      code = StatusCode::kUnavailable;
      break;
    default:
      break;
  }
  return Status(code, std::move(msg), err, retryable);
}

std::string Status::to_string() const {
  if (ok()) {
    return "OK";
  }
  return std::string(status_code_name(code_)) + ": " + message_;
}

Status Status::with_context(std::string_view context) const {
  if (ok()) {
    return *this;
  }
  std::string msg(context);
  msg += ": ";
  msg += message_;
  return Status(code_, std::move(msg), errno_, retryable_);
}

}  // namespace strata
