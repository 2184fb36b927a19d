"""Independent re-implementations of the official pruning loops, for tests and benchmarks.

They follow the published code step by step (``alecwangcq/GraSP`` ``pruner/GraSP.py``; the PyTorch SNIP
port; ``ganguli-lab/Synaptic-Flow`` ``prune_loop`` + ``SynFlow.score``), written plainly with dense
concatenations and ``torch.topk``/``torch.kthvalue``, so graspext's fused path can be checked against them.
Only the final selection differs where noted: ``exact_count=True`` removes exactly ``int(N * sparsity)``
weights (graspext's rule) instead of the official ``<=``/``>=`` threshold tests, which keep extra ties.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn


def _prunable(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _xavier_normal_(weight: Tensor, generator: torch.Generator | None) -> None:
    """As the official in-place Xavier init; with a generator, drawn on the generator's device and copied in
    (graspext draws seeded re-initializations on the CPU, whatever the model's device)."""
    if generator is None:
        nn.init.xavier_normal_(weight)
    else:
        with torch.no_grad():
            weight.copy_(nn.init.xavier_normal_(torch.empty(weight.shape, dtype=weight.dtype,
                                                            device=generator.device), generator=generator))


def grasp_official(net: nn.Module, sparsity: float, sets: list[tuple[Tensor, Tensor]], *, temperature: float = 200.0,
                   reinit: bool = True, reinit_generator: torch.Generator | None = None,
                   exact_count: bool = True) -> dict[str, Tensor]:
    """The official two-pass GraSP loop on pre-fetched class-balanced sets (one per iteration)."""
    eps = 1e-10
    net = copy.deepcopy(net)
    net.zero_grad()
    weights = []
    for _, layer in _prunable(net):
        if isinstance(layer, nn.Linear) and reinit:
            _xavier_normal_(layer.weight, reinit_generator)
        weights.append(layer.weight)
    for w in weights:
        w.requires_grad_(True)
    net.train()
    halves = []
    grad_w = None
    for inputs, targets in sets:
        n = inputs.shape[0]
        halves += [(inputs[:n // 2], targets[:n // 2]), (inputs[n // 2:], targets[n // 2:])]
        for x, y in halves[-2:]:
            loss = F.cross_entropy(net(x) / temperature, y)
            grad_w_p = autograd.grad(loss, weights)
            if grad_w is None:
                grad_w = list(grad_w_p)
            else:
                for i in range(len(grad_w)):
                    grad_w[i] += grad_w_p[i]
    for x, y in halves:
        loss = F.cross_entropy(net(x) / temperature, y)
        grad_f = autograd.grad(loss, weights, create_graph=True)
        z = 0
        for i in range(len(weights)):
            z += (grad_w[i].data * grad_f[i]).sum()
        z.backward()
    names = [f"{n}.weight" for n, _ in _prunable(net)]
    grads = {name: -w.data * w.grad for name, w in zip(names, weights)}
    all_scores = torch.cat([torch.flatten(s) for s in grads.values()])
    num_remove = int(len(all_scores) * sparsity)
    if exact_count:
        removed = torch.zeros(all_scores.numel(), dtype=torch.bool)
        # Largest removed; among equal scores the lowest flat index goes first (graspext's tie rule).
        order = torch.sort(-all_scores.cpu(), stable=True).indices[:num_remove]
        removed[order] = True
        out, start = {}, 0
        for name, s in grads.items():
            out[name] = ~removed[start:start + s.numel()].view_as(s).to(s.device)
            start += s.numel()
        return out
    norm_factor = torch.abs(torch.sum(all_scores)) + eps
    all_scores.div_(norm_factor)
    threshold, _ = torch.topk(all_scores, num_remove, sorted=True)
    acceptable = threshold[-1]
    return {name: (g / norm_factor) <= acceptable for name, g in grads.items()}


def snip_official(net: nn.Module, sparsity: float, x: Tensor, y: Tensor, *, reinit: bool = True,
                  reinit_generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """SNIP as the PyTorch port: |dL/dc| of a multiplicative mask c = 1 on a Xavier-re-initialized copy."""
    net = copy.deepcopy(net)
    net.train()
    layers = _prunable(net)
    masks_c = []
    for _, layer in layers:
        if reinit:
            _xavier_normal_(layer.weight, reinit_generator)
        layer.weight.requires_grad_(False)
        c = torch.ones_like(layer.weight, requires_grad=True)
        masks_c.append(c)
        weight = layer.weight
        if isinstance(layer, nn.Conv2d):
            layer.forward = (lambda inp, layer=layer, c=c, weight=weight:
                             layer._conv_forward(inp, weight * c, layer.bias))
        else:
            layer.forward = lambda inp, layer=layer, c=c, weight=weight: F.linear(inp, weight * c, layer.bias)
    loss = F.cross_entropy(net(x), y)
    grads = autograd.grad(loss, masks_c)
    scores = torch.cat([g.abs().flatten() for g in grads])
    return _keep_largest(scores, sparsity, [(f"{n}.weight", g.shape) for (n, _), g in zip(layers, grads)])


def synflow_official(net: nn.Module, sparsity: float, input_shape: tuple[int, ...], rounds: int = 100
                     ) -> dict[str, Tensor]:
    """Synaptic-Flow's prune_loop with SynFlow scores: eval mode, exponential schedule, global masking."""
    net = copy.deepcopy(net)
    net.eval()
    layers = _prunable(net)
    params = [m.weight for _, m in layers]
    masks = [torch.ones_like(p) for p in params]
    originals = [p.detach().clone() for p in params]
    for k in range(rounds):
        with torch.no_grad():
            signs = {n: torch.sign(t) for n, t in net.state_dict().items() if t.is_floating_point()}
            for t in net.state_dict().values():
                if t.is_floating_point():
                    t.abs_()
            for p, m in zip(params, masks):
                p.mul_(m)
        for p in params:
            p.requires_grad_(True)
        out = net(torch.ones((1, *input_shape), dtype=params[0].dtype))
        grads = autograd.grad(out.sum(), params)
        scores = [(g * p).detach().abs() for g, p in zip(grads, params)]
        with torch.no_grad():
            for n, t in net.state_dict().items():
                if n in signs:
                    t.mul_(signs[n])
            for p, o in zip(params, originals):
                p.copy_(o)
        density = (1.0 - sparsity) ** ((k + 1) / rounds)
        flat = torch.cat([s.flatten() for s in scores])
        # Pruned weights score 0; put them first so exact-count removal never revives one.
        flat[torch.cat([m.flatten() for m in masks]) == 0] = -1.0
        num_remove = int((1.0 - density) * flat.numel() + 1e-6)
        removed = torch.zeros(flat.numel(), dtype=torch.bool)
        removed[torch.sort(flat, stable=True).indices[:num_remove]] = True
        start = 0
        for i, m in enumerate(masks):
            masks[i] = (~removed[start:start + m.numel()]).view_as(m).to(m.dtype)
            start += m.numel()
    return {f"{n}.weight": m.bool() for (n, _), m in zip(layers, masks)}


def _keep_largest(scores: Tensor, sparsity: float, shapes) -> dict[str, Tensor]:
    num_remove = int(scores.numel() * sparsity)
    removed = torch.zeros(scores.numel(), dtype=torch.bool)
    removed[torch.sort(scores, stable=True).indices[:num_remove]] = True
    out, start = {}, 0
    for name, shape in shapes:
        n = int(torch.Size(shape).numel())
        out[name] = ~removed[start:start + n].view(shape)
        start += n
    return out
