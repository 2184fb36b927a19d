#include <torch/library.h>

// masks_from_threshold(scores, threshold, num_remove, remove_largest) -> (masks, kept_counts)
// Removes exactly `num_remove` entries: every score strictly beyond `threshold` (above it when
// remove_largest, below it otherwise), then as many entries equal to `threshold` as are still needed, in
// global order (tensor index, then flat index): the earliest ties go first. masks[i] is True where kept;
// kept_counts[i] is the number kept in scores[i].
TORCH_LIBRARY_FRAGMENT(graspext, m) {
  m.def(
      "masks_from_threshold(Tensor[] scores, Tensor threshold, int num_remove, bool remove_largest) "
      "-> (Tensor[], Tensor)");
}
