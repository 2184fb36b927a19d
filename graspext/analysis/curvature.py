"""The Hessian of a model's loss on a fixed set of batches: products, Lanczos, traces and spectra.

:class:`Curvature` holds the model, the batches (no augmentation: the same tensors every time) and which
coordinates count: every trainable parameter, or with ``masks`` the kept weights of the masked layers and every
other parameter whole (pruned positions are outside the space, so the operator is ``P H P`` on the kept
coordinates). The loss is the sample-weighted mean over all batches, so ``H = sum_b (n_b / N) H_b``.

Hessian-vector products:

- ``"exact"``: double backward, ``d/dθ (∇L(θ) · v)``;
- ``"finite_difference"``: ``(∇L(θ + εv) − ∇L(θ)) / ε`` with the ReLU pattern and max-pool choices recorded at
  θ replayed at θ + εv (GraSP's frozen-activation quotient, ``graspext.pruning.activation_patterns``), so the
  quotient converges to autograd's product inside the current activation region. It costs one gradient per
  product where the exact one costs about three, and is accurate in float64 (relative error 1e-7 against
  ``exact`` on VGG11/16/19-CIFAR). In float32 the difference of two gradients drowns in their round-off on deep
  networks along a random direction (VGG19-CIFAR at batch 64: relative error about 100); there use ``exact``,
  or the model in float64 (benchmarks/RESULTS.md, curvature).

On top: Lanczos with full reorthogonalisation (:func:`lanczos`), the top-k eigenvalues, Hutchinson's trace
estimate with its standard error, stochastic Lanczos quadrature (SLQ) of the spectral density with several
Rademacher probes, and an exact eigendecomposition for small models. Every random draw comes from a
``torch.Generator`` seeded by ``seed``, so results are deterministic given a seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graspext.pruning.activation_patterns import ActivationPatterns

ENGINES = ("exact", "finite_difference")
EXACT_MAX_PARAMS = 4096          # the exact Hessian holds dim^2 float64 values: 128 MiB at this size
# ε |v| / (1 + |θ|): float32 as GraSP's frozen-activation finite difference (round-off and truncation balance
# there); float64 resolves a step 1000x smaller, whose truncation error is that much smaller too.
FD_RELATIVE_STEP = {torch.float32: 1e-5, torch.float64: 1e-8}


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class Curvature:
    """The loss Hessian of ``model`` on ``batches`` (an iterable of ``(inputs, targets)``, read once).

    ``masks`` (``graspext.Masks`` or name -> bool tensor) restrict the space to the kept weights; ``params``
    (names) restrict it to some parameters (default: every parameter that requires grad). The model's mode is
    used as it is (call ``model.eval()`` first for the curvature of the deployed network, BatchNorm on running
    statistics, as the pruning-limit analysis does), and so are its weights: apply the masks before. Running
    statistics are never updated.
    """

    def __init__(self, model: nn.Module, batches: Iterable, *, loss_fn: Callable = F.cross_entropy,
                 masks: Mapping[str, Tensor] | None = None, params: Iterable[str] | None = None,
                 engine: str = "exact", fd_epsilon: float | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if fd_epsilon is not None and not (isinstance(fd_epsilon, numbers.Real) and 0 < fd_epsilon < math.inf):
            raise ValueError(f"fd_epsilon must be a positive number or None, got {fd_epsilon!r}")
        self.model, self.loss_fn, self.engine, self.fd_epsilon = model, loss_fn, engine, fd_epsilon
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        names = list(named) if params is None else list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"params: {unknown[:3]} are not trainable parameters of the model")
        if not names:
            raise ValueError("params: the model has no trainable parameter to take the Hessian over")
        self.names = names
        self.params = [named[n] for n in names]
        self.masks: dict[str, Tensor] = {}
        if masks is not None:
            for key, mask in masks.items():
                if key not in named:
                    raise ValueError(f"masks: {key!r} is not a trainable parameter of the model; the masks belong "
                                     "to another model")
                if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != named[key].shape:
                    raise ValueError(f"masks[{key!r}] must be a bool tensor of the parameter's shape "
                                     f"{tuple(named[key].shape)}, got {getattr(mask, 'shape', type(mask))}")
                if key in names:
                    self.masks[key] = mask.to(named[key].device)
        self.batches = [(x, y) for x, y in batches]
        if not self.batches:
            raise ValueError("batches: no batch to take the loss on")
        self.num_samples = sum(len(y) for _, y in self.batches)
        # Coordinates per parameter, counted once: flatten/unflatten run on every Lanczos step.
        self._counts = [int(self.masks[n].sum()) if n in self.masks else p.numel()
                        for n, p in zip(self.names, self.params)]
        self.dim = sum(self._counts)
        self._fd_base: list[tuple[list[Tensor], ActivationPatterns]] | None = None
        self.hvp_count = 0

    # ------------------------------------------------------------------ vectors
    def zeros(self) -> list[Tensor]:
        return [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

    def project_(self, v: list[Tensor]) -> list[Tensor]:
        """Zeroes the pruned positions of ``v`` in place (the projection P)."""
        for n, t in zip(self.names, v):
            if n in self.masks:
                t.mul_(self.masks[n])
        return v

    def flatten(self, v: list[Tensor]) -> Tensor:
        """The kept coordinates of ``v`` as one float64 vector of length ``dim``."""
        return torch.cat([(t[self.masks[n]] if n in self.masks else t.reshape(-1)).double()
                          for n, t in zip(self.names, v)])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        out, at = [], 0
        for n, p, count in zip(self.names, self.params, self._counts):
            t = torch.zeros_like(p, dtype=torch.float64)
            if n in self.masks:
                t[self.masks[n]] = flat[at:at + count]
            else:
                t.view(-1).copy_(flat[at:at + count])
            out.append(t)
            at += count
        return out

    def rademacher(self, generator: torch.Generator) -> list[Tensor]:
        """A ±1 vector on the kept coordinates (drawn on the CPU, so the draw does not depend on the device)."""
        flat = torch.randint(0, 2, (self.dim,), generator=generator, dtype=torch.float64).mul_(2).sub_(1)
        return [t.to(p.device) for t, p in zip(self.unflatten(flat), self.params)]

    # ------------------------------------------------------------------ loss, gradient, products
    def _forward(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """The model on ``x`` (with ``params`` in place of its own), on copies of its buffers: BatchNorm's running
        statistics are never updated, so every product sees the same model."""
        from torch.func import functional_call

        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return functional_call(self.model, {**(params or {}), **buffers}, (x,), strict=False)

    def _batch_loss(self, x: Tensor, y: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        loss = self.loss_fn(self._forward(x, params), y)
        if not torch.isfinite(loss).all():
            raise ValueError(f"the loss on a batch is not finite ({loss.item()}); the curvature is undefined there")
        return loss

    def loss(self) -> float:
        with torch.no_grad():
            return sum(float(self._batch_loss(x, y)) * len(y) for x, y in self.batches) / self.num_samples

    def gradient(self) -> list[Tensor]:
        total = self.zeros()
        for x, y in self.batches:
            grads = torch.autograd.grad(self._batch_loss(x, y), self.params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g.double(), alpha=len(y) / self.num_samples)
        return self.project_(total)

    def hvp(self, v: list[Tensor]) -> list[Tensor]:
        """``P H P v`` in float64 (``v`` is a list of tensors shaped like the parameters)."""
        v = self.project_([t.to(device=p.device, dtype=torch.float64).clone() for t, p in zip(v, self.params)])
        self.hvp_count += 1
        if self.engine == "exact":
            return self.project_(self._hvp_exact(v))
        return self.project_(self._hvp_finite_difference(v))

    def _hvp_exact(self, v: list[Tensor]) -> list[Tensor]:
        total = self.zeros()
        for x, y in self.batches:
            grads = torch.autograd.grad(self._batch_loss(x, y), self.params, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(grads, v) if g is not None and g.requires_grad]
            if not pairs:
                continue
            dot = sum((g * t.to(g.dtype)).sum() for g, t in pairs)
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            for acc, h in zip(total, hv):
                if h is not None:
                    acc.add_(h.double(), alpha=len(y) / self.num_samples)
        return total

    def _fd_gradients(self) -> list[tuple[list[Tensor], ActivationPatterns]]:
        """Each batch's gradient at θ with its recorded activation pattern (computed once, reused)."""
        if self._fd_base is None:
            base = []
            for x, y in self.batches:
                with ActivationPatterns() as pattern:
                    grads = torch.autograd.grad(self._batch_loss(x, y), self.params, allow_unused=True)
                base.append(([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, self.params)],
                             pattern))
            self._fd_base = base
        return self._fd_base

    def _hvp_finite_difference(self, v: list[Tensor]) -> list[Tensor]:
        base = self._fd_gradients()
        eps = self.fd_epsilon
        if eps is None:
            theta_norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in self.params))
            v_norm = math.sqrt(sum(float(t.square().sum()) for t in v))
            eps = FD_RELATIVE_STEP.get(self.params[0].dtype, 1e-3) * (1.0 + theta_norm) / max(v_norm, 1e-30)
        moved = {n: (p.detach() + eps * t.to(p.dtype)).requires_grad_() for n, p, t in zip(self.names, self.params, v)}
        inputs = [moved[n] for n in self.names]
        total = self.zeros()
        for (x, y), (g0, pattern) in zip(self.batches, base):
            with pattern.replaying():
                loss = self._batch_loss(x, y, moved)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
            for acc, g, g_base in zip(total, grads, g0):
                if g is not None:
                    acc.add_((g.double() - g_base.double()) / eps, alpha=len(y) / self.num_samples)
        return total

    # ------------------------------------------------------------------ spectra
    def exact_hessian(self, max_params: int = EXACT_MAX_PARAMS) -> Tensor:
        """The ``dim x dim`` Hessian over the kept coordinates, column by column (``dim`` products)."""
        if self.dim > max_params:
            raise ValueError(f"an exact Hessian of {self.dim} parameters needs {self.dim}^2 float64 values "
                             f"(more than max_params={max_params}); use the SLQ density (spectral_density) or "
                             "top_eigenvalues instead")
        columns = []
        for i in range(self.dim):
            e = torch.zeros(self.dim, dtype=torch.float64)
            e[i] = 1.0
            columns.append(self.flatten(self.hvp([t.to(p.device) for t, p in zip(self.unflatten(e), self.params)])))
        h = torch.stack(columns, dim=1).cpu()
        return 0.5 * (h + h.T)  # symmetric up to round-off; eigh reads one triangle

    def exact_eigenvalues(self, max_params: int = EXACT_MAX_PARAMS) -> Tensor:
        """Every eigenvalue, ascending (``torch.linalg.eigvalsh`` of :meth:`exact_hessian`)."""
        return torch.linalg.eigvalsh(self.exact_hessian(max_params))

    def _matvec(self, flat: Tensor) -> Tensor:
        v = [t.to(p.device) for t, p in zip(self.unflatten(flat), self.params)]
        return self.flatten(self.hvp(v)).cpu()

    def top_eigenvalues(self, k: int = 1, *, steps: int | None = None, seed: int = 0) -> Tensor:
        """The ``k`` largest eigenvalues, descending: Ritz values of ``steps`` Lanczos steps from a Rademacher
        start (default ``max(2k + 20, 40)``, at most ``dim``)."""
        k = _check_int(k, "k", 1)
        if k > self.dim:
            raise ValueError(f"k={k} is larger than the number of parameters the Hessian is over ({self.dim})")
        steps = min(self.dim, max(2 * k + 20, 40) if steps is None else _check_int(steps, "steps", k))
        start = self.flatten(self.rademacher(torch.Generator().manual_seed(seed))).cpu()
        alpha, beta, _ = lanczos(self._matvec, start, steps)
        ritz = torch.linalg.eigvalsh(tridiagonal(alpha, beta))
        if len(ritz) < k:
            raise ValueError(f"the Krylov space from this start has dimension {len(ritz)} < k={k}; "
                             "try another seed")
        return ritz.flip(0)[:k]

    def hutchinson_trace(self, probes: int = 100, *, seed: int = 0) -> tuple[float, float]:
        """Hutchinson's estimate of ``tr(P H P)`` from ``probes`` Rademacher vectors, and its standard error."""
        probes = _check_int(probes, "probes", 2)
        gen = torch.Generator().manual_seed(seed)
        samples = []
        for _ in range(probes):
            v = self.rademacher(gen)
            samples.append(sum(float((a * b).sum()) for a, b in zip(v, self.hvp(v))))
        s = torch.tensor(samples, dtype=torch.float64)
        return float(s.mean()), float(s.std(unbiased=True) / math.sqrt(probes))

    def spectral_density(self, probes: int = 8, steps: int = 100, *, seed: int = 0) -> SpectralDensity:
        """SLQ: per Rademacher probe, ``steps`` Lanczos steps; the Ritz values are the nodes and the squared first
        components of the Ritz vectors the weights (Gauss quadrature of ``q^T f(H) q``, exact for polynomials of
        degree < 2 steps). Averaged over probes, each probe's weights sum to ``1 / probes``."""
        probes = _check_int(probes, "probes", 1)
        steps = min(self.dim, _check_int(steps, "steps", 1))
        gen = torch.Generator().manual_seed(seed)
        nodes, weights = [], []
        for _ in range(probes):
            start = self.flatten(self.rademacher(gen)).cpu()
            alpha, beta, _ = lanczos(self._matvec, start, steps)
            theta, vectors = torch.linalg.eigh(tridiagonal(alpha, beta))
            nodes.append(theta)
            weights.append(vectors[0].square() / probes)
        return SpectralDensity(torch.cat(nodes), torch.cat(weights), probes=probes, steps=steps, dim=self.dim)


