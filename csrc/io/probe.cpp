// probe_direct_io() and the test seam that refuses O_DIRECT.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include <strata/io/probe.h>

#include "io/testing_hooks.h"

namespace strata::io {

namespace testing {

namespace {
std::atomic<bool> g_refuse_direct{false};
}  // namespace

void set_refuse_direct_io(bool refuse) { g_refuse_direct.store(refuse); }
bool refuse_direct_io() { return g_refuse_direct.load(); }

}  // namespace testing

Result<bool> probe_direct_io(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    return Status::from_errno(errno, "probe_direct_io: stat " + dir);
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::from_errno(ENOTDIR, "probe_direct_io: " + dir);
  }
  if (testing::refuse_direct_io()) {
    return false;
  }
  static std::atomic<unsigned> seq{0};
  std::string path;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    path = dir + "/.strata-probe-" + std::to_string(::getpid()) + "-" +
           std::to_string(seq.fetch_add(1)) + ".tmp";
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_DIRECT, 0600);
    if (fd < 0 && errno != EEXIST) {
      break;
    }
  }
  if (fd < 0) {
    const int err = errno;
    if (err == EINVAL) {
      return false;  // the file system refuses O_DIRECT at open
    }
    return Status::from_errno(err, "probe_direct_io: open " + path + " with O_DIRECT");
  }
  void* buf = nullptr;
  if (::posix_memalign(&buf, kDirectAlignment, kDirectAlignment) != 0) {
    ::unlink(path.c_str());
    ::close(fd);
    return Status(StatusCode::kOutOfMemory, "probe_direct_io: 4 KiB buffer");
  }
  std::memset(buf, 0, kDirectAlignment);
  ssize_t n;
  do {
    n = ::pwrite(fd, buf, kDirectAlignment, 0);
  } while (n < 0 && errno == EINTR);
  const int err = n < 0 ? errno : 0;
  std::free(buf);
  ::unlink(path.c_str());
  ::close(fd);
  if (n == ssize_t(kDirectAlignment)) {
    return true;
  }
  if (err == EINVAL) {
    return false;  // accepted at open, refused on use (some FUSE file systems)
  }
  if (n >= 0) {
    return Status(StatusCode::kIoError, "probe_direct_io: short 4 KiB write in " + dir);
  }
  return Status::from_errno(err, "probe_direct_io: pwrite 4096 bytes in " + dir);
}

}  // namespace strata::io
