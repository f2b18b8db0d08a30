// Run-time choice of the CPU instruction set of the compiled kernels.
//
// The extension is built once with the compiler's default (baseline x86-64) flags, so the same build runs on any
// x86-64 CPU. The vectorized kernels live in their own translation units whose functions carry a target attribute
// (csrc/cpu_target.h); the caller picks one table of kernels at run time from what cpuid reports, or from the
// override GENKNOWSUB_FAST_CPU_ISA=scalar|avx2|avx512|auto (read at the first call), or from the op
// genknowsub_fast_C::cpu_isa(name) (tests force each path through it).
#pragma once

#include <string>

namespace gkf_isa {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Whether this CPU (and the OS, for the AVX state) can run the kernels of `isa`.
// kAvx2 needs AVX2, FMA and F16C; kAvx512 needs AVX-512 F, BW, VL, DQ and BF16.
bool supported(Isa isa);

// The best ISA this CPU supports.
Isa best();

// The ISA the kernels use now: the forced one, else best(). Throws (c10::Error) when GENKNOWSUB_FAST_CPU_ISA names an
// unknown ISA or one this CPU cannot run.
Isa active();

// "scalar", "avx2" or "avx512".
const char* name(Isa isa);

}  // namespace gkf_isa
