// AVX-512 build of the sparse convolution kernels; used only when the CPU reports AVX-512F (see
// sparse_conv2d_kernel.cpp), so this file alone may contain AVX-512 instructions.
#include "ops/cpu/sparse_conv2d_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#include <immintrin.h>  // intrinsics only: all `extern inline` or static, nothing the linker could merge

#define GRASPEXT_ISA avx512
#define GRASPEXT_ISA_NAME "avx512"
#define GRASPEXT_VEC_BYTES 64
#define GRASPEXT_FMA(a, b, c) graspext_fma512(a, b, c)
static inline __m512 graspext_fma512(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
static inline __m512d graspext_fma512(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
#include "ops/cpu/isa/sparse_conv2d_simd.h"

const graspext::cpu::SparseConvKernels* graspext::cpu::avx512_kernels() { return avx512::kernels(); }
#pragma GCC pop_options
#else
const graspext::cpu::SparseConvKernels* graspext::cpu::avx512_kernels() { return nullptr; }
#endif
