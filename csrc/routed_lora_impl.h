// The routed-LoRA kernels, written once against a vector-operations struct O (cpu_vec.h) and instantiated per ISA by
// routed_lora_isa_*.cpp inside that ISA's target region and namespace. Every sum is in float32 registers: elements of
// x, A, Bᵀ and y are converted on load (bfloat16 / float16 → float32 is exact), products and sums are float32 FMAs,
// and y gets one rounding per element, y + Σ (the delta summed first).
//
// Needs: <cstdint>, <cstring>, <cmath>, <type_traits>, routed_lora_kernels.h (outside the region), cpu_vec.h (inside).

template <class O, typename T>
static typename O::V load_part(const T* p, int64_t n) {
  float tmp[O::W];
  for (int64_t i = 0; i < O::W; ++i) tmp[i] = i < n ? to_f32(p[i]) : 0.f;
  return O::load(tmp);
}

template <class O, typename T>
static void store_part(T* p, typename O::V a, int64_t n) {
  float tmp[O::W];
  O::store(tmp, a);
  for (int64_t i = 0; i < n; ++i) from_f32(tmp[i], p + i);
}

// out[q] = Σ_i x[i] · rows[q][i] for q < n (n <= 4). The x loads are shared by the n rows; 4 rows × 2 accumulators
// are 8 independent FMA chains, enough to hide the FMA latency (4 cycles × 2 ports).
template <class O, typename TX, typename TR>
static void dot_rows(const TX* x, const TR* const* rows, int n, int64_t d, float* out) {
  using V = typename O::V;
  constexpr int W = O::W;
  V acc0[4], acc1[4];
  for (int q = 0; q < 4; ++q) acc0[q] = acc1[q] = O::zero();
  int64_t i = 0;
  if (n == 4) {
    for (; i + 2 * W <= d; i += 2 * W) {
      const V x0 = O::load(x + i), x1 = O::load(x + i + W);
      for (int q = 0; q < 4; ++q) {
        acc0[q] = O::fma(x0, O::load(rows[q] + i), acc0[q]);
        acc1[q] = O::fma(x1, O::load(rows[q] + i + W), acc1[q]);
      }
    }
  } else {
    for (; i + 2 * W <= d; i += 2 * W) {
      const V x0 = O::load(x + i), x1 = O::load(x + i + W);
      for (int q = 0; q < n; ++q) {
        acc0[q] = O::fma(x0, O::load(rows[q] + i), acc0[q]);
        acc1[q] = O::fma(x1, O::load(rows[q] + i + W), acc1[q]);
      }
    }
  }
  if (i + W <= d) {
    const V x0 = O::load(x + i);
    for (int q = 0; q < n; ++q) acc0[q] = O::fma(x0, O::load(rows[q] + i), acc0[q]);
    i += W;
  }
  if (i < d) {
    const V x0 = load_part<O>(x + i, d - i);
    for (int q = 0; q < n; ++q) acc1[q] = O::fma(x0, load_part<O>(rows[q] + i, d - i), acc1[q]);
  }
  for (int q = 0; q < n; ++q) out[q] = O::hsum(O::add(acc0[q], acc1[q]));
}

// The shrink's dot products: x and rows in the model dtype T. Where the ISA has a bfloat16 dot-product instruction
// (O::kBf16Dot) and T is bfloat16, O::dot_rows_bf16 uses it: the products of two bfloat16 values are exact in float32
// either way, only the order of the float32 additions differs. The routing scores never take this path (prototypes
// are float32).
template <class O, typename T>
static void shrink_dot(const T* x, const T* const* rows, int n, int64_t d, float* out) {
  if constexpr (O::kBf16Dot && std::is_same_v<T, Bf16>) {
    O::dot_rows_bf16(x, rows, n, d, out);
  } else {
    dot_rows<O, T, T>(x, rows, n, d, out);
  }
}

// Streaming top-k of one token's logits, fed in expert order: slots sorted by decreasing logit; a new logit enters
// only when strictly larger, so on ties the lower expert index (fed first) stays ahead. NaN never enters; slots left
// empty at the end take the lowest free indices.
struct TopK {
  int32_t* idx;
  float* val;
  int64_t k, filled = 0;

