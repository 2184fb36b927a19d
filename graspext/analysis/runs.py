"""The three analyses as runs with JSON results and plots (``graspext analyze gradflow | spectrum | limit``).

With no model or data given each runs a digits-sized default: LeNet-5 on the embedded digits data (1,437
training and 360 test images, 3x32x32), a couple of minutes at most on a 2-core CPU.

- :func:`run_gradflow`: a 90 %-sparse LeNet-5 trained from three initialisations (the dense init masked, the
  layer-scaled and the unit-scaled sparse init), its masked gradient norm on a fixed batch through training,
  and its distance to the initialisation (Evci et al.'s first two findings).
- :func:`run_spectrum`: the trained network's Hessian on fixed training batches: the top eigenvalues
  (Lanczos), the trace (Hutchinson) and the SLQ spectral density.
- :func:`run_limit`: train with L1 (no weight decay, as the official runs), then the predicted and the actual
  pruning limit (Zhang et al.).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

import graspext as gx
from graspext._io import write_text
from graspext.analysis.curvature import Curvature
from graspext.analysis.gradflow import GradientFlow, distance_to_init
from graspext.analysis.limit import L1Regularization, pruning_limit
from graspext.init import apply_init_

DEFAULT_MODEL = "lenet5"
INITS = ("dense", "layer_scaled", "unit_scaled")  # "dense": the model's dense init, masked


def _digits(batch_size: int, seed: int):
    from graspext.data.digits import digits_dataset

    train, test = digits_dataset(train=True), digits_dataset(train=False)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return train, train_loader, DataLoader(test, batch_size=256)


def fixed_batches(dataset, samples: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` examples of ``dataset`` in batches: the same tensors every time, no augmentation."""
    if samples > len(dataset):
        raise ValueError(f"samples={samples} is more than the dataset's {len(dataset)} examples")
    loader = DataLoader(Subset(dataset, range(samples)), batch_size=batch_size, shuffle=False)
    return [(x, y) for x, y in loader]


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return gx.models.create(name)


def _write_json(out_dir: str | None, name: str, result: dict[str, Any]) -> None:
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_text(os.path.join(out_dir, name), json.dumps(result, indent=2) + "\n")


def _plot(out_dir: str | None, stem: str, draw: Callable) -> list[str]:
    if not out_dir:
        return []
    from graspext.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    paths = _save(fig, out_dir, stem)
    plt.close(fig)
    return paths


def run_gradflow(out_dir: str | None = None, *, model: str = DEFAULT_MODEL, sparsity: float = 0.9,
                 epochs: int = 3, lr: float = 0.05, batch_size: int = 64, every: int = 5, seed: int = 0,
                 progress: bool = False) -> dict[str, Any]:
    """Gradient flow of a randomly pruned network trained from each of :data:`INITS`; ``gradflow.json``."""
    train, train_loader, test_loader = _digits(batch_size, seed)
    probe = fixed_batches(train, 256, 256)[0]
    runs = {}
    for init in INITS:
        net = _model(model, seed)
        masks = gx.prune(net, "random", sparsity, seed=seed)
        start = copy.deepcopy(net)
        if init != "dense":
            apply_init_(init, start, masks, generator=torch.Generator().manual_seed(seed))
        else:
            masks.apply_(start).remove()
        init_state = {k: v.clone() for k, v in start.state_dict().items()}
        flow = GradientFlow(probe, every=every)
        result = gx.train(start, train_loader, test_loader, masks=masks, callbacks=[flow], epochs=epochs, lr=lr,
                          momentum=0.9, weight_decay=5e-4, seed=seed, progress=progress)
        runs[init] = {"history": [{"step": h["step"], "total": h["total"]} for h in flow.history],
                      "best_test_acc": result.best_test_acc, "distance_to_init": distance_to_init(start, init_state)}
    out = {"model": model, "sparsity": sparsity, "epochs": epochs, "every": every, "runs": runs}
    _write_json(out_dir, "gradflow.json", out)

    def draw(ax):
        for init, run in runs.items():
            ax.plot([h["step"] for h in run["history"]], [h["total"] for h in run["history"]], label=init)
        ax.set_xlabel("training step")
        ax.set_ylabel("masked gradient norm (fixed batch)")
        ax.set_yscale("log")
        ax.set_title(f"gradient flow, {model} at {sparsity:.0%} sparsity")
        ax.legend()

    out["plots"] = _plot(out_dir, "gradient_flow", draw)
    return out


