// Exact Arrow prototypes on CUDA: one thread block per expert (problem), for every module of a library at once.
//
// Per block: the r × r Gram matrices G_a = A Aᵀ and G_b = Bᵀ B accumulated in float64 from tiles of the factors
// staged in shared memory (each thread owns up to kItems (row pair, column slice) accumulators, merged with shared
// atomics), the r × r cyclic Jacobi solves of prototypes_common.h in shared memory, then p = Aᵀ c with a block
// reduction for the norm and the canonical sign (largest-|entry| positive, first index on ties).
//
// No torch headers here (the binding, prototypes_cuda_binding.cpp, owns the torch side).

#include <cuda_runtime.h>

#include <cstdint>

#include "prototypes_common.h"
#include "prototypes_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kStage = 2048;  // doubles of staged factor tile
constexpr int kMaxPairs = kGkfProtoMaxRank * (kGkfProtoMaxRank + 1) / 2;
constexpr int kItems = (kMaxPairs + kThreads - 1) / kThreads;  // 9 accumulators per thread at r = 64

__device__ inline void pair_of(int p, int r, int* i, int* j) {
  // p-th pair (i ≤ j) in row-major order of the upper triangle
  int row = 0;
  while (p >= r - row) {
    p -= r - row;
    ++row;
  }
  *i = row;
  *j = row + p;
}

