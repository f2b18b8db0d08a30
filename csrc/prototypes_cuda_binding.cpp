// CUDA dispatch of genknowsub_fast_C::arrow_prototypes{,_batched}: builds the per-expert descriptors and calls the
// C-ABI launcher of prototypes_cuda.cu. Compiled only when the extension is built with CUDA.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "prototypes_cuda.h"

namespace gkf_proto_cuda {

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> arrow_prototypes_batched(at::TensorList a_list,
                                                                                      at::TensorList b_list) {
  TORCH_CHECK(a_list.size() == b_list.size(), "arrow_prototypes_batched: ", a_list.size(), " A tensors but ",
              b_list.size(), " B tensors");
  const size_t m = a_list.size();
  std::vector<at::Tensor> protos(m), zeros(m);
  if (m == 0) return {protos, zeros};
  const auto device = a_list[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> a_w(m), b_w(m), out_w(m);
  std::vector<GkfProtoProblem> problems;
  int r_max = 0;
  for (size_t i = 0; i < m; ++i) {
    const auto& a = a_list[i];
    const auto& b = b_list[i];
    TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(1) == b.size(2),
                "arrow_prototypes: expected A (E, r, d_in) and B (E, d_out, r), got ", a.sizes(), " and ", b.sizes(),
                " (pair ", i, ")");
    TORCH_CHECK(a.device() == device && b.device() == device, "arrow_prototypes: all factors must be on ", device);
    TORCH_CHECK(at::isFloatingType(a.scalar_type()) && at::isFloatingType(b.scalar_type()),
                "arrow_prototypes: floating-point factors expected (pair ", i, ")");
    TORCH_CHECK(a.size(1) <= kGkfProtoMaxRank, "arrow_prototypes: the CUDA kernel takes r <= ", kGkfProtoMaxRank,
                ", got r = ", a.size(1), " (pair ", i, ")");
    a_w[i] = a.to(at::kFloat).contiguous();
    b_w[i] = b.to(at::kFloat).contiguous();
    const int64_t e = a.size(0), r = a.size(1), d_in = a.size(2), d_out = b.size(1);
    out_w[i] = at::empty({e, d_in}, a_w[i].options());
    zeros[i] = at::zeros({e}, a_w[i].options().dtype(at::kBool));
    r_max = std::max<int>(r_max, static_cast<int>(r));
    const float* ap = a_w[i].data_ptr<float>();
    const float* bp = b_w[i].data_ptr<float>();
    float* op = out_w[i].data_ptr<float>();
    bool* zp = zeros[i].data_ptr<bool>();
    for (int64_t k = 0; k < e; ++k)
      problems.push_back({ap + k * r * d_in, bp + k * d_out * r, op + k * d_in, zp + k, d_in, d_out,
                          static_cast<int32_t>(r), 0});
  }
  const int64_t n = static_cast<int64_t>(problems.size());
  if (n > 0) {
    const int64_t bytes = n * static_cast<int64_t>(sizeof(GkfProtoProblem));
    auto host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), problems.data(), bytes);
    auto dev = host.to(device, /*non_blocking=*/true);
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int err = gkf_arrow_prototypes_cuda_launch(reinterpret_cast<const GkfProtoProblem*>(dev.data_ptr()), n,
                                                     r_max, static_cast<void*>(stream.stream()));
    TORCH_CHECK(err == 0, "arrow_prototypes CUDA kernel: ", gkf_cuda_error_string(err));
    // `host` may be freed now: the caching host allocator keeps pinned blocks until their copy's event completes.
  }
  for (size_t i = 0; i < m; ++i) protos[i] = out_w[i].to(a_list[i].scalar_type());
  return {protos, zeros};
}

std::tuple<at::Tensor, at::Tensor> arrow_prototypes(const at::Tensor& a, const at::Tensor& b) {
  auto res = arrow_prototypes_batched({a}, {b});
  return {std::get<0>(res)[0], std::get<1>(res)[0]};
}

}  // namespace gkf_proto_cuda

TORCH_LIBRARY_IMPL(genknowsub_fast_C, CUDA, m) {
  m.impl("arrow_prototypes", &gkf_proto_cuda::arrow_prototypes);
  m.impl("arrow_prototypes_batched", &gkf_proto_cuda::arrow_prototypes_batched);
}
