// The routed-LoRA kernels, written once against a vector-operations struct O (cpu_vec.h) and instantiated per ISA by
// routed_lora_isa_*.cpp inside that ISA's target region and namespace. Every sum is in float32 registers: elements of
// x, A, Bᵀ and y are converted on load (bfloat16 / float16 → float32 is exact), products and sums are float32 (FMAs,
// or vdpbf16ps for the bfloat16 shrink: the product of two bfloat16 values is exact in float32 either way, only the
// order of the float32 additions differs), and y gets one rounding per element, y + Σ (the delta summed first). The
// routing scores are float32 sums against the float32 prototypes.
//
// Needs: <algorithm>, <cstdint>, <cstring>, <cmath>, <limits>, <type_traits>, <vector>, routed_lora_kernels.h (outside
// the region), cpu_vec.h (inside).

// out[m·4 + n] = Σ_i xs[m][i] · rs[n][i] for m < M, n < 4: M x rows against 4 rows, over d elements. Each x load
// serves 4 rows and each row load M tokens (M·4 independent FMA chains).
template <class O, int M, typename TX, typename TR>
static void dot_tile(const TX* const* xs, const TR* const* rs, int64_t d, float* out) {
  if constexpr (O::kBf16Dot && std::is_same_v<TX, Bf16> && std::is_same_v<TR, Bf16>) {
    O::template dot_tile_bf16<M>(xs, rs, d, out);
  } else {
    using V = typename O::V;
    constexpr int W = O::W;
    V acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < 4; ++n) acc[m][n] = O::zero();
    int64_t i = 0;
    for (; i + W <= d; i += W) {
      V xv[M];
      for (int m = 0; m < M; ++m) xv[m] = O::load(xs[m] + i);
      for (int n = 0; n < 4; ++n) {
        const V rv = O::load(rs[n] + i);
        for (int m = 0; m < M; ++m) acc[m][n] = O::fma(xv[m], rv, acc[m][n]);
      }
    }
    if (i < d) {
      V xv[M];
      for (int m = 0; m < M; ++m) xv[m] = O::load_part(xs[m] + i, d - i);
      for (int n = 0; n < 4; ++n) {
        const V rv = O::load_part(rs[n] + i, d - i);
        for (int m = 0; m < M; ++m) acc[m][n] = O::fma(xv[m], rv, acc[m][n]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < 4; ++n) out[m * 4 + n] = O::hsum(acc[m][n]);
  }
}

// dot_tile for 1 <= m <= O::kDotM x rows (out holds m·4 values).
template <class O, typename TX, typename TR>
static void dot_tiles(const TX* const* xs, int m, const TR* const* rs, int64_t d, float* out) {
  static_assert(O::kDotM == 2 || O::kDotM == 4, "dot tiles of 2 or 4 tokens");
  switch (m) {
    case 1: return dot_tile<O, 1>(xs, rs, d, out);
    case 2: return dot_tile<O, 2>(xs, rs, d, out);
    case 3: if constexpr (O::kDotM >= 3) return dot_tile<O, 3>(xs, rs, d, out); break;
    case 4: if constexpr (O::kDotM >= 4) return dot_tile<O, 4>(xs, rs, d, out); break;
  }
}

// Brings `bytes` at p towards L2 (software prefetch, one instruction per 64-byte line): data that the next steps
// read once from memory, in runs that the hardware prefetcher does not predict (rows of the experts a token chose).
static inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// Decode calls (a few tokens) read each byte of the prototypes and of the chosen experts once, usually from memory
// (a model streams all its weights between two calls of one layer). They keep about this many bytes of each stream
// in flight ahead of the arithmetic: the prototypes, and the Bᵀ rows the expand walks column by column.
constexpr int64_t kDecodeAheadBytes = int64_t(256) << 10;

// Columns of the k·r Bᵀ rows a decode expand keeps in flight ahead of the tile it works on.
template <typename T>
static inline int64_t decode_cols_ahead(const Problem& p) {
  const int64_t cols = kDecodeAheadBytes / (p.k * p.r * static_cast<int64_t>(sizeof(T)));
  return cols < 64 ? 64 : cols;
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

// Scores of tokens [t0, t1) against experts [e0, e1) of the prototype rows `proto` (float32, or the bfloat16 copy of
// screened routing): tiles of kDotM tokens × 4 experts, token tiles outer (the tile's x rows stay in L1 while the
// range's prototype rows come from L2). x rows of another type than the rows are converted once per tile into `xf`
// (kDotM rows): exactly to float32, or rounded to nearest even to bfloat16 (then products of two bfloat16 values,
// through vdpbf16ps where the ISA has it: half the bytes and twice the products per instruction of float32 rows). A
// tile past e1 repeats the last row; its extra outputs are dropped.
template <class O, typename T, typename R>
static void scores_rows(const Problem& p, const R* proto, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out,
                        int64_t ld_out, float* xf) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t d = p.d_in, row = d * static_cast<int64_t>(sizeof(R));
  constexpr int M = O::kDotM;
  float s[M * 4];
  R* xr = reinterpret_cast<R*>(xf);
  // A decode call keeps kDecodeAheadBytes of prototype rows in flight ahead of its tiles.
  const int64_t ahead = p.t <= kDecodeMaxT ? kDecodeAheadBytes / row : 0;
  if (ahead > 0) prefetch_l2(proto + e0 * d, (e1 - e0 < ahead ? e1 - e0 : ahead) * row);
  for (int64_t i = t0; i < t1; i += M) {
    const int m = static_cast<int>(t1 - i < M ? t1 - i : M);
    const R* xs[M];
    for (int q = 0; q < m; ++q) {
      if constexpr (std::is_same_v<T, R>) {
        xs[q] = x + (i + q) * d;
      } else {
        R* dst = xr + q * d;
        const T* src = x + (i + q) * d;
        int64_t c = 0;
        for (; c + O::W <= d; c += O::W) O::store(dst + c, O::load(src + c));
        if (c < d) O::store_part(dst + c, O::load_part(src + c, d - c), d - c);
        xs[q] = dst;
      }
    }
    for (int64_t j = e0; j < e1; j += 4) {
      if (ahead > 0 && j + ahead < e1)
        prefetch_l2(proto + (j + ahead) * d, (e1 - j - ahead < 4 ? e1 - j - ahead : 4) * row);
      const R* rs[4];
      for (int q = 0; q < 4; ++q) rs[q] = proto + (j + q < e1 ? j + q : e1 - 1) * d;
      dot_tiles<O>(xs, m, rs, d, s);
      const int64_t n = e1 - j < 4 ? e1 - j : 4;
      for (int q = 0; q < m; ++q)
        for (int64_t c = 0; c < n; ++c) out[(i + q - t0) * ld_out + (j + c - e0)] = s[q * 4 + c];
    }
  }
}

// Float32 scores of x against the prototype rows `ids[0..n)` (in increasing order), fed to `top`: the dot products of
// the unscreened in-pass routing (dot_tiles over float32 rows; a product's value does not depend on its tile).
template <class O, typename T>
static void exact_scores(const Problem& p, const T* xi, const int32_t* ids, int64_t n, TopK& top) {
  const int64_t d = p.d_in;
  float s[4];
  for (int64_t u = 0; u < n; u += 4) {
    const int64_t m = n - u < 4 ? n - u : 4;
    const float* rs[4];
    for (int q = 0; q < 4; ++q) rs[q] = p.proto + static_cast<int64_t>(ids[u + (q < m ? q : m - 1)]) * d;
    dot_tiles<O>(&xi, 1, rs, d, s);
    for (int64_t q = 0; q < m; ++q) top.push(ids[u + q], std::fabs(s[q]));
  }
}

// Top-k of one token from its screened scores si (scores_rows over the bfloat16 copy): the k experts of the largest
// screened logits, with their float32 scores (the k dot products of the unscreened path) for the softmax, so the
// weights are those of the float32 scores. A screened score is within tau = (2⁻⁸ + u_x + 2γ)·‖x‖₂ of the float32 one (the rounding of the
// prototypes, and of x unless it is bfloat16, to bfloat16, and of both sums; cpu_kernel.screen_error_bound), so where
// the float32 logits of the k-th and next experts differ by more than 2·tau the experts are those of the float32
// scores. A token whose screened logits are NaN or Inf is scored against every prototype in float32.
template <class O, typename T>
static void select_screened(const Problem& p, const T* xi, const float* si, TopK& top) {
  const int64_t e = p.e, k = p.k;
  for (int64_t j = 0; j < e; ++j) top.push(static_cast<int32_t>(j), std::fabs(si[j]));
  int32_t ids[64];
  static thread_local std::vector<int32_t> all;
  const int32_t* chosen = ids;
  int64_t n = k;
  if (top.filled == k && std::isfinite(top.val[0]) && k <= 64) {
    for (int64_t j = 0; j < k; ++j) ids[j] = top.idx[j];
    std::sort(ids, ids + k);  // fed in expert order: ties between exact logits go to the lower index
  } else {
    if (all.size() < static_cast<size_t>(e)) all.resize(e);
    for (int64_t j = 0; j < e; ++j) all[j] = static_cast<int32_t>(j);
    chosen = all.data(), n = e;
  }
  top.filled = 0;
  exact_scores<O>(p, xi, chosen, n, top);
}

// For tokens [t0, t1): routing (scores given or computed here), then, when `shrink`, h = A_idx x. With `p.t` small
// (a decode call), the rows the token chose are fetched from memory while the routing of the next token runs: right
// after its top-k, the token's A rows and (up to an L2-sized budget) its Bᵀ rows are prefetched.
template <class O, typename T>
static void route_t(const Problem& p, const float* scores, int64_t t0, int64_t t1, bool shrink) {
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int64_t e = p.e, d = p.d_in, k = p.k, r = p.r, kr = k * r;
  const bool prefetch = p.t <= kDecodeMaxT;
  const int64_t esz = static_cast<int64_t>(sizeof(T));
  for (int64_t i = t0; i < t1; ++i) {
    const T* xi = x + i * d;
    TopK top{p.idx + i * k, p.w + i * k, k};
    if (scores != nullptr && p.proto_screen != nullptr) {
      select_screened<O>(p, xi, scores + i * e, top);
    } else if (scores != nullptr) {
      const float* si = scores + i * e;
      for (int64_t j = 0; j < e; ++j) top.push(static_cast<int32_t>(j), std::fabs(si[j]));
    } else {
      float s[4];
      const int64_t ahead = prefetch && i == t0 ? kDecodeAheadBytes / (d * 4) : 0;  // prototype rows in flight
      if (ahead > 0) prefetch_l2(p.proto, (e < ahead ? e : ahead) * d * 4);
      for (int64_t j = 0; j < e; j += 4) {
        if (ahead > 0 && j + ahead < e)
          prefetch_l2(p.proto + (j + ahead) * d, (e - j - ahead < 4 ? e - j - ahead : 4) * d * 4);
        const float* rs[4];
        for (int q = 0; q < 4; ++q) rs[q] = p.proto + (j + q < e ? j + q : e - 1) * d;
        dot_tiles<O>(&xi, 1, rs, d, s);
        const int64_t n = e - j < 4 ? e - j : 4;
        for (int64_t q = 0; q < n; ++q) top.push(static_cast<int32_t>(j + q), std::fabs(s[q]));
      }
    }
    top.finish(e, p.temperature);
    const int32_t* id = p.idx + i * k;
    if (prefetch) {
      // Cold experts (a decode step of a model that streamed its weights since the last call): ask now for the lines
      // the shrink and the start of the expand read, so the memory system works on all of them at once instead of one
      // dependent run after another: the chosen experts' A rows (r·d_in contiguous elements each, up to
      // kDecodeAheadBytes in all), then the first columns of their k·r Bᵀ rows (the expand prefetches the rest as it
      // walks the columns).
      int64_t budget = kDecodeAheadBytes;
      for (int64_t j = 0; j < k && budget > 0; ++j) {
        const int64_t need = r * d * esz, bytes = need < budget ? need : budget;
        prefetch_l2(a + static_cast<int64_t>(id[j]) * r * d, bytes);
        budget -= bytes;
      }
      const int64_t cols = decode_cols_ahead<T>(p), n = cols < p.d_out ? cols : p.d_out;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t c = 0; c < r; ++c) prefetch_l2(b + (static_cast<int64_t>(id[j]) * r + c) * p.ld_b, n * esz);
    }
    if (!shrink) continue;
    float* hi = p.h + i * kr;
    float s[4];
    for (int64_t q0 = 0; q0 < kr; q0 += 4) {
      const T* rows[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t u = q0 + q < kr ? q0 + q : kr - 1;
        rows[q] = a + (static_cast<int64_t>(id[u / r]) * r + u % r) * d;
      }
      dot_tiles<O>(&xi, 1, rows, d, s);
      const int64_t n = kr - q0 < 4 ? kr - q0 : 4;
      for (int64_t q = 0; q < n; ++q) hi[q0 + q] = s[q];
    }
  }
}

