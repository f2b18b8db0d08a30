// Routed-LoRA kernels for any CPU (the baseline instruction set; see routed_lora_impl.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "routed_lora_kernels.h"

namespace gkf_rl {
namespace scalar {
namespace {
#define GKF_VEC_SCALAR
#include "cpu_vec.h"
#undef GKF_VEC_SCALAR
#include "routed_lora_impl.h"
}  // namespace
}  // namespace scalar

const Kernels& kernels_scalar() { return scalar::KernelsOf<scalar::VecScalar>::table(); }

}  // namespace gkf_rl
