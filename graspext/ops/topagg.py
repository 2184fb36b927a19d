"""TopAgg, DataLens's gradient compression and private aggregation (Wang et al., CCS 2021), as fused operators
(``torch.ops.graspext.topagg`` / ``topagg_votes``, CPU and CUDA), with plain-torch references that draw the same
random numbers (see ``csrc/ops/topagg.h``), so every backend and the reference agree vote for vote.

For each teacher's gradient row ``g`` (length ``d``): keep the ``k`` largest ``|g|`` (ties to the lower index),
clip to ``b = min(max |g|, max_grad)``, and vote +1 with probability ``1/2 + g/(2b)``, else -1 (an unbiased
estimate of ``g / b`` on the kept coordinates). ``topagg`` sums the votes over the teachers of each sample, adds
``N(0, sigma^2)`` per coordinate and returns +1 / -1 where the noisy sum is above ``beta·T`` / below ``-beta·T``,
0 elsewhere, with the noisy sum itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graspext import _extension

_extension.load()

_MASK64 = (1 << 64) - 1
_STREAM_STRIDE = 0xD1B54A32D192ED03
SIGN_STREAM, NOISE_STREAM = 1, 2


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


def topagg_votes(grads: Tensor, k: int, max_grad: float, seed: int) -> Tensor:
    """Each row's compressed vote, int8 of ``grads``' shape (``[T, d]`` or ``[S, T, d]``): exactly ``k`` entries
    in {-1, +1} per row, the rest 0."""
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads must be a tensor, got {type(grads).__name__}")
    return torch.ops.graspext.topagg_votes(grads, int(k), float(max_grad), _check_seed(seed))


def topagg(grads: Tensor, k: int, max_grad: float, sigma: float, beta: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(out, noisy_sum)`` for ``grads`` ``[S, T, d]`` (S samples, T teachers): ``out`` int8 ``[S, d]`` in
    {-1, 0, 1}, ``noisy_sum`` float64 ``[S, d]``. Fused: the votes are never materialized."""
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads must be a tensor, got {type(grads).__name__}")
    return torch.ops.graspext.topagg(grads, int(k), float(max_grad), float(sigma), float(beta), _check_seed(seed))


@torch.library.register_fake("graspext::topagg_votes")
def _topagg_votes_fake(grads, k, max_grad, seed):
    return grads.new_empty(grads.shape, dtype=torch.int8)


@torch.library.register_fake("graspext::topagg")
def _topagg_fake(grads, k, max_grad, sigma, beta, seed):
    shape = (grads.shape[0], grads.shape[2])
    return grads.new_empty(shape, dtype=torch.int8), grads.new_empty(shape, dtype=torch.float64)


# ------------------------------------------------------------------ the plain-torch reference
def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    """splitmix64 on int64 tensors holding uint64 bit patterns (int64 arithmetic wraps modulo 2^64)."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def stream_key(seed: int, stream: int) -> int:
    return _splitmix64_int((seed + stream * _STREAM_STRIDE) & _MASK64)


def uniform(key: int, index: Tensor) -> Tensor:
    """The uniform in [0, 1) for each int64 ``index`` of the stream ``key`` (float64)."""
    return _shift_right(_splitmix64(index + _signed(key)), 11).double() * 2.0**-53


def topagg_votes_reference(grads: Tensor, k: int, max_grad: float, seed: int) -> Tensor:
    """:func:`topagg_votes` in plain torch (stable sort for the ties, the same counter-based draws)."""
    d = grads.shape[-1]
    rows = grads.reshape(-1, d).double()
    kept = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    b = torch.minimum(rows.abs().amax(1, keepdim=True), torch.tensor(float(max_grad), dtype=torch.float64))
    g = torch.maximum(torch.minimum(rows.gather(1, kept), b), -b)
    p = torch.where(b > 0, 0.5 + g / (2.0 * b), torch.full_like(g, 0.5))
    index = torch.arange(rows.shape[0], dtype=torch.int64, device=grads.device)[:, None] * d + kept
    signs = torch.where(uniform(stream_key(seed, SIGN_STREAM), index) < p, 1, -1).to(torch.int8)
    votes = torch.zeros(rows.shape, dtype=torch.int8, device=grads.device).scatter_(1, kept, signs)
    return votes.view(grads.shape)


def topagg_reference(grads: Tensor, k: int, max_grad: float, sigma: float, beta: float, seed: int
                     ) -> tuple[Tensor, Tensor]:
    """:func:`topagg` in plain torch: materialized votes, summed, plus the same Box-Muller noise."""
    samples, teachers, d = grads.shape
    sums = topagg_votes_reference(grads, k, max_grad, seed).sum(1, dtype=torch.int64).double()
    i = torch.arange(samples * d, dtype=torch.int64, device=grads.device)
    key = stream_key(seed, NOISE_STREAM)
    u1, u2 = 1.0 - uniform(key, 2 * i), uniform(key, 2 * i + 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    noisy = sums + sigma * z.view(samples, d)
    bound = beta * teachers
    out = torch.where(noisy > bound, 1, torch.where(noisy < -bound, -1, 0)).to(torch.int8)
    return out, noisy
