#include <strata/io/swap_file.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <strata/io/checksum.h>
#include <strata/log.h>

#include "io/extent_allocator.h"
#include "io/testing_hooks.h"

namespace strata::io {

namespace {

constexpr uint64_t kAlign = kDirectAlignment;
// A leftover temporary file (crash between create and rename) is removed only
// when this old, so the scan never races a creator inside that window.
constexpr int64_t kTmpGraceSeconds = 60;

std::atomic<uint64_t> g_seq{0};

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

std::string gib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", double(bytes) / double(uint64_t(1) << 30));
  return buf;
}

void warn_buffered_once(const std::string& dir, const std::string& path, const std::string& why) {
  static std::mutex mu;
  static std::set<std::string> warned;
  bool first;
  {
    std::lock_guard<std::mutex> lk(mu);
    first = warned.insert(dir).second;
  }
  // Outside mu: a sink may block (the binding's waits for the GIL).
  if (first) {
    log_message(LogLevel::kWarning, "the file system at " + dir + " refuses O_DIRECT (" + why +
                                        "); swap file " + path +
                                        " uses buffered I/O through the page cache");
  }
}

// Removes swap files in `dir` whose owner is gone: their flock can be taken.
void remove_stale(const std::string& dir, uint64_t* removed, uint64_t* skipped) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    return;
  }
  const int dfd = ::dirfd(d);
  const int64_t now = int64_t(::time(nullptr));
  while (dirent* ent = ::readdir(d)) {
    const std::string name = ent->d_name;
    const bool swap = starts_with(name, "strata-") && ends_with(name, ".swap");
    const bool tmp = starts_with(name, ".strata-") && ends_with(name, ".swap.tmp");
    if (!swap && !tmp) {
      continue;
    }
    struct stat by_name {};
    if (::fstatat(dfd, name.c_str(), &by_name, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(by_name.st_mode)) {
      continue;
    }
    if (tmp && now - int64_t(by_name.st_mtime) < kTmpGraceSeconds) {
      continue;
    }
    const int fd = ::openat(dfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      ++*skipped;  // another user's file, or gone meanwhile
      continue;
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      // Unlink only the inode we hold locked, not a file created meanwhile
      // under the same name.
      struct stat held {
      }, now_named{};
      if (::fstat(fd, &held) == 0 &&
          ::fstatat(dfd, name.c_str(), &now_named, AT_SYMLINK_NOFOLLOW) == 0 &&
          held.st_ino == now_named.st_ino && held.st_dev == now_named.st_dev &&
          ::unlinkat(dfd, name.c_str(), 0) == 0) {
        ++*removed;
      }
    }
    ::close(fd);
  }
  ::closedir(d);
}

bool valid_tag(const std::string& tag) {
  if (tag.empty() || tag.size() > 64) {
    return false;
  }
  for (char c : tag) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}

}  // namespace

struct SwapFile::Impl {
  struct Sum {
    std::vector<uint64_t> chunks;  // XXH3-64 of each kChecksumChunk of the extent
    bool valid = false;
  };

  SwapFileOptions options;
  IoEngine* engine = nullptr;
  std::string path;
  int fd = -1;
  int handle = -1;
  bool direct = false;
  uint64_t size = 0;
  uint64_t stale_removed = 0;
  uint64_t stale_skipped = 0;

  mutable std::mutex mu;  // guards alloc and sums
  detail::ExtentAllocator alloc{0};
  std::vector<Sum> sums;  // by extent id

  // The checksum of each kChecksumChunk of the extent, hashed through
  // options.parallel_for when there are several.
  std::vector<uint64_t> checksum(const void* buf, size_t len) const {
    const size_t n = checksum_chunks(len);
    std::vector<uint64_t> chunk(n);
    auto one = [&](size_t i) { chunk[i] = chunk_checksum(buf, len, i); };
    if (n > 1 && options.parallel_for) {
      options.parallel_for(n, one);
    } else {
      for (size_t i = 0; i < n; ++i) {
        one(i);
      }
    }
    return chunk;
  }

