"""The TopAgg accountant against a closed-form RDP computation of the Gaussian mechanism."""

import math

import pytest

from graspext.datalens.privacy import DEFAULT_ORDERS, TopAggAccountant


def _closed_form_epsilon(sigma, k, queries, delta, orders):
    """RDP of the Gaussian mechanism with L2 sensitivity 2√k: α·(2√k)²/(2σ²) = 2kα/σ² per query, composed over the
    queries, converted to (ε, δ) by Balle et al. 2020's bound (the one Opacus uses), minimised over the orders."""
    best = math.inf
    for a in orders:
        rdp = queries * 2 * k * a / sigma**2
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return max(best, 0.0)


@pytest.mark.parametrize("sigma, k, queries", [(5000, 200, 1000), (800, 300, 600), (1000, 350, 50),
                                               (50.0, 10, 1), (10.0, 1, 20_000)])
def test_epsilon_matches_the_closed_form(sigma, k, queries):
    accountant = TopAggAccountant(sigma, k)
    accountant.step(queries)
    assert accountant.epsilon() == pytest.approx(_closed_form_epsilon(sigma, k, queries, 1e-5, DEFAULT_ORDERS),
                                                 rel=1e-9)
    assert accountant.noise_multiplier == pytest.approx(sigma / (2 * math.sqrt(k)))


def test_epsilon_grows_with_queries_and_the_budget_is_respected():
    accountant = TopAggAccountant(5000, 200)
    assert accountant.epsilon() == 0.0
    values = [accountant.epsilon(n) for n in (1, 10, 100, 1000)]
    assert values == sorted(values) and values[0] > 0
    n = accountant.queries_within(1.0)
    assert accountant.epsilon(n) <= 1.0 < accountant.epsilon(n + 1)


def test_state_round_trips_and_refuses_another_run():
    a = TopAggAccountant(800, 300)
    a.step(42)
    b = TopAggAccountant(800, 300)
    b.load_state_dict(a.state_dict())
    assert b.queries == 42 and b.epsilon() == a.epsilon()
    with pytest.raises(ValueError, match="sigma=800.0, this run has sigma=900.0"):
        TopAggAccountant(900, 300).load_state_dict(a.state_dict())


def test_bad_input_gets_clear_errors():
    for delta in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
            TopAggAccountant(10, 5, delta=delta)
    for sigma in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="sigma must be a positive finite number"):
            TopAggAccountant(sigma, 5)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        TopAggAccountant(10, 0)
    with pytest.raises(ValueError, match="queries must be an int >= 0"):
        TopAggAccountant(10, 5).step(-1)
    with pytest.raises(ValueError, match="max_eps must be a positive finite number"):
        TopAggAccountant(10, 5).queries_within(0)
