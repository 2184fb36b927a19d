"""The settings of a dynamic sparse training run: :class:`RigL` and :class:`SET`."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from graspext.dst.schedule import ANNEALS

_GROW_INIT = re.compile(r"^(zeros|random_normal|random_uniform|grad_scale|grad_sign)(?:_(\d*\.?\d*))?$")


def grow_init_parts(grow_init: str) -> tuple[str, float]:
    """``"random_normal_2"`` -> ``("random_normal", 2.0)``: the official flag's method and divisor."""
    match = _GROW_INIT.match(grow_init) if isinstance(grow_init, str) else None
    if match is None or (match.group(2) is not None and not re.search(r"\d", match.group(2))):
        raise ValueError("grow_init must be 'zeros', 'random_normal', 'random_uniform', 'grad_scale' or "
                         f"'grad_sign', optionally with a divisor ('random_normal_2'), got {grow_init!r}")
    divisor = float(match.group(2)) if match.group(2) else 1.0
    if divisor == 0:
        raise ValueError(f"grow_init's divisor must not be zero, got {grow_init!r}")
    return match.group(1), divisor


@dataclass
class DynamicSparsity:
    """What RigL and SET share. Field names follow the official flags (``maskupdate_frequency`` -> ``frequency``).

    Attributes:
        frequency: ΔT, steps between mask updates (official 100).
        drop_fraction: α, the fraction of each layer's active weights the first update moves (official 0.3).
        drop_fraction_anneal: ``"cosine"`` (decays to 0 at ``end_step``) or ``"constant"``.
        begin_step: the first update step (official 0: the first update is at step 0).
        end_step: the last step that may update (inclusive); None means ``end_fraction`` of the training steps.
        end_fraction: used when ``end_step`` is None (official CIFAR/ImageNet configs: 0.75).
        grow_init: value of new connections: ``"zeros"`` (official default), ``"random_normal"``,
            ``"random_uniform"`` (std / mean |w| of the layer's active weights), RigL's ``"grad_scale"`` /
            ``"grad_sign"``; an optional ``_<divisor>`` suffix divides it, as in the official flags.
        reinit_when_same: a weight dropped and grown again in the same update restarts like a new one (official
            default False: it keeps its value and optimizer state).
        update_replaces_step: on update steps the mask update replaces the optimizer step (TF1 RigL), or follows
            it (TF1 SET, and the TF2 RigL variant).
        noise_std: standard deviation of the tie-break noise added to |w| in the drop step (official 1e-5).
        seed: seeds the noise and SET's random growth, per (layer, step), so that a resumed run draws the same.
    """

    frequency: int = 100
    drop_fraction: float = 0.3
    drop_fraction_anneal: str = "cosine"
    begin_step: int = 0
    end_step: int | None = None
    end_fraction: float = 0.75
    grow_init: str = "zeros"
    reinit_when_same: bool = False
    update_replaces_step: bool = True
    noise_std: float = 1e-5
    seed: int = 0

    method: ClassVar[str] = ""
    uses_gradient: ClassVar[bool] = False

    def __post_init__(self):
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
            setattr(self, name, int(value))

        integer("frequency", 1)
        integer("begin_step", 0)
        integer("seed", 0)
        if self.end_step is not None:
            integer("end_step", 0)
            if self.end_step < self.begin_step:
                raise ValueError(f"end_step must be >= begin_step ({self.begin_step}), got {self.end_step}")
        for name, low, high, closed in (("drop_fraction", 0.0, 1.0, False), ("end_fraction", 0.0, 1.0, True)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or not low < value < high and not (closed and value == high)):
                raise ValueError(f"{name} must be a number in (0, 1{']' if closed else ')'}, got {value!r}")
            setattr(self, name, float(value))
        if self.drop_fraction_anneal not in ANNEALS:
            raise ValueError(f"drop_fraction_anneal must be one of {ANNEALS}, got {self.drop_fraction_anneal!r}")
        kind, _ = grow_init_parts(self.grow_init)
        if kind.startswith("grad") and not self.uses_gradient:
            raise ValueError(f"grow_init={self.grow_init!r} needs the dense gradient, which only RigL computes")
        for name in ("reinit_when_same", "update_replaces_step"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if (isinstance(self.noise_std, bool) or not isinstance(self.noise_std, numbers.Real)
                or not math.isfinite(self.noise_std) or self.noise_std < 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")
        self.noise_std = float(self.noise_std)

    def resolved_end_step(self, total_steps: int | None) -> int:
        """The last update step of a run of ``total_steps`` steps; raises if it lies beyond the training."""
        if self.end_step is None:
            if total_steps is None:
                raise ValueError("dst: the training loader has no len(), so end_fraction cannot be resolved; "
                                 "give end_step")
            end = int(self.end_fraction * total_steps)
        else:
            end = self.end_step
        if total_steps is not None and self.begin_step >= total_steps:
            raise ValueError(f"begin_step {self.begin_step} lies beyond the training, whose steps are "
                             f"0..{total_steps - 1}")
        if total_steps is not None and end >= total_steps:
            raise ValueError(f"end_step {end} lies beyond the training, whose steps are 0..{total_steps - 1}")
        return max(end, self.begin_step)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    def callback(self):
        from graspext.dst.callback import DynamicSparsityCallback

        return DynamicSparsityCallback(self)


@dataclass
class RigL(DynamicSparsity):
    """RigL (Evci et al., ICML 2020): grow where the dense gradient is largest. The mask update replaces the
    optimizer step on update iterations, as in the official TF1 code."""

    method: ClassVar[str] = "rigl"
    uses_gradient: ClassVar[bool] = True


@dataclass
class SET(DynamicSparsity):
    """SET (Mocanu et al., 2018): grow uniformly at random, after the optimizer step."""

    update_replaces_step: bool = False
    method: ClassVar[str] = "set"


METHODS = {"rigl": RigL, "set": SET}


def from_dict(options: dict[str, Any]) -> DynamicSparsity:
    """``{"method": "rigl", "frequency": 100, ...}`` (a config file's ``[dst]`` table) -> the settings."""
    options = dict(options)
    method = options.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"dst method must be one of {sorted(METHODS)}, got {method!r}")
    cls = METHODS[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown dst option(s) {', '.join(unknown)}; {method} takes {', '.join(sorted(known))}")
    return cls(**options)
