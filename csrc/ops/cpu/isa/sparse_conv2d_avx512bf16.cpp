// AVX-512 build with AVX512-BF16: the AVX-512 kernels, except that bfloat16 weight gradients multiply with
// vdpbf16ps (see Vec<Bf16>). Used only when the CPU reports AVX512-BF16 (see sparse_conv2d_kernel.cpp).
#include "ops/cpu/sparse_conv2d_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,avx2,fma")
#include <immintrin.h>  // intrinsics only: all `extern inline` or static, nothing the linker could merge

#define GRASPEXT_ISA avx512bf16
#define GRASPEXT_ISA_NAME "avx512_bf16"
#define GRASPEXT_VEC_BYTES 64
#define GRASPEXT_FMA(a, b, c) graspext_fma512bf(a, b, c)
#define GRASPEXT_DPBF16(acc, a, b) graspext_dpbf16(acc, a, b)
static inline __m512 graspext_fma512bf(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
static inline __m512d graspext_fma512bf(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
template <typename Words>
static inline __m512 graspext_dpbf16(__m512 acc, Words a, Words b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#include "ops/cpu/isa/sparse_conv2d_simd.h"

const graspext::cpu::SparseConvKernels* graspext::cpu::avx512_bf16_kernels() { return avx512bf16::kernels(); }
#pragma GCC pop_options
#else
const graspext::cpu::SparseConvKernels* graspext::cpu::avx512_bf16_kernels() { return nullptr; }
#endif
