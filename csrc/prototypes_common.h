// Shared constants and the small symmetric eigen solver of the exact Arrow prototype kernels (CPU and CUDA).
//
// Maths, per expert (A: r × d_in, B: d_out × r, ΔW = B A):
//   G_a = A Aᵀ = U Λ Uᵀ (cyclic Jacobi), G_b = Bᵀ B,
//   M = Λ^½ Uᵀ G_b U Λ^½ (r × r; rows/columns of directions with tiny λ are dropped, i.e. set to zero),
//   v = top eigenvector of M, p = Aᵀ U Λ^{-½} v, normalised, sign so that the largest-|entry| is positive.
// Λ^{-½} Uᵀ A has orthonormal rows spanning A's row space, so ΔWᵀΔW = Qᵀ M Q with Q those rows and the eigenvalues
// of M are the squared singular values of ΔW. A zero (or numerically zero) ΔW gives a zero prototype and a flag.
//
// No torch or CUDA headers here: the .cu includes this file too.

#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GKF_HD __host__ __device__
#else
#define GKF_HD
#endif

namespace gkf_proto {

// Directions of A's row space with λ_k ≤ kDropRel · λ_max are dropped: they change ΔW by at most
// sqrt(kDropRel) ≈ 3e-7 of ‖A‖₂‖B‖₂ (below float32 rounding of the factors) and Λ^{-½} would amplify their noise.
constexpr double kDropRel = 1e-13;
// ΔW counts as zero when σ₁² ≤ (64 ε₆₄)² ‖A‖_F² ‖B‖_F² (the torch fallback uses the same test).
constexpr double kZeroRel = (64.0 * 2.220446049250313e-16) * (64.0 * 2.220446049250313e-16);
constexpr int kMaxSweeps = 60;

// One Jacobi rotation's (c, s) that zeroes a[p][q] of a symmetric matrix (a_pp, a_qq, a_pq given); t = tan θ.
GKF_HD inline void jacobi_rotation(double app, double aqq, double apq, double* c, double* s, double* t) {
  const double theta = (aqq - app) / (2.0 * apq);
  double tt;
  if (fabs(theta) > 1e150) {
    tt = 0.5 / theta;
  } else {
    tt = 1.0 / (fabs(theta) + sqrt(theta * theta + 1.0));
    if (theta < 0) tt = -tt;
  }
  const double cc = 1.0 / sqrt(tt * tt + 1.0);
  *c = cc;
  *s = tt * cc;
  *t = tt;
}

// Applies the rotation (c, s, t) that zeroes a[p][q] (apq its value before) to `a` and to the columns p, q of `v`.
GKF_HD inline void jacobi_apply(double* a, double* v, int n, int p, int q, double apq, double c, double s, double t) {
  a[p * n + p] -= t * apq;
  a[q * n + q] += t * apq;
  a[p * n + q] = a[q * n + p] = 0.0;
  for (int k = 0; k < n; ++k) {
    if (k != p && k != q) {
      const double akp = a[k * n + p], akq = a[k * n + q];
      const double np_ = c * akp - s * akq, nq = s * akp + c * akq;
      a[k * n + p] = a[p * n + k] = np_;
      a[k * n + q] = a[q * n + k] = nq;
    }
    const double vkp = v[k * n + p], vkq = v[k * n + q];
    v[k * n + p] = c * vkp - s * vkq;
    v[k * n + q] = s * vkp + c * vkq;
  }
}

// Jacobi eigen solver on a symmetric n × n row-major matrix `a` (overwritten: its diagonal ends as the eigenvalues);
// `v` receives the eigenvectors as columns. Converges quadratically; stops when the off-diagonal mass is below
// ε² of the Frobenius norm, or after kMaxSweeps sweeps.
// NF = 0 (n read at run time): serial cyclic row order. NF > 0 even (the CPU kernel's r = 4 and r = 8): n = NF and
// each sweep runs in the round-robin ("parallel") order, n − 1 rounds of n / 2 disjoint pairs. The pairs of a round
// do not touch each other's a_pp, a_qq, a_pq, so all their (c, s, t) are computed first, as independent dependency
// chains (the divisions and square roots overlap instead of running back to back), then applied one after the other;
// the result is the same as rotating them one at a time in that order.
template <int NF = 0>
GKF_HD inline void jacobi_eigh(double* a, double* v, int n_rt) {
  static_assert(NF >= 0 && NF % 2 == 0, "jacobi_eigh: NF must be 0 or even");
  const int n = NF > 0 ? NF : n_rt;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) v[i * n + j] = i == j ? 1.0 : 0.0;
  double frob = 0.0;
  for (int i = 0; i < n * n; ++i) frob += a[i] * a[i];
  if (frob == 0.0) return;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    double off = 0.0;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) off += a[p * n + q] * a[p * n + q];
    if (off <= 1e-32 * frob) break;
    if constexpr (NF > 0) {
      constexpr int kHalf = NF / 2;
      for (int round = 0; round < NF - 1; ++round) {
        // players 0 .. NF − 2 on a circle plus NF − 1 fixed: pair (round, NF − 1), then (round ± i) mod (NF − 1)
        int pp[kHalf], qq[kHalf];
        double apq[kHalf], cc[kHalf], ss[kHalf], tt[kHalf];
        for (int i = 0; i < kHalf; ++i) {
          int x = i == 0 ? round : (round + i) % (NF - 1);
          int y = i == 0 ? NF - 1 : (round - i + (NF - 1)) % (NF - 1);
          pp[i] = x < y ? x : y;
          qq[i] = x < y ? y : x;
          apq[i] = a[pp[i] * NF + qq[i]];
          const double app = a[pp[i] * NF + pp[i]], aqq = a[qq[i] * NF + qq[i]];
          // An a_pq below 1/100 ulp of both a_pp and a_qq (whose rotation would change neither) is set to zero
          // without rotating (the classic threshold of cyclic Jacobi); it spares most of the last, confirming sweep.
          if (apq[i] != 0.0 && sweep > 2) {
            const double g100 = 100.0 * fabs(apq[i]);
            if (fabs(app) + g100 == fabs(app) && fabs(aqq) + g100 == fabs(aqq)) {
              a[pp[i] * NF + qq[i]] = a[qq[i] * NF + pp[i]] = 0.0;
              apq[i] = 0.0;
            }
          }
          if (apq[i] != 0.0) jacobi_rotation(app, aqq, apq[i], &cc[i], &ss[i], &tt[i]);
        }
        for (int i = 0; i < kHalf; ++i)
          if (apq[i] != 0.0) jacobi_apply(a, v, NF, pp[i], qq[i], apq[i], cc[i], ss[i], tt[i]);
      }
    } else {
      for (int p = 0; p < n; ++p) {
        for (int q = p + 1; q < n; ++q) {
          const double apq = a[p * n + q];
          if (apq == 0.0) continue;
          double c, s, t;
          jacobi_rotation(a[p * n + p], a[q * n + q], apq, &c, &s, &t);
          jacobi_apply(a, v, n, p, q, apq, c, s, t);
        }
      }
    }
  }
}

