"""The pruning limit: the Gaussian-width formula, R(s), the one-shot sweep, the L1 option and the runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graspext as gx
from graspext.analysis import (
    L1Regularization,
    SpectralDensity,
    actual_limit,
    gaussian_width,
    one_shot_sweep,
    predicted_limit,
)
from graspext.analysis.limit import RemovedNorm, loss_noise, prunable_weights
from tests.helpers import TinyNet, ordered_loader, tiny_data


def _density(eigenvalues, weights=None):
    nodes = torch.as_tensor(eigenvalues, dtype=torch.float64)
    w = torch.full_like(nodes, 1 / len(nodes)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return SpectralDensity(nodes, w, probes=1, steps=len(nodes), dim=len(nodes))


def test_gaussian_width_is_the_statistical_dimension_of_the_sublevel_set_within_the_ball():
    """Quadratic loss ½ wᵀHw, H = diag(λ): the sublevel set {L ≤ ε} is the ellipsoid with semi-axes r_i = √(2ε/λ_i)
    (checked on its boundary). Intersected with the radius-R ball it lies between the ellipsoid E_h whose
    quadratic form is the sum of the two and √2·E_h. gw(R)·d·R² is E_h's squared Gaussian width, E sup_{x∈E_h}
    ⟨g, x⟩², estimated here by Monte Carlo; the intersection's own, bounded above by the best ellipsoid of the
    pencil of its two quadratic forms, is between 1x and 2x of it."""
    g = torch.Generator().manual_seed(0)
    d, eps = 40, 0.05
    lam = torch.logspace(-3, 2, d, dtype=torch.float64)
    r2 = 2 * eps / lam
    axis = torch.diag(r2.sqrt())
    assert torch.allclose(0.5 * (axis.square() * lam).sum(1), torch.full((d,), eps, dtype=torch.float64))
    samples = torch.randn(20_000, d, generator=g, dtype=torch.float64)
    for radius in (0.05, 0.3, 2.0):
        formula = float(gaussian_width(_density(lam), radius, eps))
        rho2 = r2 * radius**2 / (radius**2 + r2)  # E_h's squared semi-axes
        width2 = (samples.square() * rho2).sum(1)  # sup over E_h of <g, x>, squared
        estimate = float(width2.mean()) / (d * radius**2)
        stderr = float(width2.std()) / math.sqrt(len(samples)) / (d * radius**2)
        assert abs(estimate - formula) < 4 * stderr
        # sup <g, x> over {Σ x²/r² ≤ 1, |x| ≤ R} is at most its support on each ellipsoid of the pencil
        # (1 - t)·ellipsoid + t·ball (each contains the intersection, and contains E_h); t on a grid.
        t = torch.linspace(0, 1, 401, dtype=torch.float64)[:, None]
        form = (1 - t) / r2 + t / radius**2                                  # [T, d]
        exact2 = (samples[:500, None, :].square() / form[None]).sum(-1).min(1).values
        ratio = float(exact2.mean()) / (d * radius**2) / formula
        assert 1 - 1e-9 <= ratio <= 2 + 1e-9


def test_gaussian_width_limits_and_zero_eigenvalues():
    density = _density([0.0, 1.0, 4.0])
    assert float(gaussian_width(density, 0.0, 0.1)) == pytest.approx(1.0)
    assert float(gaussian_width(density, 1e9, 0.1)) == pytest.approx(1 / 3)  # the zero eigenvalue's term stays 1
    radii = torch.tensor([0.1, 1.0, 10.0])
    values = gaussian_width(density, radii, 0.1)
    assert values.shape == radii.shape and bool((values[1:] < values[:-1]).all())
    with pytest.raises(ValueError, match="epsilon must be positive"):
        gaussian_width(density, 1.0, 0.0)


def test_removed_norm_is_continuous_and_exact_at_whole_counts():
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(50, generator=g), torch.randn(3, 7, generator=g)]
    norm = RemovedNorm(weights)
    flat = torch.cat([w.reshape(-1) for w in weights]).double().abs().sort().values
    for k in (0, 1, 10, 71):
        assert norm(k / 71) == pytest.approx(float(flat[:k].square().sum().sqrt()))
    between = norm(10.5 / 71)
    assert norm(10 / 71) < between < norm(11 / 71)


def test_predicted_limit_solves_the_fixed_point():
    density = _density(torch.logspace(-2, 1, 30))
    norm = RemovedNorm([torch.linspace(0.01, 1, 200)])
    s = predicted_limit(density, 0.02, norm)
    assert 0 < s < 1
    assert float(gaussian_width(density, norm(s), 0.02)) == pytest.approx(s, abs=1e-6)


def test_one_shot_sweep_prunes_exact_counts_and_restores_the_model():
    torch.manual_seed(0)
    model = TinyNet().double().eval()
    loader = ordered_loader(tiny_data(n=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    rows = one_shot_sweep(model, loader, [0.0, 0.5, 0.9])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [r["removed"] for r in rows] == [0.0, 0.5, 0.9]
    flat = torch.cat([w.detach().reshape(-1).abs() for w in weights.values()]).sort().values
    for r in rows:
        count = math.ceil(r["removed"] * total)
        assert r["R"] == pytest.approx(float(flat[:count].square().sum().sqrt()))
    assert rows[0]["accuracy"] == pytest.approx(gx.analysis.limit.evaluate(model, loader)[1])


def test_actual_limit_reads_the_sweep_as_the_official_script():
    sweep = [{"removed": 0.0, "accuracy": 0.9}, {"removed": 0.3, "accuracy": 0.92}, {"removed": 0.5, "accuracy": 0.91},
             {"removed": 0.7, "accuracy": 0.9}, {"removed": 0.8, "accuracy": 0.5}]
    assert actual_limit(sweep) == 0.5  # 0.7 only equals the unpruned accuracy
    assert actual_limit(sweep[:1] + sweep[3:]) == 0.0
    with pytest.raises(ValueError, match="must include 0"):
        actual_limit(sweep[1:])


def test_l1_regularization_is_the_subgradient_of_the_l1_term():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()

    class _Trainer:
        scaler = None

    trainer = _Trainer()
    trainer.model = model
    L1Regularization(0.01).on_after_backward(trainer)
    reference = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    reference.load_state_dict(model.state_dict())
    (F.cross_entropy(reference(x), y) + 0.01 * sum(p.abs().sum() for p in reference.parameters())).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="lmbda must be a positive finite number"):
            L1Regularization(bad)


def test_loss_noise_needs_finite_losses_and_two_batches():
    model = TinyNet().double().eval()
    data = tiny_data(n=16)
    mean, std = loss_noise(model, ordered_loader(data))
    assert std > 0 and math.isfinite(mean)
    with pytest.raises(ValueError, match="at least 2 batches"):
        loss_noise(model, [next(iter(ordered_loader(data)))])
    nan = [(torch.full((4, 3, 16, 16), float("nan"), dtype=torch.float64), torch.zeros(4, dtype=torch.long))] * 2
    with pytest.raises(ValueError, match="not finite"):
        loss_noise(model, nan)
    with pytest.raises(ValueError, match="fractions: every removed fraction must be a number in"):
        one_shot_sweep(model, ordered_loader(data), [0.0, 1.0])


def test_runs_write_json_and_plots(tmp_path):
    from graspext.analysis.runs import run_gradflow, run_limit, run_spectrum

    limit = run_limit(str(tmp_path / "limit"), epochs=1, probes=1, steps=10, samples=128)
    stored = json.loads((tmp_path / "limit" / "limit.json").read_text())
    assert stored["predicted"] == limit["predicted"] and 0 <= stored["actual"] < 1
    assert (tmp_path / "limit" / "pruning_limit.png").exists()
    spectrum = run_spectrum(str(tmp_path / "spectrum"), epochs=1, k=2, probes=1, steps=10, trace_probes=4,
                            samples=128)
    assert len(spectrum["top_eigenvalues"]) == 2 and spectrum["top_eigenvalues"][0] >= spectrum["top_eigenvalues"][1]
    assert (tmp_path / "spectrum" / "spectral_density.png").exists()
    flow = run_gradflow(str(tmp_path / "gradflow"), epochs=1, every=10)
    assert set(flow["runs"]) == {"dense", "layer_scaled", "unit_scaled"}
    # Evci et al.: the dense init masked to 90 % starts with far weaker gradient flow than the unit-scaled one.
    assert flow["runs"]["unit_scaled"]["history"][0]["total"] > 5 * flow["runs"]["dense"]["history"][0]["total"]


def test_cli_analyze_limit_prints_both_limits(tmp_path, capsys):
    from graspext.cli import main

    assert main(["analyze", "limit", "--epochs", "1", "--probes", "1", "--steps", "8", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "predicted pruning limit:" in printed and "actual pruning limit:" in printed
    assert json.loads((tmp_path / "limit.json").read_text())["sweep"][0]["removed"] == 0.0
