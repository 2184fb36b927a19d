"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020; Renda et al. 2020).

``run_imp`` trains round 0 dense (all-kept masks over the prunable layers), then repeats: prune ``rate`` of the
remaining weights by magnitude, reset the kept weights, train again. The reset is

- ``"init"``: the initial values (the lottery ticket);
- ``"step"``: the values after ``rewind_step`` training steps of round 0 (late rewinding);
- ``"lr"``: the trained values, with the learning-rate schedule restarted (learning-rate rewinding).

Which weights a round prunes come from the checkpoint with the best accuracy on the evaluation loader
(``prune_on="best"``; give it a validation split carved from the training set -- Ma et al.'s official scripts
choose on test accuracy, which leaks the test set) or from the last epoch (``prune_on="final"``).

Every round lives in ``out_dir/round-NN`` (its masks, the trainer's checkpoint and results, ``round.json`` when
done), so a run killed anywhere -- inside a round or between two -- resumes and ends bit for bit as an
uninterrupted one. Rounds train as the trainer's ``kernels="auto"`` trains: masked dense weights while the cost
model predicts sparse layers not to pay, ``graspext.sparsify``'s layers from then on, so the time per round is
flat at first and falls as the network gets sparser (benchmarks/RESULTS.md, IMP rounds).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from graspext._io import atomic_write, write_text
from graspext.callbacks import Callback
from graspext.lottery.tickets import (
    ON_COLLAPSE,
    SCOPES,
    RewindCapture,
    check_rate,
    dense_masks,
    prune_remaining,
    rewind_,
    state_copy,
)
from graspext.masks import Masks

REWINDS = ("init", "step", "lr")
PRUNE_ON = ("best", "final")
RUN_CONFIG = "imp.json"
ROUND_DONE = "round.json"