// h rows [r0, r1) of the pairs pairs[0..n): runs of pairs with the same expert in tiles of kDotM tokens × 4 rows of
// that expert's A.
template <class O, typename T>
static void shrink_pairs_t(const Problem& p, const int32_t* pairs, int64_t n_pairs, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  const int64_t d = p.d_in, r = p.r, k = p.k;
  constexpr int M = O::kDotM;
  float s[M * 4];
  for (int64_t u = 0; u < n_pairs;) {
    const int32_t ex = p.idx[pairs[u]];
    int m = 1;
    while (m < M && u + m < n_pairs && p.idx[pairs[u + m]] == ex) ++m;
    const T* xs[M];
    for (int q = 0; q < m; ++q) xs[q] = x + (pairs[u + q] / k) * d;
    const T* base = a + static_cast<int64_t>(ex) * r * d;
    for (int64_t c = r0; c < r1; c += 4) {
      const T* rows[4];
      for (int q = 0; q < 4; ++q) rows[q] = base + (c + q < r1 ? c + q : r1 - 1) * d;
      dot_tiles<O>(xs, m, rows, d, s);
      const int64_t nc = r1 - c < 4 ? r1 - c : 4;
      for (int q = 0; q < m; ++q)
        for (int64_t j = 0; j < nc; ++j) p.h[static_cast<int64_t>(pairs[u + q]) * r + c + j] = s[q * 4 + j];
    }
    u += m;
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
        a0 = O::fma(cf, n == W ? O::load(base + c * ld) : O::load_part(base + c * ld, n), a0);
      }
    }
    if (n == W) {
      O::store(y + q, O::add(a0, O::load(y + q)));
    } else {
      O::store_part(y + q, O::add(a0, O::load_part(y + q, n)), n);
    }
  }
}

