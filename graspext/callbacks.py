"""Trainer callbacks: how features that are not training itself (dynamic sparse training, diagnostics) drive it.

A :class:`Callback` overrides the events it needs. The trainer calls them in this order::

    on_fit_start                      model converted (sparse layers or masked weights), optimizer built,
                                      before a checkpoint is resumed
    per epoch:  on_epoch_start
        per training batch:  on_train_batch_start -> forward, backward -> on_after_backward
                             -> optimizer step (unless a callback asked to skip it) -> on_train_batch_end
    on_epoch_end                      may add fields to the epoch's record (results.jsonl)
    on_fit_end                        may add fields to summary.json

Every event gets the :class:`~graspext.train.Trainer`, whose ``model``, ``optimizer``, ``global_step`` (the
training batch's index over the whole run, from 0), ``steps_per_epoch``, ``total_steps``, ``config``,
``mask_handle`` (masked dense training) and ``sparse_layers`` (sparse-kernel training) it may use.

A callback with state implements ``state_dict``/``load_state_dict``: the trainer saves it in every checkpoint
and restores it on resume, so a resumed run continues exactly where the killed one stood.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Base class; every event does nothing."""

    def on_fit_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer, epoch: int) -> None:
        pass

    def on_train_batch_start(self, trainer, inputs, targets) -> None:
        pass

    def on_after_backward(self, trainer) -> bool | None:
        """Called with the gradients in place; return True to skip this step's optimizer step."""
        return None

    def on_train_batch_end(self, trainer, loss) -> None:
        """After the optimizer step (or its skip); ``loss`` is the batch's loss, a detached tensor."""

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer, summary: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
