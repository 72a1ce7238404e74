// FaultInjectionEngine over both backends: every injected fault surfaces as a
// clean error from wait() (or submit()), no batch with a fault reports
// success, the bytes of a failed op are not written, and the engine keeps
// working afterwards.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <strata/io/fault_injection.h>
#include <strata/io/swap_file.h>

#include "unit/test_io_common.h"

namespace strata::io {
namespace {

using test::AlignedBuf;
using test::Backend;
using test::fill_pattern;
using test::TempDir;

constexpr size_t kBlock = 64 << 10;
constexpr size_t kPieces = 5;

class FaultTest : public testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(dir_.ok());
    path_ = dir_.path() + "/fault.dat";
    fd_ = test::open_file(path_, true);
    if (fd_ < 0 && errno == EINVAL) {
      GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
    }
    ASSERT_GE(fd_, 0);
    // A buffered fd to set up and inspect the file behind the engine's back
    // (the kernel keeps it coherent with the O_DIRECT one).
    plain_ = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(plain_, 0);
  }
  void TearDown() override {
    if (fd_ >= 0) {
      ::close(fd_);
    }
    if (plain_ >= 0) {
      ::close(plain_);
    }
  }
  IoOptions options() const {
    IoOptions o = test::options_for(GetParam());
    o.block_size = kBlock;
    o.queue_depth = 4;
    return o;
  }
  // Fills the file with a known pattern through plain pwrite.
  void prefill(std::vector<char>* image) {
    image->assign(kPieces * kBlock, 0);
    fill_pattern(image->data(), image->size(), 999);
    ASSERT_EQ(::pwrite(plain_, image->data(), image->size(), 0), ssize_t(image->size()));
    ASSERT_EQ(::fsync(plain_), 0);
  }
  std::vector<char> file_image() {
    std::vector<char> out(kPieces * kBlock);
    EXPECT_EQ(::pread(plain_, out.data(), out.size(), 0), ssize_t(out.size()));
    return out;
  }

  TempDir dir_;
  std::string path_;
  int fd_ = -1;
  int plain_ = -1;
};

const char* kind_name(Fault::Kind k) {
  switch (k) {
    case Fault::Kind::kEio:
      return "EIO";
    case Fault::Kind::kEnospc:
      return "ENOSPC";
    case Fault::Kind::kShort:
      return "short";
  }
  return "?";
}

TEST_P(FaultTest, EveryBlockFaultSurfacesAsACleanError) {
  STRATA_MAKE_ENGINE_OR_SKIP(inner, GetParam(), options());
  AlignedBuf buf(kPieces * kBlock);
  for (Fault::Kind kind : {Fault::Kind::kEio, Fault::Kind::kEnospc, Fault::Kind::kShort}) {
    for (IoOp op : {IoOp::kWrite, IoOp::kRead}) {
      for (uint64_t at : {uint64_t(0), uint64_t(2), uint64_t(kPieces - 1)}) {
        SCOPED_TRACE(std::string(kind_name(kind)) + (op == IoOp::kRead ? " read" : " write") +
                     " at op " + std::to_string(at));
        std::vector<char> before;
        prefill(&before);
        FaultInjectionEngine fi(inner.get(), kBlock);
        auto h = fi.register_file(fd_, path_, true);
        ASSERT_TRUE(h.ok());
        fi.add_fault(Fault{at, kind});
        fill_pattern(buf.data(), buf.size(), 5 + at);
        std::vector<char> written(buf.data(), buf.data() + buf.size());
        IoRequest r{op, *h, buf.data(), buf.size(), 0};
        auto t = fi.submit(std::span<const IoRequest>(&r, 1));
        ASSERT_TRUE(t.ok()) << t.status().to_string();
        Status st = fi.wait(*t);
        ASSERT_FALSE(st.ok()) << "a batch with an injected fault reported success";
        EXPECT_EQ(st.code(),
                  kind == Fault::Kind::kEnospc ? StatusCode::kNoSpace : StatusCode::kIoError);
        EXPECT_NE(st.message().find("injected"), std::string::npos) << st.message();
        EXPECT_NE(st.message().find(path_), std::string::npos) << st.message();
        EXPECT_NE(st.message().find("offset " + std::to_string(at * kBlock)), std::string::npos)
            << st.message();
        if (kind == Fault::Kind::kShort) {
          EXPECT_NE(st.message().find("32768 of 65536 bytes"), std::string::npos) << st.message();
        }
        EXPECT_EQ(fi.faults_fired(), 1u);
        EXPECT_EQ(fi.block_ops_seen(), kPieces);

        if (op == IoOp::kWrite) {
          // The faulted op did not write (or wrote only its first half);
          // the others did.
          std::vector<char> now = file_image();
          for (size_t p = 0; p < kPieces; ++p) {
            const char* got = now.data() + p * kBlock;
            if (p != at) {
              EXPECT_EQ(0, std::memcmp(got, written.data() + p * kBlock, kBlock)) << "piece " << p;
            } else if (kind == Fault::Kind::kShort) {
              EXPECT_EQ(0, std::memcmp(got, written.data() + p * kBlock, kBlock / 2));
              EXPECT_EQ(0, std::memcmp(got + kBlock / 2, before.data() + p * kBlock + kBlock / 2,
                                       kBlock / 2));
            } else {
              EXPECT_EQ(0, std::memcmp(got, before.data() + p * kBlock, kBlock));
            }
          }
        }
        // The engine is not poisoned: the next batch (no fault left) works.
        Status again = op == IoOp::kWrite ? fi.write(*h, buf.data(), buf.size(), 0)
                                          : fi.read(*h, buf.data(), buf.size(), 0);
        EXPECT_TRUE(again.ok()) << again.to_string();
        ASSERT_TRUE(fi.unregister_file(*h).ok());
      }
    }
  }
}

