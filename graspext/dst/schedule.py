"""When masks are updated and how many connections each update moves (RigL's TF1 schedule).

Following google-research/rigl ``sparse_optimizers_base.py``:

- an update runs at step t when ``begin_step <= t <= end_step`` (both inclusive) and ``last_update + frequency
  <= t``, with ``last_update`` starting at ``-frequency``: so at t = begin_step, begin_step + frequency, ...;
- the drop fraction is ``drop_fraction`` (``"constant"``) or its cosine decay on the global step,
  ``f(t) = drop_fraction / 2 * (1 + cos(pi * min(t, T) / T))`` with ``T = end_step - begin_step``
  (``"cosine"``, TF's ``cosine_decay``);
- a layer with n active weights drops ``floor(n * f)`` of them, the product taken in float32 as TF does.
"""

from __future__ import annotations

import math

import torch

ANNEALS = ("cosine", "constant")


def drop_fraction(step: int, initial: float, anneal: str, begin_step: int, end_step: int) -> float:
    """The fraction of each layer's active weights that the update at ``step`` drops."""
    if anneal == "constant":
        return float(initial)
    if anneal != "cosine":
        raise ValueError(f"drop_fraction_anneal must be one of {ANNEALS}, got {anneal!r}")
    decay_steps = end_step - begin_step
    t = min(step, decay_steps)  # TF's cosine_decay clips the global step at decay_steps
    return float(initial) * 0.5 * (1.0 + math.cos(math.pi * t / decay_steps)) if decay_steps > 0 else float(initial)


def num_to_drop(n_active: int, fraction: float) -> int:
    """``floor(n_active * fraction)`` in float32 arithmetic, as TF casts it."""
    product = torch.tensor(n_active, dtype=torch.float32) * torch.tensor(fraction, dtype=torch.float32)
    return int(product.item())


def update_steps(begin_step: int, end_step: int, frequency: int) -> list[int]:
    """The closed form of the schedule over contiguous steps: ``begin_step + k * frequency <= end_step``."""
    return list(range(begin_step, end_step + 1, frequency))


class UpdateSchedule:
    """The stateful rule as the official code runs it (``last_update`` is saved with the training state)."""

    def __init__(self, begin_step: int, end_step: int, frequency: int):
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.last_update = -frequency

    def is_update(self, step: int) -> bool:
        return self.begin_step <= step <= self.end_step and self.last_update + self.frequency <= step

    def done(self, step: int) -> None:
        self.last_update = step
