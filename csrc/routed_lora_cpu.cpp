// Fused Arrow-routed LoRA delta on the CPU: y += Σ_{j∈top-k(|x·P|)} w_j · (s·Bᵀ)_{idx_j}ᵀ (A_{idx_j} x), per token.
//
// Why a C++ kernel: the portable torch path spends ~8 µs per op dispatch on 10+ small ops per layer (decode is
// dominated by that) and its dense expand multiplies by all E·r columns although only k·r are non-zero per token
// (3.3x the needed FLOPs at E=10, r=8, k=3). Here one call does, per token:
//   1. routing logits |x·p_e| (in-kernel dot products; one MKL GEMM for large T),
//   2. top-k (ties to the lower index) and softmax over the k with temperature,
//   3. the shrink of the k selected experts only (k·r dot products),
//   4. the expand of the k selected experts only (k·r axpys into y), tiled over d_out so the B rows stay in L1/L2
//      while every token of a tile uses them.
// Layout (see genknowsub_fast/backends/packing.py): route_shrink (E + E·r, d_in) = [P ; A rows],
// b_t (E, r, d_out) = s_e · B_eᵀ. All float32, contiguous.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace gkf_cpu {

// Up to this many experts, routing logits are computed per token inside the shrink pass (see routed_lora_delta_).
constexpr int64_t kPerTokenLogitsMaxE = 32;
// Above this many bytes of B, the expand walks all tokens per d_out tile (see routed_lora_delta_).
constexpr int64_t kExpandAllTokensBytes = int64_t(4) << 20;

// Dot products of one vector x with `n` rows (n <= 4) sharing the loads of x. With AVX2 + FMA: 4 rows × 2 vector
// accumulators = 8 independent FMA chains, enough to hide the FMA latency (4 cycles × 2 ports); a single accumulator
// ran at 1/8 of that. Without AVX2 a plain loop that the compiler vectorizes as it can.
static inline void dot_rows(const float* x, const float* const* rows, int n, int64_t d, float* out) {
  int64_t i = 0;
  float part[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0[4], acc1[4];
  for (int q = 0; q < 4; ++q) acc0[q] = acc1[q] = _mm256_setzero_ps();
  if (n == 4) {
    for (; i + 16 <= d; i += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      for (int q = 0; q < 4; ++q) {
        acc0[q] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(rows[q] + i), acc0[q]);
        acc1[q] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(rows[q] + i + 8), acc1[q]);
      }
    }
  } else {
    for (; i + 16 <= d; i += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      for (int q = 0; q < n; ++q) {
        acc0[q] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(rows[q] + i), acc0[q]);
        acc1[q] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(rows[q] + i + 8), acc1[q]);
      }
    }
  }
  for (int q = 0; q < n; ++q) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(acc0[q], acc1[q]));
    for (int l = 0; l < 8; ++l) part[q] += lanes[l];
  }
#endif
  for (int q = 0; q < n; ++q) {
    float s = part[q];
    for (int64_t j = i; j < d; ++j) s += x[j] * rows[q][j];
    out[q] = s;
  }
}

// y[0..w) += Σ_q coef[q] · rows[q][0..w): with AVX2 a 32-float block of y stays in 4 registers across all rows, so each
// FMA costs one load (the B element) instead of load y + load B + store y.
static inline void axpy_rows(float* y, const float* const* rows, const float* coef, int64_t n, int64_t w) {
  int64_t q0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; q0 + 32 <= w; q0 += 32) {
    __m256 a0 = _mm256_loadu_ps(y + q0), a1 = _mm256_loadu_ps(y + q0 + 8);
    __m256 a2 = _mm256_loadu_ps(y + q0 + 16), a3 = _mm256_loadu_ps(y + q0 + 24);
    for (int64_t k = 0; k < n; ++k) {
      const __m256 c = _mm256_set1_ps(coef[k]);
      const float* b = rows[k] + q0;
      a0 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b), a0);
      a1 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b + 8), a1);
      a2 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b + 16), a2);
      a3 = _mm256_fmadd_ps(c, _mm256_loadu_ps(b + 24), a3);
    }
    _mm256_storeu_ps(y + q0, a0);
    _mm256_storeu_ps(y + q0 + 8, a1);
    _mm256_storeu_ps(y + q0 + 16, a2);
    _mm256_storeu_ps(y + q0 + 24, a3);
  }
#endif
  for (int64_t k = 0; k < n; ++k) {
    const float c = coef[k];
    const float* b = rows[k];
    for (int64_t q = q0; q < w; ++q) y[q] += c * b[q];
  }
}

static void dot_many(const float* x, const float* const* rows, int64_t n, int64_t d, float* out) {
  for (int64_t q = 0; q < n; q += 4) dot_rows(x, rows + q, static_cast<int>(std::min<int64_t>(4, n - q)), d, out + q);
}

