// SwapFile: naming, locking, stale files of dead processes, the space check,
// the O_DIRECT fallback, extents and checksums, over both backends.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <strata/io/checksum.h>
#include <strata/io/probe.h>
#include <strata/io/swap_file.h>

#include "io/testing_hooks.h"
#include "unit/test_io_common.h"

namespace strata::io {
namespace {

using test::AlignedBuf;
using test::Backend;
using test::fill_pattern;
using test::TempDir;

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::vector<std::string> swap_files_in(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    return out;
  }
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.find("strata-") != std::string::npos) {
      out.push_back(n);
    }
  }
  ::closedir(d);
  return out;
}

class SwapFileTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(dir_.ok());
    if (GetParam() == Backend::kUring && !test::uring_unavailable_reason().empty()) {
      GTEST_SKIP() << "io_uring unavailable: " << test::uring_unavailable_reason();
    }
    IoOptions o = test::options_for(GetParam());
    o.block_size = 256 << 10;
    auto e = make_io_engine(o);
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    engine_ = std::move(e).value();
  }
  SwapFileOptions opts(uint64_t size = 8 << 20) const {
    SwapFileOptions o;
    o.dir = dir_.path();
    o.tag = "test";
    o.size = size;
    return o;
  }
  TempDir dir_;
  std::unique_ptr<IoEngine> engine_;
};

TEST_P(SwapFileTest, ExtentsRoundTripWithChecksums) {
  auto swap = SwapFile::create(opts(), engine_.get());
  ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  SwapFile& s = **swap;
  EXPECT_EQ(s.size(), uint64_t(8) << 20);
  auto can_direct = probe_direct_io(dir_.path());
  ASSERT_TRUE(can_direct.ok());
  EXPECT_EQ(s.direct(), *can_direct);
  const std::vector<uint64_t> sizes = {4096, 12345, 1 << 20, (1 << 20) + 1, 3 << 20};
  std::vector<Extent> extents;
  std::vector<std::unique_ptr<AlignedBuf>> src, dst;
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto e = s.allocate(sizes[i]);
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    EXPECT_EQ(e->offset % 4096, 0u);
    EXPECT_EQ(e->length % 4096, 0u);
    EXPECT_GE(e->length, sizes[i]);
    extents.push_back(*e);
    src.push_back(std::make_unique<AlignedBuf>(e->length));
    dst.push_back(std::make_unique<AlignedBuf>(e->length));
    fill_pattern(src.back()->data(), e->length, 40 + i);
  }
  // Async: all writes in flight together, then all reads.
  std::vector<Ticket> tickets;
  for (size_t i = 0; i < extents.size(); ++i) {
    auto t = s.submit_write(extents[i], src[i]->data());
    ASSERT_TRUE(t.ok());
    tickets.push_back(*t);
  }
  for (Ticket t : tickets) {
    ASSERT_TRUE(engine_->wait(t).ok());
  }
  tickets.clear();
  for (size_t i = 0; i < extents.size(); ++i) {
    auto t = s.submit_read(extents[i], dst[i]->data());
    ASSERT_TRUE(t.ok());
    tickets.push_back(*t);
  }
  for (size_t i = 0; i < extents.size(); ++i) {
    ASSERT_TRUE(engine_->wait(tickets[i]).ok());
    EXPECT_TRUE(s.verify(extents[i], dst[i]->data()).ok());
    EXPECT_EQ(0, std::memcmp(src[i]->data(), dst[i]->data(), extents[i].length));
  }
  // Synchronous read verifies itself.
  EXPECT_TRUE(s.read(extents[2], dst[2]->data()).ok());
  SwapFileStats st = s.stats();
  EXPECT_EQ(st.live_extents, sizes.size());
  EXPECT_EQ(st.used_bytes + st.free_bytes, st.capacity);
  EXPECT_EQ(st.checksums_verified, sizes.size() + 1);
  EXPECT_EQ(st.checksum_mismatches, 0u);
  for (const Extent& e : extents) {
    s.free(e);
  }
  EXPECT_EQ(s.stats().fragments, 1u);
  EXPECT_EQ(s.stats().free_bytes, s.size());
}

