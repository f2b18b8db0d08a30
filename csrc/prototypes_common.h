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

// Serial cyclic Jacobi on a symmetric n × n row-major matrix `a` (overwritten: its diagonal ends as the eigenvalues);
// `v` receives the eigenvectors as columns. Converges quadratically; stops when the off-diagonal mass is below
// ε² of the Frobenius norm, or after kMaxSweeps sweeps.
GKF_HD inline void jacobi_eigh(double* a, double* v, int n) {
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
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (apq == 0.0) continue;
        double c, s, t;
        jacobi_rotation(a[p * n + p], a[q * n + q], apq, &c, &s, &t);
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
    }
  }
}

// From G_a (overwritten) and G_b (overwritten: it ends holding M), the coefficients c (r) with p ∝ Aᵀ c. `work`
// holds 2 r² doubles.
// Returns false when ΔW is (numerically) zero; c is then all zero.
GKF_HD inline bool solve_coefficients(double* ga, double* gb, int r, double* coef, double* work) {
  double tra = 0.0, trb = 0.0;
  for (int i = 0; i < r; ++i) {
    tra += ga[i * r + i];
    trb += gb[i * r + i];
    coef[i] = 0.0;
  }
  const double scale = tra * trb;
  if (!(scale > 0.0)) return false;
  double* u = work;          // eigenvectors of G_a (columns)
  double* w = work + r * r;  // G_b U, then the eigenvectors of M
  double* m = gb;            // M replaces G_b once G_b U is formed
  jacobi_eigh(ga, u, r);
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
  jacobi_eigh(m, w, r);
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
