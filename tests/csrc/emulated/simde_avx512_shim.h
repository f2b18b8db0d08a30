// SIMDe (portable implementations of the x86 intrinsics) plus the AVX-512 intrinsics SIMDe 0.7.4 lacks, written here
// with plain loops and the host's F16C scalar conversions: lets routed_lora_isa_avx512.cpp run on a CPU without
// AVX-512 (tests/csrc/test_emulated_avx512.py). Force-included before the kernel file.
#pragma once
#include <cstring>
#include <cstdint>
#include <immintrin.h>  // the host's F16C scalar conversions only
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
static inline simde__m512i gkfemu_cvtepu16_epi32(simde__m256i a) {
  uint16_t in[16]; uint32_t out[16]; std::memcpy(in, &a, 32);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  simde__m512i r; std::memcpy(&r, out, 64); return r;
}
static inline float gkfemu_reduce_add_ps(simde__m512 a) {
  float v[16]; std::memcpy(v, &a, 64); float s = 0; for (int i = 0; i < 16; ++i) s += v[i]; return s;
}
static inline simde__m512 gkfemu_cvtph_ps(simde__m256i a) {
  uint16_t in[16]; float out[16]; std::memcpy(in, &a, 32);
  for (int i = 0; i < 16; ++i) out[i] = _cvtsh_ss(in[i]);
  simde__m512 r; std::memcpy(&r, out, 64); return r;
}
static inline simde__m256i gkfemu_cvtps_ph(simde__m512 a, int) {
  float in[16]; uint16_t out[16]; std::memcpy(in, &a, 64);
  for (int i = 0; i < 16; ++i) out[i] = _cvtss_sh(in[i], 0);
  simde__m256i r; std::memcpy(&r, out, 32); return r;
}
static inline simde__m256bh gkfemu_cvtneps_pbh(simde__m512 a) {
  float in[16]; uint16_t out[16]; std::memcpy(in, &a, 64);
  for (int i = 0; i < 16; ++i) { uint32_t u; std::memcpy(&u, &in[i], 4); u += 0x7fffu + ((u >> 16) & 1u); out[i] = u >> 16; }
  simde__m256bh r; std::memcpy(&r, out, 32); return r;
}
// Masked loads and stores (elements whose mask bit is clear are neither read nor written; loads give zero there).
static inline simde__m512 gkfemu_maskz_loadu_ps(uint32_t k, const void* p) {
  float out[16] = {0};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1u) std::memcpy(&out[i], static_cast<const char*>(p) + 4 * i, 4);
  simde__m512 r; std::memcpy(&r, out, 64); return r;
}
static inline void gkfemu_mask_storeu_ps(void* p, uint32_t k, simde__m512 a) {
  float in[16]; std::memcpy(in, &a, 64);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1u) std::memcpy(static_cast<char*>(p) + 4 * i, &in[i], 4);
}
static inline simde__m256i gkfemu_maskz_loadu_epi16_256(uint32_t k, const void* p) {
  uint16_t out[16] = {0};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1u) std::memcpy(&out[i], static_cast<const char*>(p) + 2 * i, 2);
  simde__m256i r; std::memcpy(&r, out, 32); return r;
}
static inline void gkfemu_mask_storeu_epi16_256(void* p, uint32_t k, simde__m256i a) {
  uint16_t in[16]; std::memcpy(in, &a, 32);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1u) std::memcpy(static_cast<char*>(p) + 2 * i, &in[i], 2);
}
static inline simde__m512i gkfemu_maskz_loadu_epi16_512(uint32_t k, const void* p) {
  uint16_t out[32] = {0};
  for (int i = 0; i < 32; ++i)
    if ((k >> i) & 1u) std::memcpy(&out[i], static_cast<const char*>(p) + 2 * i, 2);
  simde__m512i r; std::memcpy(&r, out, 64); return r;
}
#define _mm512_maskz_loadu_ps gkfemu_maskz_loadu_ps
#define _mm512_mask_storeu_ps gkfemu_mask_storeu_ps
#define _mm256_maskz_loadu_epi16 gkfemu_maskz_loadu_epi16_256
#define _mm256_mask_storeu_epi16 gkfemu_mask_storeu_epi16_256
#define _mm512_maskz_loadu_epi16 gkfemu_maskz_loadu_epi16_512
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 gkfemu_cvtepu16_epi32
#define _mm512_reduce_add_ps gkfemu_reduce_add_ps
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps gkfemu_cvtph_ps
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph gkfemu_cvtps_ph
#define _mm512_cvtneps_pbh gkfemu_cvtneps_pbh
