// IoEngine: both backends pass the same suite (parameterized); io_uring cases
// skip with the reason when io_uring is unavailable.
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <strata/io/io_engine.h>
#include <strata/io/probe.h>

#include "io/uring_engine.h"
#include "unit/test_io_common.h"

namespace strata::io {
namespace {

using test::AlignedBuf;
using test::Backend;
using test::fill_pattern;
using test::TempDir;

struct EngineParam {
  Backend backend;
  unsigned rings;  // intra_op_parallelism
  bool single_submit;
  bool overlap_events;
};

std::string param_name(const testing::TestParamInfo<EngineParam>& info) {
  const EngineParam& p = info.param;
  std::string s = test::backend_label(p.backend);
  s += "_x" + std::to_string(p.rings);
  if (p.single_submit) {
    s += "_single";
  }
  if (!p.overlap_events) {
    s += "_nooverlap";
  }
  return s;
}

class EngineTest : public testing::TestWithParam<EngineParam> {
 protected:
  IoOptions options(size_t block = 64 << 10, unsigned qd = 8) const {
    IoOptions o = test::options_for(GetParam().backend);
    o.block_size = block;
    o.queue_depth = qd;
    o.intra_op_parallelism = GetParam().rings;
    o.single_submit = GetParam().single_submit;
    o.overlap_events = GetParam().overlap_events;
    return o;
  }
  TempDir dir_;
};

// Reads the file with plain pread, independently of the engine.
std::vector<char> slurp(const std::string& path) {
  std::vector<char> out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return out;
  }
  char buf[65536];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) {
    out.insert(out.end(), buf, buf + n);
  }
  ::close(fd);
  return out;
}

