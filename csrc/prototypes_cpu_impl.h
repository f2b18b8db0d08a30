// The CPU prototype solver (see prototypes_cpu.cpp), included twice by it: once for any CPU (GKF_PROTO_AVX2 0) and
// once inside an AVX2 + FMA target region (GKF_PROTO_AVX2 1), where the hand-written AVX2 kernels are added and the
// compiler vectorizes the generic loops with AVX2 too (a baseline-only copy made the r = 4 A pass of E = 10,
// d_in = 3072 take 0.18 ms instead of 0.09 ms). No include guard; include nothing here (see cpu_target.h).

// g (R × R, row-major, float64) += Σ_x col_x col_xᵀ over columns [c0, c1) of a (R rows, row stride ld). With R a
// compile-time constant the accumulators live in registers.
template <typename T, int R>
static void gram_cols_fixed(const T* a, int64_t ld, int64_t c0, int64_t c1, double* g) {
  double acc[R * R] = {};
  for (int64_t x = c0; x < c1; ++x) {
    double v[R];
    for (int i = 0; i < R; ++i) v[i] = static_cast<double>(a[i * ld + x]);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < R; ++j) acc[i * R + j] += v[i] * v[j];
  }
  for (int i = 0; i < R * R; ++i) g[i] += acc[i];
}

// g (R × R) += Σ_y row_y row_yᵀ over rows [y0, y1) of b (rows of R contiguous values).
template <typename T, int R>
static void gram_rows_fixed(const T* b, int64_t y0, int64_t y1, double* g) {
  double acc[R * R] = {};
  for (int64_t y = y0; y < y1; ++y) {
    double v[R];
    for (int i = 0; i < R; ++i) v[i] = static_cast<double>(b[y * R + i]);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < R; ++j) acc[i * R + j] += v[i] * v[j];
  }
  for (int i = 0; i < R * R; ++i) g[i] += acc[i];
}

#if GKF_PROTO_AVX2
// s.. (4 lanes each) = the 2 × 2 tile of dot products of rows (a0, a1) with rows (b0, b1) over w columns (w a multiple
// of 8): two column groups per step, 8 independent FMA chains hide the FMA latency.
static void tile_sums(const double* __restrict a0, const double* __restrict a1, const double* __restrict b0,
                      const double* __restrict b1, int64_t w, double* s00, double* s01, double* s10, double* s11) {
    // two column groups per step: 8 independent FMA chains hide the FMA latency
    __m256d v00 = _mm256_setzero_pd(), v01 = _mm256_setzero_pd();
    __m256d v10 = _mm256_setzero_pd(), v11 = _mm256_setzero_pd();
    __m256d u00 = _mm256_setzero_pd(), u01 = _mm256_setzero_pd();
    __m256d u10 = _mm256_setzero_pd(), u11 = _mm256_setzero_pd();
    for (int64_t c = 0; c < w; c += 8) {
      const __m256d x0 = _mm256_loadu_pd(a0 + c), x1 = _mm256_loadu_pd(a1 + c);
      const __m256d y0 = _mm256_loadu_pd(b0 + c), y1 = _mm256_loadu_pd(b1 + c);
      const __m256d p0 = _mm256_loadu_pd(a0 + c + 4), p1 = _mm256_loadu_pd(a1 + c + 4);
      const __m256d q0 = _mm256_loadu_pd(b0 + c + 4), q1 = _mm256_loadu_pd(b1 + c + 4);
      v00 = _mm256_fmadd_pd(x0, y0, v00);
      v01 = _mm256_fmadd_pd(x0, y1, v01);
      v10 = _mm256_fmadd_pd(x1, y0, v10);
      v11 = _mm256_fmadd_pd(x1, y1, v11);
      u00 = _mm256_fmadd_pd(p0, q0, u00);
      u01 = _mm256_fmadd_pd(p0, q1, u01);
      u10 = _mm256_fmadd_pd(p1, q0, u10);
      u11 = _mm256_fmadd_pd(p1, q1, u11);
    }
    _mm256_store_pd(s00, _mm256_add_pd(v00, u00));
    _mm256_store_pd(s01, _mm256_add_pd(v01, u01));
    _mm256_store_pd(s10, _mm256_add_pd(v10, u10));
    _mm256_store_pd(s11, _mm256_add_pd(v11, u11));
}
#endif  // GKF_PROTO_AVX2

// Any r: G += X Xᵀ for a block X (r rows × w columns, row stride ldx, w a multiple of 8, float64), over 2 × 2 tiles of
// row pairs with 4-lane accumulators (one load per FMA; the compiler vectorizes the lane loops). Row r of an odd r
// reads the zero row `zero`. Writes both triangles.
static void gram_block(const double* x, int r, int64_t ldx, int64_t w, const double* zero, double* g, bool avx2) {
  for (int i = 0; i < r; i += 2) {
    const double* __restrict a0 = x + i * ldx;
    const double* __restrict a1 = i + 1 < r ? x + (i + 1) * ldx : zero;
    for (int j = i; j < r; j += 2) {
      const double* __restrict b0 = x + j * ldx;
      const double* __restrict b1 = j + 1 < r ? x + (j + 1) * ldx : zero;
      alignas(32) double s00[4] = {}, s01[4] = {}, s10[4] = {}, s11[4] = {};
#if GKF_PROTO_AVX2
      if (avx2) {
        tile_sums(a0, a1, b0, b1, w, s00, s01, s10, s11);
      } else
#endif
      {
      for (int64_t c = 0; c < w; c += 4) {
        for (int l = 0; l < 4; ++l) {
          s00[l] += a0[c + l] * b0[c + l];
          s01[l] += a0[c + l] * b1[c + l];
          s10[l] += a1[c + l] * b0[c + l];
          s11[l] += a1[c + l] * b1[c + l];
        }
      }
      }
      const double t00 = (s00[0] + s00[1]) + (s00[2] + s00[3]), t01 = (s01[0] + s01[1]) + (s01[2] + s01[3]);
      const double t10 = (s10[0] + s10[1]) + (s10[2] + s10[3]), t11 = (s11[0] + s11[1]) + (s11[2] + s11[3]);
      auto add = [&](int p, int q, double v) {
        if (p >= r || q >= r) return;
        g[p * r + q] += v;
        if (p != q) g[q * r + p] += v;
      };
      add(i, j, t00);
      add(i, j + 1, t01);
      if (j != i) add(i + 1, j, t10);  // on a diagonal tile t10 is t01 again
      add(i + 1, j + 1, t11);
    }
  }
}

constexpr int64_t kBlock = 256;

// A (r rows, row stride ld): columns [c0, c1) in blocks converted to float64.
template <typename T>
static void gram_cols_generic(const T* a, int64_t ld, int r, int64_t c0, int64_t c1, double* g, bool avx2) {
  std::vector<double> buf(static_cast<size_t>(r) * kBlock + kBlock, 0.0);
  const double* zero = buf.data() + static_cast<size_t>(r) * kBlock;
  for (int64_t x0 = c0; x0 < c1; x0 += kBlock) {
    const int64_t w = std::min(kBlock, c1 - x0), w4 = (w + 7) / 8 * 8;
    for (int i = 0; i < r; ++i) {
      double* dst = buf.data() + i * kBlock;
      const T* src = a + i * ld + x0;
      for (int64_t x = 0; x < w; ++x) dst[x] = static_cast<double>(src[x]);
      for (int64_t x = w; x < w4; ++x) dst[x] = 0.0;
    }
    gram_block(buf.data(), r, kBlock, w4, zero, g, avx2);
  }
}

// B (rows of r contiguous values): rows [y0, y1) in blocks transposed to float64 (r × block).
template <typename T>
static void gram_rows_generic(const T* b, int r, int64_t y0, int64_t y1, double* g, bool avx2) {
  std::vector<double> buf(static_cast<size_t>(r) * kBlock + kBlock, 0.0);
  const double* zero = buf.data() + static_cast<size_t>(r) * kBlock;
  for (int64_t z0 = y0; z0 < y1; z0 += kBlock) {
    const int64_t w = std::min(kBlock, y1 - z0), w4 = (w + 7) / 8 * 8;
    const T* src = b + z0 * r;
    for (int64_t y = 0; y < w; ++y)
      for (int i = 0; i < r; ++i) buf[i * kBlock + y] = static_cast<double>(src[y * r + i]);
    for (int i = 0; i < r; ++i)
      for (int64_t y = w; y < w4; ++y) buf[i * kBlock + y] = 0.0;
    gram_block(buf.data(), r, kBlock, w4, zero, g, avx2);
  }
}

