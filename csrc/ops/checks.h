#pragma once
// Argument checks shared by every backend. Messages name the argument and say what was expected.

#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace graspext::ops {

// All tensors in `list` are floating point (float32 or float64), on one device. Returns that dtype.
inline c10::ScalarType check_score_list(at::TensorList list, const char* name) {
  TORCH_CHECK(!list.empty(), name, " must be a non-empty list of tensors");
  const auto dtype = list[0].scalar_type();
  const auto device = list[0].device();
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    TORCH_CHECK(t.defined(), name, "[", i, "] is undefined");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, "[", i,
                "] must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] has dtype ", t.scalar_type(), " but ", name,
                "[0] has ", dtype, "; all must share one dtype");
    TORCH_CHECK(t.device() == device, name, "[", i, "] is on ", t.device(), " but ", name, "[0] is on ",
                device, "; all must be on one device");
  }
  return dtype;
}

inline int64_t total_numel(at::TensorList list) {
  int64_t n = 0;
  for (const auto& t : list) n += t.numel();
  return n;
}

// The arguments of global_kth_value, for every backend. Returns the scores' dtype.
inline c10::ScalarType check_global_kth_value_args(at::TensorList scores, int64_t k) {
  const auto dtype = check_score_list(scores, "scores");
  const int64_t n = total_numel(scores);
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, ", n, "] (the total number of scores), got ", k);
  return dtype;
}

// Raises naming the first tensor that holds NaN or Inf, if any; the kernels call it once they have counted
// non-finite scores (off the hot path: one reduction per tensor).
inline void check_scores_finite(at::TensorList scores) {
  for (size_t i = 0; i < scores.size(); ++i) {
    const int64_t bad = scores[i].numel() - at::isfinite(scores[i]).sum().item<int64_t>();
    TORCH_CHECK(bad == 0, "scores[", i, "] contains ", bad,
                " NaN or Inf value(s); scores must be finite to be ranked (check the model and data)");
  }
}

// The arguments of masks_from_threshold, for every backend. Returns the scores' dtype.
inline c10::ScalarType check_masks_from_threshold_args(at::TensorList scores, const at::Tensor& threshold,
                                                       int64_t num_remove) {
  const auto dtype = check_score_list(scores, "scores");
  TORCH_CHECK(threshold.numel() == 1, "threshold must hold a single value, got shape ", threshold.sizes());
  TORCH_CHECK(threshold.device() == scores[0].device(), "threshold is on ", threshold.device(),
              " but scores are on ", scores[0].device());
  const int64_t n = total_numel(scores);
  TORCH_CHECK(num_remove >= 0 && num_remove <= n, "num_remove must be in [0, ", n, "], got ", num_remove);
  return dtype;
}

}  // namespace graspext::ops

// The arguments of topagg / topagg_votes, for every backend: grads [S, T, d] (votes: also [T, d]); sigma and
// beta only for the fused topagg. Value errors reach Python as ValueError, dtype errors as TypeError.
inline void check_topagg_args(const at::Tensor& grads, int64_t k, double max_grad, bool fused, double sigma = 1.0,
                              double beta = 0.0) {
  TORCH_CHECK_TYPE(grads.scalar_type() == at::kFloat || grads.scalar_type() == at::kDouble,
                   "grads must be float32 or float64, got ", grads.scalar_type());
  TORCH_CHECK_VALUE(fused ? grads.dim() == 3 : (grads.dim() == 2 || grads.dim() == 3), "grads must be ",
                    fused ? "[samples, teachers, d]" : "[teachers, d] or [samples, teachers, d]", ", got shape ",
                    grads.sizes());
  const int64_t d = grads.size(-1);
  TORCH_CHECK_VALUE(d >= 1 && grads.size(-2) >= 1,
                    "grads must have at least one teacher and one coordinate, got shape ", grads.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= d, "k must be in [1, ", d, "] (the gradient's length d), got ", k);
  TORCH_CHECK_VALUE(std::isfinite(max_grad) && max_grad > 0, "max_grad must be a positive finite number, got ",
                    max_grad);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0, "sigma must be a positive finite number (the noise's "
                    "standard deviation), got ", sigma);
  TORCH_CHECK_VALUE(beta >= 0 && beta < 1, "beta must be in [0, 1) (the vote threshold as a fraction of the "
                    "teachers), got ", beta);
}