TEST_P(EngineTest, RoundTripOddSizesAndOffsetsBuffered) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options());
  const std::string path = dir_.path() + "/odd.dat";
  int fd = test::open_file(path, false);
  ASSERT_GE(fd, 0);
  auto h = engine->register_file(fd, path, false);
  ASSERT_TRUE(h.ok()) << h.status().to_string();

  // Disjoint ranges at odd offsets, several larger than the 64 KiB block.
  const std::vector<size_t> lens = {1, 4095, 4097, 65536 * 3 + 17, (1 << 20) + 5, 200000, 7};
  std::vector<uint64_t> offs;
  uint64_t off = 3;
  for (size_t len : lens) {
    offs.push_back(off);
    off += len + 1001;
  }
  const uint64_t file_len = off;
  std::vector<std::vector<char>> src(lens.size()), dst(lens.size());
  std::vector<IoRequest> writes, reads;
  for (size_t i = 0; i < lens.size(); ++i) {
    src[i].resize(lens[i]);
    dst[i].assign(lens[i], 0);
    fill_pattern(src[i].data(), lens[i], 100 + i);
    writes.push_back(IoRequest{IoOp::kWrite, *h, src[i].data(), lens[i], offs[i]});
    reads.push_back(IoRequest{IoOp::kRead, *h, dst[i].data(), lens[i], offs[i]});
  }
  auto wt = engine->submit(writes);
  ASSERT_TRUE(wt.ok()) << wt.status().to_string();
  ASSERT_TRUE(engine->wait(*wt).ok());
  // Extend the file past the last range so that reading the gaps is legal.
  ASSERT_EQ(::ftruncate(fd, off_t(file_len)), 0);

  auto rt = engine->submit(reads);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Status st = engine->wait(*rt);
  ASSERT_TRUE(st.ok()) << st.to_string();
  for (size_t i = 0; i < lens.size(); ++i) {
    EXPECT_EQ(0, std::memcmp(src[i].data(), dst[i].data(), lens[i])) << "range " << i;
  }
  // The file holds exactly the ranges, zeros elsewhere.
  std::vector<char> want(file_len, 0);
  for (size_t i = 0; i < lens.size(); ++i) {
    std::memcpy(want.data() + offs[i], src[i].data(), lens[i]);
  }
  EXPECT_TRUE(slurp(path) == want);

  size_t pieces = 0;
  size_t bytes = 0;
  for (size_t len : lens) {
    pieces += (len + (64 << 10) - 1) / (64 << 10);
    bytes += len;
  }
  IoStats s = engine->stats();
  EXPECT_EQ(s.write_ops, pieces);
  EXPECT_EQ(s.read_ops, pieces);
  EXPECT_EQ(s.bytes_written, bytes);
  EXPECT_EQ(s.bytes_read, bytes);
  EXPECT_EQ(s.errors, 0u);
  ASSERT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(EngineTest, RoundTripAlignedDirect) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options(256 << 10, 4));
  const std::string path = dir_.path() + "/direct.dat";
  int fd = test::open_file(path, true);
  if (fd < 0 && errno == EINVAL) {
    GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
  }
  ASSERT_GE(fd, 0);
  auto h = engine->register_file(fd, path, true);
  ASSERT_TRUE(h.ok());
  const std::vector<size_t> lens = {4096, 65536, (1 << 20) + 4096, 3 << 20};
  size_t total = 0;
  for (size_t l : lens) {
    total += l;
  }
  AlignedBuf src(total), dst(total);
  fill_pattern(src.data(), total, 7);
  // Registered buffers take the READ_FIXED/WRITE_FIXED path on io_uring. A
  // low RLIMIT_MEMLOCK (non-root, 8 MiB) refuses them; I/O must work anyway.
  Status rs = engine->register_buffer(src.data(), total);
  Status rd = engine->register_buffer(dst.data(), total);
  for (const Status* r : {&rs, &rd}) {
    if (!r->ok()) {
      ASSERT_EQ(r->code(), StatusCode::kPermissionDenied) << r->to_string();
    }
  }
  const bool fixed = rs.ok() && rd.ok();
  std::vector<IoRequest> w, r;
  size_t pos = 0;
  uint64_t off = 8192;
  for (size_t l : lens) {
    w.push_back(IoRequest{IoOp::kWrite, *h, src.data() + pos, l, off});
    r.push_back(IoRequest{IoOp::kRead, *h, dst.data() + pos, l, off});
    pos += l;
    off += l + 4096;
  }
  auto wt = engine->submit(w);
  ASSERT_TRUE(wt.ok());
  Status st = engine->wait(*wt);
  ASSERT_TRUE(st.ok()) << st.to_string();
  auto rt = engine->submit(r);
  ASSERT_TRUE(rt.ok());
  st = engine->wait(*rt);
  ASSERT_TRUE(st.ok()) << st.to_string();
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), total));
  if (GetParam().backend == Backend::kUring && fixed) {
    const IoStats s = engine->stats();
    EXPECT_EQ(s.fixed_buffer_ops, s.read_ops + s.write_ops);
  }
  if (rs.ok()) {
    EXPECT_TRUE(engine->unregister_buffer(src.data()).ok());
  }
  if (rd.ok()) {
    EXPECT_TRUE(engine->unregister_buffer(dst.data()).ok());
  }
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(EngineTest, MisalignedDirectRequestIsRejectedWhole) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options());
  const std::string path = dir_.path() + "/mis.dat";
  int fd = test::open_file(path, true);
  if (fd < 0 && errno == EINVAL) {
    GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
  }
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 1 << 20), 0);
  auto h = engine->register_file(fd, path, true);
  ASSERT_TRUE(h.ok());
  AlignedBuf buf(3 * 65536);
  fill_pattern(buf.data(), buf.size(), 1);
  const IoRequest good{IoOp::kWrite, *h, buf.data(), 65536, 0};
  const std::vector<IoRequest> bad = {
      {IoOp::kWrite, *h, buf.data() + 1, 65536, 65536},  // buffer
      {IoOp::kWrite, *h, buf.data(), 65536, 512},        // offset
      {IoOp::kRead, *h, buf.data(), 4097, 0},            // length
  };
  for (const IoRequest& b : bad) {
    std::vector<IoRequest> batch = {good, b};
    auto t = engine->submit(batch);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().message().find("misaligned O_DIRECT"), std::string::npos)
        << t.status().message();
    EXPECT_NE(t.status().message().find(path), std::string::npos);
  }
  // Nothing of the rejected batches was submitted, not even the valid part.
  const IoStats s = engine->stats();
  EXPECT_EQ(s.write_ops + s.read_ops + s.errors, 0u);
  std::vector<char> content = slurp(path);
  ASSERT_EQ(content.size(), size_t(1) << 20);
  EXPECT_TRUE(std::all_of(content.begin(), content.end(), [](char c) { return c == 0; }));
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(EngineTest, ReadPastEndIsACleanError) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options());
  const std::string path = dir_.path() + "/short.dat";
  int fd = test::open_file(path, false);
  ASSERT_GE(fd, 0);
  std::vector<char> data(6000, 'x');
  ASSERT_EQ(::pwrite(fd, data.data(), data.size(), 0), ssize_t(data.size()));
  auto h = engine->register_file(fd, path, false);
  ASSERT_TRUE(h.ok());
  std::vector<char> buf(8192);
  // Wholly past the end: the first read returns 0.
  Status st = engine->read(*h, buf.data(), 4096, 8192);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), StatusCode::kIoError);
  EXPECT_NE(st.message().find("past end of file"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("read " + path + " offset 8192 len 4096"), std::string::npos)
      << st.message();
  // Straddling the end: 6000 bytes come back, the continuation reads 0.
  st = engine->read(*h, buf.data(), 8192, 0);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("after 6000 bytes"), std::string::npos) << st.message();
  EXPECT_GE(engine->stats().errors, 2u);
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(EngineTest, DirectReadPastEndIsACleanError) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options());
  const std::string path = dir_.path() + "/dshort.dat";
  int fd = test::open_file(path, true);
  if (fd < 0 && errno == EINVAL) {
    GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
  }
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 8192), 0);
  auto h = engine->register_file(fd, path, true);
  ASSERT_TRUE(h.ok());
  AlignedBuf buf(16384);
  Status st = engine->read(*h, buf.data(), 4096, 16384);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("past end of file"), std::string::npos) << st.message();
  st = engine->read(*h, buf.data(), 16384, 0);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("after 8192 bytes"), std::string::npos) << st.message();
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(EngineTest, BadFileDescriptorsAreCleanErrors) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options());
  auto bad = engine->register_file(-1, "/nowhere", false);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("/nowhere"), std::string::npos);

  const std::string path = dir_.path() + "/closed.dat";
  int closed = test::open_file(path, false);
  ASSERT_GE(closed, 0);
  ::close(closed);
  auto stale = engine->register_file(closed, path, false);
  ASSERT_FALSE(stale.ok());
  EXPECT_EQ(stale.status().sys_errno(), EBADF);

  // A write through a read-only fd fails in the kernel: the error comes back
  // from wait() naming op, path, offset and length.
  int ro = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(ro, 0);
  auto h = engine->register_file(ro, path, false);
  ASSERT_TRUE(h.ok());
  std::vector<char> buf(4096, 'a');
  Status st = engine->write(*h, buf.data(), buf.size(), 4096);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.sys_errno(), EBADF);
  EXPECT_NE(st.message().find("write " + path + " offset 4096 len 4096"), std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("Bad file descriptor"), std::string::npos) << st.message();
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(ro);
}

