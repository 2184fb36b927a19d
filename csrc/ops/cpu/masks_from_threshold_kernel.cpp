#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/cpu/work_items.h"

namespace graspext::ops {
namespace {

constexpr int64_t kItemSize = 1 << 16;

struct ItemCounts {
  int64_t beyond = 0;     // strictly on the removed side of the threshold
  int64_t equal = 0;      // equal to the threshold
  int64_t nonfinite = 0;
};

std::tuple<std::vector<at::Tensor>, at::Tensor> masks_from_threshold_cpu(at::TensorList scores_in,
                                                                        const at::Tensor& threshold,
                                                                        int64_t num_remove, bool remove_largest) {
  const auto dtype = check_masks_from_threshold_args(scores_in, threshold, num_remove);
  const auto scores = cpu::contiguous_all(scores_in);
  const auto items = cpu::make_work_items(scores, kItemSize);
  const auto num_items = static_cast<int64_t>(items.size());

  std::vector<at::Tensor> masks;
  for (const auto& s : scores) masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
  auto kept_counts = at::zeros({static_cast<int64_t>(scores.size())}, at::TensorOptions().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES(dtype, "masks_from_threshold_cpu", [&] {
    const auto t = threshold.to(dtype).item<scalar_t>();
    TORCH_CHECK(std::isfinite(t), "threshold must be finite, got ", t);
    auto beyond = [&](scalar_t x) { return remove_largest ? x > t : x < t; };

    // Pass 1: per-item counts.
    std::vector<ItemCounts> counts(num_items);
    at::parallel_for(0, num_items, 1, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        const auto& item = items[it];
        const scalar_t* x = scores[item.tensor].const_data_ptr<scalar_t>();
        ItemCounts c;
        for (int64_t i = item.begin; i < item.end; ++i) {
          c.beyond += beyond(x[i]);
          c.equal += x[i] == t;
          c.nonfinite += !std::isfinite(x[i]);
        }
        counts[it] = c;
      }
    });
    int64_t total_beyond = 0, total_equal = 0;
    for (int64_t it = 0; it < num_items; ++it) {
      TORCH_CHECK(counts[it].nonfinite == 0, "scores[", items[it].tensor,
                  "] contains NaN or Inf values; scores must be finite to be ranked");
      total_beyond += counts[it].beyond;
      total_equal += counts[it].equal;
    }
    TORCH_CHECK(total_beyond <= num_remove && num_remove <= total_beyond + total_equal, "threshold ", t,
                " cannot remove exactly num_remove=", num_remove, " scores: ", total_beyond, " lie strictly ",
                remove_largest ? "above" : "below", " it and ", total_equal,
                " equal it (use global_kth_value to choose the threshold)");

    // Ties are removed in global order: item `it` removes its share of what is left after earlier items.
    std::vector<int64_t> ties_to_remove(num_items);
    int64_t ties_left = num_remove - total_beyond;
    for (int64_t it = 0; it < num_items; ++it) {
      ties_to_remove[it] = std::min(ties_left, counts[it].equal);
      ties_left -= ties_to_remove[it];
    }

    // Pass 2: write the masks.
    std::vector<int64_t> kept(num_items);
    at::parallel_for(0, num_items, 1, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        const auto& item = items[it];
        const scalar_t* x = scores[item.tensor].const_data_ptr<scalar_t>();
        bool* m = masks[item.tensor].data_ptr<bool>();
        int64_t ties = ties_to_remove[it];
        int64_t kept_here = 0;
        for (int64_t i = item.begin; i < item.end; ++i) {
          bool keep = !beyond(x[i]);
          if (keep && ties > 0 && x[i] == t) {
            keep = false;
            --ties;
          }
          m[i] = keep;
          kept_here += keep;
        }
        kept[it] = kept_here;
      }
    });
    auto* kc = kept_counts.data_ptr<int64_t>();
    for (int64_t it = 0; it < num_items; ++it) kc[items[it].tensor] += kept[it];
  });
  return {masks, kept_counts.to(scores_in[0].device())};
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CPU, m) {
  m.impl("masks_from_threshold", &masks_from_threshold_cpu);
}

}  // namespace graspext::ops
