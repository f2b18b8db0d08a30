// Interface between the routed-LoRA driver (routed_lora_cpu.cpp: checks, scheduling, threads, torch) and its
// per-ISA kernels (routed_lora_isa_*.cpp, each one instantiation of routed_lora_impl.h). Plain data only: the kernel
// translation units include no torch header.
#pragma once

#include <cstdint>

namespace gkf_rl {

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Storage of one bfloat16 / float16 value (the kernels convert to and from float32 themselves).
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

// One call of the op. x (T, d_in) and y (T, d_out) row-major; prototypes (E, d_in) float32; a (E, r, d_in); b_t
// (E, r, d_out) with row stride ld_b; x, y, a, b_t in `dtype`.
struct Problem {
  DType dtype = DType::kF32;
  int64_t t = 0, d_in = 0, d_out = 0, e = 0, r = 0, k = 0, ld_b = 0;
  const void* x = nullptr;
  void* y = nullptr;
  const float* proto = nullptr;
  const void* a = nullptr;
  const void* b = nullptr;
  double temperature = 1.0;
  // Routing results and shrink outputs, (T, k) and (T, k·r), written by the kernels.
  int32_t* idx = nullptr;
  float* w = nullptr;
  float* h = nullptr;
  // Expand coefficients (T, k·r), read by expand() and expand_pairs().
  const float* g = nullptr;
  // Screened routing (route_t): bfloat16 copies of the prototype rows, whose scores select the experts. Null: the
  // float32 scores select them.
  const Bf16* proto_screen = nullptr;
};

// Decode calls: at most this many tokens (they prefetch the rows the call reads: see routed_lora_impl.h).
constexpr int64_t kDecodeMaxT = 4;

struct Kernels {
  // out[(i - t0) * ld_out + j - e0] = x_i · p_j (float32) for tokens [t0, t1) and experts [e0, e1), in register
  // tiles of several tokens × 4 experts (the prototype rows of [e0, e1) are reused from cache by every token tile:
  // callers keep the range L2-sized). xf: scratch of O::kDotM·d_in floats (at most 4·d_in) for converted x rows.
  void (*scores)(const Problem& p, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out, int64_t ld_out,
                 float* xf);
  // The same against the bfloat16 prototypes p.proto_screen, x rounded to bfloat16 (vdpbf16ps where the ISA has it):
  // the screened scores that route() reads when p.proto_screen is set. xf: the same scratch, holding bfloat16 rows.
  void (*scores_screen)(const Problem& p, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* out, int64_t ld_out,
                        float* xf);
  // For tokens [t0, t1): logits |s_ij| (s from `scores`, row stride E, or x · p computed here when null), top-k with
  // ties to the lower index, softmax over the k in float64 → idx, w; then, when `shrink`, h = A_idx x for the k
  // selected experts. With p.proto_screen set, s holds screened scores: they select the experts, and their
  // float32 scores give the weights (see select_screened).
  void (*route)(const Problem& p, const float* scores, int64_t t0, int64_t t1, bool shrink);
  // h rows [r0, r1) of the (token, slot) pairs pairs[0..n) (pair = token·k + slot). Consecutive pairs with the same
  // expert (pairs sorted by expert) share register tiles: each A row load serves several tokens.
  void (*shrink_pairs)(const Problem& p, const int32_t* pairs, int64_t n, int64_t r0, int64_t r1);
  // y[i, c0:c1) = y + Σ_{slots j, rows c} g[i, j·r + c] · b_t[idx[i, j], c, c0:c1) for tokens [i0, i1), in tiles of
  // `tile` columns (tile-major: each tile of every token, then the next tile); the sum in float32, one rounding.
  void (*expand)(const Problem& p, int64_t i0, int64_t i1, int64_t c0, int64_t c1, int64_t tile);
  // The same for every token and the columns [c0, c1), grouped by expert: pairs[0..n) are all (token, slot) pairs
  // sorted by expert; register blocks of several tokens of one expert share each Bᵀ load. A token's sums wait in
  // delta (T × (c1 - c0) float32 scratch) between its experts; its last one adds them to y (one rounding).
  void (*expand_pairs)(const Problem& p, const int32_t* pairs, int64_t n, int64_t c0, int64_t c1, float* delta);
  // Whether scores_screen multiplies bfloat16 pairs in hardware (vdpbf16ps): screening only pays there.
  bool bf16_dot;
};

const Kernels& kernels_scalar();
const Kernels& kernels_avx2();    // only call where gkf_isa::supported(kAvx2)
const Kernels& kernels_avx512();  // only call where gkf_isa::supported(kAvx512)

}  // namespace gkf_rl
