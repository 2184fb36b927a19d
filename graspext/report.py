"""Plots (PNG and SVG) from run and sweep folders: accuracy against sparsity per method, per-layer density
bars, training curves."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

from graspext.masks import Masks


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def accuracy_vs_sparsity(sweep_dir: str, out_dir: str) -> list[str]:
    """From ``sweep_table.csv``: mean best test accuracy (± std) against sparsity, one line per method."""
    path = os.path.join(sweep_dir, "sweep_table.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep: no sweep_table.csv in {sweep_dir!r} (run `graspext sweep` first)")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((float(r["sparsity"]), 100 * float(r["best_test_acc_mean"]), 100 * float(r["best_test_acc_std"]))
                     for r in rows if r["method"] == method)
        xs, ys, es = zip(*pts)
        ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set_xlabel("weights pruned (%)")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title("Accuracy against sparsity")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = _save(fig, out_dir, "accuracy_vs_sparsity")
    plt.close(fig)
    return paths


def layer_densities(masks_paths: Sequence[str], out_dir: str, labels: Sequence[str] | None = None) -> list[str]:
    """Grouped bars of per-layer density for one or more masks files."""
    if not masks_paths:
        raise ValueError("masks: give at least one masks file")
    all_masks = [Masks.load(p) for p in masks_paths]
    labels = list(labels) if labels else [m.meta.get("method", os.path.basename(p))
                                          for m, p in zip(all_masks, masks_paths)]
    names = list(all_masks[0])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.25 * len(names) * len(all_masks))), 4))
    width = 0.8 / len(all_masks)
    for i, (masks, label) in enumerate(zip(all_masks, labels)):
        dens = masks.layer_densities()
        ax.bar([j + i * width for j in range(len(names))], [100 * dens.get(n, float("nan")) for n in names],
               width=width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("weights kept (%)")
    ax.set_title("Per-layer density")
    ax.legend(fontsize=7)
    paths = _save(fig, out_dir, "layer_density")
    plt.close(fig)
    return paths


def training_curves(run_dirs: Sequence[str], out_dir: str) -> list[str]:
    """Train loss and test accuracy per epoch from each run's ``results.jsonl``."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    plotted = 0
    for run in run_dirs:
        path = os.path.join(run, "results.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            history = [json.loads(line) for line in f if line.strip()]
        epochs = [r["epoch"] for r in history]
        label = os.path.basename(os.path.normpath(run))
        ax_loss.plot(epochs, [r["train_loss"] for r in history], label=label)
        ax_acc.plot(epochs, [100 * r["test_acc"] for r in history], label=label)
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise FileNotFoundError(f"runs: none of {list(run_dirs)} has a results.jsonl")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    paths = _save(fig, out_dir, "training_curves")
    plt.close(fig)
    return paths


def _representative_runs(folder: str) -> list[str]:
    """A sweep's per-layer and curve plots show one run per method: the highest sparsity, the first seed."""
    with open(os.path.join(folder, "sweep_runs.csv")) as f:
        rows = list(csv.DictReader(f))
    top = max(float(r["sparsity"]) for r in rows)
    first_seed = min(int(r["seed"]) for r in rows)
    picked = {}
    for r in rows:
        if float(r["sparsity"]) == top and int(r["seed"]) == first_seed:
            # Each run is a folder of the sweep (older tables hold paths from where the sweep ran: only the
            # folder's name is taken from them), never a path resolved against the current directory.
            picked.setdefault(r["method"], os.path.join(folder, os.path.basename(os.path.normpath(r["out_dir"]))))
    return [picked[m] for m in sorted(picked)]


def report(folder: str, out_dir: str | None = None) -> list[str]:
    """Every plot that ``folder`` (a sweep folder or a single run folder) has data for."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder: {folder!r} does not exist")
    out_dir = out_dir or os.path.join(folder, "report")
    paths = []
    if os.path.isfile(os.path.join(folder, "sweep_table.csv")):
        paths += accuracy_vs_sparsity(folder, out_dir)
        runs = _representative_runs(folder)
    else:
        runs = [folder] if os.path.isfile(os.path.join(folder, "masks.pt")) else []
    runs = [r for r in runs if os.path.isfile(os.path.join(r, "masks.pt"))]
    if runs:
        paths += layer_densities([os.path.join(r, "masks.pt") for r in runs], out_dir,
                                 [os.path.basename(os.path.normpath(r)) for r in runs])
        if any(os.path.isfile(os.path.join(r, "results.jsonl")) for r in runs):
            paths += training_curves(runs, out_dir)
    if not paths:
        raise FileNotFoundError(f"folder: {folder!r} holds no sweep table, masks or results to plot")
    return paths
