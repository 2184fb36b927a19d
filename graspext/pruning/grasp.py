"""GraSP: Gradient Signal Preservation (Wang, Zhang & Grosse, ICLR 2020).

Score S(theta) = -theta ⊙ (H g), with g the gradient of the loss and H its Hessian, both over the pruned
weights (paper eq. 8; official ``pruner/GraSP.py``). Removing weight q changes the gradient norm by about
S_q; GraSP removes the **largest** scores, keeping the weights whose removal least reduces gradient flow.

As the official code: a deep copy with BatchNorm in train mode; optionally every Linear weight of the copy
re-initialized Xavier-normal; class-balanced data, ``samples_per_class`` per class per iteration, each
iteration's set split into ``num_chunks`` (the official halves; with train-mode BatchNorm the split
changes the result); logits divided by ``temperature``. Pass 1: g = sum over chunks of grad L_chunk. Pass 2:
Hg = sum over chunks of H_chunk g.

Hg engines: ``exact`` double backward (the official computation, the default); ``forward_over_reverse``
(forward-mode AD through the backward pass: exact in exact arithmetic, no retained double-backward graph);
``finite_difference`` Hg ≈ (sum_c grad L_c(theta + eps g) - g) / eps, reusing pass 1's g (one extra gradient
per chunk). The perturbed pass replays the ReLU on/off pattern and max-pool argmax recorded in pass 1
(``fd_freeze_activations``, default on): autograd's Hg is the derivative inside the current activation region,
and a difference quotient that crosses kinks is not (see ``activation_patterns.py``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graspext import ops
from graspext.pruning import data as D
from graspext.pruning.activation_patterns import ActivationPatterns
from graspext.pruning.base import (Method, ScoringContext, check_bool, check_int, check_positive,
                                   disable_running_stats_, masked_weights, register, reinit_xavier, replace_weight,
                                   seeded_generator, working_copy, zeros_like_scores)

ENGINES = ("exact", "forward_over_reverse", "finite_difference")
DEFAULT_SAMPLES_PER_CLASS = 25  # official default; the CIFAR-10 configs use 10
FROZEN_RELATIVE_STEP = 1e-5       # finite_difference step with frozen activations (see benchmarks/RESULTS.md)


@dataclass
class GraspOptions:
    temperature: float = 200.0
    num_chunks: int = 2
    reinit_linear: bool = True
    samples_per_class: int | None = None
    iterations: int = 1
    engine: str = "exact"
    num_classes: int | None = None
    fd_epsilon: float | None = None
    fd_freeze_activations: bool = True
    seed: int | None = None
    cuda_graphs: bool = False

    def __post_init__(self):
        check_positive(self.temperature, "temperature")
        check_int(self.num_chunks, "num_chunks", 1)
        check_bool(self.reinit_linear, "reinit_linear")
        check_int(self.samples_per_class, "samples_per_class", 1, allow_none=True)
        check_int(self.iterations, "iterations", 1)
        check_int(self.num_classes, "num_classes", 2, allow_none=True)
        check_positive(self.fd_epsilon, "fd_epsilon", allow_none=True)
        check_bool(self.fd_freeze_activations, "fd_freeze_activations")
        check_int(self.seed, "seed", 0, allow_none=True)
        check_bool(self.cuda_graphs, "cuda_graphs")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.cuda_graphs and self.engine != "exact":
            raise ValueError(f"cuda_graphs applies to engine='exact' (its double backward), not {self.engine!r}")


class _InnerWithConstant(torch.autograd.Function):
    """<c, x> for a constant c, saving only c (a mul or dot node would also keep x, an N-sized gradient, alive
    until the double backward). Its backward, 1 * c, is bitwise what the official (c * x).sum() gives."""

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor) -> Tensor:
        ctx.save_for_backward(c)
        return torch.dot(c.reshape(-1), x.reshape(-1))

    @staticmethod
    def backward(ctx, dz: Tensor):
        (c,) = ctx.saved_tensors
        return dz * c, None


def _loss(model: nn.Module, x: Tensor, y: Tensor, temperature: float) -> Tensor:
    out = model(x)
    D.check_logits(out, y)
    return F.cross_entropy(out / temperature, y)


def _gradient_dot_g(loss: Tensor, weights: list[Tensor], g: list[Tensor]) -> Tensor:
    """z = <grad loss, g> with the graph kept, whose gradient in the weights is H g (the official z)."""
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    z = 0
    for gi, gfi in zip(g, grads):
        z += _InnerWithConstant.apply(gfi, gi)
    return z  # nothing in z's graph holds the gradients: they are freed on return


def _accumulate_hg(work: nn.Module, weights: list[Tensor], g: list[Tensor], x: Tensor, y: Tensor,
                   temperature: float) -> None:
    """Adds H_chunk g into each weight's .grad: the official z = <grad L_chunk, g>, then z.backward()."""
    _gradient_dot_g(_loss(work, x, y, temperature), weights, g).backward(inputs=weights)