// The coefficients by whitening with a Cholesky factor instead of G_a's eigen decomposition (one Jacobi solve
// instead of two): G_a = L Lᵀ, Q = L⁻¹ A has orthonormal rows, ΔWᵀΔW = Qᵀ (Lᵀ G_b L) Q, so with v the top
// eigenvector of M = Lᵀ G_b L, p = Qᵀ v = Aᵀ L⁻ᵀ v. Only for a well-conditioned G_a: λ_min ≥ 1 / ‖L⁻¹‖_F² must exceed
// 1e-10 tr G_a (≥ 1e-10 λ_max), so no direction would have been dropped (kDropRel) and L⁻¹ amplifies rounding by
// at most ~1e10 ε. Returns -1 when not applicable (G_a untouched; the caller takes the eigen path), else 1 for a
// nonzero ΔW or 0 for a zero one (coef untouched, i.e. zero). gb ends holding M; work holds N² doubles.
template <int N>
GKF_HD inline int solve_coefficients_cholesky(const double* ga, double* gb, double tra, double scale, double* coef,
                                              double* work) {
  double l[N * N], li[N * N];
  for (int j = 0; j < N; ++j) {
    double d = ga[j * N + j];
    for (int k = 0; k < j; ++k) d -= l[j * N + k] * l[j * N + k];
    if (!(d > 0.0)) return -1;
    const double ljj = sqrt(d);
    l[j * N + j] = ljj;
    for (int i = j + 1; i < N; ++i) {
      double x = ga[i * N + j];
      for (int k = 0; k < j; ++k) x -= l[i * N + k] * l[j * N + k];
      l[i * N + j] = x / ljj;
    }
    for (int i = 0; i < j; ++i) l[i * N + j] = 0.0;
  }
  double fro = 0.0;
  for (int j = 0; j < N; ++j) {  // li = L⁻¹ (lower triangular), column by column
    for (int i = 0; i < j; ++i) li[i * N + j] = 0.0;
    li[j * N + j] = 1.0 / l[j * N + j];
    for (int i = j + 1; i < N; ++i) {
      double x = 0.0;
      for (int k = j; k < i; ++k) x += l[i * N + k] * li[k * N + j];
      li[i * N + j] = -x / l[i * N + i];
    }
    for (int i = j; i < N; ++i) fro += li[i * N + j] * li[i * N + j];
  }
  if (!(1.0 / fro > 1e-10 * tra)) return -1;
  double t[N * N];  // G_b L
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      double x = 0.0;
      for (int k = j; k < N; ++k) x += gb[i * N + k] * l[k * N + j];
      t[i * N + j] = x;
    }
  double* m = gb;
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      double x = 0.0;
      for (int k = i; k < N; ++k) x += l[k * N + i] * t[k * N + j];
      m[i * N + j] = x;
    }
  for (int i = 0; i < N; ++i)  // exact symmetry before Jacobi
    for (int j = i + 1; j < N; ++j) m[i * N + j] = m[j * N + i] = 0.5 * (m[i * N + j] + m[j * N + i]);
  double* w = work;
  jacobi_eigh<N>(m, w, N);
  int top = 0;
  for (int i = 1; i < N; ++i)
    if (m[i * N + i] > m[top * N + top]) top = i;
  if (!(m[top * N + top] > kZeroRel * scale)) return 0;
  for (int i = 0; i < N; ++i) {  // coef = L⁻ᵀ v
    double x = 0.0;
    for (int k = i; k < N; ++k) x += li[k * N + i] * w[k * N + top];
    coef[i] = x;
  }
  return 1;
}