  inline void push(int32_t e, float v) {
    if (filled == k && !(v > val[k - 1])) return;
    if (!(v == v)) return;
    int64_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > val[pos - 1]) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = e;
  }

  // Fill empty slots (only NaN logits left) and turn the k logits into softmax(logit / temperature), in float64.
  inline void finish(int64_t e, double temperature) {
    for (int32_t j = 0; filled < k && j < e; ++j) {
      bool taken = false;
      for (int64_t s = 0; s < filled; ++s) taken = taken || idx[s] == j;
      if (!taken) {
        idx[filled] = j;
        val[filled++] = std::numeric_limits<float>::quiet_NaN();
      }
    }
    const double top = val[0];
    double sum = 0.0;
    double ex[64];
    for (int64_t j = 0; j < k; ++j) {
      const double v = std::exp((static_cast<double>(val[j]) - top) / temperature);
      if (j < 64) ex[j] = v;
      sum += v;
    }
    for (int64_t j = 0; j < k; ++j) {
      const double v = j < 64 ? ex[j] : std::exp((static_cast<double>(val[j]) - top) / temperature);
      val[j] = static_cast<float>(v / sum);
    }
  }
};

template <class O, typename T>
static void route_t(const Problem& p, const float* scores, int64_t t0, int64_t t1, bool shrink) {
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  const int64_t e = p.e, d = p.d_in, k = p.k, r = p.r, kr = k * r;
  for (int64_t i = t0; i < t1; ++i) {
    const T* xi = x + i * d;
    TopK top{p.idx + i * k, p.w + i * k, k};
    if (scores != nullptr) {
      const float* si = scores + i * e;
      for (int64_t j = 0; j < e; ++j) top.push(static_cast<int32_t>(j), std::fabs(si[j]));
    } else {
      for (int64_t j = 0; j < e; j += 4) {
        const int n = static_cast<int>(e - j < 4 ? e - j : 4);
        const float* rows[4];
        float s[4];
        for (int q = 0; q < n; ++q) rows[q] = p.proto + (j + q) * d;
        dot_rows<O, T, float>(xi, rows, n, d, s);
        for (int q = 0; q < n; ++q) top.push(static_cast<int32_t>(j + q), std::fabs(s[q]));
      }
    }
    top.finish(e, p.temperature);
    if (!shrink) continue;
    const int32_t* id = p.idx + i * k;
    float* hi = p.h + i * kr;
    for (int64_t q0 = 0; q0 < kr; q0 += 4) {
      const int n = static_cast<int>(kr - q0 < 4 ? kr - q0 : 4);
      const T* rows[4];
      for (int q = 0; q < n; ++q) {
        const int64_t s = q0 + q;
        rows[q] = a + (static_cast<int64_t>(id[s / r]) * r + s % r) * d;
      }
      shrink_dot<O, T>(xi, rows, n, d, hi + q0);
    }
  }
}

template <class O, typename T>
static void scores_t(const Problem& p, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out, int64_t ld_out) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t d = p.d_in;
  for (int64_t i = t0; i < t1; ++i)
    for (int64_t j = e0; j < e1; j += 4) {
      const int n = static_cast<int>(e1 - j < 4 ? e1 - j : 4);
      const float* rows[4];
      for (int q = 0; q < n; ++q) rows[q] = p.proto + (j + q) * d;
      dot_rows<O, T, float>(x + i * d, rows, n, d, out + (i - t0) * ld_out + (j - e0));
    }
}

template <class O, typename T>
static void shrink_pairs_t(const Problem& p, const int32_t* pairs, int64_t n_pairs, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  const int64_t d = p.d_in, r = p.r, k = p.k;
  for (int64_t u = 0; u < n_pairs; ++u) {
    const int64_t pair = pairs[u], i = pair / k;
    const T* base = a + static_cast<int64_t>(p.idx[pair]) * r * d;
    for (int64_t c = r0; c < r1; c += 4) {
      const int n = static_cast<int>(r1 - c < 4 ? r1 - c : 4);
      const T* rows[4];
      for (int q = 0; q < n; ++q) rows[q] = base + (c + q) * d;
      shrink_dot<O, T>(x + i * d, rows, n, d, p.h + pair * r + c);
    }
  }
}

