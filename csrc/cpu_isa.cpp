// Run-time ISA choice (see cpu_isa.h) and the op that reports or forces it.

#include "cpu_isa.h"

#include <torch/library.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

namespace gkf_isa {

namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
bool cpu_has(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      // __builtin_cpu_supports also checks that the OS saves the AVX-512 state (XCR0): a virtual machine can hide it
      // while cpuid still lists the instructions.
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bf16") && cpu_has(Isa::kAvx2);
  }
  return false;
}
#else
bool cpu_has(Isa isa) { return isa == Isa::kScalar; }
#endif

constexpr int kUnset = -1;
std::atomic<int> g_active{kUnset};
std::mutex g_mutex;

bool parse(const std::string& s, Isa* out, bool* is_auto) {
  *is_auto = false;
  if (s == "scalar") *out = Isa::kScalar;
  else if (s == "avx2") *out = Isa::kAvx2;
  else if (s == "avx512") *out = Isa::kAvx512;
  else if (s == "auto" || s.empty()) *is_auto = true;
  else return false;
  return true;
}

// Sets the active ISA from a name ("auto" or "" = the best supported); throws on an unknown or unsupported name.
Isa set_from(const std::string& s, const char* where) {
  Isa isa = Isa::kScalar;
  bool is_auto = false;
  TORCH_CHECK(parse(s, &isa, &is_auto), where, ": unknown CPU ISA '", s, "', expected scalar, avx2, avx512 or auto");
  if (is_auto) isa = best();
  TORCH_CHECK(supported(isa), where, ": this CPU cannot run the ", name(isa), " kernels (best: ", name(best()), ")");
  g_active.store(static_cast<int>(isa));
  return isa;
}

}  // namespace

bool supported(Isa isa) {
  static const bool has[3] = {true, cpu_has(Isa::kAvx2), cpu_has(Isa::kAvx512)};
  return has[static_cast<int>(isa)];
}

Isa best() {
  if (supported(Isa::kAvx512)) return Isa::kAvx512;
  if (supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

const char* name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

Isa active() {
  const int v = g_active.load(std::memory_order_relaxed);
  if (v != kUnset) return static_cast<Isa>(v);
  std::lock_guard<std::mutex> guard(g_mutex);
  if (g_active.load() != kUnset) return static_cast<Isa>(g_active.load());
  const char* env = std::getenv("GENKNOWSUB_FAST_CPU_ISA");
  return set_from(env ? std::string(env) : std::string(), "GENKNOWSUB_FAST_CPU_ISA");
}

// cpu_isa(""): the active ISA's name; cpu_isa(name): force it ("auto": back to the best) and return the new name.
std::string cpu_isa_op(const std::string& request) {
  if (request.empty()) return name(active());
  std::lock_guard<std::mutex> guard(g_mutex);
  return name(set_from(request, "cpu_isa"));
}

}  // namespace gkf_isa

TORCH_LIBRARY_FRAGMENT(genknowsub_fast_C, m) { m.def("cpu_isa(str request=\"\") -> str", &gkf_isa::cpu_isa_op); }
