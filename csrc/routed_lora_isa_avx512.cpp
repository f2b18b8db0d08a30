// Routed-LoRA kernels compiled for AVX-512 (F, BW, VL, DQ, BF16) in a target region; the driver calls these only
// where the CPU has all of them. bfloat16 shrinks use vdpbf16ps; everything else is routed_lora_impl.h on 16 lanes.

// GCC 12's AVX-512 intrinsic headers initialise their "undefined" vectors with themselves, which -Wall reports at every
// use; the warnings are about the headers, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_target.h"
#include "routed_lora_kernels.h"

namespace gkf_rl {

#if GKF_HAVE_X86_TARGETS
GKF_TARGET_AVX512_BEGIN
namespace avx512 {
namespace {
#define GKF_VEC_AVX512
#include "cpu_vec.h"
#undef GKF_VEC_AVX512
#include "routed_lora_impl.h"
}  // namespace

static inline __m512bh load_bh(const Bf16* p) {
  __m512bh v;
  std::memcpy(&v, p, 64);  // a plain unaligned vector load
  return v;
}

// out[q] = Σ x[i] · rows[q][i] (n <= 4) for bfloat16 x and rows: 32 products per vdpbf16ps, 4 rows × 2 accumulators;
// the last d % 64 elements through the converting kernel.
void VecAvx512::dot_rows_bf16(const Bf16* x, const Bf16* const* rows, int n, int64_t d, float* out) {
  __m512 acc0[4], acc1[4];
  for (int q = 0; q < 4; ++q) acc0[q] = acc1[q] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= d; i += 64) {
    const __m512bh x0 = load_bh(x + i), x1 = load_bh(x + i + 32);
    for (int q = 0; q < n; ++q) {
      acc0[q] = _mm512_dpbf16_ps(acc0[q], x0, load_bh(rows[q] + i));
      acc1[q] = _mm512_dpbf16_ps(acc1[q], x1, load_bh(rows[q] + i + 32));
    }
  }
  float rest[4] = {0.f, 0.f, 0.f, 0.f};
  if (i < d) {
    const Bf16* tail[4];
    for (int q = 0; q < n; ++q) tail[q] = rows[q] + i;
    dot_rows<VecAvx512, Bf16, Bf16>(x + i, tail, n, d - i, rest);
  }
  for (int q = 0; q < n; ++q) out[q] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[q], acc1[q])) + rest[q];
}
}  // namespace avx512

const Kernels& kernels_avx512() { return avx512::KernelsOf<avx512::VecAvx512>::table(); }
GKF_TARGET_END
#else
const Kernels& kernels_avx512() { return kernels_scalar(); }
#endif

}  // namespace gkf_rl