template <class O, typename T>
static void expand_t(const Problem& p, int64_t i0, int64_t i1, int64_t c0, int64_t c1, int64_t tile) {
  T* y = static_cast<T*>(p.y);
  const T* b = static_cast<const T*>(p.b);
  const int64_t k = p.k, r = p.r, kr = k * r, d_out = p.d_out;
  const int64_t ahead = p.t <= kDecodeMaxT ? decode_cols_ahead<T>(p) : 0;
  for (int64_t c = c0; c < c1; c += tile) {
    const int64_t w = c1 - c < tile ? c1 - c : tile;
    if (ahead > 0 && c + ahead < d_out) {
      // A decode call: the Bᵀ columns `ahead` to the right, for every chosen row (route_t asked for the first ones).
      const int64_t n = (d_out - c - ahead < w ? d_out - c - ahead : w) * static_cast<int64_t>(sizeof(T));
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < k; ++j)
          for (int64_t q = 0; q < r; ++q)
            prefetch_l2(b + (static_cast<int64_t>(p.idx[i * k + j]) * r + q) * p.ld_b + c + ahead, n);
    }
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

// One (token, slot) pair of an expand block: its token's float32 sums (a row of the column chunk), its r coefficients,
// its token's y row (at the chunk's first column), and whether it is the token's first / last pair in expert order.
template <typename T>
struct PairRow {
  float* delta;
  const float* coef;
  T* y;
  bool first, last;
};

// For m < M pairs of one expert (rows: its r Bᵀ rows from the chunk's first column), columns [q, q + NV·W):
// sums = (first ? 0 : delta) + Σ_c coef[c] · rows[c·ld + ...]; then y = y + sums (one rounding) on the token's last
// pair, else delta = sums. A block of M tokens × NV vectors of sums stays in registers, so each Bᵀ load (and
// conversion) serves M tokens; a token's sums never go to memory when it chose one expert, and y is read and written
// once per token.
template <class O, int M, int NV, typename T>
static void expand_block(const PairRow<T>* pr, const T* rows, int64_t ld, int64_t r, int64_t q) {
  using V = typename O::V;
  constexpr int W = O::W;
  // Local copies: stores through float* could alias the caller's arrays, which made the compiler reload them.
  float* d[M];
  const float* cf[M];
  for (int m = 0; m < M; ++m) d[m] = pr[m].delta + q, cf[m] = pr[m].coef;
  V acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = pr[m].first ? O::zero() : O::load(d[m] + v * W);
  const T* row = rows + q;
  int64_t c = 0;
  do {  // r >= 1: a loop that may run zero times kept the sums on the stack around it
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = O::load(row + v * W);
    for (int m = 0; m < M; ++m) {
      const V s = O::set1(cf[m][c]);
      for (int v = 0; v < NV; ++v) acc[m][v] = O::fma(s, bv[v], acc[m][v]);
    }
    row += ld;
  } while (++c < r);
  for (int m = 0; m < M; ++m) {
    if (pr[m].last) {
      T* y = pr[m].y + q;
      for (int v = 0; v < NV; ++v) O::store(y + v * W, O::add(acc[m][v], O::load(y + v * W)));
    } else {
      for (int v = 0; v < NV; ++v) O::store(d[m] + v * W, acc[m][v]);
    }
  }
}

// The same for the last nq < NV·W columns, one vector at a time.
template <class O, int M, typename T>
static void expand_block_part(const PairRow<T>* pr, const T* rows, int64_t ld, int64_t r, int64_t q, int64_t nq) {
  using V = typename O::V;
  constexpr int W = O::W;
  for (int64_t v = q; v < q + nq; v += W) {
    const int64_t n = q + nq - v < W ? q + nq - v : W;
    V acc[M];
    for (int m = 0; m < M; ++m) acc[m] = pr[m].first ? O::zero() : O::load_part(pr[m].delta + v, n);
    for (int64_t c = 0; c < r; ++c) {
      const V bv = O::load_part(rows + c * ld + v, n);
      for (int m = 0; m < M; ++m) acc[m] = O::fma(O::set1(pr[m].coef[c]), bv, acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      if (pr[m].last) {
        O::store_part(pr[m].y + v, O::add(acc[m], O::load_part(pr[m].y + v, n)), n);
      } else {
        O::store_part(pr[m].delta + v, acc[m], n);
      }
    }
  }
}

template <class O, int M, typename T>
static void expand_rows(const PairRow<T>* pr, const T* rows, int64_t ld, int64_t r, int64_t w) {
  constexpr int NV = O::kExpandNV, BW = NV * O::W;
  int64_t q = 0;
  for (; q + BW <= w; q += BW) expand_block<O, M, NV>(pr, rows, ld, r, q);
  if (q < w) expand_block_part<O, M>(pr, rows, ld, r, q, w - q);
}

// Expand grouped by expert for the columns [c0, c1) of y: the (token, slot) pairs sorted by expert, each expert's Bᵀ
// chunk (r rows × (c1 - c0)) read once and applied to its tokens kExpandM at a time. A token's sums wait in delta
// (T × (c1 - c0) float32 scratch, L2-sized) between its experts; its last expert adds them to y (one rounding).
template <class O, typename T>
static void expand_pairs_t(const Problem& p, const int32_t* pairs, int64_t n_pairs, int64_t c0, int64_t c1,
                           float* delta) {
  constexpr int M = O::kExpandM;
  static_assert(M >= 2 && M <= 6, "expand blocks of 2 to 6 tokens");
  T* y = static_cast<T*>(p.y);
  const T* b = static_cast<const T*>(p.b);
  const int64_t w = c1 - c0, k = p.k, r = p.r;
  for (int64_t u = 0; u < n_pairs;) {
    const int32_t ex = p.idx[pairs[u]];
    int64_t end = u + 1;
    while (end < n_pairs && p.idx[pairs[end]] == ex) ++end;
    // The next expert's Bᵀ chunk (r rows of w columns, `ld_b` apart: short strided runs the hardware prefetcher does
    // not follow) is fetched while this one runs.
    // So are the y segments (one per token, d_out apart) of the tokens whose last expert is the next one.
    if (end < n_pairs) {
      const int32_t nx = p.idx[pairs[end]];
      const T* nb = b + static_cast<int64_t>(nx) * r * p.ld_b + c0;
      for (int64_t c = 0; c < r; ++c) prefetch_l2(nb + c * p.ld_b, w * static_cast<int64_t>(sizeof(T)));
      for (int64_t v = end; v < n_pairs && p.idx[pairs[v]] == nx; ++v) {
        const int64_t i = pairs[v] / k;
        bool last = true;
        for (int64_t j = 0; j < k; ++j) last = last && p.idx[i * k + j] <= nx;
        if (last) prefetch_l2(y + i * p.d_out + c0, w * static_cast<int64_t>(sizeof(T)));
      }
    }
    const T* rows = b + static_cast<int64_t>(ex) * r * p.ld_b + c0;
    while (u < end) {
      const int m = static_cast<int>(end - u < M ? end - u : M);
      PairRow<T> pr[M];
      for (int q = 0; q < m; ++q) {
        const int64_t pair = pairs[u + q], i = pair / k;
        // The token's experts are distinct: its first / last pair in expert order has its smallest / largest index.
        const int32_t* id = p.idx + i * k;
        int32_t lo = id[0], hi = id[0];
        for (int64_t j = 1; j < k; ++j) lo = id[j] < lo ? id[j] : lo, hi = id[j] > hi ? id[j] : hi;
        pr[q] = PairRow<T>{delta + i * w, p.g + pair * r, y + i * p.d_out + c0, ex == lo, ex == hi};
      }
      switch (m) {
        case 1: expand_rows<O, 1>(pr, rows, p.ld_b, r, w); break;
        case 2: expand_rows<O, 2>(pr, rows, p.ld_b, r, w); break;
        case 3: if constexpr (M >= 3) expand_rows<O, 3>(pr, rows, p.ld_b, r, w); break;
        case 4: if constexpr (M >= 4) expand_rows<O, 4>(pr, rows, p.ld_b, r, w); break;
        case 5: if constexpr (M >= 5) expand_rows<O, 5>(pr, rows, p.ld_b, r, w); break;
        case 6: if constexpr (M >= 6) expand_rows<O, 6>(pr, rows, p.ld_b, r, w); break;
      }
      u += m;
    }
  }
}

// ------------------------------------------------------------------------------------------------ dtype dispatch

template <class O>
struct KernelsOf {
  template <typename R>
  static void scores_of(const Problem& p, const R* rows, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out,
                        int64_t ld, float* xf) {
    switch (p.dtype) {
      case DType::kF32: return scores_rows<O, float>(p, rows, t0, t1, e0, e1, out, ld, xf);
      case DType::kBF16: return scores_rows<O, Bf16>(p, rows, t0, t1, e0, e1, out, ld, xf);
      case DType::kF16: return scores_rows<O, F16>(p, rows, t0, t1, e0, e1, out, ld, xf);
    }
  }
  static void scores(const Problem& p, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out, int64_t ld,
                     float* xf) {
    scores_of(p, p.proto, t0, t1, e0, e1, out, ld, xf);
  }
  static void scores_screen(const Problem& p, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out, int64_t ld,
                            float* xf) {
    scores_of(p, p.proto_screen, t0, t1, e0, e1, out, ld, xf);
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
    static const Kernels k{&scores, &scores_screen, &route, &shrink_pairs, &expand, &expand_pairs, O::kBf16Dot};
    return k;
  }
};
