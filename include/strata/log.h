// strata/log.h — the library's one output sink.
//
// The core never writes to stderr itself: every message it has for a person
// (warnings such as a fallback to unpinned memory or buffered I/O, notes such
// as removed stale swap files, errors it recovers from) goes to one sink, a
// function pointer and an argument set with set_log_sink() — mimalloc's
// mi_register_output(fun, arg). The default sink writes
// "strata: [warning: |error: ]<message>\n" to stderr; the Python binding
// installs one that hands messages to logging.getLogger("strata").
//
// Contract of a sink: it receives one whole message per call, without the
// "strata: " prefix and without a trailing newline; it may be called from any
// strata thread (I/O workers, the step pipeline) and concurrently, so it must
// be thread-safe; it must not call set_log_sink(). kFatal messages come right
// before the process aborts (a failed debug check): a sink should write them
// out at once, not queue them.
// Thread-safety: set_log_sink() may be called at any time (meant once, at
//   start); each message goes whole to the sink set before or after it. `arg`
//   must stay valid while the sink may still be called.
#pragma once

#include <string_view>

namespace strata {

enum class LogLevel : int { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

using LogSink = void (*)(LogLevel level, std::string_view message, void* arg);

// Installs `sink` (nullptr: the default stderr sink) with its argument.
void set_log_sink(LogSink sink, void* arg);

// Sends one message to the current sink.
void log_message(LogLevel level, std::string_view message);

// The default sink (what nullptr selects), for sinks that fall back to it.
void stderr_log_sink(LogLevel level, std::string_view message, void* arg);

}  // namespace strata
