// test_child.h — running part of a test in a forked child, for what a test
// must not change in the test process itself (resource limits, capabilities).
//
// Thread-safety: fork() from a test that has started no threads of its own;
// the child runs `fn` and exits with its return value without running the
// parent's destructors or atexit handlers (_exit).
#pragma once

#include <linux/capability.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

// Runs `fn(&out)` in a forked child and returns its exit status (-1 when it
// could not be run or did not exit); what the child put in `out` is
// appended to *text through a pipe.
template <typename Fn>
int run_in_child(Fn fn, std::string* text) {
  int fds[2];
  if (pipe(fds) != 0) {
    return -1;
  }
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::string out;
    int code = fn(&out);
    (void)!write(fds[1], out.data(), out.size());
    _exit(code);
  }
  close(fds[1]);
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof(buf))) > 0) {
    text->append(buf, size_t(n));
  }
  close(fds[0]);
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) {
    return -1;
  }
  return WEXITSTATUS(status);
}

// Drops CAP_IPC_LOCK from this (single-threaded, forked) process, so that
// RLIMIT_MEMLOCK binds root too: what `setpriv --inh-caps=-ipc_lock
// --bounding-set=-ipc_lock` does for a new program, without setpriv or exec.
inline bool drop_cap_ipc_lock() {
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (syscall(SYS_capget, &hdr, data) != 0) {
    return false;
  }
  data[0].effective &= ~(1u << CAP_IPC_LOCK);
  data[0].permitted &= ~(1u << CAP_IPC_LOCK);
  data[0].inheritable &= ~(1u << CAP_IPC_LOCK);
  return syscall(SYS_capset, &hdr, data) == 0;
}
