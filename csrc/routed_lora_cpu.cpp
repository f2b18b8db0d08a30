// Fused Arrow-routed LoRA delta on the CPU, in float32, bfloat16 and float16:
//   y += Σ_{j ∈ top-k(|x·P|)} w_j · (s·Bᵀ)_{idx_j}ᵀ (A_{idx_j} x), per token.
//
// Why a C++ kernel: the portable torch path spends ~8 µs per op dispatch on 10+ small ops per layer (decode is
// dominated by that) and its dense expand multiplies by all E·r columns although only k·r are non-zero per token.
// One call here does, per token:
//   1. routing scores x·p_e in float32 (x converted exactly; prototypes are float32), unless the caller passes them
//      (tensor-parallel layers sum them over shards first); with a bfloat16 copy of the prototypes (`screen`, on
//      AVX-512-BF16, many experts) bfloat16 scores select the experts, the float32 scores of those k give the weights
//      (the same experts as the float32 scores wherever the top-k margin exceeds the bfloat16 error);
//   2. top-k of |score| (ties to the lower index) and softmax over the k in float64;
//   3. the shrink of the k selected experts only (k·r dot products, float32 sums);
//   4. the expand of the k selected experts only, tiled over d_out; the delta is summed in float32 and added to y
//      with one rounding per element.
// This file checks the arguments, chooses the schedule and runs the threads; the arithmetic is in
// routed_lora_impl.h, compiled once per instruction set (routed_lora_isa_*.cpp) and chosen at run time (cpu_isa.h).
//
// Build with -DGKF_PHASE_TIMING for a timing build: it adds the op routed_lora_phase_ns() -> int[] (nanoseconds per
// phase since the last call: scores, route, shrink, coefficients, expand, set-up), which benchmarks/cpu_kernel_phases.py
// reads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <ctime>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "routed_lora_kernels.h"

