// Schemas of the fused training-mode BatchNorm (+ optional ReLU) ops.
//
// They normalize a contiguous [P, C, L] tensor per channel C over (P, L): a batch-innermost activation
// ([H, W, C, N] storage) is [H*W, C, N], an NCHW-contiguous one [N, C, H*W]. One pass gathers the statistics
// and one writes the output; the backward pass likewise reads its inputs twice, where BatchNorm, a residual
// add and ReLU in torch make about twice as many passes over memory.
#include <torch/library.h>

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