#if GKF_PROTO_AVX2
// r = 4, float32 factors, AVX2 + FMA. A: four columns per step, one float64 vector per row, the 10 row pairs in 10
// vector accumulators (2.5 FMAs per column). B: one row (4 values) per step against itself rotated by 0, 1 and 2
// lanes, which covers all 10 pairs in 3 FMAs.
static inline double hsum(__m256d v) {
  const __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
  const __m128d s = _mm_add_pd(lo, hi);
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

static void gram_a4_avx2(const float* a, int64_t ld, int64_t c0, int64_t c1, double* g) {
  __m256d acc[10];
  for (auto& v : acc) v = _mm256_setzero_pd();
  int64_t x = c0;
  for (; x + 4 <= c1; x += 4) {
    const __m256d r0 = _mm256_cvtps_pd(_mm_loadu_ps(a + x));
    const __m256d r1 = _mm256_cvtps_pd(_mm_loadu_ps(a + ld + x));
    const __m256d r2 = _mm256_cvtps_pd(_mm_loadu_ps(a + 2 * ld + x));
    const __m256d r3 = _mm256_cvtps_pd(_mm_loadu_ps(a + 3 * ld + x));
    acc[0] = _mm256_fmadd_pd(r0, r0, acc[0]);
    acc[1] = _mm256_fmadd_pd(r0, r1, acc[1]);
    acc[2] = _mm256_fmadd_pd(r0, r2, acc[2]);
    acc[3] = _mm256_fmadd_pd(r0, r3, acc[3]);
    acc[4] = _mm256_fmadd_pd(r1, r1, acc[4]);
    acc[5] = _mm256_fmadd_pd(r1, r2, acc[5]);
    acc[6] = _mm256_fmadd_pd(r1, r3, acc[6]);
    acc[7] = _mm256_fmadd_pd(r2, r2, acc[7]);
    acc[8] = _mm256_fmadd_pd(r2, r3, acc[8]);
    acc[9] = _mm256_fmadd_pd(r3, r3, acc[9]);
  }
  int k = 0;
  for (int i = 0; i < 4; ++i)
    for (int j = i; j < 4; ++j, ++k) {
      double s = hsum(acc[k]);
      for (int64_t y = x; y < c1; ++y) s += static_cast<double>(a[i * ld + y]) * static_cast<double>(a[j * ld + y]);
      g[i * 4 + j] += s;
      if (i != j) g[j * 4 + i] += s;
    }
}

static void gram_b4_avx2(const float* b, int64_t y0, int64_t y1, double* g) {
  __m256d d0 = _mm256_setzero_pd(), d1 = _mm256_setzero_pd(), d2 = _mm256_setzero_pd();
  __m256d e0 = _mm256_setzero_pd(), e1 = _mm256_setzero_pd(), e2 = _mm256_setzero_pd();
  __m256d f0 = _mm256_setzero_pd(), f1 = _mm256_setzero_pd(), f2 = _mm256_setzero_pd();
  __m256d h0 = _mm256_setzero_pd(), h1 = _mm256_setzero_pd(), h2 = _mm256_setzero_pd();
  int64_t y = y0;
  for (; y + 4 <= y1; y += 4) {  // four rows per step: 12 independent FMA chains hide the FMA latency
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(b + y * 4));
    const __m256d w = _mm256_cvtps_pd(_mm_loadu_ps(b + y * 4 + 4));
    d0 = _mm256_fmadd_pd(v, v, d0);
    d1 = _mm256_fmadd_pd(v, _mm256_permute4x64_pd(v, 0x39), d1);  // lanes (1,2,3,0)
    d2 = _mm256_fmadd_pd(v, _mm256_permute4x64_pd(v, 0x4E), d2);  // lanes (2,3,0,1)
    e0 = _mm256_fmadd_pd(w, w, e0);
    e1 = _mm256_fmadd_pd(w, _mm256_permute4x64_pd(w, 0x39), e1);
    e2 = _mm256_fmadd_pd(w, _mm256_permute4x64_pd(w, 0x4E), e2);
    const __m256d u = _mm256_cvtps_pd(_mm_loadu_ps(b + y * 4 + 8));
    const __m256d z = _mm256_cvtps_pd(_mm_loadu_ps(b + y * 4 + 12));
    f0 = _mm256_fmadd_pd(u, u, f0);
    f1 = _mm256_fmadd_pd(u, _mm256_permute4x64_pd(u, 0x39), f1);
    f2 = _mm256_fmadd_pd(u, _mm256_permute4x64_pd(u, 0x4E), f2);
    h0 = _mm256_fmadd_pd(z, z, h0);
    h1 = _mm256_fmadd_pd(z, _mm256_permute4x64_pd(z, 0x39), h1);
    h2 = _mm256_fmadd_pd(z, _mm256_permute4x64_pd(z, 0x4E), h2);
  }
  d0 = _mm256_add_pd(d0, f0);
  d1 = _mm256_add_pd(d1, f1);
  d2 = _mm256_add_pd(d2, f2);
  e0 = _mm256_add_pd(e0, h0);
  e1 = _mm256_add_pd(e1, h1);
  e2 = _mm256_add_pd(e2, h2);
  for (; y < y1; ++y) {
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(b + y * 4));
    d0 = _mm256_fmadd_pd(v, v, d0);
    d1 = _mm256_fmadd_pd(v, _mm256_permute4x64_pd(v, 0x39), d1);
    d2 = _mm256_fmadd_pd(v, _mm256_permute4x64_pd(v, 0x4E), d2);
  }
  alignas(32) double s0[4], s1[4], s2[4];
  _mm256_store_pd(s0, _mm256_add_pd(d0, e0));
  _mm256_store_pd(s1, _mm256_add_pd(d1, e1));
  _mm256_store_pd(s2, _mm256_add_pd(d2, e2));
  for (int i = 0; i < 4; ++i) {
    g[i * 4 + i] += s0[i];
    const int j1 = (i + 1) & 3;  // lane i of s1 is b_i b_{i+1}
    g[i * 4 + j1] += s1[i];
    g[j1 * 4 + i] += s1[i];
  }
  // lanes 0,1 of s2 are b0 b2 and b1 b3; lanes 2,3 hold the same sums again
  const double p02 = s2[0], p13 = s2[1];
  g[0 * 4 + 2] += p02;
  g[2 * 4 + 0] += p02;
  g[1 * 4 + 3] += p13;
  g[3 * 4 + 1] += p13;
}

