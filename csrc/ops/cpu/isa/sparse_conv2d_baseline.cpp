// Portable build of the sparse convolution kernels: 16-byte vectors in the compiler's vector extension,
// which every x86-64 CPU (SSE2) and other architectures' baseline vector units can run.
#include "ops/cpu/sparse_conv2d_kernels.h"

#define GRASPEXT_ISA baseline
#define GRASPEXT_ISA_NAME "baseline"
#define GRASPEXT_VEC_BYTES 16
#define GRASPEXT_FMA(a, b, c) ((a) * (b) + (c))
#include "ops/cpu/isa/sparse_conv2d_simd.h"

const graspext::cpu::SparseConvKernels* graspext::cpu::baseline_kernels() { return baseline::kernels(); }