TEST_P(FaultTest, MatchCountAndStickyFaults) {
  STRATA_MAKE_ENGINE_OR_SKIP(inner, GetParam(), options());
  std::vector<char> image;
  prefill(&image);
  FaultInjectionEngine fi(inner.get(), kBlock);
  auto h = fi.register_file(fd_, path_, true);
  ASSERT_TRUE(h.ok());
  AlignedBuf buf(kBlock);
  // The third block write fails; reads are not counted for it.
  fi.add_fault(Fault{2, Fault::Kind::kEio, Fault::Scope::kBlockOp, Fault::Match::kWrite});
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(fi.read(*h, buf.data(), kBlock, 0).ok());
  }
  EXPECT_TRUE(fi.write(*h, buf.data(), kBlock, 0).ok());
  EXPECT_TRUE(fi.write(*h, buf.data(), kBlock, 0).ok());
  EXPECT_FALSE(fi.write(*h, buf.data(), kBlock, 0).ok());
  EXPECT_TRUE(fi.write(*h, buf.data(), kBlock, 0).ok());
  EXPECT_EQ(fi.faults_fired(), 1u);

  // count = 0: a dead device from the 2nd read on.
  fi.clear_faults();
  fi.add_fault(Fault{5, Fault::Kind::kEio, Fault::Scope::kBlockOp, Fault::Match::kRead, 0});
  EXPECT_TRUE(fi.read(*h, buf.data(), kBlock, 0).ok());  // read index 4
  for (int i = 0; i < 5; ++i) {
    EXPECT_FALSE(fi.read(*h, buf.data(), kBlock, 0).ok());
  }
  EXPECT_TRUE(fi.write(*h, buf.data(), kBlock, 0).ok());
  fi.clear_faults();
  EXPECT_TRUE(fi.read(*h, buf.data(), kBlock, 0).ok());
  ASSERT_TRUE(fi.unregister_file(*h).ok());
}