// r = 8, float32 A, AVX2 + FMA. The 36 row pairs need 36 vector accumulators, more than the 16 registers, so each
// block of kA8Block columns (8 rows × 1 KB, L1-resident after the first pass) is swept four times with a register tile
// each: rows 0..3 × 0..3 (10 pairs), rows 4..7 × 4..7 (10 pairs), rows 0..3 × {4, 5} and rows 0..3 × {6, 7} (8 pairs
// each); the 36 accumulators stay in a stack array between blocks. 9 FMAs per column, float64 products and sums.
constexpr int64_t kA8Block = 256;

static inline int pair8(int i, int j) { return i * 8 - i * (i - 1) / 2 + (j - i); }  // i <= j, row-major upper

static inline __m256d cvt4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

static void gram_a8_avx2(const float* a, int64_t ld, int64_t c0, int64_t c1, double* g) {
  __m256d acc[36];
  for (auto& v : acc) v = _mm256_setzero_pd();
  const int64_t end4 = c0 + (c1 - c0) / 4 * 4;
  for (int64_t x0 = c0; x0 < end4; x0 += kA8Block) {
    const int64_t x1 = std::min(end4, x0 + kA8Block);
    for (int o = 0; o < 8; o += 4) {  // diagonal 4 × 4 blocks of G
      const float *a0 = a + o * ld, *a1 = a0 + ld, *a2 = a1 + ld, *a3 = a2 + ld;
      __m256d s00 = acc[pair8(o, o)], s01 = acc[pair8(o, o + 1)], s02 = acc[pair8(o, o + 2)];
      __m256d s03 = acc[pair8(o, o + 3)], s11 = acc[pair8(o + 1, o + 1)], s12 = acc[pair8(o + 1, o + 2)];
      __m256d s13 = acc[pair8(o + 1, o + 3)], s22 = acc[pair8(o + 2, o + 2)], s23 = acc[pair8(o + 2, o + 3)];
      __m256d s33 = acc[pair8(o + 3, o + 3)];
      for (int64_t x = x0; x < x1; x += 4) {
        const __m256d r0 = cvt4(a0 + x), r1 = cvt4(a1 + x), r2 = cvt4(a2 + x), r3 = cvt4(a3 + x);
        s00 = _mm256_fmadd_pd(r0, r0, s00);
        s01 = _mm256_fmadd_pd(r0, r1, s01);
        s02 = _mm256_fmadd_pd(r0, r2, s02);
        s03 = _mm256_fmadd_pd(r0, r3, s03);
        s11 = _mm256_fmadd_pd(r1, r1, s11);
        s12 = _mm256_fmadd_pd(r1, r2, s12);
        s13 = _mm256_fmadd_pd(r1, r3, s13);
        s22 = _mm256_fmadd_pd(r2, r2, s22);
        s23 = _mm256_fmadd_pd(r2, r3, s23);
        s33 = _mm256_fmadd_pd(r3, r3, s33);
      }
      acc[pair8(o, o)] = s00, acc[pair8(o, o + 1)] = s01, acc[pair8(o, o + 2)] = s02, acc[pair8(o, o + 3)] = s03;
      acc[pair8(o + 1, o + 1)] = s11, acc[pair8(o + 1, o + 2)] = s12, acc[pair8(o + 1, o + 3)] = s13;
      acc[pair8(o + 2, o + 2)] = s22, acc[pair8(o + 2, o + 3)] = s23, acc[pair8(o + 3, o + 3)] = s33;
    }
    for (int j = 4; j < 8; j += 2) {  // off-diagonal block: rows 0..3 × rows j, j + 1
      const float *a0 = a, *a1 = a + ld, *a2 = a + 2 * ld, *a3 = a + 3 * ld, *bj = a + j * ld, *bk = bj + ld;
      __m256d t0 = acc[pair8(0, j)], t1 = acc[pair8(1, j)], t2 = acc[pair8(2, j)], t3 = acc[pair8(3, j)];
      __m256d u0 = acc[pair8(0, j + 1)], u1 = acc[pair8(1, j + 1)], u2 = acc[pair8(2, j + 1)];
      __m256d u3 = acc[pair8(3, j + 1)];
      for (int64_t x = x0; x < x1; x += 4) {
        const __m256d r0 = cvt4(a0 + x), r1 = cvt4(a1 + x), r2 = cvt4(a2 + x), r3 = cvt4(a3 + x);
        const __m256d p = cvt4(bj + x), q = cvt4(bk + x);
        t0 = _mm256_fmadd_pd(r0, p, t0);
        t1 = _mm256_fmadd_pd(r1, p, t1);
        t2 = _mm256_fmadd_pd(r2, p, t2);
        t3 = _mm256_fmadd_pd(r3, p, t3);
        u0 = _mm256_fmadd_pd(r0, q, u0);
        u1 = _mm256_fmadd_pd(r1, q, u1);
        u2 = _mm256_fmadd_pd(r2, q, u2);
        u3 = _mm256_fmadd_pd(r3, q, u3);
      }
      acc[pair8(0, j)] = t0, acc[pair8(1, j)] = t1, acc[pair8(2, j)] = t2, acc[pair8(3, j)] = t3;
      acc[pair8(0, j + 1)] = u0, acc[pair8(1, j + 1)] = u1, acc[pair8(2, j + 1)] = u2, acc[pair8(3, j + 1)] = u3;
    }
  }
  for (int i = 0; i < 8; ++i)  // lane sums plus the last (c1 - c0) % 4 columns
    for (int j = i; j < 8; ++j) {
      double s = hsum(acc[pair8(i, j)]);
      for (int64_t y = end4; y < c1; ++y) s += static_cast<double>(a[i * ld + y]) * static_cast<double>(a[j * ld + y]);
      g[i * 8 + j] += s;
      if (i != j) g[j * 8 + i] += s;
    }
}

