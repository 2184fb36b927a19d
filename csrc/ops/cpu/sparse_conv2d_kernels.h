#pragma once
// Interface between the sparse-convolution driver (sparse_conv2d_kernel.cpp: checks, layouts, threading) and
// the SIMD kernels in isa/, which are compiled once per instruction set and chosen at run time.
//
// Layout: every image is batch-innermost (the batch has stride 1), so that one SIMD vector holds the same
// pixel of consecutive samples. Any stride and padding then costs the same: the kernels never vectorize
// along a spatial axis. Stride and padding reach the kernels only through the row and column maps below;
// the other strides of the images are free (the ops write [height, width, channels, batch]).
// Only plain types here: the isa/ files must not see library headers.

#include <cstdint>

namespace graspext::cpu {

// A bfloat16 activation as the kernels store it: the upper half of a float32 (the layout of c10::BFloat16).
// bfloat16 images are multiplied in float32: weights, bias, partial sums and weight gradients are float32
// (the compute type), and each product rounds to bfloat16 once, when it stores its output.
struct Bf16 {
  uint16_t bits;
};

// The type the kernels multiply and accumulate in for images of type T.
template <typename T>
struct ComputeType {
  using type = T;
};
template <>
struct ComputeType<Bf16> {
  using type = float;
};
template <typename T>
using compute_t = typename ComputeType<T>::type;

// Elements between consecutive channels, rows and columns of a batch-innermost image.
struct ImageStrides {
  int64_t channel, row, pixel;
};

// dst[row, y, x, :] = bias[row] + sum over the entries e of CSR row `row` of value(e) * src[c, sy, sx, :],
// where entry e reads source channel c through kernel tap (r, s) (decoded once per call by the driver),
// value(e) = values[e], sy = row_map[r * dst_h + y] and
// sx = col_map[s * dst_w + x] (-1: the tap falls outside the source, e.g. in the padding).
// The forward convolution is this product with src = input; the input gradient is the same product with
// src = grad_output over the transposed CSR (rows are input channels) and maps that invert the stride.
template <typename T>
struct GatherConvArgs {
  int64_t batch;
  int64_t src_h, src_w;
  int64_t dst_rows, dst_h, dst_w;
  int64_t kernel_h, kernel_w;
  const T* src;
  T* dst;
  ImageStrides src_strides, dst_strides;
  const int64_t* row_ptr;      // [dst_rows + 1]
  const int64_t* tap_base;     // [nnz]: offset of the entry's source channel, c * src_strides.channel
  const int32_t* tap_r;        // [nnz]: kernel row r of the entry
  const int32_t* tap_s;        // [nnz]: kernel column s of the entry
  const compute_t<T>* values;  // [nnz], in the order of the entries
  const compute_t<T>* bias;    // null, or [dst_rows]
  const int32_t* row_map;      // [kernel_h, dst_h]
  const int32_t* col_map;      // [kernel_w, dst_w]
  bool rows_direct;            // kernel_h == 1 and row_map[y] == y: every entry is valid in every row
  int64_t col_step;            // source columns between consecutive destination columns where the map is
                               // affine (the stride; 1 for the transposed stride-1 map), or 0 if it is not
};

// Sampled product for the weight gradient, one dot product per kept weight:
// grad_values[e] = sum over y, x, n of grad_output[row, y, x, n] * input[c, sy, sx, n] with the forward maps.
template <typename T>
struct SddmmConvArgs {
  int64_t batch;
  int64_t in_h, in_w;
  int64_t out_h, out_w;
  int64_t kernel_h, kernel_w;
  const T* grad_output;  // [rows, out_h, out_w, batch] through go_strides
  const T* input;        // [channels, in_h, in_w, batch] through in_strides
  ImageStrides go_strides, in_strides;
  const int64_t* row_ptr;
  const int64_t* tap_base;  // [nnz]: c * in_strides.channel
  const int32_t* tap_r;     // [nnz]
  const int32_t* tap_s;     // [nnz]
  const int32_t* row_map;  // [kernel_h, out_h]
  const int32_t* col_map;  // [kernel_w, out_w]
  bool rows_direct;        // as in GatherConvArgs
  int64_t col_step;        // as in GatherConvArgs
  compute_t<T>* grad_values;  // [nnz]
};

// Per-thread scratch the driver allocates; sized by the largest row (entries) or the thread's rows.
template <typename T>
struct TapScratch {
  int64_t* offset;  // [max_row_nnz]
  int32_t* col;     // [max_row_nnz]
  int32_t* entry;        // [max_row_nnz]
  compute_t<T>* weight;  // [max_row_nnz]
};

// Cache blocking: the gather kernel's items are (batch chunk, y, x block, row), row fastest, so that
// consecutive items read the same source pixels, and the SDDMM kernel walks its rows in the same order. The
// driver sizes the blocks so that the pixels one (chunk, y, x block) reads across all rows fit in L2.
struct CacheBlocking {
  int64_t batch_chunk;  // samples per item
  int64_t x_block;      // output positions per item
};

template <typename T>
using GatherFn = void (*)(const GatherConvArgs<T>&, CacheBlocking, int64_t item_begin, int64_t item_end,
                          TapScratch<T>);
// The SDDMM kernel owns rows [row_begin, row_end); `partial` holds one vector of partial sums per entry of them
// (vector_bytes / sizeof(compute_t<T>) values), aligned to 64 bytes.
template <typename T>
using SddmmFn = void (*)(const SddmmConvArgs<T>&, CacheBlocking, int64_t row_begin, int64_t row_end, TapScratch<T>,
                         compute_t<T>* partial);

struct SparseConvKernels {
  const char* isa;
  int vector_bytes;
  GatherFn<float> gather_f32;
  GatherFn<double> gather_f64;
  SddmmFn<float> sddmm_f32;
  SddmmFn<double> sddmm_f64;
  GatherFn<Bf16> gather_bf16;
  SddmmFn<Bf16> sddmm_bf16;
};

// Each returns null when this build or CPU architecture has no such code path.
const SparseConvKernels* avx512_bf16_kernels();
const SparseConvKernels* avx512_kernels();
const SparseConvKernels* avx2_kernels();
const SparseConvKernels* baseline_kernels();

}  // namespace graspext::cpu
