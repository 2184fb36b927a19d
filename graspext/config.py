"""Experiment configs: TOML files (the GraSP paper's ship in ``graspext/configs/``).

    name = "cifar10-vgg19-grasp-98"
    model = "vgg19_bn"            # graspext.models registry or a torchvision model
    dataset = "cifar10"           # graspext.data.load name
    seed = 0
    batch_size = 128
    [prune]                       # method, sparsity, then the method's own options
    method = "grasp"
    sparsity = 0.98
    samples_per_class = 10
    [train]                       # graspext.TrainConfig fields; omit the table to prune only
    epochs = 160
    weight_decay = 5e-4
    [dst]                         # optional: dynamic sparse training from the [prune] masks
    method = "rigl"               # "rigl" or "set", then graspext.dst.RigL / SET fields
    frequency = 100
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TOP_LEVEL = {"name", "model", "dataset", "seed", "batch_size", "prune", "train", "dst"}


@dataclass
class ExperimentConfig:
    name: str
    model: str
    dataset: str
    method: str
    sparsity: float
    seed: int = 0
    batch_size: int = 128
    prune_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] | None = None
    dst: dict[str, Any] | None = None  # graspext.dst.from_dict options (method first)


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or os.sep in name_or_path:
        if not path.is_file():
            raise FileNotFoundError(f"config: no file {name_or_path!r}")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise ValueError(f"config: {name_or_path!r} is neither a file nor a shipped config ({', '.join(list_configs())})")
    return shipped


def shipped_or_file(name_or_path: str, folder: Path, kind: str) -> Path:
    """A ``.toml`` path, or the name of a config shipped in ``folder``; ``kind`` names the configs in errors."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise FileNotFoundError(f"config: no file {name_or_path!r}")
        return path
    shipped = folder / f"{name_or_path}.toml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in folder.glob("*.toml")))
        raise ValueError(f"config: {name_or_path!r} is neither a .toml file nor a shipped {kind} config ({names})")
    return shipped


def read_config_file(path: Path, allowed: set[str]) -> dict[str, Any]:
    """The TOML of a config file; invalid TOML or a top-level key outside ``allowed`` is an error naming it."""
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config {path}: not valid TOML ({exc})") from exc
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"config {path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return raw


def load_config(name_or_path: str) -> ExperimentConfig:
    """Reads and validates a config; every unknown key or bad value is an error naming it."""
    from graspext.data import NUM_CLASSES
    from graspext.pruning import METHODS
    from graspext.train import TrainConfig

    path = config_path(name_or_path)
    raw = read_config_file(path, TOP_LEVEL)
    for key in ("model", "dataset", "prune"):
        if key not in raw:
            raise ValueError(f"config {path}: missing {key!r}")
    for key, ok, expected in (("model", lambda v: isinstance(v, str) and v, "a model name"),
                              ("name", lambda v: isinstance(v, str) and v, "a non-empty string"),
                              ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                               "an int >= 0"),
                              ("batch_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                               "an int >= 1")):
        if key in raw and not ok(raw[key]):
            raise ValueError(f"config {path}: {key} must be {expected}, got {raw[key]!r}")
    if raw["dataset"] not in NUM_CLASSES:
        raise ValueError(f"config {path}: dataset must be one of {sorted(NUM_CLASSES)}, got {raw['dataset']!r}")
    prune = dict(raw["prune"])
    method, sparsity = prune.pop("method", None), prune.pop("sparsity", None)
    if method not in METHODS:
        raise ValueError(f"config {path}: prune.method must be one of {sorted(METHODS)}, got {method!r}")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise ValueError(f"config {path}: prune.sparsity must be a number in [0, 1), got {sparsity!r}")
    try:
        METHODS[method](**{k: v for k, v in prune.items() if k in _method_fields(METHODS[method])})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {path}: prune: {exc}") from exc
    train = raw.get("train")
    if train is not None:
        try:
            TrainConfig(**train)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {path}: train: {exc}") from exc
    dst = raw.get("dst")
    if dst is not None:
        from graspext.dst import from_dict

        if train is None:
            raise ValueError(f"config {path}: a [dst] table needs a [train] table (dynamic sparse training trains)")
        try:
            from_dict(dst)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {path}: dst: {exc}") from exc
    return ExperimentConfig(name=raw.get("name", path.stem), model=raw["model"], dataset=raw["dataset"],
                            method=method, sparsity=float(sparsity), seed=raw.get("seed", 0),
                            batch_size=raw.get("batch_size", 128), prune_options=prune, train=train, dst=dst)


def _method_fields(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls.Options)}