class _CapturedHessianProduct:
    """:func:`_accumulate_hg` for chunks of one shape, captured once as a CUDA graph and replayed per chunk: the
    double backward through train-mode BatchNorm is thousands of small kernels, launched from the host one by one
    otherwise. The replay runs the same kernels in the same order, so the scores are those of the eager loop.

    The first chunk runs eagerly on a side stream (cuDNN plans, autograd's buffers and each .grad exist before
    capture); the graph then adds H_chunk g into those .grad tensors in place, as the eager accumulation does.
    The graph checks no targets (a check reads them on the host): pass 1 has checked every chunk's.
    """

    def __init__(self, work: nn.Module, weights: list[Tensor], g: list[Tensor], first: tuple[Tensor, Tensor],
                 temperature: float):
        self.x, self.y = first[0].clone(), first[1].clone()  # the graph's inputs: each chunk is copied in
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _accumulate_hg(work, weights, g, self.x, self.y, temperature)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            z = _gradient_dot_g(F.cross_entropy(work(self.x) / temperature, self.y), weights, g)
            # Explicit in-place sums into the .grad tensors that exist now (autograd's own accumulation may
            # replace .grad by a new tensor, which a replay would then overwrite instead of adding to).
            for w, hg in zip(weights, torch.autograd.grad(z, weights)):
                w.grad.add_(hg)

    def fits(self, x: Tensor, y: Tensor) -> bool:
        return x.shape == self.x.shape and y.shape == self.y.shape and x.dtype == self.x.dtype

    def __call__(self, x: Tensor, y: Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()


@register
class GraSP(Method):
    name = "grasp"
    remove_largest = True
    Options = GraspOptions

    def _scoring_sets(self, ctx: ScoringContext, work: nn.Module) -> list[tuple[Tensor, Tensor]]:
        o = self.options
        if D.is_pair(ctx.data):
            if o.iterations != 1 or o.samples_per_class is not None:
                raise ValueError("data: an (inputs, targets) pair is used exactly as given; iterations and "
                                 "samples_per_class apply to a DataLoader only")
            return [tuple(ctx.data)]
        num_classes = o.num_classes or D.infer_num_classes(work, ctx.data)
        spc = o.samples_per_class or DEFAULT_SAMPLES_PER_CLASS
        return [D.class_balanced_batch(ctx.data, num_classes, spc) for _ in range(o.iterations)]

    def score(self, ctx: ScoringContext) -> list[Tensor]:
        o = self.options
        work, weights = working_copy(ctx)
        device, dtype = weights[0].device, weights[0].dtype
        if o.cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, got {device}")
        if o.reinit_linear:  # official: every nn.Linear of the copy, in module order
            reinit_xavier(work, [n for n, m in work.named_modules() if isinstance(m, nn.Linear)],
                          seeded_generator(o.seed))
        weights = masked_weights(work, ctx)
        work.train()
        if o.engine != "exact":
            disable_running_stats_(work)

        chunks = []
        for x, y in self._scoring_sets(ctx, work):
            chunks += D.split_chunks(*D.to_model(x, y, device, dtype), o.num_chunks)
        # Data-parallel: whole chunks per rank (train-mode BatchNorm sees each chunk as one process would), and
        # every sum over chunks below is all-reduced.
        chunks = ctx.my_share(chunks)

        # Pass 1: g = sum over chunks of grad L_chunk (recording each chunk's activation pattern for FD).
        freeze = o.engine == "finite_difference" and o.fd_freeze_activations
        patterns = [ActivationPatterns() if freeze else contextlib.nullcontext() for _ in chunks]
        for w in weights:
            w.grad = None
        for (cx, cy), recorder in zip(chunks, patterns):
            with recorder:
                loss = _loss(work, cx, cy, o.temperature)
            # Accumulating in .grad adds chunk by chunk and layer by layer, as the official grad_w += ...
            loss.backward(inputs=weights)
        if chunks:  # (a rank without a share has no gradient of its own to check)
            D.check_used(ctx.names, [w.grad for w in weights])
        g = ctx.sum_over_ranks_([w.grad for w in weights], weights)
        for w in weights:
            w.grad = None
        if o.engine == "exact":
            return self._exact(ctx, work, weights, chunks, g)
        if o.engine == "forward_over_reverse":
            return self._forward_over_reverse(ctx, work, weights, chunks, g)
        return self._finite_difference(ctx, work, list(ctx.modules), weights, chunks, g, patterns if freeze else None)

    def _exact(self, ctx, work, weights, chunks, g) -> list[Tensor]:
        temperature = self.options.temperature
        captured = None
        for c, (cx, cy) in enumerate(chunks):
            if self.options.cuda_graphs and c == 0:
                captured = _CapturedHessianProduct(work, weights, g, (cx, cy), temperature)  # runs chunk 0
            elif captured is not None and captured.fits(cx, cy):
                captured(cx, cy)
            else:
                _accumulate_hg(work, weights, g, cx, cy, temperature)  # H_chunk g into .grad, in chunk order
        del captured, g
        hg = ctx.sum_over_ranks_([w.grad for w in weights], weights)
        for w in weights:
            w.grad = None
        # S = -theta ⊙ Hg, written over Hg's storage: (-theta) * Hg == -(theta * Hg) exactly in IEEE.
        return [s.mul_(w.detach()).neg_() for s, w in zip(hg, weights)]

    def _forward_over_reverse(self, ctx, work, weights, chunks, g) -> list[Tensor]:
        # Forward-mode AD over the ordinary backward: the weights enter as dual numbers (theta, g), so every
        # activation carries its directional derivative along g and the gradient comes back as a dual whose
        # tangent is H_chunk g. No double-backward graph is kept.
        import torch.autograd.forward_ad as fwAD
        from torch.func import functional_call

        names = [n for n, p in work.named_parameters() if p.requires_grad]
        theta = [w.detach() for w in weights]
        scores = zeros_like_scores(weights)
        for cx, cy in chunks:
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(w, gi) for n, w, gi in zip(names, weights, g)}
                out = functional_call(work, duals, (cx,), strict=False)
                grads = torch.autograd.grad(F.cross_entropy(out / self.options.temperature, cy), weights)
                hg = [fwAD.unpack_dual(t).tangent for t in grads]
                del out, duals, grads
                ops.score_accumulate_(scores, theta, hg, 1.0, "neg_product")
                del hg
        return ctx.sum_over_ranks_(scores, weights)  # linear in Hg: the ranks' partial scores add up

    @torch.no_grad()
    def _finite_difference(self, ctx, work, module_names, weights, chunks, g, patterns) -> list[Tensor]:
        theta = [w.detach() for w in weights]  # the perturbed weights replace these, so theta stays intact
        eps = self.options.fd_epsilon
        if eps is None:
            # Relative step |eps g| / (1 + |theta|). With frozen activations the quotient is smooth, so the
            # step can stay well above float32 round-off; without, only a step below the nearest kink works,
            # which float64 alone can resolve.
            rel = FROZEN_RELATIVE_STEP if patterns is not None else math.sqrt(torch.finfo(theta[0].dtype).eps)
            # Both squared norms summed on the device, then one copy to the host (not one per tensor).
            sq = torch.stack([sum(t.double().square().sum() for t in ts) for ts in (theta, g)]).tolist()
            theta_norm, g_norm = math.sqrt(sq[0]), math.sqrt(sq[1])
            eps = rel * (1.0 + theta_norm) / max(g_norm, 1e-30)
        perturbed = [replace_weight(work, n, t + eps * gi) for n, t, gi in zip(module_names, theta, g)]
        # g's own storage becomes the accumulator: .grad starts at -g and autograd adds each chunk's gradient
        # in place (it does so only while .grad is the sole reference, hence the clear()).
        lead = ctx.distributed.is_main  # -g enters the all-reduced sum once
        for p, gi in zip(perturbed, g):
            p.grad = gi.neg_() if lead else torch.zeros_like(gi)
        g.clear()
        for c, (cx, cy) in enumerate(chunks):
            with torch.enable_grad(), (patterns[c].replaying() if patterns else contextlib.nullcontext()):
                _loss(work, cx, cy, self.options.temperature).backward(inputs=perturbed)
        # sum over chunks of grad L_chunk(theta + eps g), minus g
        diff = ctx.sum_over_ranks_([p.grad for p in perturbed], theta)
        for p, n, t in zip(perturbed, module_names, theta):
            p.grad = None
            replace_weight(work, n, t)  # frees the perturbed copy
        del perturbed
        scores = zeros_like_scores(weights)
        ops.score_accumulate_(scores, theta, diff, 1.0 / eps, "neg_product")  # S = -theta ⊙ diff / eps
        return scores
