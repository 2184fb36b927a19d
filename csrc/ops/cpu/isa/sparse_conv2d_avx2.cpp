// AVX2 + FMA build of the sparse convolution kernels; used when the CPU has them but not AVX-512.
#include "ops/cpu/sparse_conv2d_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>  // intrinsics only: all `extern inline` or static, nothing the linker could merge

#define GRASPEXT_ISA avx2
#define GRASPEXT_ISA_NAME "avx2"
#define GRASPEXT_VEC_BYTES 32
#define GRASPEXT_FMA(a, b, c) graspext_fma256(a, b, c)
static inline __m256 graspext_fma256(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
static inline __m256d graspext_fma256(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
#include "ops/cpu/isa/sparse_conv2d_simd.h"

const graspext::cpu::SparseConvKernels* graspext::cpu::avx2_kernels() { return avx2::kernels(); }
#pragma GCC pop_options
#else
const graspext::cpu::SparseConvKernels* graspext::cpu::avx2_kernels() { return nullptr; }
#endif
