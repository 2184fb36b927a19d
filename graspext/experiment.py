"""Application layer: one experiment (prune, then train) and sweeps over methods x sparsities x seeds.

Every run lives in its own folder (masks, layer report, checkpoint, results, summary) and resumes from it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from graspext._io import csv_text, write_text
from graspext.allocator import keep_freed_memory
from graspext.config import ExperimentConfig
from graspext.distributed.runtime import Distributed
from graspext.masks import Masks
from graspext.nn import sparsify, sparsity_report
from graspext.train import SUMMARY

SWEEP_RUNS = "sweep_runs.csv"
SWEEP_TABLE = "sweep_table.csv"
SWEEP_MARKDOWN = "sweep_table.md"
RUN_CONFIG = "experiment.json"  # what a run folder holds, to tell a finished run from a stale one


def _run_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything of a config that decides the run's result (its name is only the folder's)."""
    settings = dataclasses.asdict(cfg)
    settings.pop("name")
    return json.loads(json.dumps(settings))  # tuples as lists, as the stored copy has them


def check_run_folder(cfg: ExperimentConfig, out_dir: str) -> None:
    """Raises if ``out_dir`` holds a run of other settings: its masks, checkpoint or summary must never be
    reported under this config's name. A folder of an older version, without ``experiment.json``, is checked
    by the method and sparsity its masks record."""
    stored_path = os.path.join(out_dir, RUN_CONFIG)
    current = _run_settings(cfg)
    if os.path.exists(stored_path):
        try:
            with open(stored_path) as f:
                stored = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{stored_path}: unreadable ({exc}); delete the run folder to start over") from exc
    elif os.path.exists(os.path.join(out_dir, "masks.pt")):
        meta = Masks.load(os.path.join(out_dir, "masks.pt")).meta
        stored = {**current, "method": meta.get("method"), "sparsity": meta.get("sparsity")}
    else:
        return
    changed = sorted(k for k in current if stored.get(k) != current[k])
    if changed:
        raise ValueError(f"{out_dir} holds a run with " + ", ".join(f"{k}={stored.get(k)!r}" for k in changed)
                         + "; this one has " + ", ".join(f"{k}={current[k]!r}" for k in changed)
                         + ": use another --out, or delete that folder")