  // Compares chunks [first, first + got.size()) of the extent with their
  // recorded checksums; a mismatch names the extent and the chunk's bytes.
  Status compare(const Extent& extent, const Sum& sum, size_t first,
                 std::span<const uint64_t> got) const {
    if (first + got.size() > sum.chunks.size()) {
      return invalid_argument("swap file " + path + ": chunks " + std::to_string(first) + ".." +
                              std::to_string(first + got.size()) + " of extent " +
                              std::to_string(extent.id) + ", which has " +
                              std::to_string(sum.chunks.size()));
    }
    for (size_t k = 0; k < got.size(); ++k) {
      const size_t c = first + k;
      if (got[k] == sum.chunks[c]) {
        continue;
      }
      mismatches.fetch_add(1, std::memory_order_relaxed);
      const uint64_t lo = uint64_t(c) * kChecksumChunk;
      const uint64_t hi = std::min<uint64_t>(extent.length, lo + kChecksumChunk);
      char hex[64];
      std::snprintf(hex, sizeof(hex), "expected %016" PRIx64 ", got %016" PRIx64, sum.chunks[c],
                    got[k]);
      return Status(StatusCode::kCorruption,
                    "swap file " + path + ": checksum mismatch in extent " +
                        std::to_string(extent.id) + " (offset " + std::to_string(extent.offset) +
                        ", length " + std::to_string(extent.length) + "), bytes [" +
                        std::to_string(lo) + ", " + std::to_string(hi) + ") of it: XXH3 " + hex);
    }
    return Status::Ok();
  }

  mutable std::atomic<uint64_t> verified{0};
  mutable std::atomic<uint64_t> mismatches{0};

  Status check_live(const Extent& e) const {
    if (!alloc.is_live(e)) {
      return invalid_argument("swap file " + path + ": extent " + std::to_string(e.id) +
                              " (offset " + std::to_string(e.offset) + ", length " +
                              std::to_string(e.length) + ") is not allocated");
    }
    return Status::Ok();
  }
};