// y[0..w) = y + Σ_{j<k, c<r} coef[j·r + c] · b[(idx[j]·r + c)·ld + 0..w). A block of 4 vectors of y stays in
// registers across all k·r rows, so each FMA costs one load (the Bᵀ element), and y is read and written once.
template <class O, typename TB>
static void axpy_tile(TB* y, const TB* b, int64_t ld, const int32_t* idx, int64_t k, int64_t r, const float* coef,
                      int64_t w) {
  using V = typename O::V;
  constexpr int W = O::W;
  int64_t q = 0;
  for (; q + 4 * W <= w; q += 4 * W) {
    V a0 = O::zero(), a1 = O::zero(), a2 = O::zero(), a3 = O::zero();
    for (int64_t j = 0; j < k; ++j) {
      const TB* base = b + static_cast<int64_t>(idx[j]) * r * ld + q;
      for (int64_t c = 0; c < r; ++c) {
        const V cf = O::set1(coef[j * r + c]);
        const TB* row = base + c * ld;
        a0 = O::fma(cf, O::load(row), a0);
        a1 = O::fma(cf, O::load(row + W), a1);
        a2 = O::fma(cf, O::load(row + 2 * W), a2);
        a3 = O::fma(cf, O::load(row + 3 * W), a3);
      }
    }
    O::store(y + q, O::add(a0, O::load(y + q)));
    O::store(y + q + W, O::add(a1, O::load(y + q + W)));
    O::store(y + q + 2 * W, O::add(a2, O::load(y + q + 2 * W)));
    O::store(y + q + 3 * W, O::add(a3, O::load(y + q + 3 * W)));
  }
  for (; q < w; q += W) {
    const int64_t n = w - q < W ? w - q : W;
    V a0 = O::zero();
    for (int64_t j = 0; j < k; ++j) {
      const TB* base = b + static_cast<int64_t>(idx[j]) * r * ld + q;
      for (int64_t c = 0; c < r; ++c) {
        const V cf = O::set1(coef[j * r + c]);
        a0 = O::fma(cf, n == W ? O::load(base + c * ld) : load_part<O>(base + c * ld, n), a0);
      }
    }
    if (n == W) {
      O::store(y + q, O::add(a0, O::load(y + q)));
    } else {
      store_part<O>(y + q, O::add(a0, load_part<O>(y + q, n)), n);
    }
  }
}

