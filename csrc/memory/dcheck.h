// Private: STRATA_DCHECK, the debug-build invariant check of csrc/memory/.
//
// A failed DCHECK is a bug in strata (a broken invariant such as
// reserved != in_use + free, or a buffer freed twice), not a runtime error,
// so debug builds stop at the first one with the condition and location.
// Release builds (NDEBUG) compile the condition out; code paths that can
// meet bad input at run time return a Status instead.
#pragma once

#include <string>

namespace strata::memory::detail {
[[noreturn]] void dcheck_fail(const char* cond, const std::string& msg, const char* file, int line);
}  // namespace strata::memory::detail

#ifndef NDEBUG
#define STRATA_DCHECK(cond, msg)                                               \
  do {                                                                         \
    if (!(cond)) {                                                             \
      ::strata::memory::detail::dcheck_fail(#cond, (msg), __FILE__, __LINE__); \
    }                                                                          \
  } while (0)
#define STRATA_DCHECK_IS_ON 1
#else
#define STRATA_DCHECK(cond, msg) \
  do {                           \
    (void)sizeof(!(cond));       \
  } while (0)
#define STRATA_DCHECK_IS_ON 0
#endif