TEST_P(SwapFileTest, ChecksumMismatchIsDetected) {
  auto swap = SwapFile::create(opts(), engine_.get());
  ASSERT_TRUE(swap.ok());
  SwapFile& s = **swap;
  auto pad = s.allocate(8192);  // so the corrupted extent is not at offset 0
  auto e = s.allocate(100000);
  ASSERT_TRUE(pad.ok() && e.ok());
  AlignedBuf src(e->length), dst(e->length);
  fill_pattern(src.data(), src.size(), 77);
  ASSERT_TRUE(s.write(*e, src.data()).ok());
  ASSERT_TRUE(s.read(*e, dst.data()).ok());

  // Flip one byte behind the engine's back.
  int fd = ::open(s.path().c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  const char bad = char(src.data()[1234] ^ 0x5a);
  ASSERT_EQ(::pwrite(fd, &bad, 1, off_t(e->offset + 1234)), 1);
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);

  Status st = s.read(*e, dst.data());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), StatusCode::kCorruption);
  EXPECT_NE(st.message().find(s.path()), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("extent " + std::to_string(e->id)), std::string::npos);
  EXPECT_NE(st.message().find("offset " + std::to_string(e->offset)), std::string::npos);
  EXPECT_EQ(s.stats().checksum_mismatches, 1u);
  // Rewriting the extent heals it.
  ASSERT_TRUE(s.write(*e, src.data()).ok());
  EXPECT_TRUE(s.read(*e, dst.data()).ok());
}

// Checksums of several 1 MiB chunks hash through parallel_for; the result
// does not depend on it: a record written with it verifies without it and the
// other way round, and a flipped byte in any chunk (the short tail included)
// is caught.
TEST_P(SwapFileTest, ChunkedChecksumsRunInParallelAndDoNotDependOnIt) {
  std::atomic<int> calls{0};
  std::atomic<size_t> tasks_seen{0};
  SwapFileOptions par = opts(16 << 20);
  par.parallel_for = [&](size_t tasks, const std::function<void(size_t)>& fn) {
    ++calls;
    tasks_seen += tasks;
    std::vector<std::thread> ts;
    for (size_t t = 0; t < tasks; ++t) {
      ts.emplace_back([&fn, t] { fn(t); });
    }
    for (auto& t : ts) {
      t.join();
    }
  };
  auto swap = SwapFile::create(par, engine_.get());
  ASSERT_TRUE(swap.ok());
  SwapFile& s = **swap;
  const size_t len = (3 << 20) + 8192;  // three whole chunks and a short one
  auto e = s.allocate(len);
  ASSERT_TRUE(e.ok());
  AlignedBuf src(e->length), dst(e->length);
  fill_pattern(src.data(), src.size(), 91);
  ASSERT_TRUE(s.write(*e, src.data()).ok());
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(tasks_seen.load(), 4u);
  ASSERT_TRUE(s.read(*e, dst.data()).ok());  // verified in parallel
  EXPECT_EQ(calls.load(), 2);
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), src.size()));
  EXPECT_EQ(s.stats().checksum_mismatches, 0u);
  // A small extent is one chunk: hashed inline.
  auto small = s.allocate(4096);
  ASSERT_TRUE(small.ok());
  AlignedBuf one(4096);
  ASSERT_TRUE(s.write(*small, one.data()).ok());
  EXPECT_EQ(calls.load(), 2);

  for (uint64_t at : {uint64_t(5), uint64_t(2 << 20) + 17, uint64_t(len) - 3}) {
    int fd = ::open(s.path().c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const char bad = char(src.data()[at] ^ 0x21);
    ASSERT_EQ(::pwrite(fd, &bad, 1, off_t(e->offset + at)), 1);
    ASSERT_EQ(::fsync(fd), 0);
    ::close(fd);
    Status st = s.read(*e, dst.data());
    EXPECT_EQ(st.code(), StatusCode::kCorruption) << "byte " << at;
    ASSERT_TRUE(s.write(*e, src.data()).ok());
  }
}

