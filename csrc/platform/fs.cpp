// File-system calls; see strata/platform/fs.h.
#include <strata/platform/fs.h>

#include <fcntl.h>
#include <stdio.h>

#include <cerrno>

namespace strata::platform {

Status rename_exchange(const std::string& a, const std::string& b) {
  if (::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) == 0) {
    return Status::Ok();
  }
  const int err = errno;
  Status st = Status::from_errno(err, "rename_exchange " + a + " <-> " + b);
  // "Cannot exchange here" is told apart from a real failure whatever code
  // from_errno gives EINVAL: the caller falls back on Unavailable alone.
  if (err == ENOSYS || err == EINVAL || err == EOPNOTSUPP || err == ENOTSUP) {
    return Status(StatusCode::kUnavailable, st.message(), err);
  }
  return st;
}

}  // namespace strata::platform
