// strata/platform/fs.h — file-system calls that Python's os module does not
// offer, for the checkpoint code (python/strata/checkpoint/fsutil.py).
//
// Errors: a Status whose message names the paths and the errno text, as
//   Status::from_errno writes it ("rename_exchange /a <-> /b: No such file or
//   directory"); sys_errno() keeps the errno.
// Thread-safety: free functions without shared state (one syscall each).
#pragma once

#include <string>

#include <strata/status.h>

namespace strata::platform {

// Swaps the directory entries `a` and `b` in one step (renameat2 with
// RENAME_EXCHANGE): both must exist, on one file system; afterwards `a` names
// what `b` named and `b` what `a` named, and no observer ever sees either name
// missing. Relative paths are resolved against the working directory.
// Returns OK; Unavailable (sys_errno ENOSYS, EINVAL or EOPNOTSUPP) when the
// kernel or the file system cannot exchange, so the caller falls back to two
// renames (EINVAL also covers a call the kernel rejects outright, e.g. `a`
// inside `b`: the fallback then fails with its own error); any other failure
// as the errno's Status (NotFound for a missing path, PermissionDenied, ...).
[[nodiscard]] Status rename_exchange(const std::string& a, const std::string& b);

}  // namespace strata::platform