// A caller that hashes the buffer itself (the engine, chunk by chunk while it
// updates a record) passes chunk checksums to submit_write and checks a read
// chunk by chunk: they are the same values SwapFile computes, a wrong count
// writes nothing, a wrong value or a flipped byte is Corruption naming the
// chunk's bytes.
TEST_P(SwapFileTest, CallerChunkChecksumsAreRecordedAndCheckedByChunk) {
  auto swap = SwapFile::create(opts(16 << 20), engine_.get());
  ASSERT_TRUE(swap.ok());
  SwapFile& s = **swap;
  const size_t len = (3 << 20) + 8192;
  auto e = s.allocate(len);
  ASSERT_TRUE(e.ok());
  AlignedBuf src(e->length), dst(e->length);
  fill_pattern(src.data(), src.size(), 13);
  const size_t nc = checksum_chunks(e->length);
  ASSERT_EQ(nc, 4u);
  std::vector<uint64_t> sums(nc);
  for (size_t c = 0; c < nc; ++c) {
    sums[c] = chunk_checksum(src.data(), e->length, c);
  }
  auto bad_count = s.submit_write(*e, src.data(), std::vector<uint64_t>(nc - 1));
  EXPECT_EQ(bad_count.status().code(), StatusCode::kInvalidArgument);
  auto t = s.submit_write(*e, src.data(), sums);
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  ASSERT_TRUE(engine_->wait(*t).ok());
  ASSERT_TRUE(s.read(*e, dst.data()).ok()) << "the whole-extent verification agrees";
  EXPECT_TRUE(s.verify_chunks(*e, 1, std::span<const uint64_t>(sums.data() + 1, 2)).ok());
  std::vector<uint64_t> wrong = sums;
  wrong[2] ^= 1;
  Status st = s.verify_chunks(*e, 2, std::span<const uint64_t>(wrong.data() + 2, 2));
  EXPECT_EQ(st.code(), StatusCode::kCorruption);
  EXPECT_NE(
      st.message().find("bytes [" + std::to_string(2 << 20) + ", " + std::to_string(3 << 20) + ")"),
      std::string::npos)
      << st.message();
  EXPECT_EQ(s.verify_chunks(*e, 3, std::span<const uint64_t>(sums.data(), 2)).code(),
            StatusCode::kInvalidArgument)
      << "chunks past the extent";
  // Stored with a wrong checksum for the last (short) chunk: the next read
  // says so, naming that chunk.
  t = s.submit_write(*e, src.data(), wrong);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE(engine_->wait(*t).ok());
  st = s.read(*e, dst.data());
  EXPECT_EQ(st.code(), StatusCode::kCorruption);
  EXPECT_NE(st.message().find("bytes [" + std::to_string(2 << 20)), std::string::npos)
      << st.message();
}

TEST_P(SwapFileTest, ChecksumsOffSkipsVerification) {
  SwapFileOptions o = opts();
  o.checksums = false;
  auto swap = SwapFile::create(o, engine_.get());
  ASSERT_TRUE(swap.ok());
  SwapFile& s = **swap;
  auto e = s.allocate(4096);
  ASSERT_TRUE(e.ok());
  AlignedBuf src(4096), dst(4096);
  ASSERT_TRUE(s.write(*e, src.data()).ok());
  int fd = ::open(s.path().c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, "x", 1, off_t(e->offset)), 1);
  ::close(fd);
  EXPECT_TRUE(s.read(*e, dst.data()).ok());
  EXPECT_EQ(dst.data()[0], 'x');
  EXPECT_EQ(s.stats().checksums_verified, 0u);
}

TEST_P(SwapFileTest, NeverWrittenExtentReadsZeros) {
  auto swap = SwapFile::create(opts(), engine_.get());
  ASSERT_TRUE(swap.ok());
  auto e = (*swap)->allocate(65536);
  ASSERT_TRUE(e.ok());
  AlignedBuf dst(65536);
  std::memset(dst.data(), 1, dst.size());
  ASSERT_TRUE((*swap)->read(*e, dst.data()).ok());
  for (size_t i = 0; i < dst.size(); ++i) {
    ASSERT_EQ(dst.data()[i], 0) << i;
  }
}

