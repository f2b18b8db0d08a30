// Exact Arrow prototypes on the CPU, batched over every expert of every module in one call.
//
// Per expert: the r × r Gram matrices G_a = A Aᵀ and G_b = Bᵀ B accumulated in float64 in one streaming pass over
// the factors, the small eigen solve of prototypes_common.h, then p = Aᵀ c in a second pass over A. The whole
// library (for Phi-3-mini 32 layers × 4 modules × 10 experts = 1280 problems) is one parallel_for over experts; with
// fewer experts than threads the passes over d_in / d_out are split across threads instead.
//
// The solver (prototypes_cpu_impl.h) is compiled twice: for any CPU, and in an AVX2 + FMA target region (cpu_target.h)
// with hand-written AVX2 kernels for r = 4 and 8, used when the active ISA (cpu_isa.h) has AVX2. NaN / Inf in the factors show up in the float64 Gram
// matrices (their diagonals are sums of squares), so the op reports them without a separate pass over the data.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_target.h"
#include "prototypes_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gkf_proto_cpu {

struct Problem {
  const void* a;  // (r, d_in) of one expert
  const void* b;  // (d_out, r)
  void* out;      // (d_in)
  bool* zero;
  int64_t d_in, d_out;
  int r;
  int pair;   // index of the (A, B) pair in the call, for error messages
  bool avx2;  // run the AVX2 + FMA kernels
};

// solve_one's result: kOk, or a mask of the factors whose Gram matrix is not finite (they hold NaN or Inf).
constexpr int kOk = 0, kBadA = 1, kBadB = 2;

namespace base {
#define GKF_PROTO_AVX2 0
#include "prototypes_cpu_impl.h"
#undef GKF_PROTO_AVX2
}  // namespace base

#if GKF_HAVE_X86_TARGETS
GKF_TARGET_AVX2_BEGIN
namespace avx2 {
#define GKF_PROTO_AVX2 1
#include "prototypes_cpu_impl.h"
#undef GKF_PROTO_AVX2
}  // namespace avx2
GKF_TARGET_END
#endif

static void check_pair(const at::Tensor& a, const at::Tensor& b, size_t i) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, "arrow_prototypes: expected A (E, r, d_in) and B (E, d_out, r), got ",
              a.sizes(), " and ", b.sizes(), " (pair ", i, ")");
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(1) == b.size(2),
              "arrow_prototypes: A ", a.sizes(), " and B ", b.sizes(), " do not match (pair ", i, ")");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "arrow_prototypes: CPU tensors expected (pair ", i, ")");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()) && at::isFloatingType(b.scalar_type()),
              "arrow_prototypes: floating-point factors expected (pair ", i, ")");
}

// Output memory of a large call (a whole library: Phi-3-mini E64 r8 is 142 MB of prototypes). Fresh at::empty
// memory is faulted in 4 KB pages on first write, and those faults (with the kernel's page clearing) were ~15% of the
// op. On Linux, one 2 MB-aligned block with MADV_HUGEPAGE takes them in 2 MB pages instead. Null (use at::empty)
// off Linux, when the allocation fails, and below kHugeBlockMin: glibc trims freed heap memory above 64 MB (twice its
// largest dynamic mmap threshold) back to the OS, so outputs that large are fresh pages on every call anyway, while
// smaller ones are usually recycled from the heap without faults (E10 r4, 22 MB, was 14 -> 20 ms with the block).
constexpr int64_t kHugeBlockMin = int64_t(64) << 20;

static std::shared_ptr<void> huge_page_block(int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < kHugeBlockMin) return nullptr;
  const size_t size = (static_cast<size_t>(bytes) + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, size);
  if (p == nullptr) return nullptr;
  madvise(p, size, MADV_HUGEPAGE);  // advisory: on failure the block still works with normal pages
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
#else
  (void)bytes;
  return nullptr;
