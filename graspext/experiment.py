"""Application layer: one experiment (prune, then train) and sweeps over methods x sparsities x seeds.

Every run lives in its own folder (masks, layer report, checkpoint, results, summary) and resumes from it.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from graspext.config import ExperimentConfig
from graspext.masks import Masks
from graspext.train import SUMMARY, _write_text

SWEEP_RUNS = "sweep_runs.csv"
SWEEP_TABLE = "sweep_table.csv"
SWEEP_MARKDOWN = "sweep_table.md"


def run_experiment(cfg: ExperimentConfig, out_dir: str, *, data_root: str | None = None, download: bool = False,
                   workers: int = 0, progress: bool = True, log: Callable[[str], Any] = lambda _: None
                   ) -> dict[str, Any]:
    """Prunes (or reuses ``out_dir/masks.pt``), trains when ``cfg.train`` is set, returns the summary."""
    import graspext as gx
    from graspext import data
    from graspext.models import create

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_set = data.load(cfg.dataset, data_root, train=True, download=download)
    model = create(cfg.model, num_classes=data.NUM_CLASSES[cfg.dataset])
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed), num_workers=workers)
    masks_path = os.path.join(out_dir, "masks.pt")
    if os.path.exists(masks_path):  # a resumed run keeps the masks it trained with
        masks = Masks.load(masks_path)
        masks.check_fits(model)
        log(f"resuming with the masks in {masks_path}")
    else:
        options = dict(cfg.prune_options)
        if cfg.method in ("grasp", "snip", "random"):
            options.setdefault("seed", cfg.seed)
        masks = gx.prune(model, cfg.method, cfg.sparsity, loader, **options)
        masks.save(masks_path)
        _write_text(os.path.join(out_dir, "layers.txt"), masks.summary() + "\n")
    log(masks.summary())
    summary: dict[str, Any] = {"name": cfg.name, "model": cfg.model, "dataset": cfg.dataset, "method": cfg.method,
                               "sparsity": masks.sparsity(), "seed": cfg.seed, "out_dir": out_dir}
    if not cfg.train:
        log(f"pruning only (no [train] table); masks in {masks_path}")
        return summary
    test_loader = torch.utils.data.DataLoader(data.load(cfg.dataset, data_root, train=False), batch_size=256,
                                              num_workers=workers)
    result = gx.train(model, loader, test_loader, masks=masks,
                      **{"seed": cfg.seed, **cfg.train, "out_dir": out_dir, "progress": progress})
    summary.update(best_test_acc=result.best_test_acc, final_test_acc=result.final_test_acc)
    return summary


def sweep(base: ExperimentConfig, methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int],
          out_dir: str, **run_kwargs) -> list[dict[str, Any]]:
    """Runs every (method, sparsity, seed) in ``out_dir/<method>-<sparsity>-s<seed>``; finished runs are
    read back, so a killed sweep resumes. Writes per-run and mean ± std tables (CSV and Markdown)."""
    if not methods or not sparsities or not seeds:
        raise ValueError("sweep needs at least one method, one sparsity and one seed")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for method in methods:
        for sparsity in sparsities:
            for seed in seeds:
                cfg = copy.deepcopy(base)
                cfg.method, cfg.sparsity, cfg.seed = method, sparsity, seed
                if method != base.method:
                    cfg.prune_options = {}
                cfg.name = f"{method}-{sparsity:g}-s{seed}"
                run_dir = os.path.join(out_dir, cfg.name)
                done = os.path.join(run_dir, SUMMARY)
                if os.path.exists(done):
                    with open(done) as f:
                        finished = json.load(f)
                    rows.append({"method": method, "sparsity": sparsity, "seed": seed,
                                 "best_test_acc": finished["best_test_acc"],
                                 "final_test_acc": finished["final_test_acc"], "out_dir": run_dir})
                    continue
                summary = run_experiment(cfg, run_dir, **run_kwargs)
                rows.append({k: summary[k] for k in ("method", "seed", "best_test_acc", "final_test_acc", "out_dir")}
                            | {"sparsity": sparsity})
    _write_tables(rows, out_dir)
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r["best_test_acc"])
    return [{"method": m, "sparsity": s, "runs": len(v), "best_test_acc_mean": statistics.fmean(v),
             "best_test_acc_std": statistics.stdev(v) if len(v) > 1 else 0.0}
            for (m, s), v in sorted(groups.items())]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_tables(rows, out_dir) -> None:
    table = aggregate(rows)
    _write_text(os.path.join(out_dir, SWEEP_RUNS), _csv(rows))
    _write_text(os.path.join(out_dir, SWEEP_TABLE), _csv(table))
    lines = ["| method | sparsity | runs | best test accuracy (mean ± std) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {t['method']} | {t['sparsity']:g} | {t['runs']} | "
              f"{100 * t['best_test_acc_mean']:.2f} ± {100 * t['best_test_acc_std']:.2f} |" for t in table]
    _write_text(os.path.join(out_dir, SWEEP_MARKDOWN), "\n".join(lines) + "\n")
