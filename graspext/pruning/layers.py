"""Which parameters are pruned: Conv2d and Linear weights by default, narrowed by include/exclude rules."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

FilterFn = Callable[[nn.Module, str], bool]


def _patterns(value, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a module-name pattern or a list of them (fnmatch style), got {value!r}")


def prunable_modules(
    model: nn.Module,
    *,
    filter_fn: FilterFn | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is pruned, keyed by module name, in ``model.modules()`` order.

    ``filter_fn(module, name)`` (as in torchao's ``sparsify_``) replaces the default type test;
    ``exclude`` drops modules whose name matches any fnmatch pattern (a pattern that matches no module is an
    error: it is a typo more often than not); ``keep_first_dense`` / ``keep_last_dense`` drop the first / last
    candidate (e.g. the input conv and the classifier), also when it is the only one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, name), got {filter_fn!r}")
    excluded = _patterns(exclude, "exclude")
    all_names = [name for name, _ in model.named_modules()]
    unmatched = [p for p in excluded if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
    if unmatched:
        shown = ", ".join(repr(n) for n in all_names[1:13]) + (", ..." if len(all_names) > 13 else "")
        raise ValueError(f"exclude pattern(s) {unmatched} match no module of the model (fnmatch on module names "
                         f"such as {shown})")
    chosen: dict[str, nn.Module] = {}
    owner: dict[int, str] = {}  # id(weight) -> the first module using it
    for name, module in model.named_modules():
        wanted = filter_fn(module, name) if filter_fn is not None else isinstance(module, PRUNABLE_TYPES)
        if not wanted or any(fnmatch.fnmatchcase(name, p) for p in excluded):
            continue
        weight = getattr(module, "weight", None)
        if _is_reparametrized(module):
            raise ValueError(f"model: layer {name!r} computes its weight (torch.nn.utils.prune's weight_orig and "
                             "weight_mask, or a parametrization); remove that first "
                             "(torch.nn.utils.prune.remove(module, 'weight') or "
                             "torch.nn.utils.parametrize.remove_parametrizations), or leave the layer out with "
                             "exclude=")
        if not isinstance(weight, nn.Parameter):
            continue
        # One tensor, one mask: a weight shared by several modules (tied layers) is pruned under the name of
        # the first, which is also the name model.named_parameters() gives it.
        if id(weight) in owner:
            continue
        owner[id(weight)] = name
        chosen[name] = module
    names = list(chosen)
    if names and (keep_first_dense or keep_last_dense) and len(names) <= keep_first_dense + keep_last_dense:
        kept = " and ".join(k for k, v in (("keep_first_dense", keep_first_dense), ("keep_last_dense", keep_last_dense))
                            if v)
        raise ValueError(f"{kept} leave no layer to prune: the model has {len(names)} prunable layer(s) "
                         f"({', '.join(names) or 'the model itself'})")
    if keep_first_dense and names:
        chosen.pop(names[0])
    if keep_last_dense and names:
        chosen.pop(names[-1])
    if not chosen:
        raise ValueError(
            "model: no prunable layer found (looked for Conv2d and Linear weights"
            + (" after filter_fn/exclude" if filter_fn or excluded else "") + ")"
        )
    return chosen


def _is_reparametrized(module: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return hasattr(module, "weight_orig") or parametrize.is_parametrized(module, "weight")


def weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"