#endif
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> arrow_prototypes_batched(at::TensorList a_list,
                                                                                      at::TensorList b_list) {
  TORCH_CHECK(a_list.size() == b_list.size(), "arrow_prototypes_batched: ", a_list.size(), " A tensors but ",
              b_list.size(), " B tensors");
  const size_t m = a_list.size();
  // Work in float64 when any factor is float64, else float32 (fp16 / bf16 are widened once, which is cheap).
  bool any_double = false;
  for (size_t i = 0; i < m; ++i) {
    check_pair(a_list[i], b_list[i], i);
    any_double = any_double || a_list[i].scalar_type() == at::kDouble || b_list[i].scalar_type() == at::kDouble;
  }
  const auto work = any_double ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> a_w(m), b_w(m), out_w(m), protos(m), zeros(m);
  std::vector<Problem> problems;
  const bool avx2 = gkf_isa::active() != gkf_isa::Isa::kScalar;
  int64_t out_bytes = 0;
  for (size_t i = 0; i < m; ++i) {
    a_w[i] = a_list[i].to(work).contiguous();
    b_w[i] = b_list[i].to(work).contiguous();
    out_bytes += (a_w[i].size(0) * a_w[i].size(2) * a_w[i].element_size() + 63) / 64 * 64;
  }
  std::shared_ptr<void> block = huge_page_block(out_bytes);
  int64_t out_off = 0;
  for (size_t i = 0; i < m; ++i) {
    const int64_t e = a_w[i].size(0), r = a_w[i].size(1), d_in = a_w[i].size(2), d_out = b_w[i].size(1);
    const int64_t esz = a_w[i].element_size();
    if (block) {  // a slice of the shared block with its own storage; the block is freed with the last of them
      void* ptr = static_cast<char*>(block.get()) + out_off;
      out_off += (e * d_in * esz + 63) / 64 * 64;
      out_w[i] = at::from_blob(ptr, {e, d_in}, [block](void*) {}, a_w[i].options());
    } else {
      out_w[i] = at::empty({e, d_in}, a_w[i].options());
    }
    zeros[i] = at::zeros({e}, a_w[i].options().dtype(at::kBool));
    for (int64_t k = 0; k < e; ++k) {
      problems.push_back({static_cast<const char*>(a_w[i].data_ptr()) + k * r * d_in * esz,
                          static_cast<const char*>(b_w[i].data_ptr()) + k * d_out * r * esz,
                          static_cast<char*>(out_w[i].data_ptr()) + k * d_in * esz, zeros[i].data_ptr<bool>() + k,
                          d_in, d_out, static_cast<int>(r), static_cast<int>(i), avx2});
    }
  }
  block.reset();
  int bad_pair = -1;
  int bad = kOk;
#if GKF_HAVE_X86_TARGETS
  if (avx2)
    bad = work == at::kDouble ? avx2::solve_all<double, double>(problems, &bad_pair)
                              : avx2::solve_all<float, float>(problems, &bad_pair);
  else
#endif
    bad = work == at::kDouble ? base::solve_all<double, double>(problems, &bad_pair)
                              : base::solve_all<float, float>(problems, &bad_pair);
  // backends/prototype_ext.py turns this message into a ValueError: keep its form "<A|B|A and B> (pair i) contain(s)
  // NaN or Inf".
  TORCH_CHECK(bad == kOk, "arrow_prototypes: ", bad == kBadA ? "A" : bad == kBadB ? "B" : "A and B", " (pair ",
              bad_pair, ") ", bad == kBadA || bad == kBadB ? "contains" : "contain", " NaN or Inf");
  for (size_t i = 0; i < m; ++i) protos[i] = out_w[i].to(a_list[i].scalar_type());
  return {protos, zeros};
}

std::tuple<at::Tensor, at::Tensor> arrow_prototypes(const at::Tensor& a, const at::Tensor& b) {
  auto res = arrow_prototypes_batched({a}, {b});
  return {std::get<0>(res)[0], std::get<1>(res)[0]};
}

}  // namespace gkf_proto_cpu

TORCH_LIBRARY_FRAGMENT(genknowsub_fast_C, m) {
  m.def("arrow_prototypes(Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("arrow_prototypes_batched(Tensor[] a, Tensor[] b) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(genknowsub_fast_C, CPU, m) {
  m.impl("arrow_prototypes", &gkf_proto_cpu::arrow_prototypes);
  m.impl("arrow_prototypes_batched", &gkf_proto_cpu::arrow_prototypes_batched);
}