static inline void add_sym8(double* g, int p, int q, double v) {
  g[p * 8 + q] += v;
  if (p != q) g[q * 8 + p] += v;
}

// r = 8, float32 B, AVX2 + FMA: one row = 8 floats = lo (0..3) and hi (4..7) as float64 vectors; the 36 pairs come
// from lo·rot_k(lo) (k = 0, 1, 2), hi·rot_k(hi) (k = 0, 1, 2) and lo·rot_k(hi) (k = 0..3): 10 FMAs per row.
static void gram_b8_avx2(const float* b, int64_t y0, int64_t y1, double* g) {
  __m256d ll0 = _mm256_setzero_pd(), ll1 = _mm256_setzero_pd(), ll2 = _mm256_setzero_pd();
  __m256d hh0 = _mm256_setzero_pd(), hh1 = _mm256_setzero_pd(), hh2 = _mm256_setzero_pd();
  __m256d lh0 = _mm256_setzero_pd(), lh1 = _mm256_setzero_pd(), lh2 = _mm256_setzero_pd();
  __m256d lh3 = _mm256_setzero_pd();
  for (int64_t y = y0; y < y1; ++y) {
    const __m256 v = _mm256_loadu_ps(b + y * 8);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    ll0 = _mm256_fmadd_pd(lo, lo, ll0);
    ll1 = _mm256_fmadd_pd(lo, _mm256_permute4x64_pd(lo, 0x39), ll1);
    ll2 = _mm256_fmadd_pd(lo, _mm256_permute4x64_pd(lo, 0x4E), ll2);
    hh0 = _mm256_fmadd_pd(hi, hi, hh0);
    hh1 = _mm256_fmadd_pd(hi, _mm256_permute4x64_pd(hi, 0x39), hh1);
    hh2 = _mm256_fmadd_pd(hi, _mm256_permute4x64_pd(hi, 0x4E), hh2);
    lh0 = _mm256_fmadd_pd(lo, hi, lh0);
    lh1 = _mm256_fmadd_pd(lo, _mm256_permute4x64_pd(hi, 0x39), lh1);
    lh2 = _mm256_fmadd_pd(lo, _mm256_permute4x64_pd(hi, 0x4E), lh2);
    lh3 = _mm256_fmadd_pd(lo, _mm256_permute4x64_pd(hi, 0x93), lh3);
  }
  alignas(32) double t[10][4];
  const __m256d all[10] = {ll0, ll1, ll2, hh0, hh1, hh2, lh0, lh1, lh2, lh3};
  for (int k = 0; k < 10; ++k) _mm256_store_pd(t[k], all[k]);
  for (int h = 0; h < 2; ++h) {  // lo block (h = 0) and hi block (h = 1)
    const int o = 4 * h, k0 = 3 * h;
    for (int i = 0; i < 4; ++i) {
      add_sym8(g, o + i, o + i, t[k0][i]);
      add_sym8(g, o + i, o + ((i + 1) & 3), t[k0 + 1][i]);
    }
    add_sym8(g, o + 0, o + 2, t[k0 + 2][0]);  // lanes 2, 3 of rot2 repeat lanes 0, 1
    add_sym8(g, o + 1, o + 3, t[k0 + 2][1]);
  }
  for (int k = 0; k < 4; ++k)
    for (int i = 0; i < 4; ++i) add_sym8(g, i, 4 + ((i + k) & 3), t[6 + k][i]);
}

