// CUDA score accumulation: scores[i] += alpha * f(weights[i], values[i]) for every tensor of the list.
// One grid-stride launch per tensor on the current stream.

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda/launch.cuh"
#include "ops/score_accumulate.h"

namespace graspext::ops {
namespace {

template <typename scalar_t, ScoreMode kMode>
__global__ void accumulate_kernel(scalar_t* __restrict__ s, const scalar_t* __restrict__ w,
                                  const scalar_t* __restrict__ v, scalar_t alpha, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const scalar_t p = w[i] * v[i];
    if constexpr (kMode == ScoreMode::kNegProduct) {
      s[i] += alpha * (-p);
    } else if constexpr (kMode == ScoreMode::kAbsProduct) {
      s[i] += alpha * (p < scalar_t(0) ? -p : p);
    } else {
      s[i] += alpha * p;
    }
  }
}

template <typename scalar_t, ScoreMode kMode>
void launch(const at::Tensor& s, const at::Tensor& w, const at::Tensor& v, scalar_t alpha) {
  const int64_t n = s.numel();
  if (n == 0) return;
  accumulate_kernel<scalar_t, kMode>
      <<<grid_size(n, kThreadsPerBlock), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          s.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), alpha, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void score_accumulate_cuda(at::TensorList scores, at::TensorList weights, at::TensorList values, double alpha,
                           c10::string_view mode) {
  check_score_accumulate_args(scores, weights, values);
  const ScoreMode score_mode = parse_score_mode(mode);
  const c10::cuda::CUDAGuard guard(scores[0].device());
  const auto dtype = scores[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES(dtype, "score_accumulate_cuda", [&] {
    const auto a = static_cast<scalar_t>(alpha);
    for (size_t i = 0; i < scores.size(); ++i) {
      const auto w = weights[i].to(dtype).contiguous();
      const auto v = values[i].to(dtype).contiguous();
      switch (score_mode) {
        case ScoreMode::kNegProduct: launch<scalar_t, ScoreMode::kNegProduct>(scores[i], w, v, a); break;
        case ScoreMode::kAbsProduct: launch<scalar_t, ScoreMode::kAbsProduct>(scores[i], w, v, a); break;
        case ScoreMode::kProduct: launch<scalar_t, ScoreMode::kProduct>(scores[i], w, v, a); break;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("score_accumulate_", &score_accumulate_cuda);
}

}  // namespace graspext::ops