TEST_P(EngineTest, UnknownTicketsAndHandles) {
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options());
  EXPECT_EQ(engine->wait(12345).code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(engine->poll(12345).ok());
  char c = 0;
  IoRequest r{IoOp::kRead, 77, &c, 1, 0};
  auto t = engine->submit(std::span<const IoRequest>(&r, 1));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->unregister_file(77).code(), StatusCode::kInvalidArgument);
  // An empty batch completes at once; its ticket can be waited once.
  auto e = engine->submit({});
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(engine->wait(*e).ok());
  EXPECT_EQ(engine->wait(*e).code(), StatusCode::kInvalidArgument);
}

TEST_P(EngineTest, ManyTicketsPollDrainAndWait) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options(4096, 4));
  const std::string path = dir_.path() + "/many.dat";
  int fd = test::open_file(path, false);
  ASSERT_GE(fd, 0);
  auto h = engine->register_file(fd, path, false);
  ASSERT_TRUE(h.ok());
  constexpr int kTickets = 64;
  constexpr size_t kLen = 3 * 4096 + 100;  // 4 pieces each
  std::vector<std::vector<char>> bufs(kTickets, std::vector<char>(kLen));
  std::vector<Ticket> tickets;
  for (int i = 0; i < kTickets; ++i) {
    fill_pattern(bufs[size_t(i)].data(), kLen, uint64_t(i));
    IoRequest r{IoOp::kWrite, *h, bufs[size_t(i)].data(), kLen, uint64_t(i) * kLen};
    auto t = engine->submit(std::span<const IoRequest>(&r, 1));
    ASSERT_TRUE(t.ok());
    tickets.push_back(*t);
  }
  engine->drain();
  for (Ticket t : tickets) {
    auto p = engine->poll(t);
    ASSERT_TRUE(p.ok());
    EXPECT_TRUE(*p);  // drained: every batch is complete, results kept
  }
  for (Ticket t : tickets) {
    EXPECT_TRUE(engine->wait(t).ok());
  }
  std::vector<char> content = slurp(path);
  ASSERT_EQ(content.size(), kTickets * kLen);
  for (int i = 0; i < kTickets; ++i) {
    EXPECT_EQ(0, std::memcmp(content.data() + size_t(i) * kLen, bufs[size_t(i)].data(), kLen));
  }
  EXPECT_EQ(engine->stats().write_ops, uint64_t(kTickets) * 4);
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(EngineTest, LatencyRecordedPerBlockRequest) {
  ASSERT_TRUE(dir_.ok());
  IoOptions o = options(4096, 4);
  o.record_latency = true;
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, o);
  const std::string path = dir_.path() + "/lat.dat";
  int fd = test::open_file(path, false);
  ASSERT_GE(fd, 0);
  auto h = engine->register_file(fd, path, false);
  ASSERT_TRUE(h.ok());
  std::vector<char> buf(5 * 4096, 'z');
  ASSERT_TRUE(engine->write(*h, buf.data(), buf.size(), 0).ok());
  std::vector<uint64_t> lat = engine->take_latencies_ns();
  EXPECT_EQ(lat.size(), 5u);
  EXPECT_TRUE(engine->take_latencies_ns().empty());
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