// From G_a (overwritten) and G_b (overwritten: it ends holding M), the coefficients c (r) with p ∝ Aᵀ c. `work`
// holds 2 r² doubles.
// Returns false when ΔW is (numerically) zero; c is then all zero.
// NF as in jacobi_eigh.
template <int NF = 0>
GKF_HD inline bool solve_coefficients(double* ga, double* gb, int r_rt, double* coef, double* work) {
  const int r = NF > 0 ? NF : r_rt;
  double tra = 0.0, trb = 0.0;
  for (int i = 0; i < r; ++i) {
    tra += ga[i * r + i];
    trb += gb[i * r + i];
    coef[i] = 0.0;
  }
  const double scale = tra * trb;
  if (!(scale > 0.0)) return false;
  if constexpr (NF > 0) {  // the CPU kernel's fixed ranks: Cholesky whitening when G_a is well-conditioned
    const int res = solve_coefficients_cholesky<NF>(ga, gb, tra, scale, coef, work);
    if (res >= 0) return res == 1;
  }
  double* u = work;          // eigenvectors of G_a (columns)
  double* w = work + r * r;  // G_b U, then the eigenvectors of M
  double* m = gb;            // M replaces G_b once G_b U is formed
  jacobi_eigh<NF>(ga, u, r);
  double lmax = 0.0;
  for (int i = 0; i < r; ++i) lmax = fmax(lmax, ga[i * r + i]);
  if (!(lmax > 0.0)) return false;
  for (int i = 0; i < r; ++i) {  // d_i = sqrt(λ_i) for kept directions, 0 for dropped ones (stored on ga's diagonal)
    const double l = ga[i * r + i];
    ga[i * r + i] = l > kDropRel * lmax ? sqrt(l) : 0.0;
  }
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < r; ++j) {
      double acc = 0.0;
      for (int k = 0; k < r; ++k) acc += gb[i * r + k] * u[k * r + j];
      w[i * r + j] = acc;
    }
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < r; ++j) {
      double acc = 0.0;
      for (int k = 0; k < r; ++k) acc += u[k * r + i] * w[k * r + j];
      m[i * r + j] = ga[i * r + i] * ga[j * r + j] * acc;
    }
  for (int i = 0; i < r; ++i)  // exact symmetry before Jacobi
    for (int j = i + 1; j < r; ++j) m[i * r + j] = m[j * r + i] = 0.5 * (m[i * r + j] + m[j * r + i]);
  jacobi_eigh<NF>(m, w, r);
  int top = 0;
  for (int i = 1; i < r; ++i)
    if (m[i * r + i] > m[top * r + top]) top = i;
  const double sigma2 = m[top * r + top];
  if (!(sigma2 > kZeroRel * scale)) return false;
  for (int k = 0; k < r; ++k) {
    const double d = ga[k * r + k];
    if (d == 0.0) continue;
    const double vk = w[k * r + top] / d;
    for (int i = 0; i < r; ++i) coef[i] += u[i * r + k] * vk;
  }
  return true;
}

}  // namespace gkf_proto
