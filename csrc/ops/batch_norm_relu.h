#pragma once
// Shared by every backend of the fused BatchNorm ops (schemas in ops/batch_norm_relu.cpp): the argument checks.

#include <ATen/core/Tensor.h>

#include <optional>

namespace graspext::ops {

// The dtype of the statistics and parameter gradients: float32 for bfloat16 activations, else the input's.
at::ScalarType batch_norm_stats_dtype(const at::Tensor& input);

// The forward op's arguments, for a backend on `device`.
void check_batch_norm_forward_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   double eps, c10::DeviceType device);

// The backward op's arguments, for a backend on `device`.
void check_batch_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                    const at::Tensor& var, c10::DeviceType device);

}  // namespace graspext::ops