// wait_timed reports when the batch completed, not when it was waited for:
// the completion is seen by poll() before the clock reading taken after it.
TEST_P(EngineTest, WaitTimedReportsTheCompletionNotTheWait) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam().backend, options(4096, 4));
  const std::string path = dir_.path() + "/timed.dat";
  int fd = test::open_file(path, false);
  ASSERT_GE(fd, 0);
  auto h = engine->register_file(fd, path, false);
  ASSERT_TRUE(h.ok());
  auto steady_ns = [] {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  std::vector<char> buf(3 * 4096, 'q');
  const int64_t before = steady_ns();
  IoRequest r{IoOp::kWrite, *h, buf.data(), buf.size(), 0};
  auto t = engine->submit(std::span<const IoRequest>(&r, 1));
  ASSERT_TRUE(t.ok());
  for (;;) {
    auto p = engine->poll(*t);
    ASSERT_TRUE(p.ok());
    if (*p) {
      break;
    }
    std::this_thread::yield();
  }
  const int64_t seen = steady_ns();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  int64_t done = 0;
  ASSERT_TRUE(engine->wait_timed(*t, &done).ok());
  EXPECT_GE(done, before);
  EXPECT_LE(done, seen);  // before the 20 ms sleep, though waited for after it
  EXPECT_FALSE(engine->wait_timed(*t, &done).ok());  // forgotten, as wait()
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

INSTANTIATE_TEST_SUITE_P(Backends, EngineTest,
                         testing::Values(EngineParam{Backend::kUring, 1, false, true},
                                         EngineParam{Backend::kUring, 3, false, true},
                                         EngineParam{Backend::kUring, 1, true, false},
                                         EngineParam{Backend::kThreadPool, 1, false, true},
                                         EngineParam{Backend::kThreadPool, 3, false, true}),
                         param_name);

// --- io_uring specifics ------------------------------------------------------

TEST(UringEngineTest, RegisteredRegionsAreSplitIntoPieces) {
  if (!test::uring_unavailable_reason().empty()) {
    GTEST_SKIP() << "io_uring unavailable: " << test::uring_unavailable_reason();
  }
  IoOptions o = test::options_for(Backend::kUring);
  o.block_size = 64 << 10;
  auto made = detail::UringEngine::create(o, "");
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  auto& engine = *made;
  // 64 KiB pieces stand in for the 1 GiB limit, which would pin a GiB here.
  engine->set_max_buffer_piece_for_testing(64 << 10);
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  const std::string path = dir.path() + "/pieces.dat";
  int fd = test::open_file(path, true);
  if (fd < 0 && errno == EINVAL) {
    GTEST_SKIP() << dir.path() << " refuses O_DIRECT";
  }
  ASSERT_GE(fd, 0);
  auto h = engine->register_file(fd, path, true);
  ASSERT_TRUE(h.ok());
  AlignedBuf src(256 << 10), dst(256 << 10);
  fill_pattern(src.data(), src.size(), 3);
  ASSERT_TRUE(engine->register_buffer(src.data(), src.size()).ok());
  ASSERT_TRUE(engine->register_buffer(dst.data(), dst.size()).ok());
  // Overlapping registrations are refused.
  EXPECT_EQ(engine->register_buffer(src.data() + 4096, 4096).code(), StatusCode::kInvalidArgument);
  // Pieces aligned to the 64 KiB registrations: all fixed.
  ASSERT_TRUE(engine->write(*h, src.data(), src.size(), 0).ok());
  EXPECT_EQ(engine->stats().fixed_buffer_ops, 4u);
  // Requests straddling two registered pieces fall back to plain reads.
  ASSERT_TRUE(engine->read(*h, dst.data() + 32768, 65536, 32768).ok());
  EXPECT_EQ(engine->stats().fixed_buffer_ops, 4u);
  ASSERT_TRUE(engine->read(*h, dst.data(), dst.size(), 0).ok());
  EXPECT_EQ(engine->stats().fixed_buffer_ops, 8u);
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), src.size()));
  ASSERT_TRUE(engine->unregister_buffer(dst.data()).ok());
  EXPECT_EQ(engine->unregister_buffer(dst.data()).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(engine->read(*h, dst.data(), dst.size(), 0).ok());
  EXPECT_EQ(engine->stats().fixed_buffer_ops, 8u);  // unregistered: plain reads
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), src.size()));
  EXPECT_TRUE(engine->unregister_buffer(src.data()).ok());
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