// The r = 8 float32 pass of combine(): p, Σ p² (4 lanes in s4) and max |p| (4 lanes in m4) in one pass over the eight
// rows (A is still in L2 from the Gram pass). Returns the first column it did not do (the tail is the caller's).
static int64_t combine8(const float* a, int64_t ld, const double* coef, int64_t c0, int64_t c1, double* buf,
                        double* s4, double* m4) {
  int64_t x = c0;
  __m256d k[8];
  for (int i = 0; i < 8; ++i) k[i] = _mm256_set1_pd(coef[i]);
  const __m256d sign = _mm256_set1_pd(-0.0);
  __m256d sv = _mm256_setzero_pd(), mv = _mm256_set1_pd(-1.0);
  for (; x + 4 <= c1; x += 4) {
    __m256d lo = _mm256_mul_pd(k[0], _mm256_cvtps_pd(_mm_loadu_ps(a + x)));
    __m256d hi = _mm256_mul_pd(k[4], _mm256_cvtps_pd(_mm_loadu_ps(a + 4 * ld + x)));
    for (int i = 1; i < 4; ++i) {
      lo = _mm256_fmadd_pd(k[i], _mm256_cvtps_pd(_mm_loadu_ps(a + i * ld + x)), lo);
      hi = _mm256_fmadd_pd(k[4 + i], _mm256_cvtps_pd(_mm_loadu_ps(a + (4 + i) * ld + x)), hi);
    }
    const __m256d v = _mm256_add_pd(lo, hi);
    _mm256_storeu_pd(buf + x, v);
    sv = _mm256_fmadd_pd(v, v, sv);
    mv = _mm256_max_pd(mv, _mm256_andnot_pd(sign, v));
  }
  _mm256_storeu_pd(s4, sv);
  _mm256_storeu_pd(m4, mv);
  return x;
}
#endif  // GKF_PROTO_AVX2

template <typename T>
static void gram_a(const T* a, int64_t ld, int r, int64_t c0, int64_t c1, double* g, bool avx2) {
#if GKF_PROTO_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx2 && r == 4) return gram_a4_avx2(a, ld, c0, c1, g);
    if (avx2 && r == 8) return gram_a8_avx2(a, ld, c0, c1, g);
  }
#endif
  switch (r) {
    case 1: return gram_cols_fixed<T, 1>(a, ld, c0, c1, g);
    case 2: return gram_cols_fixed<T, 2>(a, ld, c0, c1, g);
    case 4: return gram_cols_fixed<T, 4>(a, ld, c0, c1, g);
    default: return gram_cols_generic<T>(a, ld, r, c0, c1, g, avx2);
  }
}

template <typename T>
static void gram_b(const T* b, int r, int64_t y0, int64_t y1, double* g, bool avx2) {
#if GKF_PROTO_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx2 && r == 4) return gram_b4_avx2(b, y0, y1, g);
    if (avx2 && r == 8) return gram_b8_avx2(b, y0, y1, g);
  }
#endif
  switch (r) {
    case 1: return gram_rows_fixed<T, 1>(b, y0, y1, g);
    case 2: return gram_rows_fixed<T, 2>(b, y0, y1, g);
    case 4: return gram_rows_fixed<T, 4>(b, y0, y1, g);
    default: return gram_rows_generic<T>(b, r, y0, y1, g, avx2);
  }
}

// p[c0..c1) = Σ_i coef_i a[i, c0..c1) in float64 into buf; returns Σ p² over the range and the first index of the
// largest |p| in it (through *arg, *best).
static double finish_norm(const double* buf, int64_t x, int64_t c0, int64_t c1, const double* s4, const double* m4,
                          int64_t* arg, double* best);

template <typename T>
static double combine(const T* a, int64_t ld, int r, const double* coef, int64_t c0, int64_t c1, double* buf,
                      int64_t* arg, double* best, bool avx2) {
  double s4[4] = {0.0, 0.0, 0.0, 0.0}, m4[4] = {-1.0, -1.0, -1.0, -1.0};
  int64_t x = c0;
#if GKF_PROTO_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx2 && r == 8) {
      x = combine8(a, ld, coef, c0, c1, buf, s4, m4);
      for (int64_t y = x; y < c1; ++y) {
        double lo = 0.0, hi = 0.0;
        for (int i = 0; i < 4; ++i) {
          lo += coef[i] * static_cast<double>(a[i * ld + y]);
          hi += coef[4 + i] * static_cast<double>(a[(4 + i) * ld + y]);
        }
        buf[y] = lo + hi;
      }
      return finish_norm(buf, x, c0, c1, s4, m4, arg, best);
    }
  }
