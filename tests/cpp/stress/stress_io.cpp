// Stress: concurrent submitters with deterministic per-thread seeds, over both
// backends (several rings / workers), checked against an in-memory shadow of
// the file; a SwapFile shared by threads that allocate, write, read, verify
// and free; and random injected faults that must never show up as success
// with wrong data.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <strata/io/fault_injection.h>
#include <strata/io/io_engine.h>
#include <strata/io/swap_file.h>

#include "unit/test_io_common.h"

namespace strata::io {
namespace {

using test::AlignedBuf;
using test::Backend;
using test::fill_pattern;
using test::splitmix64;
using test::TempDir;

constexpr int kThreads = 4;
constexpr size_t kSlot = 256 << 10;
constexpr int kSlotsPerThread = 8;
constexpr uint64_t kSeed = 0x5eed5eedULL;

class StressIo : public ::testing::TestWithParam<Backend> {
 protected:
  IoOptions options() const {
    IoOptions o = test::options_for(GetParam());
    o.block_size = 64 << 10;
    o.queue_depth = 8;
    o.intra_op_parallelism = 2;
    return o;
  }
  TempDir dir_;
};

struct Outstanding {
  Ticket ticket = 0;
  std::vector<int> slots;
  std::vector<IoOp> ops;
  std::vector<size_t> lens;
};

// One submitter: random batches over its own slots, up to three tickets in
// flight on disjoint slots, every read compared with the shadow. With
// `faulty`, a failed batch leaves its written slots unknown until rewritten.
void submitter(IoEngine* engine, int handle, bool direct, int tid, int iterations, bool faulty,
               std::atomic<int>* failures, std::atomic<uint64_t>* errors_seen) {
  uint64_t seed = kSeed + uint64_t(tid) * 7919;
  const uint64_t base = uint64_t(tid) * kSlotsPerThread * kSlot;
  AlignedBuf mem(kSlotsPerThread * kSlot);
  std::vector<std::vector<char>> shadow(kSlotsPerThread, std::vector<char>(kSlot, 0));
  std::vector<bool> known(kSlotsPerThread, true);
  std::vector<bool> busy(kSlotsPerThread, false);
  std::deque<Outstanding> inflight;
  int issued = 0;

  auto complete = [&](Outstanding& o) {
    Status st = engine->wait(o.ticket);
    if (!st.ok()) {
      errors_seen->fetch_add(1);
      if (!faulty) {
        ADD_FAILURE() << "thread " << tid << ": " << st.to_string();
        failures->fetch_add(1);
      }
    }
    for (size_t i = 0; i < o.slots.size(); ++i) {
      const int s = o.slots[i];
      char* p = mem.data() + size_t(s) * kSlot;
      if (o.ops[i] == IoOp::kWrite) {
        if (st.ok()) {
          std::memcpy(shadow[size_t(s)].data(), p, o.lens[i]);
          // Only the written prefix changed; the shadow keeps the rest.
        } else {
          known[size_t(s)] = false;
        }
      } else if (st.ok() && known[size_t(s)]) {
        if (std::memcmp(p, shadow[size_t(s)].data(), o.lens[i]) != 0) {
          ADD_FAILURE() << "thread " << tid << " slot " << s << ": read returned wrong data";
          failures->fetch_add(1);
        }
      }
      busy[size_t(s)] = false;
    }
  };

  while (issued < iterations || !inflight.empty()) {
    if (issued < iterations && inflight.size() < 3) {
      Outstanding o;
      std::vector<IoRequest> batch;
      const int want = 1 + int(splitmix64(seed) % 3);
      for (int k = 0; k < want; ++k) {
        const int s = int(splitmix64(seed) % kSlotsPerThread);
        if (busy[size_t(s)]) {
          continue;
        }
        busy[size_t(s)] = true;
        size_t len = 1 + splitmix64(seed) % kSlot;
        if (direct) {
          len = (len + 4095) / 4096 * 4096;
        }
        len = std::min(len, kSlot);
        // Reads of a slot whose content is unknown would prove nothing:
        // write it first.
        const IoOp op =
            (!known[size_t(s)] || splitmix64(seed) % 2 == 0) ? IoOp::kWrite : IoOp::kRead;
        char* p = mem.data() + size_t(s) * kSlot;
        if (op == IoOp::kWrite) {
          if (!known[size_t(s)]) {
            len = kSlot;  // a full rewrite makes the slot known again
          }
          fill_pattern(p, len, splitmix64(seed));
        }
        batch.push_back(IoRequest{op, handle, p, len, base + uint64_t(s) * kSlot});
        o.slots.push_back(s);
        o.ops.push_back(op);
        o.lens.push_back(len);
      }
      if (batch.empty()) {
        complete(inflight.front());
        inflight.pop_front();
        continue;
      }
      auto t = engine->submit(batch);
      if (!t.ok()) {
        errors_seen->fetch_add(1);
        if (!faulty) {
          ADD_FAILURE() << t.status().to_string();
          failures->fetch_add(1);
        }
        for (size_t i = 0; i < o.slots.size(); ++i) {
          busy[size_t(o.slots[i])] = false;
          if (o.ops[i] == IoOp::kWrite) {
            // Nothing was submitted: the file still matches the shadow, but
            // the buffer was overwritten; keep the shadow as is.
          }
        }
        ++issued;
        continue;
      }
      o.ticket = *t;
      // A full rewrite of an unknown slot makes it known once it succeeds.
      for (size_t i = 0; i < o.slots.size(); ++i) {
        if (o.ops[i] == IoOp::kWrite && o.lens[i] == kSlot) {
          known[size_t(o.slots[i])] = true;
        }
      }
      inflight.push_back(std::move(o));
      ++issued;
      continue;
    }
    complete(inflight.front());
    inflight.pop_front();
  }
}

void run_submitters(IoEngine* engine, int handle, bool direct, int iterations, bool faulty,
                    std::atomic<uint64_t>* errors_seen) {
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(submitter, engine, handle, direct, t, iterations, faulty, &failures,
                         errors_seen);
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(failures.load(), 0);
}

TEST_P(StressIo, ConcurrentSubmittersDirect) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam(), options());
  const std::string path = dir_.path() + "/stress.dat";
  int fd = test::open_file(path, true);
  if (fd < 0 && errno == EINVAL) {
    GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
  }
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, off_t(kThreads * kSlotsPerThread * kSlot)), 0);
  auto h = engine->register_file(fd, path, true);
  ASSERT_TRUE(h.ok());
  std::atomic<uint64_t> errors{0};
  run_submitters(engine.get(), *h, true, 1500, false, &errors);
  EXPECT_EQ(errors.load(), 0u);
  EXPECT_EQ(engine->stats().errors, 0u);
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(StressIo, ConcurrentSubmittersBufferedOddSizes) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam(), options());
  const std::string path = dir_.path() + "/stress-buffered.dat";
  int fd = test::open_file(path, false);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, off_t(kThreads * kSlotsPerThread * kSlot)), 0);
  auto h = engine->register_file(fd, path, false);
  ASSERT_TRUE(h.ok());
  std::atomic<uint64_t> errors{0};
  run_submitters(engine.get(), *h, false, 1500, false, &errors);
  EXPECT_EQ(errors.load(), 0u);
  EXPECT_TRUE(engine->unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(StressIo, RandomFaultsNeverPassAsSuccess) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(inner, GetParam(), options());
  FaultInjectionEngine engine(inner.get(), 64 << 10);
  uint64_t seed = kSeed;
  for (int i = 0; i < 60; ++i) {
    Fault f;
    f.at_op = splitmix64(seed) % 20000;
    f.kind = Fault::Kind(splitmix64(seed) % 3);
    engine.add_fault(f);
  }
  engine.add_fault(Fault{5, Fault::Kind::kEio, Fault::Scope::kSubmit, Fault::Match::kAny, 1});
  const std::string path = dir_.path() + "/stress-fault.dat";
  int fd = test::open_file(path, true);
  if (fd < 0 && errno == EINVAL) {
    GTEST_SKIP() << dir_.path() << " refuses O_DIRECT";
  }
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, off_t(kThreads * kSlotsPerThread * kSlot)), 0);
  auto h = engine.register_file(fd, path, true);
  ASSERT_TRUE(h.ok());
  std::atomic<uint64_t> errors{0};
  run_submitters(&engine, *h, true, 1500, true, &errors);
  EXPECT_GT(engine.faults_fired(), 0u);
  EXPECT_GT(errors.load(), 0u) << "injected faults were not reported";
  EXPECT_TRUE(engine.unregister_file(*h).ok());
  ::close(fd);
}