TEST_P(FaultTest, SubmitScopeFaults) {
  STRATA_MAKE_ENGINE_OR_SKIP(inner, GetParam(), options());
  std::vector<char> image;
  prefill(&image);
  FaultInjectionEngine fi(inner.get(), kBlock);
  auto h = fi.register_file(fd_, path_, true);
  ASSERT_TRUE(h.ok());
  AlignedBuf buf(2 * kBlock);
  fi.add_fault(Fault{1, Fault::Kind::kEnospc, Fault::Scope::kSubmit});
  fi.add_fault(Fault{3, Fault::Kind::kShort, Fault::Scope::kSubmit});
  IoRequest r{IoOp::kWrite, *h, buf.data(), buf.size(), 0};
  auto t0 = fi.submit(std::span<const IoRequest>(&r, 1));
  ASSERT_TRUE(t0.ok());
  EXPECT_TRUE(fi.wait(*t0).ok());
  auto t1 = fi.submit(std::span<const IoRequest>(&r, 1));
  ASSERT_FALSE(t1.ok());
  EXPECT_EQ(t1.status().code(), StatusCode::kNoSpace);
  EXPECT_TRUE(t1.status().retryable());
  auto t2 = fi.submit(std::span<const IoRequest>(&r, 1));
  ASSERT_TRUE(t2.ok());
  EXPECT_TRUE(fi.wait(*t2).ok());
  auto t3 = fi.submit(std::span<const IoRequest>(&r, 1));
  ASSERT_TRUE(t3.ok());
  Status st = fi.wait(*t3);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("short write"), std::string::npos) << st.message();
  EXPECT_EQ(fi.submits_seen(), 4u);
  EXPECT_EQ(fi.faults_fired(), 2u);
  ASSERT_TRUE(fi.unregister_file(*h).ok());
}

TEST_P(FaultTest, SameCallsFailTheSameWay) {
  STRATA_MAKE_ENGINE_OR_SKIP(inner, GetParam(), options());
  std::vector<char> image;
  prefill(&image);
  AlignedBuf buf(kPieces * kBlock);
  std::vector<std::string> runs;
  for (int run = 0; run < 2; ++run) {
    FaultInjectionEngine fi(inner.get(), kBlock);
    auto h = fi.register_file(fd_, path_, true);
    ASSERT_TRUE(h.ok());
    fi.add_fault(Fault{7, Fault::Kind::kShort});
    std::string log;
    for (int i = 0; i < 4; ++i) {
      IoRequest r{i % 2 ? IoOp::kRead : IoOp::kWrite, *h, buf.data(), buf.size(), 0};
      auto t = fi.submit(std::span<const IoRequest>(&r, 1));
      ASSERT_TRUE(t.ok());
      log += fi.wait(*t).to_string() + "\n";
    }
    runs.push_back(log);
    ASSERT_TRUE(fi.unregister_file(*h).ok());
  }
  EXPECT_EQ(runs[0], runs[1]);
  EXPECT_NE(runs[0].find("offset 131072"), std::string::npos)
      << runs[0];  // op 7 = 2nd batch, piece 2
}

TEST_P(FaultTest, SwapFileReportsInjectedFaults) {
  STRATA_MAKE_ENGINE_OR_SKIP(inner, GetParam(), options());
  FaultInjectionEngine fi(inner.get(), kBlock);
  SwapFileOptions so;
  so.dir = dir_.path();
  so.size = 1 << 20;
  auto swap = SwapFile::create(so, &fi);
  ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  auto e = (*swap)->allocate(3 * kBlock);
  ASSERT_TRUE(e.ok());
  AlignedBuf src(3 * kBlock), dst(3 * kBlock);
  fill_pattern(src.data(), src.size(), 11);

  const uint64_t base = fi.block_ops_seen();
  fi.add_fault(Fault{base + 1, Fault::Kind::kEio});
  Status w = (*swap)->write(*e, src.data());
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.code(), StatusCode::kIoError);
  EXPECT_NE(w.message().find((*swap)->path()), std::string::npos) << w.message();
  // What is on disk now is not what was hashed: a read must not pass.
  fi.clear_faults();
  Status r = (*swap)->read(*e, dst.data());
  EXPECT_EQ(r.code(), StatusCode::kCorruption) << r.to_string();

  ASSERT_TRUE((*swap)->write(*e, src.data()).ok());
  fi.add_fault(Fault{fi.block_ops_seen() + 2, Fault::Kind::kShort});
  r = (*swap)->read(*e, dst.data());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), StatusCode::kIoError) << "a failed read is an I/O error, not a checksum one";
  fi.clear_faults();
  ASSERT_TRUE((*swap)->read(*e, dst.data()).ok());
  EXPECT_EQ(0, std::memcmp(src.data(), dst.data(), src.size()));
  swap->reset();
}

INSTANTIATE_TEST_SUITE_P(Backends, FaultTest,
                         testing::Values(Backend::kUring, Backend::kThreadPool),
                         [](const testing::TestParamInfo<Backend>& i) {
                           return std::string(test::backend_label(i.param));
                         });

}  // namespace
}  // namespace strata::io