#endif
  if (r == 4) {  // the common rank: p, Σ p² and max |p| in one pass (four independent lanes, vectorizable)
    const double k0 = coef[0], k1 = coef[1], k2 = coef[2], k3 = coef[3];
    const T *a0 = a, *a1 = a + ld, *a2 = a + 2 * ld, *a3 = a + 3 * ld;
    for (; x + 4 <= c1; x += 4)
      for (int l = 0; l < 4; ++l) {
        const int64_t xl = x + l;
        const double v = (k0 * static_cast<double>(a0[xl]) + k1 * static_cast<double>(a1[xl])) +
                         (k2 * static_cast<double>(a2[xl]) + k3 * static_cast<double>(a3[xl]));
        const double av = v < 0 ? -v : v;
        buf[xl] = v;
        s4[l] += v * v;
        m4[l] = av > m4[l] ? av : m4[l];
      }
    for (int64_t y = x; y < c1; ++y)
      buf[y] = (k0 * static_cast<double>(a0[y]) + k1 * static_cast<double>(a1[y])) +
               (k2 * static_cast<double>(a2[y]) + k3 * static_cast<double>(a3[y]));
    return finish_norm(buf, x, c0, c1, s4, m4, arg, best);
  }
  // rows in groups of four, one pass per group (the first group writes, the others add)
  int i0 = 0;
  for (; i0 + 4 <= r; i0 += 4) {
    const double k0 = coef[i0], k1 = coef[i0 + 1], k2 = coef[i0 + 2], k3 = coef[i0 + 3];
    const T *a0 = a + i0 * ld, *a1 = a0 + ld, *a2 = a1 + ld, *a3 = a2 + ld;
    if (i0 == 0) {
      for (int64_t x = c0; x < c1; ++x)
        buf[x] = (k0 * static_cast<double>(a0[x]) + k1 * static_cast<double>(a1[x])) +
                 (k2 * static_cast<double>(a2[x]) + k3 * static_cast<double>(a3[x]));
    } else {
      for (int64_t x = c0; x < c1; ++x)
        buf[x] += (k0 * static_cast<double>(a0[x]) + k1 * static_cast<double>(a1[x])) +
                  (k2 * static_cast<double>(a2[x]) + k3 * static_cast<double>(a3[x]));
    }
  }
  if (i0 == 0)
    for (int64_t x = c0; x < c1; ++x) buf[x] = 0.0;
  for (int i = i0; i < r; ++i) {
    const double ci = coef[i];
    if (ci == 0.0) continue;
    const T* row = a + i * ld;
    for (int64_t x = c0; x < c1; ++x) buf[x] += ci * static_cast<double>(row[x]);
  }
  // Σ p² and max |p| over four lanes (independent chains, vectorizable), then the first index of the max.
  for (; x + 4 <= c1; x += 4)
    for (int l = 0; l < 4; ++l) {
      const double v = buf[x + l], av = v < 0 ? -v : v;
      s4[l] += v * v;
      m4[l] = av > m4[l] ? av : m4[l];
    }
  return finish_norm(buf, x, c0, c1, s4, m4, arg, best);
}

// Adds the tail [x, c1) to the four-lane sums, then finds the first index of the largest |p|.
static double finish_norm(const double* buf, int64_t x, int64_t c0, int64_t c1, const double* s4, const double* m4,
                          int64_t* arg, double* best) {
  double ss = (s4[0] + s4[1]) + (s4[2] + s4[3]);
  double bv = std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
  for (; x < c1; ++x) {
    ss += buf[x] * buf[x];
    bv = std::max(bv, std::fabs(buf[x]));
  }
  int64_t bi = c0;
  while (bi < c1 && std::fabs(buf[bi]) != bv) ++bi;
  *arg = bi < c1 ? bi : c0;
  *best = bv;
  return ss;
}

template <typename OutT>
static void write_out(const double* buf, int64_t n, double mult, OutT* out) {
  for (int64_t x = 0; x < n; ++x) out[x] = static_cast<OutT>(buf[x] * mult);
}