TEST_P(SwapFileTest, ExtentMisuseIsRejected) {
  auto swap = SwapFile::create(opts(1 << 20), engine_.get());
  ASSERT_TRUE(swap.ok());
  SwapFile& s = **swap;
  auto e = s.allocate(1 << 20);
  ASSERT_TRUE(e.ok());
  auto full = s.allocate(1);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), StatusCode::kNoSpace);
  EXPECT_NE(full.status().message().find(s.path()), std::string::npos);
  AlignedBuf buf(1 << 20);
  s.free(*e);
  s.free(*e);  // double free: reported and ignored
  EXPECT_EQ(s.read(*e, buf.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.submit_write(*e, buf.data()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.stats().free_bytes, s.size());
}

TEST_P(SwapFileTest, NameModeLockAndRemoval) {
  std::string path;
  {
    auto swap = SwapFile::create(opts(), engine_.get());
    ASSERT_TRUE(swap.ok());
    path = (*swap)->path();
    const std::string base = path.substr(path.rfind('/') + 1);
    EXPECT_EQ(base.rfind("strata-test-" + std::to_string(::getpid()) + "-", 0), 0u) << base;
    EXPECT_EQ(base.substr(base.size() - 5), ".swap");
    struct stat st {};
    ASSERT_EQ(::lstat(path.c_str(), &st), 0);
    EXPECT_TRUE(S_ISREG(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_GE(uint64_t(st.st_blocks) * 512, (*swap)->size()) << "not preallocated";
    // Held locked: another open file description cannot take the flock.
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    EXPECT_NE(::flock(fd, LOCK_EX | LOCK_NB), 0);
    EXPECT_EQ(errno, EWOULDBLOCK);
    ::close(fd);
  }
  EXPECT_FALSE(exists(path)) << "swap file left behind";
  EXPECT_TRUE(swap_files_in(dir_.path()).empty());
}

TEST_P(SwapFileTest, TwoSwapFilesOnOneDirCoexist) {
  auto a = SwapFile::create(opts(), engine_.get());
  auto b = SwapFile::create(opts(), engine_.get());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a)->path(), (*b)->path());
  EXPECT_EQ((*b)->stats().stale_removed, 0u) << "a live file was taken for stale";
  EXPECT_TRUE(exists((*a)->path()));
  auto ea = (*a)->allocate(65536);
  auto eb = (*b)->allocate(65536);
  ASSERT_TRUE(ea.ok() && eb.ok());
  AlignedBuf sa(65536), sb(65536), d(65536);
  fill_pattern(sa.data(), sa.size(), 1);
  fill_pattern(sb.data(), sb.size(), 2);
  ASSERT_TRUE((*a)->write(*ea, sa.data()).ok());
  ASSERT_TRUE((*b)->write(*eb, sb.data()).ok());
  ASSERT_TRUE((*a)->read(*ea, d.data()).ok());
  EXPECT_EQ(0, std::memcmp(d.data(), sa.data(), d.size()));
  ASSERT_TRUE((*b)->read(*eb, d.data()).ok());
  EXPECT_EQ(0, std::memcmp(d.data(), sb.data(), d.size()));
  EXPECT_EQ(swap_files_in(dir_.path()).size(), 2u);
}

TEST_P(SwapFileTest, SpaceIsCheckedBeforeAllocation) {
  struct statvfs vfs {};
  ASSERT_EQ(::statvfs(dir_.path().c_str(), &vfs), 0);
  const uint64_t avail = uint64_t(vfs.f_bavail) * vfs.f_frsize;
  auto swap = SwapFile::create(opts(avail + (uint64_t(1) << 40)), engine_.get());
  ASSERT_FALSE(swap.ok());
  EXPECT_EQ(swap.status().code(), StatusCode::kNoSpace);
  const std::string& m = swap.status().message();
  EXPECT_NE(m.find("needs " + std::to_string(avail + (uint64_t(1) << 40))), std::string::npos) << m;
  EXPECT_NE(m.find(dir_.path()), std::string::npos) << m;
  EXPECT_NE(m.find("available"), std::string::npos) << m;
  EXPECT_TRUE(swap_files_in(dir_.path()).empty()) << "a refused swap file was left behind";
}

TEST_P(SwapFileTest, BadOptions) {
  SwapFileOptions o = opts();
  o.dir = "";
  EXPECT_EQ(SwapFile::create(o, engine_.get()).status().code(), StatusCode::kInvalidArgument);
  o = opts();
  o.dir = dir_.path() + "/missing";
  EXPECT_EQ(SwapFile::create(o, engine_.get()).status().code(), StatusCode::kNotFound);
  o = opts();
  o.tag = "../escape";
  EXPECT_EQ(SwapFile::create(o, engine_.get()).status().code(), StatusCode::kInvalidArgument);
  o = opts(0);
  EXPECT_EQ(SwapFile::create(o, engine_.get()).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SwapFile::create(opts(), nullptr).status().code(), StatusCode::kInvalidArgument);
}

// A file system that refuses O_DIRECT: tmpfs did before Linux 6.6.
TEST_P(SwapFileTest, DirectRefusedOnTmpfsFallsBackToBuffered) {
  const std::string shm = "/dev/shm";
  if (!test::is_tmpfs(shm)) {
    GTEST_SKIP() << shm << " is not a tmpfs here";
  }
  auto probe = probe_direct_io(shm);
  ASSERT_TRUE(probe.ok()) << probe.status().to_string();
  if (*probe) {
    GTEST_SKIP() << "tmpfs accepts O_DIRECT on this kernel (Linux >= 6.6); the fallback is "
                    "covered by DirectRefusedFallsBackToBuffered through the test seam";
  }
  TempDir dir(shm.c_str());
  ASSERT_TRUE(dir.ok());
  SwapFileOptions o = opts();
  o.dir = dir.path();
  auto swap = SwapFile::create(o, engine_.get());
  ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  EXPECT_FALSE((*swap)->direct());
  auto e = (*swap)->allocate(10000);
  ASSERT_TRUE(e.ok());
  std::vector<char> src(e->length, 'q'), dst(e->length);
  ASSERT_TRUE((*swap)->write(*e, src.data()).ok());
  ASSERT_TRUE((*swap)->read(*e, dst.data()).ok());
  EXPECT_EQ(src, dst);
}

TEST_P(SwapFileTest, DirectRefusedFallsBackToBuffered) {
  ::testing::internal::CaptureStderr();
  io::testing::set_refuse_direct_io(true);
  auto probe = probe_direct_io(dir_.path());
  auto swap = SwapFile::create(opts(), engine_.get());
  io::testing::set_refuse_direct_io(false);
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(probe.ok());
  EXPECT_FALSE(*probe);
  ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  SwapFile& s = **swap;
  EXPECT_FALSE(s.direct());
  EXPECT_NE(err.find("refuses O_DIRECT"), std::string::npos) << "warning not printed: " << err;
  // Buffered: unaligned host buffers are fine.
  auto e = s.allocate(5000);
  ASSERT_TRUE(e.ok());
  std::vector<char> src(e->length + 1), dst(e->length + 1);
  fill_pattern(src.data() + 1, e->length, 9);
  ASSERT_TRUE(s.write(*e, src.data() + 1).ok());
  ASSERT_TRUE(s.read(*e, dst.data() + 1).ok());
  EXPECT_EQ(0, std::memcmp(src.data() + 1, dst.data() + 1, e->length));
}

// Forks a child that creates a swap file in `dir` and reports its path, then
// either exits without any cleanup or waits to be killed.
pid_t spawn_owner(const std::string& dir, bool wait_for_kill, std::string* path) {
  int fds[2];
  if (::pipe(fds) != 0) {
    return -1;
  }
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    IoOptions o;
    o.backend = IoOptions::Backend::kThreadPool;
    auto e = make_io_engine(o);
    if (!e.ok()) {
      ::_exit(2);
    }
    SwapFileOptions so;
    so.dir = dir;
    so.tag = "child";
    so.size = 1 << 20;
    auto s = SwapFile::create(so, e->get());
    if (!s.ok()) {
      ::_exit(3);
    }
    const std::string& p = (*s)->path();
    if (::write(fds[1], p.c_str(), p.size() + 1) != ssize_t(p.size() + 1)) {
      ::_exit(4);
    }
    if (wait_for_kill) {
      for (;;) {
        ::pause();
      }
    }
    ::_exit(0);  // no destructors: the file stays, its lock dies with us
  }
  ::close(fds[1]);
  char buf[4096] = {};
  size_t got = 0;
  ssize_t n;
  while (got < sizeof(buf) - 1 && (n = ::read(fds[0], buf + got, sizeof(buf) - 1 - got)) > 0) {
    got += size_t(n);
    if (std::memchr(buf, 0, got) != nullptr) {
      break;
    }
  }
  ::close(fds[0]);
  *path = buf;
  return pid;
}

