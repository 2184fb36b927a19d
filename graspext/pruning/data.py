"""Scoring data: a DataLoader (any iterable of (inputs, targets) batches) or an (inputs, targets) pair."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], Tensor) and isinstance(data[1], Tensor))


def check_data(data, *, required: bool) -> None:
    if data is None:
        if required:
            raise ValueError("data: this method needs data: a DataLoader or an (inputs, targets) pair of tensors")
        return
    if is_pair(data):
        x, y = data
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"data: inputs must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"data: targets have {y.shape[0] if y.ndim else 0} entries but inputs have {x.shape[0]}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"data: targets must be integer class indices, got {y.dtype}")
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError("data must be a DataLoader (an iterable of (inputs, targets) batches) or an "
                        f"(inputs, targets) pair of tensors, got {type(data).__name__}")


def _batches(loader):
    for i, batch in enumerate(loader):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)
                and isinstance(batch[1], Tensor)):
            raise TypeError(f"data: batch {i} is not an (inputs, targets) pair of tensors")
        yield batch[0], batch[1]


def first_batch(data) -> tuple[Tensor, Tensor]:
    if is_pair(data):
        return data[0], data[1]
    for x, y in _batches(data):
        if x.shape[0] > 0:
            return x, y
    raise ValueError("data: the loader yielded no samples")


def class_balanced_batch(data, num_classes: int, samples_per_class: int) -> tuple[Tensor, Tensor]:
    """``samples_per_class`` samples of each class, grouped by class (as the official GraSP_fetch_data).

    Starts a fresh pass over the loader each call, as the official code does (a shuffling loader gives
    new samples each iteration). Raises if the loader runs out first.
    """
    picked_x: list[list[Tensor]] = [[] for _ in range(num_classes)]
    picked_y: list[list[Tensor]] = [[] for _ in range(num_classes)]
    full = 0
    seen = 0
    for x, y in _batches(data):
        for i in range(x.shape[0]):
            c = int(y[i])
            if not 0 <= c < num_classes:
                raise ValueError(f"data: target {c} is outside [0, {num_classes}) (num_classes={num_classes})")
            if len(picked_x[c]) < samples_per_class:
                picked_x[c].append(x[i:i + 1])
                picked_y[c].append(y[i:i + 1])
                full += len(picked_x[c]) == samples_per_class
        seen += x.shape[0]
        if full == num_classes:
            return torch.cat([t for ts in picked_x for t in ts]), torch.cat([t for ts in picked_y for t in ts]).view(-1)
    short = [f"class {c}: {len(v)}" for c, v in enumerate(picked_x) if len(v) < samples_per_class]
    raise ValueError(f"data: the loader ran out after {seen} samples before every class had samples_per_class="
                     f"{samples_per_class} samples ({', '.join(short[:5])}{', ...' if len(short) > 5 else ''})")


def infer_num_classes(model: nn.Module, data) -> int:
    """From ``data.dataset.classes`` when present, else the width of the model's output on one sample."""
    classes = getattr(getattr(data, "dataset", None), "classes", None)
    if classes is not None:
        return len(classes)
    x, _ = first_batch(data)
    device, dtype = model_device_dtype(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1].to(device=device, dtype=dtype if x.is_floating_point() else None))
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"model: expected logits of shape (batch, classes), got {tuple(out.shape)}; "
                         "pass num_classes= explicitly")
    return out.shape[1]


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("model: it has no parameters")


def to_model(x: Tensor, y: Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    return x, y.to(device=device, dtype=torch.long)


def check_used(names: list[str], grads: list[Tensor | None]) -> None:
    """Raises naming the first prunable weight the forward pass did not use (its gradient is None)."""
    for name, g in zip(names, grads):
        if g is None:
            raise ValueError(f"model: {name} is not used by the forward pass on this data, so it has no "
                             f"gradient to score; leave its layer out (exclude='{name.rpartition('.')[0]}')")


def check_logits(out, y: Tensor) -> None:
    """Raises, naming the problem, unless ``out`` is (batch, classes) logits and ``y`` holds class indices in
    [0, classes): otherwise cross-entropy fails deep inside torch, or on CUDA with a device-side assert."""
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a logits tensor (batch, classes), got a {type(out).__name__}; wrap it "
                        "in a module that returns the logits")
    if out.ndim != 2 or out.shape[0] != y.shape[0]:
        raise ValueError(f"model: expected logits of shape ({y.shape[0]}, classes) for {y.shape[0]} targets, got "
                         f"{tuple(out.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
        raise ValueError(f"data: targets must be class indices in [0, {out.shape[1]}) for the model's "
                         f"{out.shape[1]} outputs, got values in [{int(y.min())}, {int(y.max())}]")


def split_chunks(x: Tensor, y: Tensor, num_chunks: int) -> list[tuple[Tensor, Tensor]]:
    """Boundaries at i*N//num_chunks, so two chunks are the official halves [:N//2] and [N//2:]."""
    n = x.shape[0]
    if num_chunks > n:
        raise ValueError(f"num_chunks={num_chunks} exceeds the {n} scoring samples")
    bounds = [i * n // num_chunks for i in range(num_chunks + 1)]
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
