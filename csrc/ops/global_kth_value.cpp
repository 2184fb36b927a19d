#include <torch/library.h>

// global_kth_value(scores, k): the k-th smallest value (1-based, as torch.kthvalue) of the concatenation
// of every tensor in `scores`, computed without building that concatenation. Non-finite scores are an error.
TORCH_LIBRARY_FRAGMENT(graspext, m) {
  m.def("global_kth_value(Tensor[] scores, int k) -> Tensor");
}
