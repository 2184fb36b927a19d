#include "ops/score_accumulate.h"

#include <torch/library.h>

#include "ops/checks.h"

namespace graspext::ops {

ScoreMode parse_score_mode(c10::string_view mode) {
  if (mode == "neg_product") return ScoreMode::kNegProduct;
  if (mode == "abs_product") return ScoreMode::kAbsProduct;
  if (mode == "product") return ScoreMode::kProduct;
  TORCH_CHECK(false, "mode must be one of 'neg_product' (-w*v), 'abs_product' (|w*v|) or 'product' (w*v); got '",
              std::string(mode), "'");
}

void check_score_accumulate_args(at::TensorList scores, at::TensorList weights, at::TensorList values) {
  check_score_list(scores, "scores");
  TORCH_CHECK(weights.size() == scores.size(), "weights must have one tensor per score tensor: got ",
              weights.size(), " weights for ", scores.size(), " scores");
  TORCH_CHECK(values.size() == scores.size(), "values must have one tensor per score tensor: got ",
              values.size(), " values for ", scores.size(), " scores");
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto& s = scores[i];
    TORCH_CHECK(s.is_contiguous(), "scores[", i, "] must be contiguous (it is updated in place)");
    for (const auto& [t, name] : {std::pair{weights[i], "weights"}, std::pair{values[i], "values"}}) {
      TORCH_CHECK(t.defined(), name, "[", i, "] is undefined");
      TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, "[", i, "] must be floating point, got ",
                  t.scalar_type());
      TORCH_CHECK(t.device() == s.device(), name, "[", i, "] is on ", t.device(), " but scores[", i,
                  "] is on ", s.device());
      TORCH_CHECK(t.sizes() == s.sizes(), name, "[", i, "] has shape ", t.sizes(), " but scores[", i,
                  "] has shape ", s.sizes());
    }
  }
}

TORCH_LIBRARY_FRAGMENT(graspext, m) {
  m.def(
      "score_accumulate_(Tensor(a!)[] scores, Tensor[] weights, Tensor[] values, float alpha, str score_mode) -> ()");
}

}  // namespace graspext::ops
