"""Lottery comparison configs: TOML files, shipped in ``graspext/configs/lottery/``.

    name = "digits-vgg11-imp"
    model = "vgg11_bn"           # graspext.models registry or a torchvision model
    dataset = "digits"           # graspext.data.load name
    batch_size = 64
    val_fraction = 0.1           # the validation split carved from the training set (chooses checkpoints)
    select_on = "validation"     # or "test", as Ma et al.'s official scripts choose (it leaks the test set)
    [imp]                        # graspext.lottery.IMPConfig fields
    rounds = 3
    [train]                      # graspext.TrainConfig fields, for every run
    epochs = 2
    [compare]                    # graspext.lottery.compare.Comparison fields
    seeds = [0, 1]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from graspext.config import CONFIG_DIR, read_config_file, shipped_or_file

LOTTERY_CONFIG_DIR = CONFIG_DIR / "lottery"
TOP_LEVEL = {"name", "model", "dataset", "batch_size", "val_fraction", "select_on", "imp", "train", "compare"}
SELECT_ON = ("validation", "test")


@dataclass
class LotteryConfig:
    name: str
    model: str
    dataset: str
    imp: Any  # IMPConfig
    compare: Any  # Comparison
    batch_size: int = 64
    val_fraction: float = 0.1
    select_on: str = "validation"
    train: dict[str, Any] = field(default_factory=dict)


def list_lottery_configs() -> list[str]:
    return sorted(p.stem for p in LOTTERY_CONFIG_DIR.glob("*.toml"))


def load_lottery_config(name_or_path: str) -> LotteryConfig:
    """Reads and validates a lottery config; an unknown key or a bad value is an error naming it."""
    from graspext.data import NUM_CLASSES
    from graspext.lottery.compare import Comparison
    from graspext.lottery.imp import IMPConfig
    from graspext.train import TrainConfig

    path = shipped_or_file(name_or_path, LOTTERY_CONFIG_DIR, "lottery")
    raw = read_config_file(path, TOP_LEVEL)
    for key in ("model", "dataset"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"config {path}: {key} must be a non-empty string, got {raw.get(key)!r}")
    if raw["dataset"] not in NUM_CLASSES:
        raise ValueError(f"config {path}: dataset must be one of {sorted(NUM_CLASSES)}, got {raw['dataset']!r}")
    batch = raw.get("batch_size", 64)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"config {path}: batch_size must be an int >= 1, got {batch!r}")
    val = raw.get("val_fraction", 0.1)
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < val < 1:
        raise ValueError(f"config {path}: val_fraction must be a number in (0, 1), got {val!r}")
    select_on = raw.get("select_on", "validation")
    if select_on not in SELECT_ON:
        raise ValueError(f"config {path}: select_on must be one of {SELECT_ON}, got {select_on!r}")
    sections = {}
    for key, cls in (("imp", IMPConfig), ("compare", Comparison)):
        table = raw.get(key, {})
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(table) - known)
        if bad:
            raise ValueError(f"config {path}: {key}: unknown key(s) {bad}; allowed: {sorted(known)}")
        try:
            sections[key] = cls(**table)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {path}: {key}: {exc}") from exc
    train = dict(raw.get("train", {}))
    for key in ("out_dir", "resume", "seed"):
        if key in train:
            raise ValueError(f"config {path}: train: {key} is set per run by the comparison; leave it out")
    try:
        TrainConfig(**train)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {path}: train: {exc}") from exc
    return LotteryConfig(name=raw.get("name", path.stem), model=raw["model"], dataset=raw["dataset"],
                         imp=sections["imp"], compare=sections["compare"], batch_size=batch,
                         val_fraction=float(val), select_on=select_on, train=train)
