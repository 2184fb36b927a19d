#include <torch/library.h>

// DataLens's top-k gradient compression and its noisy aggregation (TopAgg); see ops/topagg.h.
//
// topagg_votes(grads [..., T, d], k, max_grad, seed) -> votes int8 [..., T, d]: each row's compressed vote,
//   exactly k entries in {-1, +1}, the rest 0 (grads of shape [S, T, d] index the randomness by sample too).
// topagg(grads [S, T, d], k, max_grad, sigma, beta, seed) -> (out int8 [S, d], noisy_sum float64 [S, d]):
//   the votes summed over the T teachers plus N(0, sigma^2), thresholded at +-beta*T; fused, without
//   materializing the votes.
TORCH_LIBRARY_FRAGMENT(graspext, m) {
  m.def("topagg_votes(Tensor grads, int k, float max_grad, int seed) -> Tensor");
  m.def("topagg(Tensor grads, int k, float max_grad, float sigma, float beta, int seed) -> (Tensor, Tensor)");
}