namespace gkf_rl {
namespace {

// Up to this many experts, the scores of a few tokens are computed per token inside the route pass while its x row is
// in L1 (one pass over x). From kScoresTiledMinT tokens on (or above kScoresInPassMaxE experts), they run in their own
// pass: blocks of kScoresTokens tokens × the experts whose prototype rows fill kScoresProtoBytes, in register tiles.
constexpr int64_t kScoresInPassMaxE = 32;
constexpr int64_t kScoresTiledMinT = 8;
constexpr int64_t kScoresTokens = 32;
constexpr int64_t kScoresProtoBytes = int64_t(256) << 10;
// Many tokens and experts: MKL's sgemm (x converted to float32 first) instead of the tiles.
constexpr bool kScoresMkl = false;
// The shrink and the expand run grouped by expert (each expert's A rows and Bᵀ chunk read once for all the tokens that
// chose it, in register tiles of several tokens) when experts are chosen by at least kGroupedMinUses tokens on
// average and there are at least kGroupedMinT tokens.
constexpr int64_t kGroupedMinUses = 2;
constexpr int64_t kGroupedMinT = 16;
// Without grouping, above this many bytes of Bᵀ the expand walks all tokens per d_out tile (see the expand below).
// Grouped, the expand writes float32 column chunks of at most kDeltaBytes for all tokens (the chunk stays in L2).
// E = 256, r = 16, qkv 3072 → 9216, float32, T = 512 (Bᵀ 151 MB) on a loaded 2-core machine: chunks of 128 KB /
// 256 KB / 1 MB / 4 MB: 90 / 66-73 / 90-104 / 89-91 ms (one thread); reading Bᵀ once took ~25 ms there (6 GB/s).
constexpr int64_t kExpandAllTokensBytes = int64_t(4) << 20;
constexpr int64_t kDeltaBytes = int64_t(256) << 10;
constexpr int64_t kTile = 64;
// Calls with less work than this many multiply-adds (every Phi-3-mini module at T = 1, up to E = 256, r = 16) run on the
// calling thread alone. Decode-sized calls take 17-30 µs on one thread (qkv, E = 10, r = 4, T = 1), while a parallel
// region that has to wake a worker cost up to 30-60 ms per call right after an MKL GEMM on a loaded 2-core machine
// (the base F.linear + op: 59-96 ms against 29-40 ms for F.linear alone; OMP_WAIT_POLICY=passive or one thread
// removed the difference).
constexpr int64_t kSerialMaxFma = int64_t(1) << 22;

// at::parallel_for, or one call on this thread for small work.
template <class F>
void run(bool serial, int64_t n, int64_t grain, const F& f) {
  if (serial) {
    if (n > 0) f(0, n);
  } else {
    at::parallel_for(0, n, grain, f);
  }
}

#ifdef GKF_PHASE_TIMING
// Timing build only: GKF_FORCE_SHRINK=token|grouped|pairs and GKF_FORCE_EXPAND=tiles|grouped override the schedule.
int forced(const char* var, const char* a, const char* b, const char* c = nullptr) {
  const char* v = std::getenv(var);
  if (v == nullptr) return -1;
  const std::string s(v);
  return s == a ? 0 : s == b ? 1 : (c != nullptr && s == c) ? 2 : -1;
}
#endif

#ifdef GKF_PHASE_TIMING
std::atomic<int64_t> g_phase_ns[6];
// Wall-clock time, or with GKF_PHASE_CPU=1 the calling thread's CPU time (for one-thread runs on a machine that other
// processes load: it leaves out the time the thread waited for a core).
int64_t phase_now() {
  static const bool cpu = std::getenv("GKF_PHASE_CPU") != nullptr;
  if (cpu) {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
struct PhaseClock {
  int64_t t0 = phase_now();
  void lap(int phase) {
    const int64_t now = phase_now();
    g_phase_ns[phase] += now - t0;
    t0 = now;
  }
};
#else
struct PhaseClock {
  void lap(int) {}
};
#endif

const Kernels& kernels_for(gkf_isa::Isa isa) {
  switch (isa) {
    case gkf_isa::Isa::kAvx512:
      return kernels_avx512();
    case gkf_isa::Isa::kAvx2:
      return kernels_avx2();
    case gkf_isa::Isa::kScalar:
      break;
  }
  return kernels_scalar();
}

DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return DType::kF32;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kHalf:
      return DType::kF16;
    default:
      TORCH_CHECK(false, "routed_lora_delta_: x must be float32, bfloat16 or float16, got ", s);
  }
}

// Tokens of x (..., d_in): the product of its leading sizes. x and y may carry any leading shape (a model's
// (batch, T, d)) so that the caller passes them as they come, without Python view calls (a reshape of x and a view
// of y back cost about 22k instructions a call from Python, a third of what a patched hidden-256 layer added at T = 1).
int64_t rows_of(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) n *= t.size(i);
  return n;
}

void check_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& a,
                const at::Tensor& b_t, int64_t top_k, double temperature, const std::optional<at::Tensor>& scores,
                const std::optional<at::Tensor>& screen) {
  const char* op = "routed_lora_delta_";
  for (const at::Tensor* t : {&y, &x, &prototypes, &a, &b_t})
    TORCH_CHECK(t->device().is_cpu(), op, ": CPU tensors only");
  dtype_of(x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && a.scalar_type() == x.scalar_type() &&
                  b_t.scalar_type() == x.scalar_type(),
              op, ": y, a and b_t must have x's dtype ", x.scalar_type());
  TORCH_CHECK(prototypes.scalar_type() == at::kFloat, op, ": prototypes must be float32");
  TORCH_CHECK(x.dim() >= 1 && y.dim() == x.dim() && prototypes.dim() == 2 && a.dim() == 3 && b_t.dim() == 3, op,
              ": expected x (..., d_in), y (..., d_out), prototypes (E, d_in), a (E, r, d_in), b_t (E, r, d_out)");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && prototypes.is_contiguous() && a.is_contiguous(), op,
              ": x, y, prototypes and a must be contiguous");
  const int64_t e = a.size(0), r = a.size(1), d_in = a.size(2);
  TORCH_CHECK(e >= 1 && r >= 1, op, ": a needs E >= 1 experts of rank >= 1, got ", a.sizes());
  TORCH_CHECK(x.size(-1) == d_in && prototypes.size(0) == e && prototypes.size(1) == d_in, op, ": x ", x.sizes(),
              ", prototypes ", prototypes.sizes(), " and a ", a.sizes(), " do not match");
  TORCH_CHECK(b_t.size(0) == e && b_t.size(1) == r && y.size(-1) == b_t.size(2) &&
                  x.sizes().slice(0, x.dim() - 1) == y.sizes().slice(0, y.dim() - 1),
              op, ": b_t ", b_t.sizes(), " and y ", y.sizes(), " do not match a ", a.sizes(), " and x ", x.sizes());
  // b_t may have a padded row stride (packing.py pads it on the CPU); rows must be unit-stride.
  TORCH_CHECK(b_t.stride(2) == 1 && b_t.stride(1) >= b_t.size(2) && b_t.stride(0) == r * b_t.stride(1), op,
              ": b_t rows must be unit-stride with one row stride, got strides ", b_t.strides());
  TORCH_CHECK(top_k >= 1 && top_k <= e, op, ": top_k must be in [1, ", e, "], got ", top_k);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op, ": temperature must be finite and > 0");
  const int64_t t = rows_of(x);
  TORCH_CHECK(t * top_k < std::numeric_limits<int32_t>::max(), op, ": too many tokens");
  if (scores.has_value()) {
    const at::Tensor& s = *scores;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 &&
                    s.size(0) == t && s.size(1) == e,
                op, ": scores must be a contiguous float32 CPU tensor of shape (", t, ", ", e, "), got ",
                s.sizes(), " ", s.scalar_type());
  }
  if (screen.has_value()) {
    const at::Tensor& s = *screen;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kBFloat16 && s.is_contiguous() && s.dim() == 2 &&
                    s.size(0) == e && s.size(1) == d_in,
                op, ": screen must be a contiguous bfloat16 CPU tensor of the prototypes' shape (", e, ", ", d_in,
                "), got ", s.sizes(), " ", s.scalar_type());
  }
}

}  // namespace

