"""Lottery tickets: iterative magnitude pruning with rewinding, and the baselines of its sanity checks.

See :mod:`graspext.lottery.imp` (the rounds, resumable) and :mod:`graspext.lottery.tickets` (pruning the remaining
weights, rewinding, random re-initialisation, random masks with the same layer counts).
"""

from graspext.lottery.imp import REWINDS, BestState, IMPConfig, run_imp
from graspext.lottery.tickets import (
    RewindCapture,
    dense_masks,
    prune_remaining,
    prune_to,
    random_masks_like,
    reinitialized,
    rewind_,
    state_copy,
)

__all__ = ["REWINDS", "BestState", "IMPConfig", "RewindCapture", "dense_masks", "prune_remaining", "prune_to",
           "random_masks_like", "reinitialized", "rewind_", "run_imp", "state_copy"]
