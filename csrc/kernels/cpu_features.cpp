#include <strata/kernels/cpu_features.h>

#include <cpuid.h>

#include <cstdint>

namespace strata::kernels {
namespace {

// xgetbv without -mxsave: the instruction is only executed after cpuid said
// OSXSAVE is set (otherwise it raises #UD).
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) {
    return f;
  }
  const unsigned max_leaf = eax;
  if (max_leaf < 1) {
    return f;
  }
  __cpuid_count(1, 0, eax, ebx, ecx, edx);
  f.sse2 = (edx >> 26) & 1;
  f.fma = (ecx >> 12) & 1;
  const bool osxsave = (ecx >> 27) & 1;
  f.avx = (ecx >> 28) & 1;
  f.f16c = (ecx >> 29) & 1;
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    f.os_avx = (xcr0 & 0x6) == 0x6;       // XMM | YMM
    f.os_avx512 = (xcr0 & 0xE6) == 0xE6;  // XMM | YMM | opmask | ZMM_Hi256 | Hi16_ZMM
  }
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    const unsigned max_sub = eax;
    f.avx2 = (ebx >> 5) & 1;
    f.avx512f = (ebx >> 16) & 1;
    f.avx512dq = (ebx >> 17) & 1;
    f.avx512bw = (ebx >> 30) & 1;
    f.avx512vl = (ebx >> 31) & 1;
    if (max_sub >= 1) {
      __cpuid_count(7, 1, eax, ebx, ecx, edx);
      f.avx512_bf16 = (eax >> 5) & 1;
    }
  }
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::string cpu_features_string() {
  const CpuFeatures& f = cpu_features();
  std::string out;
  auto add = [&out](bool on, const char* name) {
    if (on) {
      if (!out.empty()) {
        out += ' ';
      }
      out += name;
    }
  };
  add(f.sse2, "sse2");
  add(f.avx, "avx");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx2, "avx2");
  add(f.avx512f, "avx512f");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512dq, "avx512dq");
  add(f.avx512_bf16, "avx512_bf16");
  add(f.os_avx, "os_avx");
  add(f.os_avx512, "os_avx512");
  return out;
}

}  // namespace strata::kernels
