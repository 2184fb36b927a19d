#pragma once
// Argument checks shared by every backend. Messages name the argument and say what was expected.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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
