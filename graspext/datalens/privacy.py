"""The privacy cost of DataLens's votes, by Rényi differential privacy with Opacus's RDP analysis.

Each TopAgg query (one generated sample's aggregated vote vector) is a Gaussian mechanism: changing one
teacher's data changes its vote, k entries in {-1, +1}, by at most 2√k in L2 norm (every entry flipped), and
the sum carries N(0, σ²) noise per coordinate. Its RDP at order α is α·Δ² / (2σ²) = 2kα/σ² (noise multiplier
σ / Δ, no subsampling: every teacher answers every query). The queries compose additively in RDP, and ε at δ
comes from Opacus's conversion, minimised over the orders.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from graspext._validation import integer, positive

# The orders Opacus's accountants use by default, extended far up: with σ in the thousands the best order for a
# few thousand queries is large.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                          + [64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096])
DEFAULT_DELTA = 1e-5


class TopAggAccountant:
    """Counts TopAgg queries and reports the (ε, δ) they spent. ``sigma``: the noise's standard deviation;
    ``k``: the votes' non-zeros; ``delta`` in (0, 1)."""

    def __init__(self, sigma: float, k: int, delta: float = DEFAULT_DELTA, orders: Sequence[float] = DEFAULT_ORDERS):
        self.sigma = positive(sigma, "sigma")
        self.k = integer(k, "k", 1)
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.delta = float(delta)
        self.orders = [float(a) for a in orders]
        if not self.orders or any(a <= 1 for a in self.orders):
            raise ValueError(f"orders must be RDP orders above 1, got {list(orders)!r}")
        self.queries = 0

    @property
    def sensitivity(self) -> float:
        return 2.0 * math.sqrt(self.k)

    @property
    def noise_multiplier(self) -> float:
        return self.sigma / self.sensitivity

    def step(self, queries: int = 1) -> None:
        self.queries += integer(queries, "queries", 0)

    def epsilon(self, queries: int | None = None) -> float:
        """ε at ``delta`` after ``queries`` queries (default: those counted so far); 0 before any."""
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        n = self.queries if queries is None else int(queries)
        if n == 0:
            return 0.0
        rdp = compute_rdp(q=1.0, noise_multiplier=self.noise_multiplier, steps=n, orders=self.orders)
        eps, _ = get_privacy_spent(orders=self.orders, rdp=rdp, delta=self.delta)
        return float(eps)

    def queries_within(self, max_eps: float) -> int:
        """The most queries whose ε stays at or below ``max_eps`` (ε grows with the count: bisection)."""
        max_eps = positive(max_eps, "max_eps")
        lo, hi = 0, 1
        while self.epsilon(hi) <= max_eps:
            lo, hi = hi, hi * 2
            if hi > 2**40:
                return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= max_eps else (lo, mid)
        return lo

    def state_dict(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "k": self.k, "delta": self.delta, "orders": list(self.orders),
                "queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("sigma", "k", "delta"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the accountant's state has {key}={state[key]!r}, this run has "
                                 f"{key}={getattr(self, key)!r}: it belongs to another run")
        self.orders, self.queries = [float(a) for a in state["orders"]], int(state["queries"])