// The memlock check runs in a child that drops CAP_IPC_LOCK and lowers
// RLIMIT_MEMLOCK, so the test process keeps its own limits.
TEST(UringEngineTest, RegisterBufferChecksMemlockLimit) {
  if (!test::uring_unavailable_reason().empty()) {
    GTEST_SKIP() << "io_uring unavailable: " << test::uring_unavailable_reason();
  }
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2] = {};
    if (::syscall(SYS_capget, &hdr, data) != 0) {
      ::_exit(3);
    }
    data[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
    if (::syscall(SYS_capset, &hdr, data) != 0) {
      ::_exit(3);
    }
    rlimit rl{1 << 20, 1 << 20};
    if (::setrlimit(RLIMIT_MEMLOCK, &rl) != 0) {
      ::_exit(3);
    }
    auto e = make_io_engine(test::options_for(Backend::kUring));
    if (!e.ok()) {
      ::_exit(3);
    }
    AlignedBuf big(4 << 20);
    Status st = (*e)->register_buffer(big.data(), big.size());
    const bool named = st.message().find("RLIMIT_MEMLOCK") != std::string::npos;
    ::_exit(st.code() == StatusCode::kPermissionDenied && named ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 3) {
    GTEST_SKIP() << "cannot drop CAP_IPC_LOCK or lower RLIMIT_MEMLOCK here";
  }
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// --- factory ------------------------------------------------------------------

TEST(MakeIoEngineTest, AutoFallsBackWhenUringIsRefused) {
  IoOptions o;
  o.backend = IoOptions::Backend::kAuto;
  UringProbe refused{true, false, "io_uring_queue_init: Operation not permitted (test)"};
  auto e = make_io_engine_with_probe(o, refused);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  EXPECT_STREQ((*e)->backend_name(), "threadpool");
  EXPECT_NE((*e)->backend_note().find("Operation not permitted (test)"), std::string::npos)
      << (*e)->backend_note();
  EXPECT_NE((*e)->backend_note().find("fell back"), std::string::npos);

  o.backend = IoOptions::Backend::kUring;
  auto u = make_io_engine_with_probe(o, refused);
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.status().code(), StatusCode::kUnavailable);
}