// Runs in the parent without engine threads: fork() copies only the caller.
class StaleSwapFileTest : public ::testing::Test {
 protected:
  TempDir dir_;
};

TEST_F(StaleSwapFileTest, FileOfAnExitedProcessIsRemoved) {
  ASSERT_TRUE(dir_.ok());
  std::string stale;
  pid_t pid = spawn_owner(dir_.path(), false, &stale);
  ASSERT_GT(pid, 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  ASSERT_FALSE(stale.empty());
  ASSERT_TRUE(exists(stale)) << "the child should have left its file behind";

  auto engine = make_io_engine(test::options_for(Backend::kThreadPool));
  ASSERT_TRUE(engine.ok());
  SwapFileOptions o;
  o.dir = dir_.path();
  o.size = 1 << 20;
  ::testing::internal::CaptureStderr();
  auto swap = SwapFile::create(o, engine->get());
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  EXPECT_EQ((*swap)->stats().stale_removed, 1u);
  EXPECT_FALSE(exists(stale));
  EXPECT_NE(err.find("removed 1 stale swap file"), std::string::npos) << err;
  EXPECT_EQ(swap_files_in(dir_.path()).size(), 1u);
}

TEST_F(StaleSwapFileTest, FileOfAKilledProcessIsRemovedAndALiveOneKept) {
  ASSERT_TRUE(dir_.ok());
  std::string live, killed;
  pid_t live_pid = spawn_owner(dir_.path(), true, &live);
  pid_t kill_pid = spawn_owner(dir_.path(), true, &killed);
  ASSERT_GT(live_pid, 0);
  ASSERT_GT(kill_pid, 0);
  ASSERT_FALSE(live.empty());
  ASSERT_FALSE(killed.empty());
  ASSERT_EQ(::kill(kill_pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(kill_pid, &status, 0), kill_pid);
  ASSERT_TRUE(WIFSIGNALED(status));

  auto engine = make_io_engine(test::options_for(Backend::kThreadPool));
  ASSERT_TRUE(engine.ok());
  SwapFileOptions o;
  o.dir = dir_.path();
  o.size = 1 << 20;
  ::testing::internal::CaptureStderr();
  auto swap = SwapFile::create(o, engine->get());
  ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  EXPECT_EQ((*swap)->stats().stale_removed, 1u);
  EXPECT_FALSE(exists(killed)) << "stale file of the killed process kept";
  EXPECT_TRUE(exists(live)) << "file of a live process removed";

  ::kill(live_pid, SIGKILL);
  ::waitpid(live_pid, &status, 0);
}

INSTANTIATE_TEST_SUITE_P(Backends, SwapFileTest,
                         ::testing::Values(Backend::kUring, Backend::kThreadPool),
                         [](const ::testing::TestParamInfo<Backend>& i) {
                           return std::string(test::backend_label(i.param));
                         });

}  // namespace
}  // namespace strata::io