SwapFile::SwapFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<SwapFile>> SwapFile::create(const SwapFileOptions& options,
                                                   IoEngine* engine) {
  if (engine == nullptr) {
    return invalid_argument("SwapFile::create: no IoEngine");
  }
  if (options.dir.empty()) {
    return invalid_argument("SwapFile::create: empty directory (nvme_path)");
  }
  if (!valid_tag(options.tag)) {
    return invalid_argument("SwapFile::create: tag '" + options.tag +
                            "' must be 1-64 characters of [A-Za-z0-9._-]");
  }
  if (options.size == 0 || options.size > (uint64_t(1) << 62)) {
    return invalid_argument("SwapFile::create: size " + std::to_string(options.size) +
                            " must be in (0, 2^62]");
  }
  const std::string& dir = options.dir;
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    return Status::from_errno(errno, "swap directory " + dir);
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::from_errno(ENOTDIR, "swap directory " + dir);
  }

  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->engine = engine;
  impl->size = (options.size + kAlign - 1) / kAlign * kAlign;

  remove_stale(dir, &impl->stale_removed, &impl->stale_skipped);
  if (impl->stale_removed > 0) {
    log_message(LogLevel::kInfo, "removed " + std::to_string(impl->stale_removed) +
                                     " stale swap file(s) of dead processes in " + dir);
  }

  // Check the space before allocating, and say how much and where.
  struct statvfs vfs {};
  if (::statvfs(dir.c_str(), &vfs) != 0) {
    return Status::from_errno(errno, "statvfs " + dir);
  }
  const uint64_t avail = uint64_t(vfs.f_bavail) * uint64_t(vfs.f_frsize);
  if (impl->size > avail) {
    return Status(StatusCode::kNoSpace,
                  "swap file needs " + std::to_string(impl->size) + " bytes (" + gib(impl->size) +
                      ") at " + dir + " but only " + std::to_string(avail) + " bytes (" +
                      gib(avail) + ") are available there",
                  ENOSPC, true);
  }

  // Create under a hidden temporary name, lock, then rename: a visible
  // strata-*.swap is always locked while its owner lives.
  const bool want_direct = options.direct;
  bool direct = want_direct;
  std::string refused_why;
  std::string tmp;
  std::string final_path;
  int fd = -1;
  for (int attempt = 0; attempt < 1000 && fd < 0; ++attempt) {
    const std::string stem = "strata-" + options.tag + "-" + std::to_string(::getpid()) + "-" +
                             std::to_string(g_seq.fetch_add(1));
    tmp = dir + "/." + stem + ".swap.tmp";
    final_path = dir + "/" + stem + ".swap";
    int flags = O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
    if (direct) {
      if (testing::refuse_direct_io()) {
        fd = -1;
        errno = EINVAL;
      } else {
        fd = ::open(tmp.c_str(), flags | O_DIRECT, 0600);
      }
      if (fd < 0 && errno == EINVAL) {
        direct = false;
        refused_why = "open with O_DIRECT: Invalid argument";
      }
    }
    if (fd < 0 && !direct) {
      fd = ::open(tmp.c_str(), flags, 0600);
    }
    if (fd < 0 && errno != EEXIST) {
      return Status::from_errno(errno, "create swap file " + tmp);
    }
  }
  if (fd < 0) {
    return Status(StatusCode::kInternal, "create swap file in " + dir + ": no unused name");
  }
  auto cleanup = [&](const std::string& name) {
    ::unlink(name.c_str());
    ::close(fd);
  };
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    cleanup(tmp);
    return Status::from_errno(err, "flock " + tmp);
  }
  bool renamed = false;
  for (int attempt = 0; attempt < 1000 && !renamed; ++attempt) {
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_path.c_str(), RENAME_NOREPLACE) == 0) {
      renamed = true;
      break;
    }
    const int err = errno;
    if (err == EINVAL || err == ENOSYS) {
      // No RENAME_NOREPLACE here: link() also refuses to replace.
      if (::link(tmp.c_str(), final_path.c_str()) == 0) {
        ::unlink(tmp.c_str());
        renamed = true;
        break;
      }
      if (errno != EEXIST) {
        const int lerr = errno;
        cleanup(tmp);
        return Status::from_errno(lerr, "link " + tmp + " to " + final_path);
      }
    } else if (err != EEXIST) {
      cleanup(tmp);
      return Status::from_errno(err, "rename " + tmp + " to " + final_path);
    }
    final_path = dir + "/strata-" + options.tag + "-" + std::to_string(::getpid()) + "-" +
                 std::to_string(g_seq.fetch_add(1)) + ".swap";
  }
  if (!renamed) {
    cleanup(tmp);
    return Status(StatusCode::kInternal, "create swap file in " + dir + ": no unused name");
  }
  const std::string& path = final_path;

  if (::fallocate(fd, 0, 0, off_t(impl->size)) != 0) {
    const int err = errno;
    if (err == EOPNOTSUPP) {
      // The file system cannot reserve blocks: a sparse file may hit ENOSPC
      // later, which the engine reports as a NoSpace error then.
      log_message(LogLevel::kWarning,
                  "fallocate unsupported at " + dir + "; swap file " + path + " is sparse");
      if (::ftruncate(fd, off_t(impl->size)) != 0) {
        const int terr = errno;
        cleanup(path);
        return Status::from_errno(terr, "ftruncate " + path + " to " + std::to_string(impl->size));
      }
    } else {
      cleanup(path);
      if (err == ENOSPC) {
        return Status(StatusCode::kNoSpace,
                      "fallocate " + path + ": swap file needs " + std::to_string(impl->size) +
                          " bytes (" + gib(impl->size) + ") at " + dir + ", " +
                          std::to_string(avail) +
                          " bytes were available before: No space left "
                          "on device",
                      ENOSPC, true);
      }
      return Status::from_errno(err,
                                "fallocate " + path + " " + std::to_string(impl->size) + " bytes");
    }
  }

  // Some file systems accept O_DIRECT at open and refuse it on use.
  if (direct) {
    void* probe = nullptr;
    if (::posix_memalign(&probe, kAlign, kAlign) == 0) {
      std::memset(probe, 0, kAlign);
      ssize_t n;
      do {
        n = ::pwrite(fd, probe, kAlign, 0);
      } while (n < 0 && errno == EINTR);
      const int err = n < 0 ? errno : 0;
      std::free(probe);
      if (n < 0 && err == EINVAL) {
        const int fl = ::fcntl(fd, F_GETFL);
        if (fl < 0 || ::fcntl(fd, F_SETFL, fl & ~O_DIRECT) != 0) {
          const int ferr = errno;
          cleanup(path);
          return Status::from_errno(ferr, "clear O_DIRECT on " + path);
        }
        direct = false;
        refused_why = "aligned write with O_DIRECT: Invalid argument";
      } else if (n < 0) {
        cleanup(path);
        return Status::from_errno(err, "write 4096 bytes at offset 0 of " + path);
      }
    }
  }
  if (want_direct && !direct) {
    warn_buffered_once(dir, path, refused_why);
  }

  auto handle = engine->register_file(fd, path, direct);
  if (!handle.ok()) {
    cleanup(path);
    return handle.status();
  }
  impl->path = path;
  impl->fd = fd;
  impl->handle = *handle;
  impl->direct = direct;
  impl->alloc = detail::ExtentAllocator(impl->size, kAlign);
  return std::unique_ptr<SwapFile>(new SwapFile(std::move(impl)));
}