@dataclass
class SpectralDensity:
    """A discrete spectral measure: eigenvalue ``nodes`` with ``weights`` summing to 1 (SLQ)."""

    nodes: Tensor
    weights: Tensor
    probes: int
    steps: int
    dim: int

    def moment(self, k: int) -> float:
        """``∫ λ^k dp``, which estimates ``tr(H^k) / dim``."""
        return float((self.weights * self.nodes.pow(k)).sum())

    def smoothed(self, grid: Tensor, sigma: float) -> Tensor:
        """The density on ``grid`` with a Gaussian of width ``sigma`` around each node (for plots)."""
        kernel = torch.exp(-0.5 * ((grid[:, None] - self.nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return kernel @ self.weights

    def to_dict(self) -> dict:
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(), "probes": self.probes,
                "steps": self.steps, "dim": self.dim}


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta``."""
    t = torch.diag(alpha)
    if len(beta):
        t += torch.diag(beta, 1) + torch.diag(beta, -1)
    return t


def lanczos(matvec: Callable[[Tensor], Tensor], start: Tensor, steps: int, *, breakdown: float = 1e-10
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos with full reorthogonalisation (twice, classical Gram-Schmidt) on a symmetric operator.

    ``matvec`` maps a float64 vector to a float64 vector; ``start`` is normalised first. Returns the diagonal
    ``alpha``, the off-diagonal ``beta`` of the tridiagonal matrix and the basis ``Q`` (``[m, n]``), with
    ``m <= steps``: it stops early where the Krylov space is exhausted (``beta < breakdown · |alpha|_max``).
    The basis costs ``steps x n`` float64 values of memory.
    """
    steps = _check_int(steps, "steps", 1)
    q = start.double() / start.double().norm()
    basis = torch.empty(steps, q.numel(), dtype=torch.float64)
    alpha, beta = [], []
    for j in range(steps):
        basis[j] = q
        w = matvec(q).double()
        a = float(w @ q)
        alpha.append(a)
        active = basis[: j + 1]
        for _ in range(2):  # full reorthogonalisation against every basis vector so far
            w -= active.T @ (active @ w)
        b = float(w.norm())
        if j == steps - 1:
            break
        scale = max(abs(x) for x in alpha) or 1.0
        if b <= breakdown * scale:
            break
        beta.append(b)
        q = w / b
    m = len(alpha)
    return (torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta[: m - 1], dtype=torch.float64),
            basis[:m])
