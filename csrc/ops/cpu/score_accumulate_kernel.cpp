#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "ops/cpu/work_items.h"
#include "ops/score_accumulate.h"

namespace graspext::ops {
namespace {

constexpr int64_t kItemSize = 1 << 15;

template <typename scalar_t, ScoreMode kMode>
void accumulate(scalar_t* __restrict__ s, const scalar_t* __restrict__ w, const scalar_t* __restrict__ v,
                scalar_t alpha, int64_t n) {
  // Plain loops: the compiler vectorizes them; the op is bound by memory bandwidth.
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t p = w[i] * v[i];
    if constexpr (kMode == ScoreMode::kNegProduct) {
      s[i] += alpha * (-p);
    } else if constexpr (kMode == ScoreMode::kAbsProduct) {
      s[i] += alpha * std::abs(p);
    } else {
      s[i] += alpha * p;
    }
  }
}

void score_accumulate_cpu(at::TensorList scores, at::TensorList weights, at::TensorList values, double alpha,
                          c10::string_view mode) {
  check_score_accumulate_args(scores, weights, values);
  const ScoreMode score_mode = parse_score_mode(mode);
  const auto dtype = scores[0].scalar_type();
  // Inputs of another floating dtype (e.g. AMP's half gradients) are computed in the score dtype.
  std::vector<at::Tensor> w, v;
  for (size_t i = 0; i < scores.size(); ++i) {
    w.push_back(weights[i].to(dtype).contiguous());
    v.push_back(values[i].to(dtype).contiguous());
  }
  const auto items = cpu::make_work_items(scores, kItemSize);
  if (items.empty()) return;
  AT_DISPATCH_FLOATING_TYPES(dtype, "score_accumulate_cpu", [&] {
    const auto a = static_cast<scalar_t>(alpha);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        const auto& item = items[it];
        scalar_t* s = scores[item.tensor].data_ptr<scalar_t>() + item.begin;
        const scalar_t* wp = w[item.tensor].const_data_ptr<scalar_t>() + item.begin;
        const scalar_t* vp = v[item.tensor].const_data_ptr<scalar_t>() + item.begin;
        const int64_t n = item.end - item.begin;
        switch (score_mode) {
          case ScoreMode::kNegProduct: accumulate<scalar_t, ScoreMode::kNegProduct>(s, wp, vp, a, n); break;
          case ScoreMode::kAbsProduct: accumulate<scalar_t, ScoreMode::kAbsProduct>(s, wp, vp, a, n); break;
          case ScoreMode::kProduct: accumulate<scalar_t, ScoreMode::kProduct>(s, wp, vp, a, n); break;
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CPU, m) {
  m.impl("score_accumulate_", &score_accumulate_cpu);
}

}  // namespace graspext::ops