void routed_lora_delta_(at::Tensor y, const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& a,
                        const at::Tensor& b_t, int64_t top_k, double temperature, bool weights_mixing,
                        const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& screen) {
  PhaseClock clock;
  check_args(y, x, prototypes, a, b_t, top_k, temperature, scores, screen);
  const int64_t t = rows_of(x), d_in = x.size(-1), e = a.size(0), r = a.size(1), d_out = b_t.size(2), k = top_k;
  if (t == 0) return;
  const Kernels& kern = kernels_for(gkf_isa::active());
  const int64_t threads = at::get_num_threads(), kr = k * r, esz = x.element_size();
  std::vector<int32_t> idx(t * k);
  std::vector<float> w(t * k), h(t * kr), g(t * kr);
  Problem p;
  p.dtype = dtype_of(x.scalar_type());
  p.t = t, p.d_in = d_in, p.d_out = d_out, p.e = e, p.r = r, p.k = k, p.ld_b = b_t.stride(1);
  p.x = x.data_ptr(), p.y = y.data_ptr(), p.proto = prototypes.data_ptr<float>(), p.a = a.data_ptr(), p.b = b_t.data_ptr();
  p.temperature = temperature;
  p.idx = idx.data(), p.w = w.data(), p.h = h.data(), p.g = g.data();
  clock.lap(5);
  const bool serial = t * ((scores.has_value() ? 0 : e * d_in) + kr * (d_in + d_out)) <= kSerialMaxFma;

  // 1. routing scores (T, E), signed: given; register tiles of tokens × experts over blocks of both (enough tokens);
  // a pass over tokens × experts (few tokens, many experts); or (few tokens and experts) inside the route pass below.
  // float32 x against float32 prototypes may also take MKL's sgemm (kScoresMkl).
  // Screened routing (select_screened): the scores pass reads the bfloat16 copy of the prototypes (half the bytes, and
  // vdpbf16ps); the route pass takes each token's top-k of those and their float32 scores for the weights. Only where
  // the kernels multiply bfloat16 pairs in hardware, and only for the scores pass (more than kScoresInPassMaxE experts).
  const bool screened = screen.has_value() && kern.bf16_dot && !scores.has_value() && e > kScoresInPassMaxE;
  if (screened) {
    p.proto_screen = reinterpret_cast<const Bf16*>(screen->data_ptr());
  }
  at::Tensor s_t;
  const float* s = nullptr;
  bool mkl = !screened && t >= kScoresTiledMinT && e > kScoresInPassMaxE && kScoresMkl;
#ifdef GKF_PHASE_TIMING
  if (const int f = forced("GKF_FORCE_SCORES", "tiles", "mkl"); f >= 0) mkl = f == 1;
#endif
  if (scores.has_value()) {
    s = scores->data_ptr<float>();
  } else if (mkl) {
    s_t = at::mm((x.scalar_type() == at::kFloat ? x : x.to(at::kFloat)).view({t, d_in}), prototypes.t()).contiguous();
    s = s_t.data_ptr<float>();
  } else if (t >= kScoresTiledMinT || e > kScoresInPassMaxE) {
    s_t = at::empty({t, e}, x.options().dtype(at::kFloat));
    float* out = s_t.data_ptr<float>();
    // Blocks of up to kScoresTokens tokens × the experts whose prototype rows fill kScoresProtoBytes (L2), so each
    // prototype row is read from memory (or L3) once per token block, and from L2 by each register tile.
    const int64_t proto_row = d_in * (screened ? 2 : prototypes.element_size());
    const int64_t eb = std::min(e, std::max<int64_t>(4, kScoresProtoBytes / proto_row / 4 * 4));
    const int64_t tb = t >= kScoresTiledMinT ? kScoresTokens : 1;
    const int64_t n_eb = (e + eb - 1) / eb, n_tb = (t + tb - 1) / tb;
    // Screening float32 / float16 x over several expert blocks: x rounded to bfloat16 once for the pass (the same
    // values as the per-tile rounding), not once per block.
    at::Tensor x_bf16;
    Problem ps = p;
    if (screened && x.scalar_type() != at::kBFloat16 && n_eb > 1) {
      x_bf16 = x.to(at::kBFloat16).contiguous();
      ps.dtype = DType::kBF16, ps.x = x_bf16.data_ptr();
    }
    run(serial, n_tb * n_eb, 1, [&](int64_t lo, int64_t hi) {
      static thread_local std::vector<float> xf;  // converted x rows of one register tile
      if (xf.size() < static_cast<size_t>(4 * d_in)) xf.resize(4 * d_in);
      for (int64_t u = lo; u < hi; ++u) {
        const int64_t t0 = (u / n_eb) * tb, e0 = (u % n_eb) * eb;
        const int64_t t1 = std::min(t, t0 + tb), e1 = std::min(e, e0 + eb);
        if (screened)
          kern.scores_screen(ps, t0, t1, e0, e1, out + t0 * e + e0, e, xf.data());
        else
          kern.scores(p, t0, t1, e0, e1, out + t0 * e + e0, e, xf.data());
      }
    });
    s = out;
  }
  clock.lap(0);

  // 2-3. top-k + softmax, and the shrink h = A_idx x of the selected experts. Three schedules:
  //  - grouped by expert when experts are chosen by several tokens each: each expert's r rows are read once for all
  //    its tokens, in register tiles of several tokens;
  //  - per token (route and shrink in one pass, x row in L1) when there are enough tokens for the threads;
  //  - few tokens (decode): the k·r dot products of the token(s) split across threads in blocks of 4 rows.
  const bool many_uses = t * k >= kGroupedMinUses * e && t >= kGroupedMinT;
  bool grouped = many_uses;
  bool per_token = !grouped && t >= 2 * threads;
  bool expand_grouped = many_uses;
#ifdef GKF_PHASE_TIMING
  if (const int f = forced("GKF_FORCE_SHRINK", "token", "grouped", "pairs"); f >= 0) {
    per_token = f == 0;
    grouped = f == 1;
  }
  if (const int f = forced("GKF_FORCE_EXPAND", "tiles", "grouped"); f >= 0) expand_grouped = f == 1;
#endif
  run(serial, t, 4, [&](int64_t lo, int64_t hi) { kern.route(p, s, lo, hi, per_token); });
  const int64_t n_pairs = t * k;
  std::vector<int32_t> by_expert;  // the (token, slot) pairs sorted by expert (a counting sort)
  if (grouped || expand_grouped) {
    by_expert.resize(n_pairs);
    std::vector<int64_t> start(e + 1, 0);
    for (int64_t u = 0; u < n_pairs; ++u) ++start[idx[u] + 1];
    for (int64_t j = 0; j < e; ++j) start[j + 1] += start[j];
    for (int64_t u = 0; u < n_pairs; ++u) by_expert[start[idx[u]]++] = static_cast<int32_t>(u);
  }
  clock.lap(1);
  if (grouped) {
    run(serial, n_pairs, 16, [&](int64_t lo, int64_t hi) {
      kern.shrink_pairs(p, by_expert.data() + lo, hi - lo, 0, r);
    });
  } else if (!per_token) {
    const int64_t blocks = (r + 3) / 4;
    run(serial, n_pairs * blocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) {
        const int32_t pair = static_cast<int32_t>(u / blocks);
        const int64_t c0 = (u % blocks) * 4;
        kern.shrink_pairs(p, &pair, 1, c0, std::min(r, c0 + 4));
      }
    });
  }
  clock.lap(2);

  // Expand coefficients: "output" mixing w_j · h_j; "weights" mixing (merged A applied once, then every selected B
  // weighted by w_j) w_j · Σ_i w_i h_i.
  for (int64_t i = 0; i < t; ++i) {
    const float* wi = w.data() + i * k;
    const float* hi = h.data() + i * kr;
    float* gi = g.data() + i * kr;
    if (weights_mixing) {
      for (int64_t c = 0; c < r; ++c) {
        float m = 0.f;
        for (int64_t j = 0; j < k; ++j) m += wi[j] * hi[j * r + c];
        for (int64_t j = 0; j < k; ++j) gi[j * r + c] = wi[j] * m;
      }
    } else {
      for (int64_t j = 0; j < k; ++j)
        for (int64_t c = 0; c < r; ++c) gi[j * r + c] = wi[j] * hi[j * r + c];
    }
  }
  clock.lap(3);

  // 4. expand. Grouped by expert (enough tokens per expert): column chunks of at most kDeltaBytes of float32 sums for
  // all tokens (the chunk stays in L2), each expert's Bᵀ chunk read once and applied to its tokens in register blocks.
  // Otherwise work = (token block × group of 64-column d_out tiles); inside a task, tiles in order and, per tile,
  // every token of the block. A tile of all E·r Bᵀ rows (20 KB at E·r = 80 in float32, with the padded row stride of
  // packing.py) stays in L1 across the block's tokens, and each token's y row is walked sequentially tile after tile,
  // which the hardware prefetcher follows. Few tokens (decode): split d_out across threads instead. No two tasks
  // write the same y element. When all of Bᵀ is larger than kExpandAllTokensBytes, every token block would stream
  // the whole of Bᵀ from memory again: one block of all tokens instead reads it once.
  if (expand_grouped) {
    int64_t delta_bytes = kDeltaBytes;
#ifdef GKF_PHASE_TIMING
    if (const char* v = std::getenv("GKF_DELTA_KB")) delta_bytes = std::atoll(v) << 10;
#endif
    const int64_t chunk = std::max<int64_t>(64, std::min<int64_t>(4096, delta_bytes / (4 * t) / 64 * 64));
    const int64_t n_chunks = (d_out + chunk - 1) / chunk;
    run(serial, n_chunks, 1, [&](int64_t lo, int64_t hi) {
      // Scratch kept per thread across calls: a fresh buffer of this size came from mmap, zero pages faulted in on
      // every call.
      static thread_local std::vector<float> delta;
      if (delta.size() < static_cast<size_t>(t * chunk)) delta.resize(t * chunk);
      for (int64_t c = lo; c < hi; ++c)
        kern.expand_pairs(p, by_expert.data(), n_pairs, c * chunk, std::min(d_out, (c + 1) * chunk), delta.data());
    });
    clock.lap(4);
    return;
  }
  const int64_t tok_block = e * r * d_out * esz > kExpandAllTokensBytes ? t : 32;
  const int64_t n_tiles = (d_out + kTile - 1) / kTile;
  const int64_t n_blocks = (t + tok_block - 1) / tok_block;
  const int64_t n_groups = n_blocks >= 2 * threads ? 1 : std::min(n_tiles, 4 * threads);
  const int64_t tiles_per_group = (n_tiles + n_groups - 1) / n_groups;
  run(serial, n_blocks * n_groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t blk = task / n_groups, grp = task % n_groups;
      const int64_t c0 = std::min(d_out, grp * tiles_per_group * kTile);
      const int64_t c1 = std::min(d_out, c0 + tiles_per_group * kTile);
      const int64_t i0 = blk * tok_block, i1 = std::min(t, i0 + tok_block);
      if (c0 < c1) kern.expand(p, i0, i1, c0, c1, kTile);
    }
  });
  clock.lap(4);
}

#ifdef GKF_PHASE_TIMING
std::vector<int64_t> routed_lora_phase_ns() {
  std::vector<int64_t> out;
  for (auto& v : g_phase_ns) out.push_back(v.exchange(0));
  return out;
}
#endif

}  // namespace gkf_rl

TORCH_LIBRARY_FRAGMENT(genknowsub_fast_C, m) {
  m.def(
      "routed_lora_delta_(Tensor(a!) y, Tensor x, Tensor prototypes, Tensor a, Tensor b_t, int top_k, "
      "float temperature, bool weights_mixing, Tensor? scores=None, Tensor? screen=None) -> ()");
#ifdef GKF_PHASE_TIMING
  m.def("routed_lora_phase_ns() -> int[]", &gkf_rl::routed_lora_phase_ns);
#endif
}

TORCH_LIBRARY_IMPL(genknowsub_fast_C, CPU, m) { m.impl("routed_lora_delta_", &gkf_rl::routed_lora_delta_); }
