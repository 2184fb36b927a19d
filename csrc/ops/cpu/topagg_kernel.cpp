// TopAgg on the CPU: one row (sample, teacher) at a time, in parallel over rows. The k-th largest |g| of a row
// comes from std::nth_element on the magnitudes' order-preserving integer keys (ops/radix_key.h), then one pass
// keeps everything above it and the ties at it by index, lowest first, so the selection is exact and
// deterministic. The fused op sums each sample's votes in per-thread int32 rows, then adds the noise.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/radix_key.h"
#include "ops/topagg.h"

namespace graspext::ops {
namespace {

// Calls emit(coordinate, vote) for the k kept coordinates of one row, in increasing coordinate order.
template <typename scalar_t, typename Emit>
void row_votes(const scalar_t* g, int64_t d, int64_t k, double max_grad, uint64_t key, uint64_t index0,
               std::vector<typename RadixKey<scalar_t>::bits_t>& keys,
               std::vector<typename RadixKey<scalar_t>::bits_t>& order, Emit&& emit) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  keys.resize(d);
  double max_abs = 0;
  for (int64_t j = 0; j < d; ++j) {
    const scalar_t a = std::abs(g[j]);
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(a)), "grads contains NaN or Inf; the votes need finite "
                      "gradients");
    keys[j] = RadixKey<scalar_t>::encode(a);
    max_abs = std::max(max_abs, static_cast<double>(a));
  }
  order.assign(keys.begin(), keys.end());
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<bits_t>());
  const bits_t kth = order[k - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < d; ++j) above += keys[j] > kth;
  int64_t ties = k - above;  // coordinates equal to the k-th largest that are kept: the lowest indices
  const double b = std::min(max_abs, max_grad);
  for (int64_t j = 0; j < d; ++j) {
    bool keep = keys[j] > kth;
    if (!keep && keys[j] == kth && ties > 0) {
      keep = true;
      --ties;
    }
    if (keep) {
      const double clipped = std::clamp(static_cast<double>(g[j]), -b, b);
      emit(j, topagg::stochastic_sign(clipped, b, key, index0 + static_cast<uint64_t>(j)));
    }
  }
}

at::Tensor topagg_votes_cpu(const at::Tensor& grads_in, int64_t k, double max_grad, int64_t seed) {
  check_topagg_args(grads_in, k, max_grad, /*fused=*/false);
  const auto grads = grads_in.contiguous();
  const int64_t d = grads.size(-1), rows = grads.numel() / d;
  auto votes = at::zeros(grads.sizes(), grads.options().dtype(at::kChar));
  const uint64_t key = topagg::stream_key(static_cast<uint64_t>(seed), topagg::kSignStream);
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "topagg_votes_cpu", [&] {
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    int8_t* v = votes.data_ptr<int8_t>();
    at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
      std::vector<typename RadixKey<scalar_t>::bits_t> keys, order;
      for (int64_t r = first; r < last; ++r) {
        int8_t* out = v + r * d;
        row_votes(g + r * d, d, k, max_grad, key, static_cast<uint64_t>(r * d), keys, order,
                  [&](int64_t j, int8_t vote) { out[j] = vote; });
      }
    });
  });
  return votes;
}

std::tuple<at::Tensor, at::Tensor> topagg_cpu(const at::Tensor& grads_in, int64_t k, double max_grad, double sigma,
                                              double beta, int64_t seed) {
  check_topagg_args(grads_in, k, max_grad, /*fused=*/true, sigma, beta);
  const auto grads = grads_in.contiguous();
  const int64_t samples = grads.size(0), teachers = grads.size(1), d = grads.size(2);
  auto out = at::empty({samples, d}, grads.options().dtype(at::kChar));
  auto noisy = at::empty({samples, d}, grads.options().dtype(at::kDouble));
  const uint64_t sign_key = topagg::stream_key(static_cast<uint64_t>(seed), topagg::kSignStream);
  const uint64_t noise_key = topagg::stream_key(static_cast<uint64_t>(seed), topagg::kNoiseStream);
  const double bound = beta * static_cast<double>(teachers);
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "topagg_cpu", [&] {
    const scalar_t* g = grads.const_data_ptr<scalar_t>();
    const int64_t rows = samples * teachers;
    // Per-task sums of whole samples' rows: a task owns a range of rows and adds into its own [S, d] slice only
    // for the samples it touches, then the slices are reduced in a fixed order (deterministic).
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    std::vector<std::vector<int32_t>> partial(tasks);
    at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t last_task) {
      std::vector<typename RadixKey<scalar_t>::bits_t> keys, order;
      for (int64_t task = first_task; task < last_task; ++task) {
        auto& sums = partial[task];
        sums.assign(samples * d, 0);
        const int64_t begin = rows * task / tasks, end = rows * (task + 1) / tasks;
        for (int64_t r = begin; r < end; ++r) {
          int32_t* row_sum = sums.data() + (r / teachers) * d;
          row_votes(g + r * d, d, k, max_grad, sign_key, static_cast<uint64_t>(r * d), keys, order,
                    [&](int64_t j, int8_t vote) { row_sum[j] += vote; });
        }
      }
    });
    int8_t* o = out.data_ptr<int8_t>();
    double* n = noisy.data_ptr<double>();
    at::parallel_for(0, samples * d, 4096, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        int64_t total = 0;
        for (const auto& sums : partial) total += sums[i];
        n[i] = static_cast<double>(total) + sigma * topagg::normal(noise_key, static_cast<uint64_t>(i));
        o[i] = topagg::threshold_vote(n[i], bound);
      }
    });
  });
  return {out, noisy};
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CPU, m) {
  m.impl("topagg_votes", &topagg_votes_cpu);
  m.impl("topagg", &topagg_cpu);
}

}  // namespace graspext::ops