TEST_P(StressIo, SharedSwapFile) {
  ASSERT_TRUE(dir_.ok());
  STRATA_MAKE_ENGINE_OR_SKIP(engine, GetParam(), options());
  SwapFileOptions so;
  so.dir = dir_.path();
  so.tag = "stress";
  so.size = 64 << 20;
  auto swap = SwapFile::create(so, engine.get());
  ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  SwapFile* s = swap->get();
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([s, t, &failures] {
      uint64_t seed = kSeed ^ (uint64_t(t) << 32);
      struct Live {
        Extent e;
        uint64_t pattern;
      };
      std::vector<Live> live;
      AlignedBuf buf(2 << 20), back(2 << 20);
      for (int i = 0; i < 400; ++i) {
        const uint64_t r = splitmix64(seed) % 4;
        if (r < 2 || live.empty()) {
          auto e = s->allocate(1 + splitmix64(seed) % (2 << 20));
          if (!e.ok()) {
            if (e.status().code() != StatusCode::kNoSpace) {
              failures.fetch_add(1);
            }
            continue;
          }
          const uint64_t pat = splitmix64(seed);
          fill_pattern(buf.data(), e->length, pat);
          if (!s->write(*e, buf.data()).ok()) {
            failures.fetch_add(1);
          }
          live.push_back(Live{*e, pat});
        } else if (r == 2) {
          const Live& l = live[splitmix64(seed) % live.size()];
          Status st = s->read(l.e, back.data());
          fill_pattern(buf.data(), l.e.length, l.pattern);
          if (!st.ok() || std::memcmp(buf.data(), back.data(), l.e.length) != 0) {
            ADD_FAILURE() << "extent " << l.e.id << ": " << st.to_string();
            failures.fetch_add(1);
          }
        } else {
          const size_t k = splitmix64(seed) % live.size();
          s->free(live[k].e);
          live.erase(live.begin() + long(k));
        }
      }
      for (const Live& l : live) {
        s->free(l.e);
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(failures.load(), 0);
  const SwapFileStats st = s->stats();
  EXPECT_EQ(st.live_extents, 0u);
  EXPECT_EQ(st.fragments, 1u);
  EXPECT_EQ(st.free_bytes, st.capacity);
  EXPECT_EQ(st.checksum_mismatches, 0u);
}

INSTANTIATE_TEST_SUITE_P(Backends, StressIo,
                         ::testing::Values(Backend::kUring, Backend::kThreadPool),
                         [](const ::testing::TestParamInfo<Backend>& i) {
                           return std::string(test::backend_label(i.param));
                         });

}  // namespace
}  // namespace strata::io