def _trained(model: str, epochs: int, lr: float, batch_size: int, seed: int, progress: bool,
             callbacks=(), weight_decay: float = 5e-4):
    train, train_loader, test_loader = _digits(batch_size, seed)
    net = _model(model, seed)
    result = gx.train(net, train_loader, test_loader, callbacks=list(callbacks), epochs=epochs, lr=lr, momentum=0.9,
                      weight_decay=weight_decay, seed=seed, progress=progress)
    return net.eval(), train, test_loader, result


def run_spectrum(out_dir: str | None = None, *, model: str = DEFAULT_MODEL, epochs: int = 5, lr: float = 0.05,
                 batch_size: int = 64, samples: int = 512, k: int = 5, probes: int = 4, steps: int = 60,
                 trace_probes: int = 50, engine: str = "exact", seed: int = 0, progress: bool = False
                 ) -> dict[str, Any]:
    """The trained network's Hessian (eval mode, ``samples`` fixed training images); ``spectrum.json``."""
    net, train, _, result = _trained(model, epochs, lr, batch_size, seed, progress)
    curvature = Curvature(net, fixed_batches(train, samples, 128), engine=engine)
    top = curvature.top_eigenvalues(k, seed=seed).tolist()
    trace, trace_error = curvature.hutchinson_trace(trace_probes, seed=seed)
    density = curvature.spectral_density(probes, steps, seed=seed)
    out = {"model": model, "parameters": curvature.dim, "best_test_acc": result.best_test_acc,
           "loss": curvature.loss(), "top_eigenvalues": top, "trace": trace, "trace_stderr": trace_error,
           "density": density.to_dict(), "hvp_products": curvature.hvp_count}
    _write_json(out_dir, "spectrum.json", out)

    def draw(ax):
        lo, hi = float(density.nodes.min()), float(density.nodes.max())
        pad = 0.05 * (hi - lo or 1.0)
        grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
        ax.plot(grid, density.smoothed(grid, sigma=0.01 * (hi - lo or 1.0)))
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.set_title(f"Hessian spectrum, {model} ({curvature.dim} parameters)")

    out["plots"] = _plot(out_dir, "spectral_density", draw)
    return out


def run_limit(out_dir: str | None = None, *, model: str = DEFAULT_MODEL, epochs: int = 10, lr: float = 0.05,
              lmbda: float = 1e-4, batch_size: int = 64, samples: int = 512, probes: int = 4, steps: int = 60,
              seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Train with L1, then both pruning limits; ``limit.json``."""
    net, train, test_loader, result = _trained(model, epochs, lr, batch_size, seed, progress,
                                               callbacks=[L1Regularization(lmbda)], weight_decay=0.0)
    limit = pruning_limit(net, fixed_batches(train, samples, 64), test_loader, probes=probes, steps=steps, seed=seed)
    out = {"model": model, "lmbda": lmbda, "epochs": epochs, "best_test_acc": result.best_test_acc,
           **limit.to_dict()}
    _write_json(out_dir, "limit.json", out)

    def draw(ax):
        xs = [100 * r["removed"] for r in limit.sweep]
        ax.plot(xs, [r["accuracy"] for r in limit.sweep], label="accuracy after one-shot pruning")
        ax.plot(xs, limit.predicted_width, label="predicted width gw(R(s))")
        ax.plot(xs, [r["removed"] for r in limit.sweep], color="gray", linewidth=0.8, linestyle=":", label="gw = s")
        ax.axvline(100 * limit.predicted, color="g", linestyle="--", label=f"predicted limit {limit.predicted:.1%}")
        ax.axvline(100 * limit.actual, color="r", linestyle="--", label=f"actual limit {limit.actual:.1%}")
        ax.set_xlabel("removed weights (%)")
        ax.set_ylabel("accuracy / width")
        ax.set_title(f"pruning limit, {model}")
        ax.legend(fontsize=7)

    out["plots"] = _plot(out_dir, "pruning_limit", draw)
    return out
