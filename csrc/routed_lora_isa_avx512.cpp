// Routed-LoRA kernels compiled for AVX-512 (F, BW, VL, DQ, BF16) in a target region; the driver calls these only
// where the CPU has all of them. routed_lora_impl.h on 16 lanes; dot products of two bfloat16 operands (scores against
// bfloat16 prototypes, shrinks of bfloat16 experts) use vdpbf16ps (cpu_vec.h).

// GCC 12's AVX-512 intrinsic headers initialise their "undefined" vectors with themselves, which -Wall reports at every
// use; the warnings are about the headers, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

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
GKF_TARGET_AVX512_BEGIN
namespace avx512 {
namespace {
#define GKF_VEC_AVX512
#include "cpu_vec.h"
#undef GKF_VEC_AVX512
#include "routed_lora_impl.h"
}  // namespace

}  // namespace avx512

const Kernels& kernels_avx512() { return avx512::KernelsOf<avx512::VecAvx512>::table(); }
GKF_TARGET_END
#else
const Kernels& kernels_avx512() { return kernels_scalar(); }
#endif

}  // namespace gkf_rl