// top-k of logits[0..e) with ties to the lower index, then softmax of logit/temperature over the k.
static void topk_softmax(const float* logits, int64_t e, int64_t k, double temperature, int64_t* idx, float* w) {
  // k rounds of "largest not yet taken": strict > keeps the lower index on ties. E and k are small (<= a few 100).
  uint64_t taken_small = 0;
  std::vector<char> taken_big;
  if (e > 64) taken_big.assign(e, 0);
  auto is_taken = [&](int64_t i) { return e > 64 ? taken_big[i] != 0 : ((taken_small >> i) & 1ULL) != 0; };
  auto take = [&](int64_t i) {
    if (e > 64) taken_big[i] = 1; else taken_small |= (1ULL << i);
  };
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float bv = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < e; ++i) {
      if (is_taken(i)) continue;
      if (best < 0 || logits[i] > bv) {  // NaN logits never win a comparison but still fill a slot
        best = i;
        bv = logits[i];
      }
    }
    idx[j] = best;
    take(best);
  }
  const double top = logits[idx[0]];
  double sum = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    const double v = std::exp((static_cast<double>(logits[idx[j]]) - top) / temperature);
    w[j] = static_cast<float>(v);
    sum += v;
  }
  for (int64_t j = 0; j < k; ++j) w[j] = static_cast<float>(w[j] / sum);
}

