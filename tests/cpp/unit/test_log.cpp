// The core's one log sink (strata/log.h).
//
// Regression (issue 18, item 6): the core wrote to stderr itself in eight
// places, so embedders (the Python binding, which routes to logging) could
// neither capture nor silence it. Here a real core message (a stale swap file
// removed) reaches an installed sink and nothing reaches stderr; the default
// sink writes the old "strata: ..." lines.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <strata/io/io_engine.h>
#include <strata/io/swap_file.h>
#include <strata/log.h>

namespace fs = std::filesystem;
using namespace strata;

namespace {

struct Captured {
  std::mutex mu;
  std::vector<std::pair<LogLevel, std::string>> messages;
};

void capture(LogLevel level, std::string_view message, void* arg) {
  auto* c = static_cast<Captured*>(arg);
  std::lock_guard<std::mutex> lock(c->mu);
  c->messages.emplace_back(level, std::string(message));
}

// Restores the default sink when a test ends, whatever it asserted.
struct SinkGuard {
  explicit SinkGuard(Captured* c) { set_log_sink(capture, c); }
  ~SinkGuard() { set_log_sink(nullptr, nullptr); }
};

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/strata-log-test-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
};

}  // namespace

TEST(Log, CoreMessagesReachTheSinkAndNotStderr) {
  TempDir dir;
  // A swap file no live process holds: SwapFile::create removes it and says so.
  std::ofstream(dir.path / "strata-rank0-opt-dead.swap") << "left behind";
  io::IoOptions io;
  io.backend = io::IoOptions::Backend::kThreadPool;
  auto engine = io::make_io_engine(io);
  ASSERT_TRUE(engine.ok()) << engine.status().to_string();
  io::SwapFileOptions o;
  o.dir = dir.path.string();
  o.size = 1 << 20;

  Captured got;
  std::string err;
  {
    SinkGuard guard(&got);
    ::testing::internal::CaptureStderr();
    auto swap = io::SwapFile::create(o, engine.value().get());
    // From another thread too: the sink is called wherever the core runs.
    std::thread([] { log_message(LogLevel::kWarning, "from a worker"); }).join();
    err = ::testing::internal::GetCapturedStderr();
    ASSERT_TRUE(swap.ok()) << swap.status().to_string();
  }
  EXPECT_EQ(err, "") << "the core wrote to stderr itself";
  ASSERT_GE(got.messages.size(), 2u);
  const std::string want = "removed 1 stale swap file(s) of dead processes in " + dir.path.string();
  bool said = false;
  for (const auto& [level, message] : got.messages) {
    said = said || (level == LogLevel::kInfo && message == want);
    EXPECT_EQ(message.rfind("strata: ", 0), std::string::npos) << "the sink gets the bare message";
  }
  EXPECT_TRUE(said) << got.messages[0].second;
  EXPECT_EQ(got.messages.back(), std::make_pair(LogLevel::kWarning, std::string("from a worker")));
}

TEST(Log, DefaultSinkWritesStrataLinesToStderr) {
  ::testing::internal::CaptureStderr();
  log_message(LogLevel::kInfo, "an info");
  log_message(LogLevel::kWarning, "a warning");
  log_message(LogLevel::kError, "an error");
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "strata: an info\nstrata: warning: a warning\nstrata: error: an error\n");
}
