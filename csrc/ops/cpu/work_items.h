#pragma once
// Splits a list of tensors into fixed-size pieces ("work items") in global order (tensor, then flat index).
// The split depends only on the shapes, never on the thread count, so per-item results reduced in item
// order are deterministic.

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace graspext::ops::cpu {

struct WorkItem {
  int64_t tensor;  // index into the list
  int64_t begin;   // flat element range [begin, end) of that tensor
  int64_t end;
};

inline std::vector<WorkItem> make_work_items(at::TensorList tensors, int64_t item_size) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += item_size) items.push_back({t, b, std::min(n, b + item_size)});
  }
  return items;
}

// Contiguous copies (no-ops for contiguous inputs) so kernels can use raw pointers.
inline std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

}  // namespace graspext::ops::cpu