template <class O, typename T>
static void expand_t(const Problem& p, int64_t i0, int64_t i1, int64_t c0, int64_t c1, int64_t tile) {
  T* y = static_cast<T*>(p.y);
  const T* b = static_cast<const T*>(p.b);
  const int64_t k = p.k, r = p.r, kr = k * r, d_out = p.d_out;
  for (int64_t c = c0; c < c1; c += tile) {
    const int64_t w = c1 - c < tile ? c1 - c : tile;
    for (int64_t i = i0; i < i1; ++i) {
      // Prefetch the next token's y segment: another row, which the hardware prefetcher does not guess
      // (fp32, T = 512, E = 64, r = 8, d_out = 3072: expand 2.8 → 1.8 ms).
      if (i + 1 < i1) {
        const char* nxt = reinterpret_cast<const char*>(y + (i + 1) * d_out + c);
        for (int64_t off = 0; off < w * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(nxt + off, 1, 3);
      }
      axpy_tile<O, T>(y + i * d_out + c, b + c, p.ld_b, p.idx + i * k, k, r, p.g + i * kr, w);
    }
  }
}

// delta[i, 0..w) += Σ_c coef[c] · rows[c][0..w) for one (token, slot) pair: 4 vectors of delta in registers across
// the r rows of the expert's Bᵀ chunk (which stays in L1 for all the pairs of that expert).
template <class O, typename TB>
static void axpy_delta(float* delta, const TB* b, int64_t ld, int64_t r, const float* coef, int64_t w) {
  using V = typename O::V;
  constexpr int W = O::W;
  int64_t q = 0;
  for (; q + 4 * W <= w; q += 4 * W) {
    V a0 = O::load(delta + q), a1 = O::load(delta + q + W), a2 = O::load(delta + q + 2 * W);
    V a3 = O::load(delta + q + 3 * W);
    for (int64_t c = 0; c < r; ++c) {
      const V cf = O::set1(coef[c]);
      const TB* row = b + c * ld + q;
      a0 = O::fma(cf, O::load(row), a0);
      a1 = O::fma(cf, O::load(row + W), a1);
      a2 = O::fma(cf, O::load(row + 2 * W), a2);
      a3 = O::fma(cf, O::load(row + 3 * W), a3);
    }
    O::store(delta + q, a0);
    O::store(delta + q + W, a1);
    O::store(delta + q + 2 * W, a2);
    O::store(delta + q + 3 * W, a3);
  }
  for (; q < w; q += W) {
    const int64_t n = w - q < W ? w - q : W;
    V a0 = n == W ? O::load(delta + q) : load_part<O>(delta + q, n);
    for (int64_t c = 0; c < r; ++c)
      a0 = O::fma(O::set1(coef[c]), n == W ? O::load(b + c * ld + q) : load_part<O>(b + c * ld + q, n), a0);
    if (n == W) {
      O::store(delta + q, a0);
    } else {
      store_part<O>(delta + q, a0, n);
    }
  }
}

// Expand grouped by expert for the columns [c0, c1) of y: the (token, slot) pairs sorted by expert, each expert's Bᵀ
// chunk read once for all its pairs, the sums in delta (T × (c1 - c0) float32), then y = y + delta (one rounding).
template <class O, typename T>
static void expand_pairs_t(const Problem& p, const int32_t* pairs, int64_t n_pairs, int64_t c0, int64_t c1,
                           float* delta) {
  using V = typename O::V;
  constexpr int W = O::W;
  T* y = static_cast<T*>(p.y);
  const T* b = static_cast<const T*>(p.b);
  const int64_t w = c1 - c0, k = p.k, r = p.r;
  std::memset(delta, 0, sizeof(float) * p.t * w);
  int64_t next = 0;  // first pair of the next expert
  for (int64_t u = 0; u < n_pairs; ++u) {
    const int64_t pair = pairs[u];
    const int32_t ex = p.idx[pair];
    if (u == next) {
      // A new expert: prefetch the next one's Bᵀ chunk (r rows of w columns, `ld_b` apart: short strided runs the
      // hardware prefetcher does not follow).
      while (next < n_pairs && p.idx[pairs[next]] == ex) ++next;
      if (next < n_pairs) {
        const char* nb = reinterpret_cast<const char*>(b + static_cast<int64_t>(p.idx[pairs[next]]) * r * p.ld_b + c0);
        for (int64_t c = 0; c < r; ++c)
          for (int64_t off = 0; off < w * static_cast<int64_t>(sizeof(T)); off += 64)
            __builtin_prefetch(nb + c * p.ld_b * static_cast<int64_t>(sizeof(T)) + off, 0, 2);
      }
    }
    const T* rows = b + static_cast<int64_t>(ex) * r * p.ld_b + c0;
    axpy_delta<O, T>(delta + (pair / k) * w, rows, p.ld_b, r, p.g + pair * r, w);
  }
  for (int64_t i = 0; i < p.t; ++i) {
    T* yi = y + i * p.d_out + c0;
    const float* di = delta + i * w;
    int64_t q = 0;
    for (; q + W <= w; q += W) O::store(yi + q, O::add(O::load(di + q), O::load(yi + q)));
    if (q < w) store_part<O>(yi + q, O::add(load_part<O>(di + q, w - q), load_part<O>(yi + q, w - q)), w - q);
  }
}

// ------------------------------------------------------------------------------------------------ dtype dispatch

template <class O>
struct KernelsOf {
  static void scores(const Problem& p, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out, int64_t ld) {
    switch (p.dtype) {
      case DType::kF32: return scores_t<O, float>(p, t0, t1, e0, e1, out, ld);
      case DType::kBF16: return scores_t<O, Bf16>(p, t0, t1, e0, e1, out, ld);
      case DType::kF16: return scores_t<O, F16>(p, t0, t1, e0, e1, out, ld);
    }
  }
  static void route(const Problem& p, const float* scores, int64_t t0, int64_t t1, bool shrink) {
    switch (p.dtype) {
      case DType::kF32: return route_t<O, float>(p, scores, t0, t1, shrink);
      case DType::kBF16: return route_t<O, Bf16>(p, scores, t0, t1, shrink);
      case DType::kF16: return route_t<O, F16>(p, scores, t0, t1, shrink);
    }
  }
  static void shrink_pairs(const Problem& p, const int32_t* pairs, int64_t n, int64_t r0, int64_t r1) {
    switch (p.dtype) {
      case DType::kF32: return shrink_pairs_t<O, float>(p, pairs, n, r0, r1);
      case DType::kBF16: return shrink_pairs_t<O, Bf16>(p, pairs, n, r0, r1);
      case DType::kF16: return shrink_pairs_t<O, F16>(p, pairs, n, r0, r1);
    }
  }
  static void expand(const Problem& p, int64_t i0, int64_t i1, int64_t c0, int64_t c1, int64_t tile) {
    switch (p.dtype) {
      case DType::kF32: return expand_t<O, float>(p, i0, i1, c0, c1, tile);
      case DType::kBF16: return expand_t<O, Bf16>(p, i0, i1, c0, c1, tile);
      case DType::kF16: return expand_t<O, F16>(p, i0, i1, c0, c1, tile);
    }
  }
  static void expand_pairs(const Problem& p, const int32_t* pairs, int64_t n, int64_t c0, int64_t c1, float* delta) {
    switch (p.dtype) {
      case DType::kF32: return expand_pairs_t<O, float>(p, pairs, n, c0, c1, delta);
      case DType::kBF16: return expand_pairs_t<O, Bf16>(p, pairs, n, c0, c1, delta);
      case DType::kF16: return expand_pairs_t<O, F16>(p, pairs, n, c0, c1, delta);
    }
  }
  static const Kernels& table() {
    static const Kernels k{&scores, &route, &shrink_pairs, &expand, &expand_pairs};
    return k;
  }
};
