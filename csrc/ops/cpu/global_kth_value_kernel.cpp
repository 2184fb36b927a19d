// Exact k-th smallest value over a list of tensors by most-significant-digit radix selection:
// each pass histograms 16 key bits of the elements that still match the prefix chosen so far, so float32
// takes two passes over the data and float64 four, with O(threads * 65536) extra memory and no copy.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "ops/checks.h"
#include "ops/cpu/work_items.h"
#include "ops/radix_key.h"

namespace graspext::ops {
namespace {

constexpr int64_t kItemSize = 1 << 18;

template <typename scalar_t>
std::vector<int64_t> radix_histogram(const std::vector<at::Tensor>& scores,
                                     const std::vector<cpu::WorkItem>& items, int shift, bool match_prefix,
                                     typename RadixKey<scalar_t>::bits_t prefix) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  std::vector<int64_t> hist(kRadixBins, 0);
  std::mutex merge;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
    // uint32 counts keep the table in L2; items are far below 2^32 elements, and we flush per item range.
    std::vector<uint32_t> local(kRadixBins, 0);
    uint32_t* h = local.data();
    int64_t pending = 0;
    auto flush = [&] {
      std::lock_guard<std::mutex> lock(merge);
      for (int b = 0; b < kRadixBins; ++b) hist[b] += local[b];
      std::fill(local.begin(), local.end(), 0u);
      pending = 0;
    };
    for (int64_t it = first; it < last; ++it) {
      const auto& item = items[it];
      const scalar_t* x = scores[item.tensor].const_data_ptr<scalar_t>();
      if (!match_prefix) {
        for (int64_t i = item.begin; i < item.end; ++i) {
          h[static_cast<uint32_t>(RadixKey<scalar_t>::encode(x[i]) >> shift)]++;
        }
      } else {
        // Few elements match the prefix: test 64 at a time with a vectorizable OR, then count the rare hits.
        const int high = shift + kRadixBits;
        auto count = [&](int64_t i) {
          const bits_t key = RadixKey<scalar_t>::encode(x[i]);
          if ((key >> high) == prefix) h[static_cast<uint32_t>(key >> shift) & (kRadixBins - 1)]++;
        };
        constexpr int64_t kBlock = 64;
        int64_t i = item.begin;
        for (; i + kBlock <= item.end; i += kBlock) {
          bool any = false;
          for (int64_t j = i; j < i + kBlock; ++j) any |= (RadixKey<scalar_t>::encode(x[j]) >> high) == prefix;
          if (any) {
            for (int64_t j = i; j < i + kBlock; ++j) count(j);
          }
        }
        for (; i < item.end; ++i) count(i);
      }
      pending += item.end - item.begin;
      if (pending > (int64_t{1} << 31)) flush();
    }
    flush();
  });
  return hist;
}

template <typename scalar_t>
void check_finite(const std::vector<int64_t>& top_hist, const std::vector<at::Tensor>& scores) {
  constexpr int side = nonfinite_bins_per_side<scalar_t>();
  int64_t nonfinite = 0;
  for (int b = 0; b < side; ++b) nonfinite += top_hist[b] + top_hist[kRadixBins - 1 - b];
  if (nonfinite > 0) check_scores_finite(scores);
}

at::Tensor global_kth_value_cpu(at::TensorList scores_in, int64_t k) {
  const auto dtype = check_global_kth_value_args(scores_in, k);
  const auto scores = cpu::contiguous_all(scores_in);
  const auto items = cpu::make_work_items(scores, kItemSize);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES(dtype, "global_kth_value_cpu", [&] {
    using bits_t = typename RadixKey<scalar_t>::bits_t;
    bits_t prefix = 0;
    int64_t rank = k;  // 1-based rank within the elements matching `prefix`
    for (int shift = RadixKey<scalar_t>::kBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
      const bool first_pass = shift == RadixKey<scalar_t>::kBits - kRadixBits;
      const auto hist = radix_histogram<scalar_t>(scores, items, shift, !first_pass, prefix);
      if (first_pass) check_finite<scalar_t>(hist, scores);
      int digit = 0;
      while (rank > hist[digit]) rank -= hist[digit++];
      prefix = (prefix << kRadixBits) | static_cast<bits_t>(digit);
    }
    result = at::scalar_tensor(RadixKey<scalar_t>::decode(prefix), scores_in[0].options());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CPU, m) {
  m.impl("global_kth_value", &global_kth_value_cpu);
}

}  // namespace graspext::ops