void routed_lora_delta_(at::Tensor y, const at::Tensor& x, const at::Tensor& route_shrink, const at::Tensor& b_t,
                        int64_t top_k, double temperature, bool weights_mixing) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "routed_lora_delta_: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat &&
                  route_shrink.scalar_type() == at::kFloat && b_t.scalar_type() == at::kFloat,
              "routed_lora_delta_: float32 tensors only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && b_t.dim() == 3 && route_shrink.dim() == 2, "routed_lora_delta_: ranks");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && route_shrink.is_contiguous(),
              "routed_lora_delta_: x, y and route_shrink must be contiguous");
  // b_t may have a padded row stride (packing.py pads it on the CPU, see there); rows must be dense.
  TORCH_CHECK(b_t.stride(2) == 1 && b_t.stride(0) == b_t.size(1) * b_t.stride(1) && b_t.stride(1) >= b_t.size(2),
              "routed_lora_delta_: b_t rows must be dense with one row stride");
  const int64_t t = x.size(0), d_in = x.size(1), e = b_t.size(0), r = b_t.size(1), d_out = b_t.size(2);
  TORCH_CHECK(route_shrink.size(0) == e + e * r && route_shrink.size(1) == d_in, "routed_lora_delta_: route_shrink");
  TORCH_CHECK(y.size(0) == t && y.size(1) == d_out, "routed_lora_delta_: y shape");
  TORCH_CHECK(top_k >= 1 && top_k <= e, "routed_lora_delta_: top_k out of range");
  TORCH_CHECK(temperature > 0, "routed_lora_delta_: temperature must be > 0");
  if (t == 0) return;

  const float* xp = x.data_ptr<float>();
  const float* rs = route_shrink.data_ptr<float>();
  const float* bt = b_t.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t kr = top_k * r;
  const int64_t ld = b_t.stride(1);

  // 1. routing logits (T, E). With many experts and tokens, one MKL GEMM up front (measured faster at E=64). Otherwise
  // each token's logits are computed in the per-token pass below, while its x row is in L1, saving a pass over x.
  const bool logits_gemm = t >= 32 && e > kPerTokenLogitsMaxE;
  at::Tensor logits_t;
  const float* logits_all = nullptr;
  if (logits_gemm) {
    logits_t = at::mm(x, route_shrink.narrow(0, 0, e).t()).abs_().contiguous();
    logits_all = logits_t.data_ptr<float>();
  }
  std::vector<const float*> proto_rows(e);
  for (int64_t i = 0; i < e; ++i) proto_rows[i] = rs + i * d_in;

  // 2-3. per token: top-k, softmax, shrink of the selected experts → expand coefficients g (T, k·r) and rows (T, k).
  // Token by token over all of d_in: blocking tokens × d_in chunks so that a chunk of all E·r A rows stays in L2 was
  // slower (E=64, r=8, T=512, 3072→3072: 2.4 ms against 1.5 ms; the short chunks cost more than the L3 reads saved).
  std::vector<int64_t> idx(t * top_k);
  std::vector<float> g(t * kr);
  at::parallel_for(0, t, 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> w(top_k), h(kr), hmix(r), token_logits(e);
    std::vector<const float*> rows(kr);
    for (int64_t i = lo; i < hi; ++i) {
      int64_t* id = idx.data() + i * top_k;
      const float* li = logits_all ? logits_all + i * e : token_logits.data();
      if (!logits_all) {
        dot_many(xp + i * d_in, proto_rows.data(), e, d_in, token_logits.data());
        for (int64_t q = 0; q < e; ++q) token_logits[q] = std::fabs(token_logits[q]);
      }
      topk_softmax(li, e, top_k, temperature, id, w.data());
      for (int64_t j = 0; j < top_k; ++j)
        for (int64_t c = 0; c < r; ++c) rows[j * r + c] = rs + (e + id[j] * r + c) * d_in;
      dot_many(xp + i * d_in, rows.data(), kr, d_in, h.data());
      float* gi = g.data() + i * kr;
      if (weights_mixing) {  // merged A applied once, then every selected B weighted by w_j
        std::fill(hmix.begin(), hmix.end(), 0.f);
        for (int64_t j = 0; j < top_k; ++j)
          for (int64_t c = 0; c < r; ++c) hmix[c] += w[j] * h[j * r + c];
        for (int64_t j = 0; j < top_k; ++j)
          for (int64_t c = 0; c < r; ++c) gi[j * r + c] = w[j] * hmix[c];
      } else {
        for (int64_t j = 0; j < top_k; ++j)
          for (int64_t c = 0; c < r; ++c) gi[j * r + c] = w[j] * h[j * r + c];
      }
    }
  });

  // 4. expand. Work = (token block × group of 64-float d_out tiles); inside a task, tiles in order and, per tile, every
  // token of the block. A tile of all E·r B rows (20 KB at E·r = 80, with the padded row stride of packing.py) stays
  // in L1 across the block's tokens, and each token's y row is walked sequentially tile after tile, which the hardware
  // prefetcher follows (walking all tokens per tile instead, T = 512 ran at 9 GFMA/s on one core, latency-bound on y).
  // Few tokens (decode): split d_out across threads instead. No two tasks write the same y element.
  // When all of B (E·r·d_out floats) is larger than kExpandAllTokensBytes, every token block streamed the whole of B
  // from memory again: one block of all tokens instead reads B once, and the software prefetch of the next token's y
  // segment (below) hides the latency that made walking all tokens per tile slow (T = 512, E = 64, r = 8,
  // d_out = 16384: expand 20 → 8.9 ms).
  constexpr int64_t kTile = 64;
  const int64_t kTokBlock = e * r * d_out * static_cast<int64_t>(sizeof(float)) > kExpandAllTokensBytes ? t : 32;
  const int64_t n_tiles = (d_out + kTile - 1) / kTile;
  const int64_t n_blocks = (t + kTokBlock - 1) / kTokBlock;
  const int64_t threads = at::get_num_threads();
  const int64_t n_groups = n_blocks >= 2 * threads ? 1 : std::min(n_tiles, 4 * threads);
  const int64_t tiles_per_group = (n_tiles + n_groups - 1) / n_groups;
  at::parallel_for(0, n_blocks * n_groups, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const float*> rows(kr);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t blk = task / n_groups, grp = task % n_groups;
      const int64_t tile0 = grp * tiles_per_group, tile1 = std::min(n_tiles, tile0 + tiles_per_group);
      const int64_t i0 = blk * kTokBlock, i1 = std::min(t, i0 + kTokBlock);
      for (int64_t tile = tile0; tile < tile1; ++tile) {
        const int64_t c0 = tile * kTile, width = std::min(d_out, c0 + kTile) - c0;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t* id = idx.data() + i * top_k;
          for (int64_t j = 0; j < top_k; ++j)
            for (int64_t c = 0; c < r; ++c) rows[j * r + c] = bt + (id[j] * r + c) * ld + c0;
#if defined(__AVX2__) && defined(__FMA__)
          // Prefetch the next token's y segment, a different row that the hardware prefetcher does not guess
          // (T=512, E=64, r=8, d_out=3072: expand 2.8 → 1.8 ms).
          if (i + 1 < i1) {
            const char* nxt = reinterpret_cast<const char*>(yp + (i + 1) * d_out + c0);
            for (int64_t off = 0; off < width * 4; off += 64) _mm_prefetch(nxt + off, _MM_HINT_T0);
          }
#endif
          axpy_rows(yp + i * d_out + c0, rows.data(), g.data() + i * kr, kr, width);
        }
      }
    }
  });
}

}  // namespace gkf_cpu

TORCH_LIBRARY_FRAGMENT(genknowsub_fast_C, m) {
  m.def(
      "routed_lora_delta_(Tensor(a!) y, Tensor x, Tensor route_shrink, Tensor b_t, int top_k, float temperature, "
      "bool weights_mixing) -> ()");
}

TORCH_LIBRARY_IMPL(genknowsub_fast_C, CPU, m) { m.impl("routed_lora_delta_", &gkf_cpu::routed_lora_delta_); }
