#include <strata/log.h>

#include <cstdio>
#include <mutex>
#include <string>

namespace strata {

namespace {

struct SinkSlot {
  std::mutex mu;  // guards sink and arg
  LogSink sink = nullptr;
  void* arg = nullptr;
};

SinkSlot& slot() {
  static SinkSlot s;  // constructed on first use: safe from static initialisers
  return s;
}

}  // namespace

void stderr_log_sink(LogLevel level, std::string_view message, void* /*arg*/) {
  const char* kind = level == LogLevel::kWarning ? "warning: "
                     : level == LogLevel::kInfo  ? ""
                                                 : "error: ";
  // One fwrite per message, so concurrent messages do not interleave.
  std::string line = std::string("strata: ") + kind + std::string(message) + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

void set_log_sink(LogSink sink, void* arg) {
  SinkSlot& s = slot();
  std::lock_guard<std::mutex> lock(s.mu);
  s.sink = sink;
  s.arg = arg;
}

void log_message(LogLevel level, std::string_view message) {
  SinkSlot& s = slot();
  LogSink sink;
  void* arg;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    sink = s.sink;
    arg = s.arg;
  }
  // Called outside the lock: a sink may block (the binding's takes the GIL).
  (sink ? sink : stderr_log_sink)(level, message, arg);
}

}  // namespace strata