@dataclass
class IMPConfig:
    """``rounds`` pruning rounds of ``rate`` each (``rounds + 1`` trainings: round 0 is dense); the rest as the
    module docstring says. Ma et al.'s ResNet-20 recipe: 14 rounds of 20 %, first conv and classifier dense."""

    rounds: int = 14
    rate: float = 0.2
    scope: str = "global"
    rewind: str = "init"
    rewind_step: int = 0
    prune_on: str = "best"
    keep_first_dense: bool = False
    keep_last_dense: bool = False
    on_collapse: str = "raise"

    def __post_init__(self):
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, numbers.Integral) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        self.rate = check_rate(self.rate)
        for name, allowed in (("scope", SCOPES), ("rewind", REWINDS), ("prune_on", PRUNE_ON),
                              ("on_collapse", ON_COLLAPSE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.rewind_step, bool) or not isinstance(self.rewind_step, numbers.Integral) \
                or self.rewind_step < 0:
            raise ValueError(f"rewind_step must be an int >= 0 (training steps), got {self.rewind_step!r}")
        if self.rewind != "step" and self.rewind_step:
            raise ValueError(f"rewind_step={self.rewind_step} applies to rewind='step' only, got rewind={self.rewind!r}")

    def densities(self) -> list[float]:
        """The nominal density of each round's training (global scope: exact up to rounding)."""
        return [(1 - self.rate) ** r for r in range(self.rounds + 1)]


class BestState(Callback):
    """Keeps the model's state at the epoch with the best accuracy on the trainer's evaluation loader."""

    def __init__(self):
        self.best, self.epoch, self.state = -math.inf, None, None

    def on_epoch_end(self, trainer, epoch: int, record: dict[str, Any]) -> None:
        if record["test_acc"] > self.best:
            self.best, self.epoch, self.state = record["test_acc"], epoch, state_copy(trainer.model)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epoch": self.epoch, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.epoch, self.state = state["best"], state["epoch"], state["state"]


def result_settings(train_options: dict[str, Any]) -> dict[str, str]:
    """The training options that change results (progress bars and TensorBoard logs do not), as stored text."""
    return {k: repr(v) for k, v in sorted(train_options.items()) if k not in ("progress", "tensorboard")}


def _round_dir(out_dir: str, r: int) -> str:
    return os.path.join(out_dir, f"round-{r:02d}")


def _save_state(path: str, state: dict[str, Tensor]) -> None:
    atomic_write(path, lambda f: torch.save({k: v.cpu() for k, v in state.items()}, f))


def _load_state(path: str) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_run_folder(out_dir: str, settings: dict[str, Any]) -> None:
    path = os.path.join(out_dir, RUN_CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out_dir} holds an IMP run with " + ", ".join(f"{k}={stored.get(k)!r}" for k in changed)
                             + "; this one has " + ", ".join(f"{k}={settings.get(k)!r}" for k in changed)
                             + ": use another out_dir, or delete that folder")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty and holds no IMP run ({RUN_CONFIG}); use an empty or new folder")
    os.makedirs(out_dir, exist_ok=True)
    write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def run_imp(make_model: Callable[[], nn.Module], train_loader, eval_loader, config: IMPConfig, out_dir: str, *,
            seed: int = 0, evaluate: Callable[[nn.Module], float] | None = None, log: Callable[[str], Any] = print,
            round_callbacks: Callable[[int], list[Callback]] | None = None, **train_options: Any
            ) -> list[dict[str, Any]]:
    """Runs (or resumes) IMP in ``out_dir``; returns one record per round.

    ``make_model()`` builds the dense model (drawn under ``torch.manual_seed(seed)``); ``eval_loader`` chooses the
    checkpoint to prune (a validation split); ``evaluate(model)``, if given, adds a ``"test_acc"`` of the chosen
    checkpoint (the test set). ``round_callbacks(r)`` adds trainer callbacks to round ``r`` (diagnostics; the same
    ones on resume). ``train_options`` go to :func:`graspext.train` for every round (epochs, lr, ...).
    """
    import graspext as gx

    if not isinstance(config, IMPConfig):
        raise TypeError(f"config must be graspext.lottery.IMPConfig, got {type(config).__name__}")
    for key in ("masks", "out_dir", "resume", "callbacks", "dst"):
        if key in train_options:
            raise ValueError(f"{key} is set by run_imp per round; leave it out of the training options")
    settings = {"imp": asdict(config), "seed": seed, "train": result_settings(train_options)}
    _check_run_folder(out_dir, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    init_path = os.path.join(out_dir, "init.pt")
    if not os.path.exists(init_path):
        _save_state(init_path, state_copy(model))
    init_state = _load_state(init_path)
    records: list[dict[str, Any]] = []
    masks: Masks = dense_masks(model, keep_first_dense=config.keep_first_dense, keep_last_dense=config.keep_last_dense)
    for r in range(config.rounds + 1):
        rdir = _round_dir(out_dir, r)
        done = os.path.join(rdir, ROUND_DONE)
        if r > 0:
            masks = Masks.load(os.path.join(rdir, "masks.pt"))
        if os.path.exists(done):
            with open(done) as f:
                records.append(json.load(f))
            continue
        os.makedirs(rdir, exist_ok=True)
        masks.save(os.path.join(rdir, "masks.pt"))
        # The state this round starts from.
        if r == 0 or config.rewind == "init":
            start = init_state
        elif config.rewind == "step":
            start = _load_state(os.path.join(out_dir, "rewind.pt"))
        else:  # learning-rate rewinding: the previous round's pruned-on weights, a fresh schedule
            start = _load_state(os.path.join(_round_dir(out_dir, r - 1), "pruned_on.pt"))
        rewind_(model, start)
        best = BestState()
        callbacks: list[Callback] = [best]
        capture = RewindCapture(config.rewind_step) if r == 0 and config.rewind == "step" else None
        if capture is not None:
            callbacks.append(capture)
        if round_callbacks is not None:
            callbacks += list(round_callbacks(r))
        began = time.perf_counter()
        result = gx.train(model, train_loader, eval_loader, masks=masks if r > 0 else None, callbacks=callbacks,
                          out_dir=rdir, **{"seed": seed, **train_options})
        seconds = time.perf_counter() - began
        chosen = best.state if config.prune_on == "best" else state_copy(model)
        _save_state(os.path.join(rdir, "pruned_on.pt"), chosen)
        if capture is not None:
            _save_state(os.path.join(out_dir, "rewind.pt"), capture.state)
        record = {"round": r, "density": masks.density() if r > 0 else 1.0, "sparsity": masks.sparsity() if r else 0.0,
                  "best_eval_acc": result.best_test_acc, "final_eval_acc": result.final_test_acc,
                  "pruned_on_epoch": (best.epoch + 1) if config.prune_on == "best" else len(result.history),
                  "train_seconds_this_process": seconds, "train_seconds": _train_seconds(result, train_loader)}
        if evaluate is not None:
            rewind_(model, chosen)
            record["test_acc"] = float(evaluate(model))
        if r < config.rounds:
            rewind_(model, chosen)
            nxt = prune_remaining(model, masks, config.rate, config.scope, config.on_collapse)
            os.makedirs(_round_dir(out_dir, r + 1), exist_ok=True)
            nxt.save(os.path.join(_round_dir(out_dir, r + 1), "masks.pt"))
        write_text(done, json.dumps(record, indent=2) + "\n")  # last: the round counts as done only now
        log(f"IMP round {r}: density {record['density']:.4f}, best eval accuracy {record['best_eval_acc']:.4f}")
        records.append(record)
    return records


def _train_seconds(result, train_loader) -> float | None:
    """The training time of a round from its history (samples / images per second, per epoch)."""
    n = len(getattr(train_loader, "dataset", ())) or None
    if n is None:
        return None
    return float(sum(n / rec["train_images_per_s"] for rec in result.history))
