// Routed-LoRA kernels compiled for AVX2 + FMA + F16C in a target region (the file keeps the baseline flags, so the
// build runs on any x86-64 CPU; the driver calls these only where the CPU has AVX2). See routed_lora_impl.h.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_target.h"
#include "routed_lora_kernels.h"

namespace gkf_rl {

#if GKF_HAVE_X86_TARGETS
GKF_TARGET_AVX2_BEGIN
namespace avx2 {
namespace {
#define GKF_VEC_AVX2
#include "cpu_vec.h"
#undef GKF_VEC_AVX2
#include "routed_lora_impl.h"
}  // namespace
}  // namespace avx2

const Kernels& kernels_avx2() { return avx2::KernelsOf<avx2::VecAvx2>::table(); }
GKF_TARGET_END
#else
const Kernels& kernels_avx2() { return kernels_scalar(); }
#endif

}  // namespace gkf_rl
