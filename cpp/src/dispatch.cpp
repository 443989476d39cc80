// CPU feature detection and the choice of kernel table. Compiled with baseline flags only.
//
// An ISA is usable when the CPU reports it (CPUID) AND the OS saves the wider registers on a
// context switch (XGETBV: XCR0 must enable SSE+AVX state for AVX2, plus opmask and ZMM state
// for AVX-512). A CPUID-only check crashes on kernels or hypervisors that leave them off.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "ce_detail.hpp"
#include "fastxent/fastxent.hpp"
#include "kernel_table.hpp"

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && \
    (defined(FASTXENT_HAVE_AVX2) || defined(FASTXENT_HAVE_AVX512))
#define FASTXENT_X86 1
#if defined(_MSC_VER)
#include <immintrin.h>
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace fastxent {
namespace {

#if defined(FASTXENT_X86)
struct Regs {
  uint32_t a, b, c, d;
};

Regs cpuid(uint32_t leaf, uint32_t sub) {
  Regs r{0, 0, 0, 0};
#if defined(_MSC_VER)
  int v[4];
  __cpuidex(v, int(leaf), int(sub));
  r = {uint32_t(v[0]), uint32_t(v[1]), uint32_t(v[2]), uint32_t(v[3])};
#else
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
#endif
  return r;
}

uint64_t xcr0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
#endif
}

struct Features {
  bool avx2 = false;
  bool avx512 = false;
};

Features detect() {
  Features f;
  const uint32_t max_leaf = cpuid(0, 0).a;
  if (max_leaf < 7) return f;
  const Regs l1 = cpuid(1, 0);
  const bool osxsave = (l1.c >> 27) & 1;
  const bool avx = (l1.c >> 28) & 1;
  const bool fma = (l1.c >> 12) & 1;
  const bool f16c = (l1.c >> 29) & 1;
  if (!osxsave || !avx) return f;
  const uint64_t x = xcr0();
  const bool ymm_state = (x & 0x6) == 0x6;    // SSE and AVX state
  const bool zmm_state = (x & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  const Regs l7 = cpuid(7, 0);
  const bool avx2 = (l7.b >> 5) & 1;
  const bool bmi2 = (l7.b >> 8) & 1;
  const bool avx512f = (l7.b >> 16) & 1, avx512dq = (l7.b >> 17) & 1;
  const bool avx512bw = (l7.b >> 30) & 1, avx512vl = (l7.b >> 31) & 1;
  f.avx2 = ymm_state && avx2 && fma && bmi2 && f16c;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
  return f;
}
#endif

struct Entry {
  const char* name;
  const KernelTable& (*table)();
  bool usable;
};

// The registry's ISAs (isa_list.hpp), best last.
std::vector<Entry> entries() {
  std::vector<Entry> e;
#if defined(FASTXENT_X86)
  static const Features cpu = detect();
#endif
#define FASTXENT_ENTRY(name, usable) e.push_back({#name, &name##_table, usable});
  FASTXENT_FOR_EACH_ISA(FASTXENT_ENTRY)
#undef FASTXENT_ENTRY
  return e;
}

std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable* best() {
  const KernelTable* t = nullptr;
  for (const Entry& e : entries())
    if (e.usable) t = &e.table();
  return t;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const Entry& e : entries())
    if (e.usable) names.emplace_back(e.name);
  return names;
}

void set_isa(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_active.store(best());
    return;
  }
  for (const Entry& e : entries()) {
    if (name == e.name && e.usable) {
      g_active.store(&e.table());
      return;
    }
  }
  std::string avail;
  for (const std::string& n : available_isas()) avail += (avail.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown or unsupported ISA '" + name + "': this CPU can run " +
                              avail + " (or 'auto')");
}

const KernelTable& active_table() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best();
    g_active.store(t);
  }
  return *t;
}

std::string active_isa() { return active_table().name; }

bool detail::cpu_is_intel() {
#if defined(FASTXENT_X86)
  const Regs r = cpuid(0, 0);  // vendor "GenuineIntel" in EBX, EDX, ECX
  return r.b == 0x756e6547u && r.d == 0x49656e69u && r.c == 0x6c65746eu;
#else
  return false;
#endif
}

}  // namespace fastxent