// Accumulates the Gram matrix of either A (columns = d_in, rows of a are the r factor rows, `by_rows` false) or
// B (rows of r contiguous values, `by_rows` true) into g (shared, r × r, upper triangle then mirrored).
__device__ void block_gram(const float* __restrict__ src, int64_t n, int r, bool by_rows, double* stage, double* g) {
  const int tid = threadIdx.x;
  const int pairs = r * (r + 1) / 2;
  const int slices = pairs >= kThreads ? 1 : kThreads / pairs;
  const int items = pairs * slices;
  double acc[kItems];
  int pi[kItems], pj[kItems], ps[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    acc[k] = 0.0;
    const int item = tid + k * kThreads;
    if (item < items) {
      pair_of(item % pairs, r, &pi[k], &pj[k]);
      ps[k] = item / pairs;
    } else {
      pi[k] = pj[k] = ps[k] = 0;
    }
  }
  const int chunk = kStage / r;  // columns (A) or rows (B) per tile
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {
    const int w = static_cast<int>(n - c0 < chunk ? n - c0 : chunk);
    if (by_rows) {  // tile = rows [c0, c0 + w) of B: contiguous
      const float* base = src + c0 * r;
      for (int idx = tid; idx < w * r; idx += kThreads) stage[idx] = static_cast<double>(base[idx]);
    } else {  // tile = columns [c0, c0 + w) of the r rows of A, stored row by row with row length `chunk`
      for (int idx = tid; idx < r * chunk; idx += kThreads) {
        const int i = idx / chunk, x = idx - i * chunk;
        stage[idx] = x < w ? static_cast<double>(src[i * n + c0 + x]) : 0.0;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (tid + k * kThreads < items) {
        const int i = pi[k], j = pj[k];
        double s = acc[k];
        if (by_rows) {
          for (int y = ps[k]; y < w; y += slices) s += stage[y * r + i] * stage[y * r + j];
        } else {
          const double* ri = stage + i * chunk;
          const double* rj = stage + j * chunk;
          for (int x = ps[k]; x < w; x += slices) s += ri[x] * rj[x];
        }
        acc[k] = s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k)
    if (tid + k * kThreads < items) atomicAdd(&g[pi[k] * r + pj[k]], acc[k]);
  __syncthreads();
  for (int idx = tid; idx < r * r; idx += kThreads) {
    const int i = idx / r, j = idx - i * r;
    if (i > j) g[idx] = g[j * r + i];
  }
  __syncthreads();
}

struct ArgMax {
  double absval;
  double val;
  long long idx;
};

__device__ inline ArgMax better(const ArgMax& x, const ArgMax& y) {
  if (y.absval > x.absval || (y.absval == x.absval && y.idx < x.idx)) return y;
  return x;
}

__global__ void __launch_bounds__(kThreads) arrow_prototypes_kernel(const GkfProtoProblem* __restrict__ problems) {
  extern __shared__ double smem[];
  __shared__ double red_ss[kThreads / 32];
  __shared__ ArgMax red_arg[kThreads / 32];
  __shared__ int nonzero;
  __shared__ double mult;

  const GkfProtoProblem pr = problems[blockIdx.x];
  const int r = pr.r;
  const int tid = threadIdx.x;
  const int rr = r * r;
  double* ga = smem;
  double* gb = ga + rr;
  double* work = gb + rr;       // 2 r²
  double* coef = work + 2 * rr; // r
  double* stage = coef + r;     // kStage (also the solver's scratch is separate: no overlap)

  for (int idx = tid; idx < 2 * rr; idx += kThreads) smem[idx] = 0.0;
  __syncthreads();
  if (r > 0) {
    block_gram(pr.a, pr.d_in, r, false, stage, ga);
    block_gram(pr.b, pr.d_out, r, true, stage, gb);
  }
  if (tid == 0) nonzero = r > 0 && gkf_proto::solve_coefficients(ga, gb, r, coef, work) ? 1 : 0;
  __syncthreads();
  if (!nonzero) {
    for (int64_t x = tid; x < pr.d_in; x += kThreads) pr.out[x] = 0.f;
    if (tid == 0) *pr.zero = true;
    return;
  }

  // p = Aᵀ c (float64 sums, stored rounded), Σ p² and the first largest |p|.
  double ss = 0.0;
  ArgMax best{-1.0, 0.0, 0x7fffffffffffffffLL};
  for (int64_t x = tid; x < pr.d_in; x += kThreads) {
    double s = 0.0;
    for (int i = 0; i < r; ++i) s += coef[i] * static_cast<double>(pr.a[i * pr.d_in + x]);
    pr.out[x] = static_cast<float>(s);
    ss += s * s;
    const ArgMax cand{fabs(s), s, static_cast<long long>(x)};
    best = better(best, cand);
  }
  for (int off = 16; off > 0; off >>= 1) {
    ss += __shfl_down_sync(0xffffffffu, ss, off);
    ArgMax o;
    o.absval = __shfl_down_sync(0xffffffffu, best.absval, off);
    o.val = __shfl_down_sync(0xffffffffu, best.val, off);
    o.idx = __shfl_down_sync(0xffffffffu, best.idx, off);
    best = better(best, o);
  }
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) {
    red_ss[warp] = ss;
    red_arg[warp] = best;
  }
  __syncthreads();
  if (tid == 0) {
    double tot = 0.0;
    ArgMax b = red_arg[0];
    for (int k = 0; k < kThreads / 32; ++k) {
      tot += red_ss[k];
      b = better(b, red_arg[k]);
    }
    const double norm = sqrt(tot);
    mult = norm > 0.0 ? (b.val < 0 ? -1.0 : 1.0) / norm : 0.0;
    *pr.zero = !(norm > 0.0);
  }
  __syncthreads();
  const double m = mult;
  for (int64_t x = tid; x < pr.d_in; x += kThreads) pr.out[x] = static_cast<float>(pr.out[x] * m);
}

size_t shared_bytes(int r_max) {
  return sizeof(double) * (4 * static_cast<size_t>(r_max) * r_max + r_max + kStage);
}

}  // namespace

extern "C" int gkf_arrow_prototypes_cuda_launch(const GkfProtoProblem* problems, int64_t n, int r_max, void* stream) {
  if (n == 0) return 0;
  if (r_max < 0 || r_max > kGkfProtoMaxRank) return static_cast<int>(cudaErrorInvalidValue);
  const size_t bytes = shared_bytes(r_max < 1 ? 1 : r_max);
  if (bytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(arrow_prototypes_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  arrow_prototypes_kernel<<<static_cast<unsigned>(n), kThreads, bytes, static_cast<cudaStream_t>(stream)>>>(problems);
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* gkf_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
