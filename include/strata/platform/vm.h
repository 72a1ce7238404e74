// strata/platform/vm.h — virtual-memory primitives: map, place, advise,
// pre-fault, lock, and ask the kernel where pages landed.
//
// The layer under the pinned pool and NUMA regions (mimalloc's prim.h): thin
// wrappers over mmap/mbind/set_mempolicy/madvise/mlock/move_pages/
// get_mempolicy that return 0 or -errno (liburing style) and never print,
// throw or exit. Turning -errno into a Status with context is the caller's job
// (Status::from_errno).
//
// NUMA calls go through the raw syscalls (constants from <linux/mempolicy.h>),
// so they work with or without libnuma; a kernel without CONFIG_NUMA answers
// -ENOSYS, which callers treat as "capability missing".
//
// Ownership: nothing here owns memory; RAII lives one layer up
//   (csrc/memory/slab.h, strata/memory/numa_region.h).
// Units: bytes; addresses and lengths passed to mbind/madvise/mlock must be
//   kPageSize-aligned (map_anonymous returns such addresses).
// Thread-safety: every function is safe to call concurrently on distinct
//   ranges (they are syscalls); prefault() starts and joins its own threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace strata::platform {

inline constexpr size_t kPageSize = 4096;                 // base page (x86-64, aarch64 4K kernels)
inline constexpr size_t kHugePageSize = size_t(2) << 20;  // PMD-sized transparent huge page
// Node ids accepted by bind_memory()/query_policy(): the kernel's MAX_NUMNODES
// on distribution kernels is at most 1024.
inline constexpr int kMaxNumaNodes = 1024;

inline constexpr size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS) of `bytes` (rounded up
// to kPageSize) whose start is aligned to `alignment` (a power of two >=
// kPageSize; kHugePageSize lets THP back the range from its first byte). Over-
// maps by `alignment` and trims head and tail, so nothing extra stays mapped.
// Pages are not touched: placement is decided at first touch.
[[nodiscard]] int map_anonymous(size_t bytes, size_t alignment, void** out);
// munmap; `bytes` as passed to map_anonymous.
[[nodiscard]] int unmap(void* addr, size_t bytes);

enum class MemPolicy : int {
  kDefault,     // local allocation (the default policy)
  kBind,        // only the given nodes (MPOL_BIND)
  kInterleave,  // round-robin pages across the given nodes (MPOL_INTERLEAVE)
  kPreferred,   // first node if possible, else anywhere (MPOL_PREFERRED)
};
const char* mem_policy_name(MemPolicy policy);

// mbind(addr, bytes, policy, nodes). Call before the pages are touched:
// flags are 0, so pages already present are not moved. -EINVAL for an empty
// node list with a policy other than kDefault, an id outside
// [0, kMaxNumaNodes), or (from the kernel) a node that is not online or has
// no memory; -ENOSYS without CONFIG_NUMA; -EPERM under a seccomp filter.
[[nodiscard]] int bind_memory(void* addr, size_t bytes, MemPolicy policy,
                              std::span<const int> nodes);

// set_mempolicy(policy, nodes): the calling thread's policy for the pages it
// faults in from now on, outside ranges that have one of their own
// (bind_memory); threads it starts later inherit it. kDefault with no nodes
// restores local allocation. Errors as bind_memory's.
[[nodiscard]] int set_thread_policy(MemPolicy policy, std::span<const int> nodes);

// madvise(MADV_HUGEPAGE). -EINVAL when THP is compiled out; callers ignore that.
[[nodiscard]] int advise_hugepage(void* addr, size_t bytes);
// madvise(MADV_DONTFORK): a fork()ed child (DataLoader worker) gets no copy
// of the range; since Linux 5.9 pinned pages would be copied eagerly at fork.
[[nodiscard]] int advise_dontfork(void* addr, size_t bytes);

// madvise(MADV_DONTNEED) of the whole pages inside [addr, addr+bytes): they
// go back to the system and read as zero at the next touch (private
// anonymous memory). Partial pages at either end are left alone.
[[nodiscard]] int release_pages(void* addr, size_t bytes);

// Maps the whole pages inside [addr, addr+bytes) for writing now, keeping
// their contents (MADV_POPULATE_WRITE; before Linux 5.14 an atomic add of
// zero to one byte per page). For memory that was released (release_pages)
// and is about to be read and written: a read fault maps the shared zero page
// and the write then takes a copy-on-write fault and a TLB flush on every CPU
// of the process, which costs 10-15x a populated write on a VM. Partial pages
// at either end are left alone. Any thread.
[[nodiscard]] int populate_pages(void* addr, size_t bytes);

// Writes every page of [addr, addr+bytes) once so the kernel allocates it now
// (on the node the range's policy names), in `threads` parallel chunks
// (0: one thread per 64 MiB, at most usable_cpus() and 16). Uses
// MADV_POPULATE_WRITE (Linux 5.14) and falls back to touching one byte per
// page. The contents of freshly mapped anonymous memory stay zero.
[[nodiscard]] int prefault(void* addr, size_t bytes, unsigned threads = 0);

// mlock / munlock. mlock fails with -ENOMEM or -EPERM past RLIMIT_MEMLOCK
// unless the process holds CAP_IPC_LOCK (see strata/platform/memlock.h).
[[nodiscard]] int lock_memory(void* addr, size_t bytes);
[[nodiscard]] int unlock_memory(void* addr, size_t bytes);

// move_pages(0, n, pages, nullptr, status, 0): for each page address writes
// the node it is on, or a negative errno for that page (-ENOENT: not present,
// -EFAULT: not mapped). The call itself returns 0 or -errno (-ENOSYS, -EPERM).
[[nodiscard]] int query_page_nodes(std::span<const void* const> pages, std::span<int> nodes_out);

// Up to `max_samples` page addresses spread evenly over [addr, addr+bytes),
// always including the first and last page; every page when there are fewer.
std::vector<const void*> sample_pages(const void* addr, size_t bytes, size_t max_samples);

// get_mempolicy(MPOL_F_ADDR): the policy governing `addr` and its node list.
[[nodiscard]] int query_policy(const void* addr, MemPolicy* policy, std::vector<int>* nodes);
// get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR): node of the (present) page at addr.
[[nodiscard]] int query_node_of(const void* addr, int* node);

}  // namespace strata::platform
