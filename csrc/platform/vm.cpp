// Virtual-memory primitives; see strata/platform/vm.h. Every function returns
// 0 or -errno and leaves errno-to-Status conversion to the caller.
#include <strata/platform/vm.h>

#include <linux/mempolicy.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <thread>

#include <strata/platform/affinity.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace strata::platform {

namespace {

constexpr size_t kMaskWords = kMaxNumaNodes / 64;
// The kernel reads maxnode-1 bits (mm/mempolicy.c get_nodes: "--maxnode"),
// so the count passed is one more than the bits in the mask, as libnuma does.
constexpr unsigned long kMaskBitsArg = kMaxNumaNodes + 1;

int neg_errno() { return errno ? -errno : -EIO; }

bool is_aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

int to_kernel_mode(MemPolicy policy) {
  switch (policy) {
    case MemPolicy::kDefault:
      return MPOL_DEFAULT;
    case MemPolicy::kBind:
      return MPOL_BIND;
    case MemPolicy::kInterleave:
      return MPOL_INTERLEAVE;
    case MemPolicy::kPreferred:
      return MPOL_PREFERRED;
  }
  return MPOL_DEFAULT;
}

// The kernel's node mask for `nodes`; -EINVAL for an id outside
// [0, kMaxNumaNodes) or no node with a policy other than kDefault.
int node_mask(MemPolicy policy, std::span<const int> nodes, unsigned long (&mask)[kMaskWords]) {
  for (int n : nodes) {
    if (n < 0 || n >= kMaxNumaNodes) {
      return -EINVAL;
    }
    mask[n / 64] |= 1UL << (n % 64);
  }
  if (policy != MemPolicy::kDefault && nodes.empty()) {
    return -EINVAL;
  }
  return 0;
}

}  // namespace

const char* mem_policy_name(MemPolicy policy) {
  switch (policy) {
    case MemPolicy::kDefault:
      return "default";
    case MemPolicy::kBind:
      return "bind";
    case MemPolicy::kInterleave:
      return "interleave";
    case MemPolicy::kPreferred:
      return "preferred";
  }
  return "?";
}

int map_anonymous(size_t bytes, size_t alignment, void** out) {
  *out = nullptr;
  if (bytes == 0 || alignment < kPageSize || (alignment & (alignment - 1)) != 0) {
    return -EINVAL;
  }
  bytes = round_up(bytes, kPageSize);
  size_t extra = alignment > kPageSize ? alignment : 0;
  if (bytes + extra < bytes) {
    return -ENOMEM;
  }
  void* raw =
      mmap(nullptr, bytes + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    return neg_errno();
  }
  uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (base + alignment - 1) & ~(uintptr_t(alignment) - 1);
  if (extra != 0) {
    // Trim the over-mapped head and tail so only [aligned, aligned+bytes) stays.
    size_t head = aligned - base;
    size_t tail = extra - head;
    if (head != 0) {
      munmap(raw, head);
    }
    if (tail != 0) {
      munmap(reinterpret_cast<void*>(aligned + bytes), tail);
    }
  }
  *out = reinterpret_cast<void*>(aligned);
  return 0;
}

int unmap(void* addr, size_t bytes) {
  if (addr == nullptr) {
    return 0;
  }
  if (munmap(addr, round_up(bytes, kPageSize)) != 0) {
    return neg_errno();
  }
  return 0;
}

int bind_memory(void* addr, size_t bytes, MemPolicy policy, std::span<const int> nodes) {
  if (!is_aligned(addr, kPageSize)) {
    return -EINVAL;
  }
  unsigned long mask[kMaskWords] = {};
  if (int r = node_mask(policy, nodes, mask); r != 0) {
    return r;
  }
  const unsigned long* mask_arg = policy == MemPolicy::kDefault ? nullptr : mask;
  unsigned long maxnode = policy == MemPolicy::kDefault ? 0 : kMaskBitsArg;
  long r = syscall(SYS_mbind, addr, round_up(bytes, kPageSize), to_kernel_mode(policy), mask_arg,
                   maxnode, 0u);
  return r == 0 ? 0 : neg_errno();
}

int set_thread_policy(MemPolicy policy, std::span<const int> nodes) {
  unsigned long mask[kMaskWords] = {};
  if (int r = node_mask(policy, nodes, mask); r != 0) {
    return r;
  }
  const unsigned long* mask_arg = policy == MemPolicy::kDefault ? nullptr : mask;
  unsigned long maxnode = policy == MemPolicy::kDefault ? 0 : kMaskBitsArg;
  long r = syscall(SYS_set_mempolicy, to_kernel_mode(policy), mask_arg, maxnode);
  return r == 0 ? 0 : neg_errno();
}

int advise_hugepage(void* addr, size_t bytes) {
#ifdef MADV_HUGEPAGE
  return madvise(addr, round_up(bytes, kPageSize), MADV_HUGEPAGE) == 0 ? 0 : neg_errno();
#else
  return -EINVAL;
#endif
}

int advise_dontfork(void* addr, size_t bytes) {
  return madvise(addr, round_up(bytes, kPageSize), MADV_DONTFORK) == 0 ? 0 : neg_errno();
}

namespace {

// The whole pages inside [addr, addr+bytes): false when there is none.
bool whole_pages(void* addr, size_t bytes, char** start, size_t* len) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  const uintptr_t first = round_up(a, kPageSize);
  const uintptr_t end = (a + bytes) / kPageSize * kPageSize;
  if (end <= first) {
    return false;
  }
  *start = reinterpret_cast<char*>(first);
  *len = end - first;
  return true;
}

}  // namespace

int release_pages(void* addr, size_t bytes) {
  char* p = nullptr;
  size_t len = 0;
  if (!whole_pages(addr, bytes, &p, &len)) {
    return 0;
  }
  return madvise(p, len, MADV_DONTNEED) == 0 ? 0 : neg_errno();
}

int populate_pages(void* addr, size_t bytes) {
  char* p = nullptr;
  size_t len = 0;
  if (!whole_pages(addr, bytes, &p, &len)) {
    return 0;
  }
  if (madvise(p, len, MADV_POPULATE_WRITE) == 0) {
    return 0;
  }
  if (errno != EINVAL) {
    return neg_errno();
  }
  // Older kernel: a write access per page that changes nothing (the pages
  // may hold data another thread is adding to).
  for (size_t off = 0; off < len; off += kPageSize) {
    __atomic_fetch_add(p + off, char(0), __ATOMIC_RELAXED);
  }
  return 0;
}

namespace {

int prefault_chunk(char* p, size_t bytes) {
  if (bytes == 0) {
    return 0;
  }
  if (madvise(p, bytes, MADV_POPULATE_WRITE) == 0) {
    return 0;
  }
  int err = errno;
  if (err != EINVAL) {
    // ENOMEM / EFAULT / EHWPOISON are real failures, not "not supported".
    return -err;
  }
  // Kernel older than 5.14: write one byte per page. The memory is freshly
  // mapped and zero, so writing zero keeps its contents.
  for (size_t off = 0; off < bytes; off += kPageSize) {
    reinterpret_cast<volatile char*>(p)[off] = 0;
  }
  return 0;
}

}  // namespace

int prefault(void* addr, size_t bytes, unsigned threads) {
  if (!is_aligned(addr, kPageSize)) {
    return -EINVAL;
  }
  bytes = round_up(bytes, kPageSize);
  if (threads == 0) {
    size_t by_size = std::max<size_t>(1, bytes / (size_t(64) << 20));
    size_t cpus = usable_cpus();
    threads = unsigned(std::min<size_t>({by_size, cpus, 16}));
  }
  // Chunks are whole huge pages where possible so two threads never fault
  // the same THP.
  size_t unit = bytes >= kHugePageSize * threads ? kHugePageSize : kPageSize;
  size_t chunk = round_up((bytes + threads - 1) / threads, unit);
  char* base = static_cast<char*>(addr);
  if (threads <= 1 || chunk >= bytes) {
    return prefault_chunk(base, bytes);
  }
  std::atomic<int> first_error{0};
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (size_t off = 0; off < bytes; off += chunk) {
    size_t len = std::min(chunk, bytes - off);
    pool.emplace_back([&first_error, p = base + off, len] {
      int r = prefault_chunk(p, len);
      if (r != 0) {
        int expected = 0;
        first_error.compare_exchange_strong(expected, r);
      }
    });
  }
  for (auto& t : pool) {
    t.join();
  }
  return first_error.load();
}

