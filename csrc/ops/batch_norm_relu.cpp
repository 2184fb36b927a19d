// Schemas of the fused training-mode BatchNorm (+ optional ReLU) ops.
//
// They normalize a contiguous [P, C, L] tensor per channel C over (P, L): a batch-innermost activation
// ([H, W, C, N] storage) is [H*W, C, N], an NCHW-contiguous one [N, C, H*W]. One pass gathers the statistics
// and one writes the output; the backward pass likewise reads its inputs twice, where BatchNorm, a residual
// add and ReLU in torch make about twice as many passes over memory.
#include "ops/batch_norm_relu.h"

#include <torch/library.h>

namespace graspext::ops {
namespace {

void check_input(const at::Tensor& input, c10::DeviceType device) {
  TORCH_CHECK(input.dim() == 3, "input must be 3-D [P, C, L] (positions, channels, inner), got shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "input must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(input.device().type() == device, "input must be a ", c10::DeviceTypeName(device),
              " tensor for this kernel, got ", input.device());
  TORCH_CHECK(input.is_contiguous(), "input must be contiguous [P, C, L]");
  TORCH_CHECK(input.size(0) * input.size(2) > 1, "input must have more than one value per channel, got shape ",
              input.sizes());
}

void check_channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() == input.size(1), name, " must have shape [", input.size(1),
              "] (one per channel), got ", t->sizes());
  // bfloat16 activations take float32 parameters and statistics (autocast's master weights) or bfloat16 ones.
  const bool fits = t->scalar_type() == input.scalar_type() ||
                    (input.scalar_type() == at::kBFloat16 && t->scalar_type() == at::kFloat);
  TORCH_CHECK(fits, name, " has dtype ", t->scalar_type(), " but input has ", input.scalar_type(),
              input.scalar_type() == at::kBFloat16 ? " (bfloat16 input takes float32 or bfloat16)" : "");
  TORCH_CHECK(t->device() == input.device(), name, " is on ", t->device(), " but input is on ", input.device());
}

void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.sizes() == input.sizes() && t.scalar_type() == input.scalar_type() && t.device() == input.device(),
              name, " must match input (", input.scalar_type(), " of shape ", input.sizes(), " on ", input.device(),
              "), got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

}  // namespace

at::ScalarType batch_norm_stats_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kBFloat16 ? at::kFloat : input.scalar_type();
}

void check_batch_norm_forward_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   double eps, c10::DeviceType device) {
  check_input(input, device);
  check_channel_vector(weight, input, "weight");
  check_channel_vector(bias, input, "bias");
  if (residual) check_like_input(*residual, input, "residual");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
}

void check_batch_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                    const at::Tensor& var, c10::DeviceType device) {
  check_input(input, device);
  check_like_input(grad_out, input, "grad_out");
  check_like_input(out, input, "out");
  check_channel_vector(weight, input, "weight");
  check_channel_vector(mean, input, "mean");
  check_channel_vector(var, input, "var");
}

}  // namespace graspext::ops

TORCH_LIBRARY_FRAGMENT(graspext, m) {
  // Returns (out, mean, var): var is the biased batch variance; out = relu?((x - mean) / sqrt(var + eps) *
  // weight + bias + residual), with weight, bias and residual optional (residual: a ResNet block's shortcut,
  // shaped like input).
  m.def(
      "batch_norm_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias, grad_residual): grad_weight and grad_bias are the
  // per-channel sums whether or not the forward pass had weight and bias; grad_residual (the masked
  // grad_out) is empty unless residual_grad. `out` (the forward result) supplies the ReLU mask.
  m.def(
      "batch_norm_relu_backward(Tensor grad_out, Tensor input, Tensor out, Tensor? weight, Tensor mean, "
      "Tensor var, float eps, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
