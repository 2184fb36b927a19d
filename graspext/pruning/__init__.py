"""Pruning at initialization: ``prune`` (scores -> exact-count masks), ``scores``, and ``masks_from_scores``
(one scoring, masks at several sparsities).

Every method implements only ``score()`` (``graspext/pruning/<method>.py``); scope, rounds and mask making
are shared here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graspext.distributed.runtime import Distributed
from graspext.masks import Masks
from graspext.pruning import data as D
from graspext.pruning import grasp, magnitude, snip, synflow  # noqa: F401  (registers the methods)
from graspext.pruning.base import REGISTRY, Method, ScoringContext
from graspext.pruning.layers import FilterFn, prunable_modules
from graspext.pruning.selection import (LayerCollapseWarning, check_sparsity, erk_densities, layer_removals,
                                        num_to_remove, report_collapse, select_masks)

__all__ = ["prune", "scores", "masks_from_scores", "METHODS", "LayerCollapseWarning"]

METHODS = REGISTRY
SCOPES = ("global", "layerwise")
DISTRIBUTIONS = ("uniform", "erk")
SCHEDULES = ("exponential", "linear")
ON_COLLAPSE = ("warn", "raise", "ignore")


def _method_class(method: str) -> type[Method]:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    return METHODS[method.lower()]


def _make_method(method: str, options: dict[str, Any]) -> Method:
    return _method_class(method)(**options)


def _choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _check_selection(scope: str, distribution: str, on_collapse: str) -> None:
    _choice(scope, "scope", SCOPES)
    _choice(distribution, "distribution", DISTRIBUTIONS)
    _choice(on_collapse, "on_collapse", ON_COLLAPSE)
    if scope == "global" and distribution != "uniform":
        raise ValueError("distribution applies to scope='layerwise' only; global scope ranks all layers together")


def _scoring_model(model: nn.Module) -> nn.Module:
    """The model the methods score: itself, or a float32 copy where it has float16/bfloat16 parameters.

    Scores are products of weights and gradients (GraSP's are about 1e-9 at init): in float16 they underflow
    to zero, the masks then follow the tie-break order alone and can remove whole layers. The copy holds the
    same values, so the masks are those of the model as it is, scored in float32.
    """
    if isinstance(model, nn.Module) and any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        return copy.deepcopy(model).float()
    return model


def _distributed(distributed) -> Distributed:
    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    d = Distributed(enabled=distributed is not False)
    if distributed is True and not d.active:
        raise ValueError("distributed=True needs a torch.distributed process group of more than one process "
                         "(launch with torchrun, or graspext ... --nproc N)")
    return d


def _context(model, data, masks, filter_fn, exclude, keep_first_dense, keep_last_dense, method,
             distributed=None) -> ScoringContext:
    if isinstance(model, nn.Module) and any(p.is_meta for p in model.parameters()):
        raise ValueError("model: its parameters are on the meta device (shapes without values); materialize it "
                         "first, e.g. model.to_empty(device='cpu') and then initialize its weights")
    model = _scoring_model(model)
    modules = prunable_modules(model, filter_fn=filter_fn, exclude=exclude, keep_first_dense=keep_first_dense,
                               keep_last_dense=keep_last_dense)
    D.check_data(data, required=method.needs_data)
    return ScoringContext(model=model, modules=modules, data=data, masks=masks, distributed=_distributed(distributed))


def _round_sparsity(sparsity: float, round_index: int, rounds: int, schedule: str) -> float:
    # Official Synaptic-Flow prune_loop: density^((k+1)/rounds) (exponential) or linear in the density.
    density = 1.0 - sparsity
    frac = (round_index + 1) / rounds
    return 1.0 - (density ** frac if schedule == "exponential" else 1.0 - sparsity * frac)


def _check_scores(method: Method, names: list[str], params: list[Tensor], scores: list[Tensor]) -> None:
    if len(scores) != len(params):
        raise RuntimeError(f"method {method.name!r} returned {len(scores)} score tensors for {len(params)} layers")
    for n, p, s in zip(names, params, scores):
        if s.shape != p.shape:
            raise RuntimeError(f"method {method.name!r} returned scores of shape {tuple(s.shape)} for {n} "
                               f"of shape {tuple(p.shape)}")


def scores(
    model: nn.Module,
    method: str,
    data=None,
    *,
    masks: Masks | None = None,
    filter_fn: FilterFn | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    distributed: bool | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Scores of one scoring round, by parameter name, for users who make their own masks.

    Sign convention per method: GraSP removes the largest scores, every other method the smallest.
    ``masks`` (optional) are applied to a copy of the model first. The model is never modified.
    ``distributed`` as for :func:`prune`.
    """
    m = _make_method(method, options)
    if masks is not None:
        masks.check_fits(model)
    ctx = _context(model, data, dict(masks) if masks is not None else None, filter_fn, exclude,
                   keep_first_dense, keep_last_dense, m, distributed)
    out = m.score(ctx)
    _check_scores(m, ctx.names, [mod.weight for mod in ctx.modules.values()], out)
    return dict(zip(ctx.names, (s.detach() for s in out)))


def prune(
    model: nn.Module,
    method: str,
    sparsity: float,
    data=None,
    *,
    scope: str = "global",
    distribution: str = "uniform",
    rounds: int | None = None,
    schedule: str = "exponential",
    filter_fn: FilterFn | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    on_collapse: str = "warn",
    distributed: bool | None = None,
    **options: Any,
) -> Masks:
    """Prune ``model`` at initialization; returns :class:`graspext.Masks` (True = kept). ``model`` is not modified.

    Args:
        method: ``"grasp"``, ``"snip"``, ``"synflow"``, ``"magnitude"`` or ``"random"``.
        sparsity: fraction of the prunable weights removed, in [0, 1); exactly ``floor(N * sparsity)`` go.
        data: a DataLoader or an ``(inputs, targets)`` pair used exactly as given (GraSP and SNIP need it;
            SynFlow reads only the input shape from it).
        scope: ``"global"`` ranks all layers together; ``"layerwise"`` prunes each layer to the density
            ``distribution`` gives it (``"uniform"`` or ``"erk"``), still removing exactly the total count.
        rounds, schedule: iterative pruning (SynFlow defaults to 100 exponential rounds, others to 1).
        filter_fn, exclude, keep_first_dense, keep_last_dense: which Conv2d/Linear weights are pruned.
        on_collapse: a layer left with no weight ``"warn"`` s (default), ``"raise"`` s, or is ``"ignore"`` d.
        distributed: inside a torch.distributed group of N > 1 processes (``None``, the default, or ``True``),
            GraSP and SNIP score data-parallel: every rank builds the same scoring set from its ``data``, takes
            its share (GraSP: whole chunks, round-robin; SNIP: a slice of the batch) and the gradient sums (g,
            Hg) are all-reduced. SynFlow, magnitude and random need no data and compute the same on every rank.
            The masks are then checked identical on every rank (an error otherwise). ``False`` scores
            everything on each rank alone.
        **options: the method's own options (e.g. GraSP's ``temperature``, ``num_chunks``, ``engine``).
    """
    sparsity = check_sparsity(sparsity)
    _check_selection(scope, distribution, on_collapse)
    _choice(schedule, "schedule", SCHEDULES)
    m = _make_method(method, options)
    if rounds is None:
        rounds = m.default_rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    ctx = _context(model, data, None, filter_fn, exclude, keep_first_dense, keep_last_dense, m, distributed)
    names = ctx.names
    params = [mod.weight for mod in ctx.modules.values()]
    sizes = [p.numel() for p in params]
    densities = (erk_densities([tuple(p.shape) for p in params], 1.0 - sparsity) if distribution == "erk"
                 else [1.0 - sparsity] * len(params))

    masks: list[Tensor] | None = None
    kept: list[int] = sizes
    for r in range(rounds):
        target = sparsity if rounds == 1 else _round_sparsity(sparsity, r, rounds, schedule)
        ctx.masks = dict(zip(names, masks)) if masks is not None else None
        round_scores = m.score(ctx)
        _check_scores(m, names, params, round_scores)
        if masks is not None:
            # Already-pruned weights rank first for removal, so a later round never revives one.
            for s, keep in zip(round_scores, masks):
                s.masked_fill_(~keep.to(s.device), torch.finfo(s.dtype).max * (1 if m.remove_largest else -1))
        masks, kept = _select(round_scores, target, sparsity, densities, kept, scope, m.remove_largest)
        del round_scores

    ctx.distributed.check_identical(dict(zip(names, masks)), f"{m.name} masks")
    collapsed = report_collapse(names, kept, on_collapse)
    meta = {"method": m.name, "sparsity": sparsity, "scope": scope, "distribution": distribution,
            "rounds": rounds, "schedule": schedule, "options": {k: _plain(v) for k, v in options.items()},
            "collapsed_layers": collapsed}
    return Masks({n: mk.to(p.device) for n, mk, p in zip(names, masks, params)}, meta)


def _select(round_scores: list[Tensor], target: float, sparsity: float, densities: list[float], kept: list[int],
            scope: str, remove_largest: bool) -> tuple[list[Tensor], list[int]]:
    """One round's masks at sparsity ``target`` (of the final ``sparsity``) and their kept counts; ``kept`` is what
    each layer keeps before the round, ``densities`` the final per-layer densities of a layerwise scope."""
    sizes = [s.numel() for s in round_scores]
    total = sum(sizes)
    if scope == "global":
        return select_masks(round_scores, num_to_remove(total, target), remove_largest)
    round_densities = [1.0 - (1.0 - d) * target / sparsity if sparsity else 1.0 for d in densities]
    already = [n - k for n, k in zip(sizes, kept)]  # a later round never revives a weight
    counts = layer_removals(sizes, round_densities, num_to_remove(total, target), minimum=already)
    masks, layer_kept = [], []
    for s, c in zip(round_scores, counts):
        mk, kc = select_masks([s], c, remove_largest)
        masks += mk
        layer_kept += kc
    return masks, layer_kept


def masks_from_scores(scores: Mapping[str, Tensor], method: str, sparsity: float, *, scope: str = "global",
                      distribution: str = "uniform", on_collapse: str = "warn") -> Masks:
    """The masks :func:`prune` makes in one round from these :func:`scores` (by parameter name, of ``method``,
    whose sign convention they follow): score once, then select at several sparsities. ``scope``,
    ``distribution`` and ``on_collapse`` as for :func:`prune`."""
    sparsity = check_sparsity(sparsity)
    _check_selection(scope, distribution, on_collapse)
    method_class = _method_class(method)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must map parameter names to score tensors (as gx.scores returns), got "
                        f"{type(scores).__name__}")
    if not scores:
        raise ValueError("scores is empty: give the scores of at least one layer, by parameter name")
    bad = [n for n, t in scores.items() if not isinstance(t, Tensor) or not t.is_floating_point()]
    if bad:
        raise TypeError(f"scores must map parameter names to floating-point tensors; not so for {bad}")
    names, values = list(scores), [t.detach() for t in scores.values()]
    sizes = [t.numel() for t in values]
    densities = (erk_densities([tuple(t.shape) for t in values], 1.0 - sparsity) if distribution == "erk"
                 else [1.0 - sparsity] * len(values))
    masks, kept = _select(values, sparsity, sparsity, densities, sizes, scope, method_class.remove_largest)
    collapsed = report_collapse(names, kept, on_collapse)
    meta = {"method": method_class.name, "sparsity": sparsity, "scope": scope, "distribution": distribution,
            "rounds": 1, "collapsed_layers": collapsed}
    return Masks({n: mk.to(t.device) for n, mk, t in zip(names, masks, values)}, meta)


def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None), tuple, list)) else repr(v)