// Raw syscalls: the sanitizer runtimes intercept mlock/munlock and turn them
// into no-ops, which would hide pinning (and RLIMIT_MEMLOCK) from sanitized tests.
int lock_memory(void* addr, size_t bytes) {
  return syscall(SYS_mlock, addr, round_up(bytes, kPageSize)) == 0 ? 0 : neg_errno();
}

int unlock_memory(void* addr, size_t bytes) {
  return syscall(SYS_munlock, addr, round_up(bytes, kPageSize)) == 0 ? 0 : neg_errno();
}

int query_page_nodes(std::span<const void* const> pages, std::span<int> nodes_out) {
  if (nodes_out.size() < pages.size()) {
    return -EINVAL;
  }
  // move_pages takes a non-const void** although with nodes == nullptr it
  // only reads; batches keep the kernel's temporary arrays small.
  constexpr size_t kBatch = 4096;
  for (size_t i = 0; i < pages.size(); i += kBatch) {
    size_t n = std::min(kBatch, pages.size() - i);
    long r = syscall(SYS_move_pages, 0, n, const_cast<const void**>(pages.data() + i), nullptr,
                     nodes_out.data() + i, 0);
    if (r < 0) {
      return neg_errno();
    }
  }
  return 0;
}

std::vector<const void*> sample_pages(const void* addr, size_t bytes, size_t max_samples) {
  std::vector<const void*> out;
  uintptr_t first = reinterpret_cast<uintptr_t>(addr) & ~(uintptr_t(kPageSize) - 1);
  uintptr_t end = reinterpret_cast<uintptr_t>(addr) + bytes;
  if (bytes == 0 || max_samples == 0) {
    return out;
  }
  size_t pages = (end - first + kPageSize - 1) / kPageSize;
  if (pages <= max_samples) {
    out.reserve(pages);
    for (size_t i = 0; i < pages; ++i) {
      out.push_back(reinterpret_cast<const void*>(first + i * kPageSize));
    }
    return out;
  }
  out.reserve(max_samples);
  if (max_samples == 1) {
    out.push_back(reinterpret_cast<const void*>(first));
    return out;
  }
  // Evenly spaced page indices 0 .. pages-1 inclusive.
  for (size_t i = 0; i < max_samples; ++i) {
    size_t page = size_t((unsigned __int128)i * (pages - 1) / (max_samples - 1));
    out.push_back(reinterpret_cast<const void*>(first + page * kPageSize));
  }
  return out;
}

int query_policy(const void* addr, MemPolicy* policy, std::vector<int>* nodes) {
  int mode = 0;
  unsigned long mask[kMaskWords] = {};
  long r = syscall(SYS_get_mempolicy, &mode, mask, kMaskBitsArg, addr, MPOL_F_ADDR);
  if (r != 0) {
    return neg_errno();
  }
  // Mode flags (MPOL_F_STATIC_NODES, ...) ride in the high bits.
  int base = mode & ~(MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES);
  switch (base) {
    case MPOL_BIND:
      *policy = MemPolicy::kBind;
      break;
    case MPOL_INTERLEAVE:
      *policy = MemPolicy::kInterleave;
      break;
    case MPOL_PREFERRED:
      *policy = MemPolicy::kPreferred;
      break;
    default:
      *policy = MemPolicy::kDefault;
      break;
  }
  if (nodes != nullptr) {
    nodes->clear();
    for (int n = 0; n < kMaxNumaNodes; ++n) {
      if (mask[n / 64] & (1UL << (n % 64))) {
        nodes->push_back(n);
      }
    }
  }
  return 0;
}

int query_node_of(const void* addr, int* node) {
  int n = -1;
  long r = syscall(SYS_get_mempolicy, &n, nullptr, 0, addr, MPOL_F_NODE | MPOL_F_ADDR);
  if (r != 0) {
    return neg_errno();
  }
  *node = n;
  return 0;
}

}  // namespace strata::platform