// A real refusal: a child installs a seccomp filter that fails io_uring_setup
// with EPERM, as container runtimes' default profiles do.
TEST(MakeIoEngineTest, AutoFallsBackUnderSeccomp) {
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{static_cast<unsigned short>(sizeof(filter) / sizeof(filter[0])), filter};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
      ::_exit(3);
    }
    const UringProbe probe = probe_uring();
    if (probe.available || probe.reason.find("Operation not permitted") == std::string::npos) {
      ::_exit(1);
    }
    auto e = make_io_engine(IoOptions{});
    if (!e.ok() || std::string((*e)->backend_name()) != "threadpool" ||
        (*e)->backend_note().find("Operation not permitted") == std::string::npos) {
      ::_exit(2);
    }
    // The fallback does real I/O.
    char buf[4096] = {1};
    int fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    auto h = (*e)->register_file(fd, "/dev/null", false);
    if (!h.ok() || !(*e)->write(*h, buf, sizeof(buf), 0).ok()) {
      ::_exit(4);
    }
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 3) {
    GTEST_SKIP() << "cannot install a seccomp filter here";
  }
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: probe, 2: factory, 4: fallback I/O";
}

TEST(MakeIoEngineTest, AutoPicksUringWhenAvailable) {
  if (!test::uring_unavailable_reason().empty()) {
    GTEST_SKIP() << "io_uring unavailable: " << test::uring_unavailable_reason();
  }
  auto e = make_io_engine(IoOptions{});
  ASSERT_TRUE(e.ok());
  EXPECT_STREQ((*e)->backend_name(), "io_uring");
  EXPECT_NE((*e)->backend_note().find("ring"), std::string::npos);
}

