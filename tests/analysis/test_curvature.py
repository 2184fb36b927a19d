"""The curvature engine against dense float64 references: torch's Hessian and an exact eigendecomposition."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from graspext.analysis import Curvature, lanczos
from graspext.analysis.curvature import tridiagonal


class SmallMLP(nn.Module):
    """Small enough for a full Hessian; ReLU and a max-pool so the frozen-activation quotient matters."""

    def __init__(self, inputs=6, hidden=7, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = F.max_pool1d(torch.tanh(self.fc2(x)).unsqueeze(1), 1).squeeze(1)
        return self.fc3(x)


def _setup(seed=0, masked=False, n=24):
    torch.manual_seed(seed)
    model = SmallMLP().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    masks = None
    if masked:
        masks = {"fc1.weight": torch.rand(7, 6, generator=g) < 0.5, "fc2.weight": torch.rand(7, 7, generator=g) < 0.5}
        with torch.no_grad():
            for k, m in masks.items():
                model.get_parameter(k).mul_(m)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    return model, batches, masks, (x, y)


def _reference_hessian(model, data, masks):
    """torch.autograd.functional.hessian of the mean loss over the flat parameter vector, restricted to the kept
    coordinates."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(flat):
        params, at = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[at:at + s.numel()].view(s)
            at += s.numel()
        return F.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    h = torch.autograd.functional.hessian(loss, flat0)
    keep = torch.cat([(masks[n] if masks and n in masks else torch.ones(s, dtype=torch.bool)).reshape(-1)
                      for n, s in zip(names, shapes)])
    return h[keep][:, keep]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("engine", ["exact", "finite_difference"])
def test_hessian_vector_products_match_torch_hessian(masked, engine):
    model, batches, masks, data = _setup(masked=masked)
    curvature = Curvature(model, batches, masks=masks, engine=engine)
    reference = _reference_hessian(model, data, masks)
    assert curvature.dim == reference.shape[0]
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if engine == "exact" else {"rtol": 1e-4, "atol": 1e-6}
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = torch.randn(curvature.dim, generator=g, dtype=torch.float64)
        hv = curvature.flatten(curvature.hvp(curvature.unflatten(v)))
        torch.testing.assert_close(hv, reference @ v, **tolerance)
    torch.testing.assert_close(curvature.exact_hessian(), reference, **tolerance)


def test_products_change_neither_the_model_nor_its_running_statistics():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).double().train()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curvature = Curvature(model, [(x, y)])
    curvature.hvp(curvature.rademacher(torch.Generator().manual_seed(0)))
    curvature.top_eigenvalues(2, steps=8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("masked", [False, True])
def test_lanczos_top_eigenvalues_and_slq_moments_match_eigh(masked):
    model, batches, masks, _ = _setup(seed=2, masked=masked)
    curvature = Curvature(model, batches, masks=masks)
    exact = curvature.exact_eigenvalues()
    top = curvature.top_eigenvalues(3, steps=curvature.dim)  # a full Krylov space: exact up to round-off
    torch.testing.assert_close(top, exact.flip(0)[:3], rtol=1e-8, atol=1e-10)
    partial = curvature.top_eigenvalues(1, steps=min(curvature.dim, 30))
    assert float(partial[0]) == pytest.approx(float(exact[-1]), rel=1e-6)
    # SLQ with one probe is Gauss quadrature of q^T H^k q: exact for k < 2 steps.
    density = curvature.spectral_density(probes=1, steps=6, seed=3)
    q = curvature.flatten(curvature.rademacher(torch.Generator().manual_seed(3)))
    q = q / q.norm()
    h = curvature.exact_hessian()
    for k in range(1, 11):
        assert density.moment(k) == pytest.approx(float(q @ torch.linalg.matrix_power(h, k) @ q), rel=1e-7, abs=1e-12)
    # Averaged over probes, the moments estimate tr(H^k) / dim.
    many = curvature.spectral_density(probes=200, steps=10, seed=4)
    assert float(many.weights.sum()) == pytest.approx(1.0)
    for k in (1, 2):
        exact_moment = float(exact.pow(k).mean())
        spread = float(exact.pow(k).abs().max())
        assert abs(many.moment(k) - exact_moment) < 4 * spread * math.sqrt(2 / (200 * curvature.dim)) + 1e-12


def test_hutchinson_trace_within_its_statistical_error():
    model, batches, masks, _ = _setup(seed=4, masked=True)
    curvature = Curvature(model, batches, masks=masks)
    exact = float(curvature.exact_eigenvalues().sum())
    estimate, stderr = curvature.hutchinson_trace(probes=300, seed=1)
    assert stderr > 0
    assert abs(estimate - exact) < 4 * stderr
    assert curvature.hutchinson_trace(probes=300, seed=1) == (estimate, stderr)  # deterministic given a seed


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 30), steps=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_lanczos_tridiagonalises_any_symmetric_matrix(n, steps, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = a + a.T
    alpha, beta, basis = lanczos(lambda v: a @ v, torch.randn(n, generator=g, dtype=torch.float64), steps)
    m = len(alpha)
    assert m <= min(steps, n) and len(beta) == m - 1
    torch.testing.assert_close(basis @ basis.T, torch.eye(m, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(basis @ a @ basis.T, tridiagonal(alpha, beta), atol=1e-8, rtol=1e-8)


def test_bad_input_gets_clear_errors():
    model, batches, masks, _ = _setup(masked=True)
    with pytest.raises(ValueError, match="masks: 'other.weight' is not a trainable parameter"):
        Curvature(model, batches, masks={"other.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['fc1.weight'\] must be a bool tensor of the parameter's shape"):
        Curvature(model, batches, masks={"fc1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="engine must be one of"):
        Curvature(model, batches, engine="fast")
    curvature = Curvature(model, batches, masks=masks)
    with pytest.raises(ValueError, match="exact Hessian of .* use the SLQ density"):
        curvature.exact_hessian(max_params=10)
    with pytest.raises(ValueError, match=f"k={curvature.dim + 1} is larger than the number of parameters"):
        curvature.top_eigenvalues(curvature.dim + 1)
    bad = [(torch.full((4, 6), float("nan"), dtype=torch.float64), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="the loss on a batch is not finite"):
        Curvature(model, bad).hvp(Curvature(model, bad).zeros())
    with pytest.raises(ValueError, match="batches: no batch"):
        Curvature(model, [])
