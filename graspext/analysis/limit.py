"""How far a trained network can be pruned at once: the pruning limit of Zhang et al. ("How sparse can we prune a
deep network: a fundamental limit viewpoint"; official code QiaozheZhang/Global-One-shot-Pruning).

- Training with ``λ Σ|p|`` (:class:`L1Regularization`, a trainer callback; the official runs use no weight
  decay then) makes the weights compressible.
- The **actual limit** comes from a one-shot global magnitude sweep without retraining (:func:`one_shot_sweep`):
  the largest removed fraction whose accuracy stays above the unpruned network's.
- The **predicted limit** solves ``gw(R(s)) = s`` (:func:`predicted_limit`), where
  - ``gw(R) = Σ p_i r_i² / (R² + r_i²) / Σ p_i`` with ``r_i² = 2ε / |λ_i|`` over the SLQ spectral density
    ``(λ_i, p_i)`` of the loss Hessian (:func:`gaussian_width`); ``r_i`` is the semi-axis of the loss sublevel set
    ``{w : ½ wᵀHw ≤ ε}`` along eigenvector i, and ``r_i²R²/(R² + r_i²)`` the squared semi-axis of the ellipsoid
    whose quadratic form is the sum of that set's and the radius-R ball's;
  - ``ε`` is the standard deviation of the training loss over mini-batches (the loss's own noise level);
  - ``R(s) = ‖w − P_s(w)‖`` is the norm of the weights that pruning a fraction ``s`` removes.

Two departures from the official code, both on purpose: ``R`` is used as the real number it is (the official code
rounds it to an integer grid, too coarse for small networks whose weight norm is a few units), and the Hessian
is taken on fixed batches without augmentation (the official products run on augmented batches, so each one sees
a different loss). "Pruning ratio" in the official code is the removed fraction, as ``s`` is here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graspext.analysis.curvature import Curvature, SpectralDensity
from graspext.analysis.evaluation import evaluate
from graspext.callbacks import Callback
from graspext.pruning.selection import select_masks


class L1Regularization(Callback):
    """Adds ``λ Σ|p|`` over every trainable parameter to the training loss, as its subgradient ``λ sign(p)``
    added to each gradient after the backward pass (the official ``get_regularization_loss``: every weight and
    bias). The logged training loss is the data loss alone."""

    def __init__(self, lmbda: float):
        if isinstance(lmbda, bool) or not isinstance(lmbda, numbers.Real) or not 0 < lmbda < math.inf:
            raise ValueError(f"lmbda must be a positive finite number, got {lmbda!r}")
        self.lmbda = float(lmbda)

    def on_after_backward(self, trainer) -> None:
        scale = trainer.scaler.get_scale() if trainer.scaler is not None else 1.0  # fp16: gradients are scaled
        with torch.no_grad():
            for p in trainer.model.parameters():
                if p.requires_grad and p.grad is not None:
                    p.grad.add_(torch.sign(p), alpha=self.lmbda * scale)


def prunable_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weights the official sweep prunes: every Conv2d and Linear weight, by parameter name."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _removed_masks(weights: dict[str, Tensor], removed: float) -> dict[str, Tensor]:
    """Kept masks after removing ``ceil(removed · N)`` weights of smallest ``|w|`` over all layers together (the
    official count), exactly that many (ties broken deterministically)."""
    total = sum(w.numel() for w in weights.values())
    count = min(total, math.ceil(removed * total - 1e-9))
    scores = [w.detach().abs().float() for w in weights.values()]
    masks, _ = select_masks(scores, count, remove_largest=False)
    return dict(zip(weights, masks))


def one_shot_sweep(model: nn.Module, loader: Iterable, fractions: Sequence[float], *,
                   loss_fn: Callable = F.cross_entropy) -> list[dict[str, float]]:
    """Accuracy and loss of ``model`` with each removed fraction of its Conv2d/Linear weights pruned by global
    magnitude at once, without retraining (evaluated in the model's current mode; the model is restored)."""
    fractions = [_check_fraction(s, "fractions") for s in fractions]
    weights = prunable_weights(model)
    if not weights:
        raise ValueError("model has no Conv2d or Linear weight to prune")
    original = {n: w.detach().clone() for n, w in weights.items()}
    rows = []
    try:
        for s in fractions:
            masks = _removed_masks(original, s)
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(original[n] * masks[n])
            loss, acc = evaluate(model, loader, loss_fn)
            removed_norm = math.sqrt(sum(float((original[n] * ~masks[n]).double().square().sum()) for n in weights))
            rows.append({"removed": s, "accuracy": acc, "loss": loss, "R": removed_norm})
    finally:
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(original[n])
    return rows


def actual_limit(sweep: Sequence[dict[str, float]]) -> float:
    """The largest removed fraction whose accuracy is above the unpruned network's (the sweep's ``removed=0``
    row), as the official script reads it; 0 when no pruned network beats the unpruned one."""
    base = [r for r in sweep if r["removed"] == 0]
    if not base:
        raise ValueError("sweep: the fractions must include 0 (the unpruned network the limit is measured against)")
    better = [r["removed"] for r in sweep if r["removed"] > 0 and r["accuracy"] > base[0]["accuracy"]]
    return max(better, default=0.0)


@torch.no_grad()
def loss_noise(model: nn.Module, batches: Iterable, loss_fn: Callable = F.cross_entropy) -> tuple[float, float]:
    """The mean and the standard deviation of the training loss over mini-batches (ε of the prediction), in the
    model's current mode (the official ``cal_loss`` runs in eval mode)."""
    device = next(model.parameters()).device
    losses = torch.tensor([float(loss_fn(model(x.to(device)), y.to(device))) for x, y in batches], dtype=torch.float64)
    if len(losses) < 2:
        raise ValueError("batches: the loss's standard deviation over mini-batches needs at least 2 batches")
    if not torch.isfinite(losses).all():
        raise ValueError("the training loss is not finite on some batch; the pruning limit is undefined there")
    return float(losses.mean()), float(losses.std(unbiased=True))


def gaussian_width(density: SpectralDensity, radius: float | Tensor, epsilon: float) -> Tensor:
    """``gw(R) = Σ p_i r_i² / (R² + r_i²) / Σ p_i`` with ``r_i² = 2ε / |λ_i|`` (a zero eigenvalue: ``r_i = ∞``,
    a term of 1). ``radius`` may be a tensor of radii."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive (the loss's standard deviation over batches), got {epsilon!r}")
    r = torch.as_tensor(radius, dtype=torch.float64).reshape(-1, 1)
    lam = density.nodes.abs().double().reshape(1, -1)
    p = density.weights.double().reshape(1, -1)
    # r_i^2 / (R^2 + r_i^2) = 2ε / (R^2 |λ_i| + 2ε): finite for λ_i = 0 too.
    terms = 2 * epsilon / (r.square() * lam + 2 * epsilon)
    out = (terms * p).sum(1) / p.sum()
    return out.reshape(torch.as_tensor(radius).shape)


class RemovedNorm:
    """``R(s) = ‖w − P_s(w)‖`` for real ``s``: the removed weights' norm, linear in the removed count between two
    counts (the magnitudes sorted once)."""

    def __init__(self, weights: Iterable[Tensor]):
        magnitudes = torch.cat([w.detach().reshape(-1).double().abs().cpu() for w in weights]).sort().values
        self.total = magnitudes.numel()
        self.cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), magnitudes.square().cumsum(0)])

    def __call__(self, s: float) -> float:
        k = min(max(s, 0.0), 1.0) * self.total
        lo = math.floor(k)
        hi = min(lo + 1, self.total)
        squared = float(self.cumulative[lo]) + (k - lo) * float(self.cumulative[hi] - self.cumulative[lo])
        return math.sqrt(squared)


def predicted_limit(density: SpectralDensity, epsilon: float, removed_norm: Callable[[float], float], *,
                    tolerance: float = 1e-9) -> float:
    """The removed fraction ``s`` in [0, 1] where ``gw(R(s)) = s``, by bisection: ``R`` grows with ``s`` and ``gw``
    falls with ``R``, so ``gw(R(s)) − s`` falls from ``gw(0) = 1`` at ``s = 0``."""
    def gap(s: float) -> float:
        return float(gaussian_width(density, removed_norm(s), epsilon)) - s

    lo, hi = 0.0, 1.0
    if gap(hi) >= 0:
        return 1.0
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class PruningLimit:
    """Both limits of a trained network, with what they were computed from."""

    predicted: float
    actual: float
    epsilon: float
    train_loss: float
    weight_norm: float
    sweep: list[dict[str, float]] = field(default_factory=list)
    # The prediction along the sweep: gw(R(s)) for each swept s (the official plot of width against R).
    predicted_width: list[float] = field(default_factory=list)
    density: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def pruning_limit(model: nn.Module, train_batches: Sequence, test_loader: Iterable, *,
                  fractions: Sequence[float] | None = None, probes: int = 4, steps: int = 60, seed: int = 0,
                  loss_fn: Callable = F.cross_entropy, engine: str = "exact") -> PruningLimit:
    """The predicted and the actual pruning limit of a trained ``model`` (evaluated in eval mode).

    ``train_batches``: fixed training batches, no augmentation (ε and the Hessian); ``test_loader``: where the
    sweep measures accuracy; ``fractions``: the removed fractions swept (default 0, 0.01, ..., 0.99, the
    official grid of 100). ``probes``/``steps``: SLQ's Rademacher probes and Lanczos steps; ``seed`` draws them.
    """
    fractions = [i / 100 for i in range(100)] if fractions is None else list(fractions)
    was_training = model.training
    model.eval()
    try:
        train_batches = list(train_batches)
        train_loss, epsilon = loss_noise(model, train_batches, loss_fn)
        if epsilon == 0:
            raise ValueError("the training loss does not vary over the batches (ε = 0); give more, different batches")
        density = Curvature(model, train_batches, loss_fn=loss_fn, engine=engine).spectral_density(probes, steps,
                                                                                                  seed=seed)
        removed_norm = RemovedNorm(prunable_weights(model).values())
        predicted = predicted_limit(density, epsilon, removed_norm)
        sweep = one_shot_sweep(model, test_loader, sorted(set(fractions) | {0.0}), loss_fn=loss_fn)
        width = gaussian_width(density, torch.tensor([r["R"] for r in sweep]), epsilon).tolist()
        weight_norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in model.parameters()))
    finally:
        model.train(was_training)
    return PruningLimit(predicted=predicted, actual=actual_limit(sweep), epsilon=epsilon, train_loss=train_loss,
                        weight_norm=weight_norm, sweep=sweep, predicted_width=width, density=density.to_dict())


def _check_fraction(s, name: str) -> float:
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1:
        raise ValueError(f"{name}: every removed fraction must be a number in [0, 1), got {s!r}")
    return float(s)