TEST(MakeIoEngineTest, OptionsAreValidated) {
  IoOptions o;
  o.block_size = 1000;
  EXPECT_EQ(make_io_engine(o).status().code(), StatusCode::kInvalidArgument);
  o = IoOptions{};
  o.block_size = kMaxBlockSize * 2;
  EXPECT_EQ(make_io_engine(o).status().code(), StatusCode::kInvalidArgument);
  o = IoOptions{};
  o.queue_depth = 0;
  EXPECT_NE(make_io_engine(o).status().message().find("aio.queue_depth"), std::string::npos);
  o = IoOptions{};
  o.intra_op_parallelism = 0;
  EXPECT_EQ(make_io_engine(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(ProbeTest, DirectIoOnDiskAndMissingDir) {
  auto missing = probe_direct_io("/nonexistent/strata");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  auto r = probe_direct_io(dir.path());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  if (test::is_tmpfs(dir.path())) {
    GTEST_SKIP() << "/tmp is a tmpfs here";
  }
  EXPECT_TRUE(*r) << "ext4/xfs under /tmp should accept O_DIRECT";
}

// A ring torn down mid-batch, through UringEngine's enter seam. Reads of an
// empty pipe stand for requests the kernel holds: they stay in flight until
// data arrives, and data written later lands in whatever buffer a read still
// in the kernel owns.
class BrokenRingTest : public testing::Test {
 protected:
  void SetUp() override {
    if (!test::uring_unavailable_reason().empty()) {
      GTEST_SKIP() << "io_uring unavailable: " << test::uring_unavailable_reason();
    }
    IoOptions o = test::options_for(Backend::kUring);
    o.block_size = 4096;
    o.queue_depth = 8;
    auto made = detail::UringEngine::create(o, "");
    ASSERT_TRUE(made.ok()) << made.status().to_string();
    engine_ = std::move(made).value();
    ASSERT_EQ(::pipe(fds_), 0);
    auto h = engine_->register_file(fds_[0], "pipe", false);
    ASSERT_TRUE(h.ok()) << h.status().to_string();
    handle_ = *h;
  }
  void TearDown() override {
    engine_.reset();
    for (int fd : fds_) {
      if (fd >= 0) {
        ::close(fd);
      }
    }
  }
  // Submits reads of `bytes` (4 KiB pieces) into buf_ and lets them reach
  // the kernel, where they wait for data.
  Ticket submit_reads(size_t bytes) {
    buf_.assign(bytes, 0);
    IoRequest req{IoOp::kRead, handle_, buf_.data(), bytes, 0};
    auto t = engine_->submit({&req, 1});
    EXPECT_TRUE(t.ok()) << t.status().to_string();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto done = engine_->poll(*t);
    EXPECT_TRUE(done.ok() && !*done) << "reads of an empty pipe completed";
    return *t;
  }
  void write_pipe(char c, size_t bytes) {
    std::string data(bytes, c);
    ASSERT_EQ(::write(fds_[1], data.data(), data.size()), ssize_t(data.size()));
  }

  std::unique_ptr<detail::UringEngine> engine_;
  int fds_[2] = {-1, -1};
  int handle_ = -1;
  std::vector<char> buf_;
};

// Regression (issue 18, item 1): on a broken ring, fail_all completed the
// requests the kernel still held, so the caller got back buffers the kernel
// was still going to write into (here: data written to the pipe after wait()
// returned landed in the "failed" buffer). The worker now cancels what is in
// flight and reaps every CQE before failing the requests.
TEST_F(BrokenRingTest, InFlightRequestsAreCancelledBeforeTheyFail) {
  const size_t bytes = 4 * 4096;
  Ticket t = submit_reads(bytes);
  engine_->fail_enter_for_testing(EIO, 1);  // the ring breaks mid-batch
  Status st = engine_->wait(t);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("io_uring_enter"), std::string::npos) << st.to_string();
  EXPECT_NE(st.message().find("read pipe"), std::string::npos) << st.to_string();
  // The buffer is the caller's again: nothing the kernel held may fill it.
  write_pipe('x', bytes);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(std::count(buf_.begin(), buf_.end(), 0), ptrdiff_t(bytes))
      << "a read still in the kernel wrote into a buffer already handed back";
  // ... and no cancelled read took the data.
  ASSERT_EQ(::fcntl(fds_[0], F_SETFL, O_NONBLOCK), 0);
  std::vector<char> back(bytes + 1);
  EXPECT_EQ(::read(fds_[0], back.data(), back.size()), ssize_t(bytes));
  // The ring stays broken: new work fails at once with the same error.
  IoRequest req{IoOp::kRead, handle_, buf_.data(), 4096, 0};
  auto t2 = engine_->submit({&req, 1});
  ASSERT_TRUE(t2.ok());
  EXPECT_NE(engine_->wait(*t2).message().find("io_uring_enter"), std::string::npos);
  EXPECT_EQ(engine_->stats().errors, 5u);
}

// Regression (issue 18, item 1): a ring that cannot be entered any more can
// cancel nothing; its requests were failed at once all the same. Now they
// fail only when the kernel has completed them (read from the CQ ring, no
// io_uring_enter needed), and SQEs it never consumed fail at once.
TEST_F(BrokenRingTest, RingThatCannotBeEnteredWaitsForTheKernel) {
  const size_t bytes = 2 * 4096;
  Ticket t = submit_reads(bytes);
  engine_->fail_enter_for_testing(EBADF, -1);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto done = engine_->poll(t);
  ASSERT_TRUE(done.ok());
  EXPECT_FALSE(*done) << "failed while the kernel still held its buffers";
  write_pipe('y', bytes);  // the kernel completes the reads
  Status st = engine_->wait(t);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("Bad file descriptor"), std::string::npos) << st.to_string();
  EXPECT_EQ(std::count(buf_.begin(), buf_.end(), 'y'), ptrdiff_t(bytes))
      << "the reads completed into the buffer before it was handed back";
}

}  // namespace
}  // namespace strata::io
