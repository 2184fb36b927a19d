#pragma once
// score_accumulate_: scores[i] += alpha * f(weights[i], values[i]) over a list of tensors in one call.

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace graspext::ops {

// f(w, v). Sign convention: GraSP's score is -theta * (H g), i.e. kNegProduct with v = Hg
// (Wang et al. 2020, eq. 8; official pruner/GraSP.py); SNIP and SynFlow use |theta * dL/dtheta|.
enum class ScoreMode { kNegProduct, kAbsProduct, kProduct };

ScoreMode parse_score_mode(c10::string_view mode);

// Validates the three lists (lengths, shapes, devices, dtypes) for every backend.
void check_score_accumulate_args(at::TensorList scores, at::TensorList weights, at::TensorList values);

}  // namespace graspext::ops