def run_experiment(cfg: ExperimentConfig, out_dir: str, *, data_root: str | None = None, download: bool = False,
                   workers: int = 0, progress: bool = True, log: Callable[[str], Any] = lambda _: None,
                   callbacks: Sequence = ()) -> dict[str, Any]:
    """Prunes (or reuses ``out_dir/masks.pt``), trains when ``cfg.train`` is set (with the trainer
    ``callbacks``), returns the summary."""
    import graspext as gx
    from graspext import data
    from graspext.models import create

    dist = Distributed()  # under torchrun: every rank runs this; rank 0 writes the files
    check_run_folder(cfg, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if dist.is_main:
        write_text(os.path.join(out_dir, RUN_CONFIG), json.dumps(_run_settings(cfg), indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    train_set = data.load(cfg.dataset, data_root, train=True, download=download)
    model = create(cfg.model, num_classes=data.NUM_CLASSES[cfg.dataset])
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed), num_workers=workers)
    masks_path = os.path.join(out_dir, "masks.pt")
    # Rank 0 decides, so that every rank prunes (a collective) or every rank loads.
    if dist.broadcast_object(os.path.exists(masks_path)):  # a resumed run keeps the masks it trained with
        masks = Masks.load(masks_path)
        masks.check_fits(model)
        log(f"resuming with the masks in {masks_path}")
    else:
        options = dict(cfg.prune_options)
        if cfg.method in ("grasp", "snip", "random"):
            options.setdefault("seed", cfg.seed)
        masks = gx.prune(model, cfg.method, cfg.sparsity, loader, **options)  # data-parallel under torchrun
        if dist.is_main:
            masks.save(masks_path)
            write_text(os.path.join(out_dir, "layers.txt"), masks.summary() + "\n")
        dist.barrier()
    log(masks.summary())
    summary: dict[str, Any] = {"name": cfg.name, "model": cfg.model, "dataset": cfg.dataset, "method": cfg.method,
                               "sparsity": masks.sparsity(), "seed": cfg.seed, "out_dir": out_dir}
    if not cfg.train:
        log(f"pruning only (no [train] table); masks in {masks_path}")
        return summary
    test_loader = torch.utils.data.DataLoader(data.load(cfg.dataset, data_root, train=False), batch_size=256,
                                              num_workers=workers)
    dst = None
    if cfg.dst:
        from graspext.dst import from_dict

        dst = from_dict({"seed": cfg.seed, **cfg.dst})
    result = gx.train(model, loader, test_loader, masks=masks, dst=dst, callbacks=callbacks,
                      **{"seed": cfg.seed, **cfg.train, "out_dir": out_dir, "progress": progress})
    summary.update(best_test_acc=result.best_test_acc, final_test_acc=result.final_test_acc)
    if dst is not None:
        summary.update(dst=dst.method, mask_updates=result.summary["mask_updates"],
                       mean_changed_fraction=result.summary["mean_changed_fraction"])
    if "comm_bytes_per_step" in result.summary:
        summary["comm_bytes_per_step"] = result.summary["comm_bytes_per_step"]
    return summary


def sweep(base: ExperimentConfig, methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int],
          out_dir: str, **run_kwargs) -> list[dict[str, Any]]:
    """Runs every (method, sparsity, seed) in ``out_dir/<method>-<sparsity>-s<seed>``; finished runs are
    read back, so a killed sweep resumes. Writes per-run and mean ± std tables (CSV and Markdown)."""
    if not methods or not sparsities or not seeds:
        raise ValueError("sweep needs at least one method, one sparsity and one seed")
    from graspext.pruning import METHODS
    from graspext.pruning.selection import check_sparsity

    unknown = [m for m in methods if m not in METHODS]
    if unknown:  # before any run trains, not after the others have
        raise ValueError(f"methods {unknown} are not pruning methods; choose from {sorted(METHODS)}")
    for s in sparsities:
        check_sparsity(s)
    os.makedirs(out_dir, exist_ok=True)
    dist = Distributed()
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
                # Every rank skips it, or none (an unfinished run is checked by run_experiment).
                if dist.broadcast_object(os.path.exists(done)):
                    check_run_folder(cfg, run_dir)
                    try:
                        with open(done) as f:
                            finished = json.load(f)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{done}: not valid JSON ({exc}); delete {run_dir} to rerun it") from exc
                    rows.append({"method": method, "sparsity": sparsity, "seed": seed,
                                 "best_test_acc": finished["best_test_acc"],
                                 "final_test_acc": finished["final_test_acc"], "out_dir": run_dir})
                    continue
                summary = run_experiment(cfg, run_dir, **run_kwargs)
                rows.append({k: summary[k] for k in ("method", "seed", "best_test_acc", "final_test_acc", "out_dir")}
                            | {"sparsity": sparsity})
    if dist.is_main:
        _write_tables(rows, out_dir)
    dist.barrier()  # the tables exist for every rank once sweep returns
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r["best_test_acc"])
    return [{"method": m, "sparsity": s, "runs": len(v), "best_test_acc_mean": statistics.fmean(v),
             "best_test_acc_std": statistics.stdev(v) if len(v) > 1 else 0.0}
            for (m, s), v in sorted(groups.items())]


def _write_tables(rows, out_dir) -> None:
    table = aggregate(rows)
    # Run folders relative to the sweep folder, so that a moved or copied sweep still reports its own runs.
    write_text(os.path.join(out_dir, SWEEP_RUNS),
               csv_text([{**r, "out_dir": os.path.relpath(r["out_dir"], out_dir)} for r in rows]))
    write_text(os.path.join(out_dir, SWEEP_TABLE), csv_text(table))
    lines = ["| method | sparsity | runs | best test accuracy (mean ± std) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {t['method']} | {t['sparsity']:g} | {t['runs']} | "
              f"{100 * t['best_test_acc_mean']:.2f} ± {100 * t['best_test_acc_std']:.2f} |" for t in table]
    write_text(os.path.join(out_dir, SWEEP_MARKDOWN), "\n".join(lines) + "\n")


