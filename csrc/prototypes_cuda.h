// C ABI of the CUDA prototype kernel (csrc/prototypes_cuda.cu), shared with its torch binding. No CUDA or torch
// headers: the stream is passed as an opaque pointer (a cudaStream_t).

#pragma once

#include <cstdint>

extern "C" {

// One expert: A (r, d_in) and B (d_out, r) contiguous float32, the prototype written to out (d_in) in float32 and
// *zero set to 1 when ΔW = B A is (numerically) zero (out is then all zero), else 0. All pointers are device pointers.
struct GkfProtoProblem {
  const float* a;
  const float* b;
  float* out;
  bool* zero;
  int64_t d_in;
  int64_t d_out;
  int32_t r;
  int32_t pad_;
};

// Largest rank the kernel takes (its per-thread accumulators and shared memory are sized for it).
constexpr int kGkfProtoMaxRank = 64;

// Launches one thread block per problem on `stream`. `problems` is a device array of n descriptors; r_max the
// largest r among them. Returns a cudaError_t value (0 on success).
int gkf_arrow_prototypes_cuda_launch(const GkfProtoProblem* problems, int64_t n, int r_max, void* stream);

// The message of a cudaError_t value.
const char* gkf_cuda_error_string(int err);
}
