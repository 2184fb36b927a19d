"""DataLens run configs: TOML files, shipped in ``graspext/configs/datalens/``.

    name = "mnist-datalens-eps10"
    dataset = "mnist"              # digits (embedded), mnist or fashion_mnist (IDX files under --data-root)
    teachers = 4000
    k = 300                        # TopAgg: coordinates each teacher votes on
    sigma = 800.0                  # TopAgg: the vote sum's Gaussian noise
    beta = 0.2                     # TopAgg: threshold, as a fraction of the teachers
    max_eps = 10.0                 # stop before the privacy spent would exceed this (at delta)
    [evaluate]                     # graspext.datalens.evaluate.EvaluationConfig fields
    samples = 10000

Every field of :class:`DataLensConfig` may appear at the top level; defaults are the official MNIST settings
(AI-secure/DataLens README and ``main.py``).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from graspext._validation import integer, positive
from graspext.config import CONFIG_DIR, read_config_file, shipped_or_file

DATALENS_CONFIG_DIR = CONFIG_DIR / "datalens"
DATASETS = ("digits", "mnist", "fashion_mnist")


@dataclass
class EvaluationConfig:
    """Utility: a classifier trained on generated samples, tested on the real test set."""
    samples: int = 10000        # generated, class-balanced
    epochs: int = 20
    lr: float = 0.05            # SGD with momentum 0.9, step decay (graspext.TrainConfig)
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self):
        self.samples = integer(self.samples, "evaluate.samples", 1)
        self.epochs = integer(self.epochs, "evaluate.epochs", 1)
        self.lr = positive(self.lr, "evaluate.lr")
        self.batch_size = integer(self.batch_size, "evaluate.batch_size", 1)
        self.seed = integer(self.seed, "evaluate.seed", 0)


@dataclass
class DataLensConfig:
    name: str = "datalens"
    dataset: str = "digits"
    image_size: int | None = None   # digits: a multiple of 4 (default 8, the native size); MNIST-style: 28
    teachers: int = 4000
    # TopAgg (votes per generated sample) and the privacy budget.
    k: int = 300
    sigma: float = 800.0
    beta: float = 0.2
    max_grad: float = 1e-5          # the clip bound b = min(max |g|, max_grad) of the stochastic sign
    max_eps: float = 10.0
    delta: float = 1e-5
    # Networks (the official conditional DCGAN).
    z_dim: int = 50
    gf: int = 64
    gfc: int = 1024
    df: int = 32
    dfc: int = 256
    # Training (official: Adam 1e-3, beta1 0.5 for the teachers and the generator; the vote's step alpha = lr).
    batch_size: int = 30            # capped at the smallest teacher partition, as the official code does
    lr: float = 1e-3
    beta1: float = 0.5
    vote_step: float | None = None  # alpha in target = G(z) + alpha * vote; None: lr
    d_steps: int = 2                # teacher steps per generator step
    pretrain_d_steps: int = 10      # teacher steps per generator step in the first epoch (official pretrain_teacher)
    max_epochs: int = 300
    seed: int = 0                   # initialisation, partition, z and labels (public randomness)
    # The TopAgg noise's seed. It must stay secret: whoever knows it can subtract the noise. None draws one from
    # the operating system at the start of a run and keeps it only in the run's checkpoint.
    noise_seed: int | None = None
    checkpoint_every: int = 10      # generator steps between checkpoints
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        native = 8 if self.dataset == "digits" else 28
        self.image_size = native if self.image_size is None else integer(self.image_size, "image_size", 4)
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two stride-2 stages), got {self.image_size}")
        if self.dataset != "digits" and self.image_size != 28:
            raise ValueError(f"image_size: {self.dataset} images are 28x28, got {self.image_size}")
        self.teachers = integer(self.teachers, "teachers", 1)
        self.k = integer(self.k, "k", 1)
        d = self.image_size ** 2
        if self.k > d:
            raise ValueError(f"k must be in [1, {d}] (the pixels of a {self.image_size}x{self.image_size} image), "
                             f"got {self.k}")
        self.sigma = positive(self.sigma, "sigma")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1) (a fraction of the teachers), got {self.beta!r}")
        self.beta = float(self.beta)
        self.max_grad = positive(self.max_grad, "max_grad")
        self.max_eps = positive(self.max_eps, "max_eps")
        if isinstance(self.delta, bool) or not isinstance(self.delta, numbers.Real) or not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        self.delta = float(self.delta)
        for name in ("z_dim", "gf", "gfc", "df", "dfc", "batch_size", "d_steps", "max_epochs", "checkpoint_every"):
            setattr(self, name, integer(getattr(self, name), name, 1))
        self.pretrain_d_steps = integer(self.pretrain_d_steps, "pretrain_d_steps", 0)
        self.lr = positive(self.lr, "lr")
        if isinstance(self.beta1, bool) or not isinstance(self.beta1, numbers.Real) or not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {self.beta1!r}")
        self.beta1 = float(self.beta1)
        self.vote_step = self.lr if self.vote_step is None else positive(self.vote_step, "vote_step")
        self.seed = integer(self.seed, "seed", 0)
        if self.noise_seed is not None:
            self.noise_seed = integer(self.noise_seed, "noise_seed", 0)
            if self.noise_seed >= 2**63:
                raise ValueError(f"noise_seed must be below 2**63, got {self.noise_seed}")
        if isinstance(self.evaluate, dict):
            self.evaluate = _from_table(EvaluationConfig, self.evaluate, "evaluate")
        elif not isinstance(self.evaluate, EvaluationConfig):
            raise TypeError(f"evaluate must be an EvaluationConfig or a table, got {type(self.evaluate).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_table(cls, table: dict[str, Any], where: str):
    if not isinstance(table, dict):
        raise TypeError(f"{where} must be a table, got {table!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    return cls(**table)


def list_datalens_configs() -> list[str]:
    return sorted(p.stem for p in DATALENS_CONFIG_DIR.glob("*.toml"))


def load_datalens_config(name_or_path: str) -> DataLensConfig:
    """A shipped config name or a ``.toml`` path; an unknown key or a bad value is an error naming it."""
    path = shipped_or_file(name_or_path, DATALENS_CONFIG_DIR, "DataLens")
    raw = read_config_file(path, {f.name for f in dataclasses.fields(DataLensConfig)})
    raw.setdefault("name", path.stem)
    try:
        return DataLensConfig(**raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"config {path}: {exc}") from exc


__all__ = ["DATASETS", "DataLensConfig", "EvaluationConfig", "list_datalens_configs", "load_datalens_config"]
