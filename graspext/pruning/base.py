"""What every scoring method shares: options parsing, the working copy, the registry.

A method only implements ``score()`` (as in Synaptic-Flow's pruners); masking, scope and rounds are shared
(``graspext.pruning.prune``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from graspext._validation import boolean, integer, positive
from graspext.distributed.runtime import Distributed
from graspext.pruning.layers import weight_name


@dataclass
class ScoringContext:
    model: nn.Module                   # the caller's model: never modified
    modules: dict[str, nn.Module]      # prunable modules by module name, in model order
    data: Any                          # DataLoader, (inputs, targets) pair, or None
    masks: dict[str, Tensor] | None    # current keep-masks by parameter name (later rounds), else None
    # Data-parallel scoring: each rank takes its share of the scoring data and the sums over it (g, Hg) are
    # all-reduced; a single process (the default) takes everything.
    distributed: Distributed = dataclasses.field(default_factory=Distributed.single_process)

    def my_share(self, items: list) -> list:
        """This rank's items of ``items`` (round-robin), so the ranks' shares add up to the whole."""
        return items[self.distributed.rank::self.distributed.world_size]

    def sum_over_ranks_(self, tensors: list[Tensor | None], like: list[Tensor]) -> list[Tensor | None]:
        """Each tensor summed over the ranks in place (a rank without a share contributes zeros)."""
        if not self.distributed.active:
            return tensors
        out = [t if t is not None else torch.zeros_like(w) for t, w in zip(tensors, like)]
        for t in out:
            self.distributed.all_reduce_sum_(t)
        return out

    @property
    def names(self) -> list[str]:
        return [weight_name(n) for n in self.modules]


class Method:
    name: ClassVar[str]
    remove_largest: ClassVar[bool] = False   # GraSP removes its largest scores; the others their smallest
    needs_data: ClassVar[bool] = True
    default_rounds: ClassVar[int] = 1
    Options: ClassVar[type]

    def __init__(self, **options: Any):
        valid = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {self.name!r}; "
                            f"its options are: {', '.join(valid) or 'none'}")
        self.options = self.Options(**options)

    def score(self, ctx: ScoringContext) -> list[Tensor]:
        """One score tensor per prunable weight, in ``ctx.names`` order (same shapes)."""
        raise NotImplementedError


def check_int(value, name: str, minimum: int, allow_none: bool = False) -> None:
    if not (value is None and allow_none):
        integer(value, name, minimum)


def check_bool(value, name: str) -> None:
    boolean(value, name)


def check_positive(value, name: str, allow_none: bool = False) -> None:
    if not (value is None and allow_none):
        positive(value, name)


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed`` (None: the global RNG, as the official code). Seeded draws are
    made on the CPU and moved to the model's device, so one seed gives the same masks on any device."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def working_copy(ctx: ScoringContext, *, share_storage: bool = True) -> tuple[nn.Module, list[nn.Parameter]]:
    """A deep copy of the model and its prunable weights; only those weights require grad.

    With ``share_storage`` the copy's parameters are new ``Parameter`` objects over the caller's storage (no
    N-sized copy): their ``requires_grad`` and ``.grad`` are the copy's own, but their data must never be
    written in place; use :func:`replace_weight` to change a weight. Buffers are always copied (train-mode
    BatchNorm updates its running statistics).
    """
    memo = {}
    if share_storage:
        memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in ctx.model.parameters()}
    work = copy.deepcopy(ctx.model, memo)
    for p in work.parameters():
        p.requires_grad_(False)
    weights = [work.get_submodule(n).weight for n in ctx.modules]
    for w in weights:
        w.requires_grad_(True)
    return work, weights


def replace_weight(work: nn.Module, module_name: str, value: Tensor) -> nn.Parameter:
    """Gives ``work.<module_name>`` a new weight (leaving shared storage untouched); returns it."""
    param = nn.Parameter(value, requires_grad=True)
    work.get_submodule(module_name).weight = param
    return param


def reinit_xavier(work: nn.Module, module_names, generator) -> None:
    """Xavier-normal weights for these modules, drawn in order (the same draws as in-place init)."""
    for name in module_names:
        weight = work.get_submodule(name).weight
        fresh = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device if generator is None else "cpu")
        nn.init.xavier_normal_(fresh, generator=generator)
        replace_weight(work, name, fresh.to(weight.device))


def masked_weights(work: nn.Module, ctx: ScoringContext) -> list[nn.Parameter]:
    """The copy's prunable weights, with the current masks applied (by replacement) in later rounds."""
    if ctx.masks is not None:
        for module_name, name in zip(ctx.modules, ctx.names):
            w = work.get_submodule(module_name).weight
            replace_weight(work, module_name, w.detach() * ctx.masks[name].to(w.device))
    return [work.get_submodule(n).weight for n in ctx.modules]


def score_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def zeros_like_scores(weights: list[Tensor]) -> list[Tensor]:
    return [torch.zeros(w.shape, dtype=score_dtype(w), device=w.device) for w in weights]


def disable_running_stats_(model: nn.Module) -> None:
    """In train mode BatchNorm normalizes with batch statistics either way; not tracking running stats
    leaves outputs unchanged and keeps buffers out of functional transforms."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls
