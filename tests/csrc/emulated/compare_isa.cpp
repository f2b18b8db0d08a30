// Runs every routed-LoRA kernel of the emulated AVX-512 build and of the scalar build on the same random problems
// (all dtypes; d_in and d_out around the vector widths) and compares them. Tolerances from argv (float32, bfloat16,
// float16: the table of tests/tolerances.py), relative to max(1, the largest |value| of each compared array).
// Exit status 0 when everything agrees; prints the number of cases.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "routed_lora_kernels.h"

using namespace gkf_rl;

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Buf {
  std::vector<float> f;
  std::vector<uint16_t> h;
  DType dt;
  void init(size_t n, DType d, std::mt19937& g, float scale) {
    dt = d;
    std::normal_distribution<float> dist(0.f, scale);
    f.resize(n);
    h.resize(n);
    for (size_t i = 0; i < n; ++i) {
      float v = dist(g);
      if (d == DType::kBF16) v = from_bf16(h[i] = to_bf16(v));
      if (d == DType::kF16) v = _cvtsh_ss(h[i] = _cvtss_sh(v, 0));
      f[i] = v;
    }
  }
  void* ptr() { return dt == DType::kF32 ? static_cast<void*>(f.data()) : static_cast<void*>(h.data()); }
  float get(size_t i) const { return dt == DType::kF32 ? f[i] : dt == DType::kBF16 ? from_bf16(h[i]) : _cvtsh_ss(h[i]); }
};

int fails = 0;

void compare(const char* what, const std::vector<float>& a, const std::vector<float>& b, float tol) {
  float scale = 1.f;
  for (float v : b) scale = std::fmax(scale, std::fabs(v));
  for (size_t i = 0; i < a.size(); ++i)
    if (!(std::fabs(a[i] - b[i]) <= tol * scale)) {
      if (fails++ < 10) std::printf("mismatch %s[%zu]: %g vs %g\n", what, i, a[i], b[i]);
    }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const float tols[3] = {std::strtof(argv[1], nullptr), std::strtof(argv[2], nullptr), std::strtof(argv[3], nullptr)};
  std::mt19937 g(1);
  const Kernels* impl[2] = {&kernels_scalar(), &kernels_avx512()};
  int cases = 0;
  for (int dti = 0; dti < 3; ++dti)
    for (int64_t d_in : {1, 15, 16, 31, 33, 64, 65, 100, 130})
      for (int64_t d_out : {1, 17, 64, 70, 129, 300})
        for (int given_scores = 0; given_scores < 2; ++given_scores) {
          const DType dt = static_cast<DType>(dti);
          const int64_t t = 5, e = 7, r = d_in % 2 ? 5 : 3, k = 3, ld = d_out + 3;
          Buf x, a, b, y0;
          std::vector<float> protos(e * d_in);
          std::normal_distribution<float> dist(0.f, 1.f);
          for (float& v : protos) v = dist(g);
          x.init(t * d_in, dt, g, 1.f);
          a.init(e * r * d_in, dt, g, 0.3f);
          b.init(e * r * ld, dt, g, 0.5f);
          y0.init(t * d_out, dt, g, 1.f);
          std::vector<float> sc[2], w[2], h[2], ys[2], ys2[2];
          std::vector<int32_t> idx[2];
          for (int m = 0; m < 2; ++m) {
            const Kernels& kern = *impl[m];
            Buf y = y0, y2 = y0;
            std::vector<float> gg(t * k * r);
            sc[m].assign(t * e, 0.f);
            w[m].assign(t * k, 0.f);
            h[m].assign(t * k * r, 0.f);
            idx[m].assign(t * k, 0);
            Problem p;
            p.dtype = dt;
            p.t = t, p.d_in = d_in, p.d_out = d_out, p.e = e, p.r = r, p.k = k, p.ld_b = ld;
            p.x = x.ptr(), p.y = y.ptr(), p.proto = protos.data(), p.a = a.ptr(), p.b = b.ptr();
            p.idx = idx[m].data(), p.w = w[m].data(), p.h = h[m].data(), p.g = gg.data();
            std::vector<float> xf(4 * d_in);
            kern.scores(p, 0, t, 0, e, sc[m].data(), e, xf.data());
            std::vector<int32_t> pairs(t * k);
            for (int i = 0; i < t * k; ++i) pairs[i] = i;
            if (given_scores) {
              kern.route(p, sc[m].data(), 0, t, false);
              kern.shrink_pairs(p, pairs.data(), t * k, 0, r);
            } else {
              kern.route(p, nullptr, 0, t, true);
            }
            for (int i = 0; i < t * k * r; ++i) gg[i] = h[m][i] * w[m][i / r];
            kern.expand(p, 0, t, 0, d_out, 64);
            p.y = y2.ptr();
            std::vector<float> delta(t * d_out);
            std::vector<int32_t> by_expert(pairs);  // expand_pairs takes the pairs sorted by expert
            std::stable_sort(by_expert.begin(), by_expert.end(),
                             [&](int32_t u, int32_t v) { return idx[m][u] < idx[m][v]; });
            kern.expand_pairs(p, by_expert.data(), t * k, 0, d_out, delta.data());
            for (int64_t i = 0; i < t * d_out; ++i) {
              ys[m].push_back(y.get(i));
              ys2[m].push_back(y2.get(i));
            }
          }
          compare("scores", sc[1], sc[0], tols[0]);
          compare("weights", w[1], w[0], tols[0]);
          compare("shrink", h[1], h[0], tols[0]);
          compare("expand", ys[1], ys[0], tols[dti]);
          compare("expand_pairs", ys2[1], ys2[0], tols[dti]);
          if (idx[0] != idx[1] && fails++ < 10) std::printf("routing differs\n");
          ++cases;
        }
  std::printf("%d cases, %d mismatches\n", cases, fails);
  return fails == 0 ? 0 : 1;
}