SwapFile::~SwapFile() {
  if (!impl_) {
    return;
  }
  // Requests of this file may still be in flight: wait for them before the
  // fd goes away.
  impl_->engine->drain();
  impl_->engine->unregister_file(impl_->handle).ignore();
  // Unlink while still holding the lock, so no scan sees it unlocked.
  ::unlink(impl_->path.c_str());
  ::close(impl_->fd);
}

const std::string& SwapFile::path() const { return impl_->path; }
bool SwapFile::direct() const { return impl_->direct; }
uint64_t SwapFile::size() const { return impl_->size; }
int SwapFile::file_handle() const { return impl_->handle; }
IoEngine* SwapFile::engine() const { return impl_->engine; }

Result<Extent> SwapFile::allocate(uint64_t bytes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  auto e = impl_->alloc.allocate(bytes);
  if (!e.ok()) {
    return e.status().with_context("swap file " + impl_->path);
  }
  if (impl_->sums.size() <= e->id) {
    impl_->sums.resize(size_t(e->id) + 1);
  }
  impl_->sums[e->id] = Impl::Sum{};
  return e;
}

void SwapFile::free(const Extent& extent) {
  Status st;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    st = impl_->alloc.free(extent);
    if (st.ok()) {
      impl_->sums[extent.id] = Impl::Sum{};
      return;
    }
  }
  // Outside mu: a sink may block (the binding's waits for the GIL).
  log_message(LogLevel::kError, "swap file " + impl_->path + ": " + st.message() + " (ignored)");
}

Result<Ticket> SwapFile::submit_write(const Extent& extent, const void* buf) {
  std::vector<uint64_t> sums;
  if (impl_->options.checksums) {
    // Hash outside the lock: it reads the whole extent.
    sums = impl_->checksum(buf, size_t(extent.length));
  }
  return submit_write(extent, buf, std::move(sums));
}

Result<Ticket> SwapFile::submit_write(const Extent& extent, const void* buf,
                                      std::vector<uint64_t> chunk_sums) {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    STRATA_RETURN_IF_ERROR(impl_->check_live(extent));
    if (impl_->options.checksums) {
      const size_t want = checksum_chunks(size_t(extent.length));
      if (chunk_sums.size() != want) {
        return invalid_argument("swap file " + impl_->path + ": write of extent " +
                                std::to_string(extent.id) + " with " +
                                std::to_string(chunk_sums.size()) + " chunk checksums, " +
                                std::to_string(want) + " needed");
      }
      // Recorded before the write completes: if the write fails, the data on
      // disk is unknown and a later read must not verify.
      impl_->sums[extent.id] = Impl::Sum{std::move(chunk_sums), true};
    }
  }
  IoRequest r{IoOp::kWrite, impl_->handle, const_cast<void*>(buf), size_t(extent.length),
              extent.offset};
  return impl_->engine->submit(std::span<const IoRequest>(&r, 1));
}

Result<Ticket> SwapFile::submit_read(const Extent& extent, void* buf) {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    STRATA_RETURN_IF_ERROR(impl_->check_live(extent));
  }
  IoRequest r{IoOp::kRead, impl_->handle, buf, size_t(extent.length), extent.offset};
  return impl_->engine->submit(std::span<const IoRequest>(&r, 1));
}

Status SwapFile::verify(const Extent& extent, const void* buf) const {
  if (!impl_->options.checksums) {
    return Status::Ok();
  }
  Impl::Sum sum;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    STRATA_RETURN_IF_ERROR(impl_->check_live(extent));
    sum = impl_->sums[extent.id];
  }
  if (!sum.valid) {
    return Status::Ok();  // never written since allocated
  }
  const std::vector<uint64_t> got = impl_->checksum(buf, size_t(extent.length));
  impl_->verified.fetch_add(1, std::memory_order_relaxed);
  return impl_->compare(extent, sum, 0, got);
}

Status SwapFile::verify_chunks(const Extent& extent, size_t first,
                               std::span<const uint64_t> chunk_sums) const {
  if (!impl_->options.checksums) {
    return Status::Ok();
  }
  Impl::Sum sum;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    STRATA_RETURN_IF_ERROR(impl_->check_live(extent));
    if (!impl_->sums[extent.id].valid) {
      return Status::Ok();  // never written since allocated
    }
    sum = impl_->sums[extent.id];
  }
  if (first == 0 && !chunk_sums.empty()) {
    impl_->verified.fetch_add(1, std::memory_order_relaxed);
  }
  return impl_->compare(extent, sum, first, chunk_sums);
}

bool SwapFile::checksums() const { return impl_->options.checksums; }

Status SwapFile::write(const Extent& extent, const void* buf) {
  STRATA_ASSIGN_OR_RETURN(Ticket t, submit_write(extent, buf));
  return impl_->engine->wait(t);
}

Status SwapFile::read(const Extent& extent, void* buf) {
  STRATA_ASSIGN_OR_RETURN(Ticket t, submit_read(extent, buf));
  STRATA_RETURN_IF_ERROR(impl_->engine->wait(t));
  return verify(extent, buf);
}

SwapFileStats SwapFile::stats() const {
  SwapFileStats s;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    s.capacity = impl_->alloc.capacity();
    s.used_bytes = impl_->alloc.used_bytes();
    s.free_bytes = impl_->alloc.free_bytes();
    s.largest_free = impl_->alloc.largest_free();
    s.live_extents = impl_->alloc.live_extents();
    s.fragments = impl_->alloc.fragments();
  }
  s.checksums_verified = impl_->verified.load(std::memory_order_relaxed);
  s.checksum_mismatches = impl_->mismatches.load(std::memory_order_relaxed);
  s.stale_removed = impl_->stale_removed;
  s.stale_skipped = impl_->stale_skipped;
  return s;
}

}  // namespace strata::io