def train_step_seconds(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], repeats: int = 5, *,
                       bf16: bool = False, channels_last: bool = False) -> float:
    """Median seconds of one training step (forward, backward, SGD with momentum) at this batch; ``bf16`` runs
    the forward under ``torch.autocast(device, bfloat16)``, ``channels_last`` stores weights and input so."""
    import time

    import torch.nn.functional as F

    keep_freed_memory()
    model = copy.deepcopy(model).train()
    x, y = batch
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def demo(out_dir: str, *, model: str = "vgg11_bn", sparsity: float = 0.98, epochs: int = 5,
         methods: Sequence[str] = ("grasp", "snip", "synflow", "random"), progress: bool = True,
         log: Callable[[str], Any] = print) -> dict[str, Any]:
    """The README's main job on the embedded digits data: prune with each method, train briefly, compare;
    then time a training step of the pruned model against its dense twin and write the plots."""
    from graspext import data
    from graspext.models import create
    from graspext.report import report

    base = ExperimentConfig(name="demo", model=model, dataset="digits", method=methods[0], sparsity=sparsity,
                            train={"epochs": epochs, "lr": 0.1, "weight_decay": 5e-4})
    sweep(base, methods, [sparsity], [0], out_dir, progress=progress)
    with open(os.path.join(out_dir, SWEEP_MARKDOWN)) as f:
        table = f.read()

    torch.manual_seed(0)
    net = create(model, num_classes=10)
    train_set = data.load("digits", train=True)
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=False)))
    masks = Masks.load(os.path.join(out_dir, f"{methods[0]}-{sparsity:g}-s0", "masks.pt"))
    sparse_net = sparsify(net, masks)  # as the trainer does: per layer sparse or dense by the cost model
    layers = sparsity_report(sparse_net)
    kind = f"sparse kernels, {sum(r.mode == 'sparse' for r in layers)} of {len(layers)} layers sparse"
    dense_s = train_step_seconds(net, batch)
    pruned_s = train_step_seconds(sparse_net, batch)
    # What a CPU user runs for speed: bfloat16 autocast, dense in channels_last (oneDNN, AMX where present);
    # the pruned model under the same autocast, its layers chosen for bfloat16.
    dense_bf16_s = train_step_seconds(net, batch, bf16=True, channels_last=True)
    pruned_bf16_s = train_step_seconds(sparsify(net, masks, dtype=torch.bfloat16), batch, bf16=True)
    timing = {"dense_step_s": dense_s, "pruned_step_s": pruned_s, "speedup": dense_s / pruned_s, "pruned_path": kind,
              "dense_bf16_channels_last_step_s": dense_bf16_s, "pruned_bf16_step_s": pruned_bf16_s,
              "bf16_speedup": dense_bf16_s / pruned_bf16_s}
    plots = report(out_dir)
    lines = [f"graspext demo: {model} on the embedded digits data, {sparsity:.0%} of the weights pruned, "
             f"{epochs} epochs each", "", table.rstrip(), "",
             f"training step at batch 128: dense {1000 * dense_s:.0f} ms, pruned {1000 * pruned_s:.0f} ms "
             f"({timing['speedup']:.2f}x; the pruned model runs on {kind})",
             (f"under bfloat16 autocast: dense (channels_last) {1000 * dense_bf16_s:.0f} ms, pruned "
              f"{1000 * pruned_bf16_s:.0f} ms ({timing['bf16_speedup']:.2f}x)")]
    lines += ["", "plots: " + ", ".join(os.path.basename(p) for p in plots if p.endswith(".png")) +
              f" in {os.path.join(out_dir, 'report')}"]
    text = "\n".join(lines)
    write_text(os.path.join(out_dir, "demo.txt"), text + "\n")
    write_text(os.path.join(out_dir, "demo.json"), json.dumps({"timing": timing, "sparsity": sparsity,
                                                               "epochs": epochs, "model": model}, indent=2))
    log(text)
    return timing
