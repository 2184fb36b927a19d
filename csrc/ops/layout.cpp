// Schemas of the activation layout conversions between NCHW and the sparse ops' batch-innermost storage.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(graspext, m) {
  // x [N, C, H, W] (any strides) -> the same values with [H, W, C, N] storage.
  m.def("to_batch_innermost(Tensor x) -> Tensor");
  // x [N, C, H, W] (any strides) -> the same values, NCHW-contiguous.
  m.def("from_batch_innermost(Tensor x) -> Tensor");
}