// One expert; `split` parallelises its passes over d_in / d_out (used when there are fewer experts than threads).
template <typename T, typename OutT>
static int solve_one(const Problem& pr, bool split, std::vector<double>& scratch) {
  const int r = pr.r;
  const bool avx2 = pr.avx2;
  const int64_t d_in = pr.d_in, d_out = pr.d_out;
  const T* a = static_cast<const T*>(pr.a);
  const T* b = static_cast<const T*>(pr.b);
  OutT* out = static_cast<OutT*>(pr.out);
  const size_t rr = static_cast<size_t>(r) * r;
  // Only the Gram accumulators need zeros: coef is cleared by solve_coefficients, buf written before it is read.
  if (scratch.size() < 4 * rr + r + d_in) scratch.resize(4 * rr + r + d_in);
  std::fill(scratch.begin(), scratch.begin() + 2 * rr, 0.0);
  double* ga = scratch.data();
  double* gb = ga + rr;
  double* work = gb + rr;
  double* coef = work + 2 * rr;
  double* buf = coef + r;

  if (!split) {
    gram_a<T>(a, d_in, r, 0, d_in, ga, avx2);
    gram_b<T>(b, r, 0, d_out, gb, avx2);
  } else {
    // Fixed chunking (independent of the thread count), partial sums added in chunk order.
    const int64_t n_chunks = 16;
    std::vector<double> part(2 * n_chunks * rr, 0.0);
    at::parallel_for(0, 2 * n_chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        double* g = part.data() + k * rr;
        if (k < n_chunks) {
          const int64_t step = (d_in + n_chunks - 1) / n_chunks, c0 = std::min(d_in, k * step);
          gram_a<T>(a, d_in, r, c0, std::min(d_in, c0 + step), g, avx2);
        } else {
          const int64_t kk = k - n_chunks, step = (d_out + n_chunks - 1) / n_chunks, y0 = std::min(d_out, kk * step);
          gram_b<T>(b, r, y0, std::min(d_out, y0 + step), g, avx2);
        }
      }
    });
    for (int64_t k = 0; k < n_chunks; ++k)
      for (size_t i = 0; i < rr; ++i) {
        ga[i] += part[k * rr + i];
        gb[i] += part[(n_chunks + k) * rr + i];
      }
  }
  int bad = kOk;
  for (size_t i = 0; i < rr; ++i) {
    if (!std::isfinite(ga[i])) bad |= kBadA;
    if (!std::isfinite(gb[i])) bad |= kBadB;
  }
  if (bad != kOk) return bad;

  // r = 4 and r = 8: the eigen solves with n fixed at compile time and the round-robin Jacobi order.
  const bool nonzero = r == 8   ? gkf_proto::solve_coefficients<8>(ga, gb, r, coef, work)
                       : r == 4 ? gkf_proto::solve_coefficients<4>(ga, gb, r, coef, work)
                                : gkf_proto::solve_coefficients(ga, gb, r, coef, work);
  *pr.zero = !nonzero;
  if (!nonzero) {
    for (int64_t x = 0; x < d_in; ++x) out[x] = OutT(0);
    return kOk;
  }
  double ss = 0.0, best = -1.0;
  int64_t arg = 0;
  if (!split) {
    ss = combine<T>(a, d_in, r, coef, 0, d_in, buf, &arg, &best, avx2);
  } else {
    const int64_t n_chunks = 16, step = (d_in + n_chunks - 1) / n_chunks;
    std::vector<double> ssk(n_chunks, 0.0), bestk(n_chunks, -1.0);
    std::vector<int64_t> argk(n_chunks, 0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t c0 = std::min(d_in, k * step), c1 = std::min(d_in, c0 + step);
        if (c0 < c1) ssk[k] = combine<T>(a, d_in, r, coef, c0, c1, buf, &argk[k], &bestk[k], avx2);
      }
    });
    for (int64_t k = 0; k < n_chunks; ++k) {
      ss += ssk[k];
      if (bestk[k] > best) {
        best = bestk[k];
        arg = argk[k];
      }
    }
  }
  const double norm = std::sqrt(ss);
  if (!(norm > 0.0)) {
    *pr.zero = true;
    for (int64_t x = 0; x < d_in; ++x) out[x] = OutT(0);
    return kOk;
  }
  const double mult = (buf[arg] < 0 ? -1.0 : 1.0) / norm;
  write_out<OutT>(buf, d_in, mult, out);
  return kOk;
}

// Solves every problem; returns kOk or the first failing pair's mask (and its index through *bad_pair).
template <typename T, typename OutT>
static int solve_all(const std::vector<Problem>& problems, int* bad_pair) {
  const int64_t n = static_cast<int64_t>(problems.size());
  std::vector<int> status(n, kOk);
  const int64_t threads = at::get_num_threads();
  if (n >= 2 * threads || threads == 1) {
    // Dynamic schedule: problems differ in size (d_in, d_out, r), so each worker takes the next one from a counter
    // rather than a fixed contiguous range.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      std::vector<double> scratch;
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1))
        status[i] = solve_one<T, OutT>(problems[i], false, scratch);
    });
  } else {
    std::vector<double> scratch;
    for (int64_t i = 0; i < n; ++i)
      status[i] = solve_one<T, OutT>(problems[i], true, scratch);
  }
  for (int64_t i = 0; i < n; ++i)
    if (status[i] != kOk) {
      const int pair = problems[i].pair;
      int mask = 0;
      for (int64_t j = i; j < n && problems[j].pair == pair; ++j) mask |= status[j];
      *bad_pair = pair;
      return mask;
    }
  return kOk;
}

