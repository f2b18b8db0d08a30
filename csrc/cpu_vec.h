// Vector operations of one ISA on float32 lanes, loading and storing float32, bfloat16 and float16 (converted to
// float32 in registers; stores round to nearest even). Include inside the ISA's target region and namespace (see
// cpu_target.h), after <cstdint>, <cstring> and <immintrin.h>; the including file defines which Vec* structs it needs:
// GKF_VEC_SCALAR, GKF_VEC_AVX2, GKF_VEC_AVX512.
//
// Requires the types Bf16 and F16 (routed_lora_kernels.h) to be visible.

// ------------------------------------------------------------------------------------------- scalar conversions

static inline float to_f32(float v) { return v; }

static inline float to_f32(Bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float to_f32(F16 v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: mant · 2^-24 is exact in float32
      const float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline void from_f32(float v, float* p) { *p = v; }

static inline void from_f32(float v, Bf16* p) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN
    p->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  p->bits = static_cast<uint16_t>(u >> 16);
}

static inline void from_f32(float v, F16* p) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint16_t o;
  if (u >= 0x47800000u) {  // |v| >= 65536 (or Inf / NaN): Inf, or a quiet NaN
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {  // below 2^-14: a subnormal half or zero. Adding 0.5 (2^-1) aligns the half's last
    // mantissa bit with float32's last one, so the float addition itself rounds to nearest even.
    float f;
    std::memcpy(&f, &u, 4);
    f += 0.5f;
    uint32_t r;
    std::memcpy(&r, &f, 4);
    o = static_cast<uint16_t>(r - 0x3f000000u);
  } else {  // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even (may carry to Inf)
    const uint32_t odd = (u >> 13) & 1u;
    u += 0xc8000fffu + odd;  // (15 - 127) << 23 in two's complement, plus the rounding bias
    o = static_cast<uint16_t>(u >> 13);
  }
  p->bits = static_cast<uint16_t>(o | sign);
}

// -------------------------------------------------------------------------------------------------------- scalar

#ifdef GKF_VEC_SCALAR
// Eight lanes in plain arrays: the baseline path, which the compiler vectorizes with the instructions every x86-64
// CPU has (SSE2), and the only path off x86-64.
struct VecScalar {
  static constexpr int W = 8;
  struct V {
    float v[8];
  };
  static V zero() { return set1(0.f); }
  static V set1(float a) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  template <typename T>
  static V load(const T* p) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = to_f32(p[i]);
    return r;
  }
  template <typename T>
  static void store(T* p, V a) {
    for (int i = 0; i < W; ++i) from_f32(a.v[i], p + i);
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static V add(V a, V b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static float hsum(V a) {
    return ((a.v[0] + a.v[1]) + (a.v[2] + a.v[3])) + ((a.v[4] + a.v[5]) + (a.v[6] + a.v[7]));
  }
  template <typename T>
  static V load_part(const T* p, int64_t n) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = i < n ? to_f32(p[i]) : 0.f;
    return r;
  }
  template <typename T>
  static void store_part(T* p, V a, int64_t n) {
    for (int i = 0; i < n; ++i) from_f32(a.v[i], p + i);
  }
  // Register tiles: dot products of kDotM tokens × 4 rows; expand blocks of kExpandM tokens × kExpandNV vectors.
  static constexpr int kDotM = 2, kExpandM = 2, kExpandNV = 2;
  static constexpr bool kBf16Dot = false;
  template <int M>
  static void dot_tile_bf16(const Bf16* const*, const Bf16* const*, int64_t, float*) {}
};
#endif

// ---------------------------------------------------------------------------------------------------------- AVX2

#ifdef GKF_VEC_AVX2
struct VecAvx2 {
  static constexpr int W = 8;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const Bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static void store(Bf16* p, V a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256 nan = _mm256_cmp_ps(a, a, _CMP_UNORD_Q);
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan));
    r = _mm256_srli_epi32(r, 16);
    // packus works per 128-bit lane: qwords (r0-3, r0-3, r4-7, r4-7); keep qwords 0 and 2
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static void store(F16* p, V a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float hsum(V a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  template <typename T>
  static V load_part(const T* p, int64_t n) {
    float tmp[W];
    for (int64_t i = 0; i < W; ++i) tmp[i] = i < n ? to_f32(p[i]) : 0.f;
    return load(tmp);
  }
  template <typename T>
  static void store_part(T* p, V a, int64_t n) {
    float tmp[W];
    store(tmp, a);
    for (int64_t i = 0; i < n; ++i) from_f32(tmp[i], p + i);
  }
  // 16 registers: dot tiles of 2 tokens × 4 rows (8 accumulators), expand blocks of 4 tokens × 2 vectors.
  static constexpr int kDotM = 2, kExpandM = 4, kExpandNV = 2;
  static constexpr bool kBf16Dot = false;
  template <int M>
  static void dot_tile_bf16(const Bf16* const*, const Bf16* const*, int64_t, float*) {}
};
#endif

// ------------------------------------------------------------------------------------------------------- AVX-512

#ifdef GKF_VEC_AVX512
struct VecAvx512 {
  static constexpr int W = 16;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const Bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static void store(Bf16* p, V a) {
    // vcvtneps2bf16 rounds to nearest even like from_f32 (it flushes float32 subnormals, below 1.2e-38, to zero)
    const __m256bh b = _mm512_cvtneps_pbh(a);
    std::memcpy(p, &b, 32);
  }
  static void store(F16* p, V a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  // Partial vectors through masks: nothing past p + n is read or written.
  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V load_part(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static V load_part(const Bf16* p, int64_t n) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load_part(const F16* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static void store_part(float* p, V a, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), a); }
  static void store_part(Bf16* p, V a, int64_t n) {
    const __m256bh b = _mm512_cvtneps_pbh(a);
    __m256i u;
    std::memcpy(&u, &b, 32);
    _mm256_mask_storeu_epi16(p, mask(n), u);
  }
  static void store_part(F16* p, V a, int64_t n) {
    _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  // 32 registers: dot tiles of 4 tokens × 4 rows (16 accumulators), expand blocks of 6 tokens × 4 vectors (24).
  static constexpr int kDotM = 4, kExpandM = 6, kExpandNV = 4;

  // out[m·4 + n] = Σ_i xs[m][i] · rs[n][i] for bfloat16 rows through vdpbf16ps: 32 products per instruction, each
  // exact in float32 (8-bit significands), added to float32 lanes; the last d % 32 elements through masked loads
  // (zeros add nothing). M·4 accumulators hide the instruction's latency; each x load serves 4 rows and each row load
  // M tokens.
  static constexpr bool kBf16Dot = true;
  template <int M>
  static void dot_tile_bf16(const Bf16* const* xs, const Bf16* const* rs, int64_t d, float* out) {
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < 4; ++n) acc[m][n] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xs[m] + i);
      for (int n = 0; n < 4; ++n) {
        const __m512bh rv = (__m512bh)_mm512_loadu_si512(rs[n] + i);
        for (int m = 0; m < M; ++m) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv[m], rv);
      }
    }
    if (i < d) {
      const __mmask32 k = static_cast<__mmask32>((uint64_t(1) << (d - i)) - 1u);
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(k, xs[m] + i);
      for (int n = 0; n < 4; ++n) {
        const __m512bh rv = (__m512bh)_mm512_maskz_loadu_epi16(k, rs[n] + i);
        for (int m = 0; m < M; ++m) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv[m], rv);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < 4; ++n) out[m * 4 + n] = _mm512_reduce_add_ps(acc[m][n]);
  }
};
#endif
