"""Shared by the pruning tests: record the masks of every iterative round and check them round by round."""


import torch

import graspext.pruning as pruning_pkg
from graspext.pruning.selection import num_to_remove


def record_round_masks(monkeypatch) -> list[tuple[list[torch.Tensor], int]]:
    """Record every ``select_masks`` call ``prune`` makes: (copies of the masks it returned, num_remove).

    ``prune`` calls it once per round in global scope (all layers at once) and once per layer per round in
    layerwise scope (one layer each), always in layer order.
    """
    real = pruning_pkg.select_masks
    calls: list[tuple[list[torch.Tensor], int]] = []

    def recording(scores, num_remove, remove_largest):
        masks, kept = real(scores, num_remove, remove_largest)
        calls.append(([m.detach().clone() for m in masks], num_remove))
        return masks, kept

    monkeypatch.setattr(pruning_pkg, "select_masks", recording)
    return calls


def masks_by_round(calls, num_layers: int, rounds: int) -> list[list[torch.Tensor]]:
    """The recorded masks grouped into rounds: ``rounds`` lists of ``num_layers`` masks each."""
    flat = [m for masks, _ in calls for m in masks]
    assert len(flat) == num_layers * rounds, f"recorded {len(flat)} masks for {rounds} rounds of {num_layers} layers"
    return [flat[r * num_layers:(r + 1) * num_layers] for r in range(rounds)]


def revivals(old: list[torch.Tensor], new: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(layer index, count) for every layer where ``new`` keeps a weight that ``old`` had removed."""
    assert len(old) == len(new)
    out = []
    for i, (o, n) in enumerate(zip(old, new)):
        assert o.shape == n.shape and o.dtype == n.dtype == torch.bool, i
        revived = int((n & ~o).sum())
        if revived:
            out.append((i, revived))
    return out


def assert_rounds_nested(rounds: list[list[torch.Tensor]]) -> None:
    """Each round's kept set is a subset of the previous round's, layer by layer, element by element."""
    for r in range(1, len(rounds)):
        bad = revivals(rounds[r - 1], rounds[r])
        assert not bad, f"round {r + 1} revives weights removed by round {r}: (layer, count) {bad}"


def removed_per_round(sparsity: float, rounds: int, total: int) -> list[int]:
    """Exact removal count of each round of the exponential schedule: density^((k+1)/rounds) kept."""
    if rounds == 1:
        return [num_to_remove(total, sparsity)]
    return [num_to_remove(total, 1.0 - (1.0 - sparsity) ** ((k + 1) / rounds)) for k in range(rounds)]


def assert_round_counts(rounds: list[list[torch.Tensor]], sparsity: float) -> None:
    total = sum(m.numel() for m in rounds[0])
    removed = [total - sum(int(m.sum()) for m in masks) for masks in rounds]
    assert removed == removed_per_round(sparsity, len(rounds), total)
