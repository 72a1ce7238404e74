// tests/cpp/unit/test_io_common.h — helpers shared by the I/O layer's tests:
// temp dirs under /tmp (a disk file system, so O_DIRECT works), aligned
// buffers, deterministic patterns, and engine creation per backend that
// skips (with the reason) when io_uring is unavailable.
#pragma once

#include <fcntl.h>
#include <ftw.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include <gtest/gtest.h>
#include <strata/io/io_engine.h>
#include <strata/io/probe.h>

namespace strata::io::test {

class TempDir {
 public:
  explicit TempDir(const char* base = "/tmp") {
    std::string tmpl = std::string(base) + "/strata-io-test-XXXXXX";
    char* p = ::mkdtemp(tmpl.data());
    if (p != nullptr) {
      path_ = p;
    }
  }
  ~TempDir() {
    if (!path_.empty()) {
      ::nftw(
          path_.c_str(),
          [](const char* f, const struct stat*, int, struct FTW*) { return ::remove(f); }, 16,
          FTW_DEPTH | FTW_PHYS);
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  bool ok() const { return !path_.empty(); }

 private:
  std::string path_;
};

class AlignedBuf {
 public:
  explicit AlignedBuf(size_t len, size_t align = kDirectAlignment) : len_(len) {
    if (::posix_memalign(&p_, align, len == 0 ? align : len) != 0) {
      p_ = nullptr;
    }
    if (p_ != nullptr) {
      std::memset(p_, 0, len == 0 ? align : len);
    }
  }
  ~AlignedBuf() { std::free(p_); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  char* data() const { return static_cast<char*>(p_); }
  size_t size() const { return len_; }

 private:
  void* p_ = nullptr;
  size_t len_;
};

inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline void fill_pattern(void* buf, size_t len, uint64_t seed) {
  auto* p = static_cast<unsigned char*>(buf);
  uint64_t s = seed;
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const uint64_t v = splitmix64(s);
    std::memcpy(p + i, &v, 8);
  }
  const uint64_t v = splitmix64(s);
  std::memcpy(p + i, &v, len - i);
}

enum class Backend { kUring, kThreadPool };

inline const char* backend_label(Backend b) {
  return b == Backend::kUring ? "Uring" : "ThreadPool";
}

// The reason io_uring cannot be used here, or empty.
inline std::string uring_unavailable_reason() {
  static const UringProbe probe = probe_uring();
  return probe.available ? std::string() : probe.reason;
}

inline IoOptions options_for(Backend b) {
  IoOptions o;
  o.backend = b == Backend::kUring ? IoOptions::Backend::kUring : IoOptions::Backend::kThreadPool;
  return o;
}

// Opens (creating) a file in dir; O_DIRECT when asked.
inline int open_file(const std::string& path, bool direct, int extra = 0) {
  return ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | (direct ? O_DIRECT : 0) | extra, 0600);
}

inline bool is_tmpfs(const std::string& dir) {
  struct statfs s {};
  return ::statfs(dir.c_str(), &s) == 0 && s.f_type == 0x01021994;  // TMPFS_MAGIC
}

}  // namespace strata::io::test

// Creates `var` (std::unique_ptr<IoEngine>) for backend `b` with options `o`,
// skipping the test when io_uring is unavailable.
#define STRATA_MAKE_ENGINE_OR_SKIP(var, b, o)                                                   \
  if ((b) == ::strata::io::test::Backend::kUring &&                                             \
      !::strata::io::test::uring_unavailable_reason().empty()) {                                \
    GTEST_SKIP() << "io_uring unavailable: " << ::strata::io::test::uring_unavailable_reason(); \
  }                                                                                             \
  auto var##_result = ::strata::io::make_io_engine(o);                                          \
  ASSERT_TRUE(var##_result.ok()) << var##_result.status().to_string();                          \
  std::unique_ptr<::strata::io::IoEngine> var = std::move(var##_result).value()
