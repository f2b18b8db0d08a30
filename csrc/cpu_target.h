// Target regions: functions defined between GKF_TARGET_*_BEGIN and GKF_TARGET_END are compiled for that ISA, while
// the translation unit keeps the baseline flags. Include every library header (std, torch, <immintrin.h>) BEFORE the
// region: an inline function of a shared header compiled inside it would be a second, AVX-only copy of a symbol that
// other objects share, and the linker may keep that copy for code that runs on any CPU. For the same reason the code
// inside a region lives in a namespace of its own per ISA.
#pragma once

#if defined(GKF_EMULATED_INTRINSICS)
// Checking the vector kernels on a CPU without them: the including build supplies the intrinsics (e.g. SIMDe), and
// the regions compile for the host.
#define GKF_HAVE_X86_TARGETS 1
#define GKF_TARGET_AVX2_BEGIN
#define GKF_TARGET_AVX512_BEGIN
#define GKF_TARGET_END
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GKF_HAVE_X86_TARGETS 1
#include <immintrin.h>
#else
#define GKF_HAVE_X86_TARGETS 0
#endif

#if defined(GKF_EMULATED_INTRINSICS)
#elif GKF_HAVE_X86_TARGETS && defined(__clang__)
#define GKF_TARGET_AVX2_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define GKF_TARGET_AVX512_BEGIN                                                                                    \
  _Pragma(                                                                                                         \
      "clang attribute push(__attribute__((target(\"avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16\"))), " \
      "apply_to = function)")
#define GKF_TARGET_END _Pragma("clang attribute pop")
#elif GKF_HAVE_X86_TARGETS
#define GKF_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define GKF_TARGET_AVX512_BEGIN \
  _Pragma("GCC push_options")   \
      _Pragma("GCC target(\"avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16\")")
#define GKF_TARGET_END _Pragma("GCC pop_options")
#endif
