"""graspext.init: the sparse-aware initialisations of Evci et al. 2022 (unit scaled, layer scaled) and the
trainer's ``init=`` option."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import graspext as gx
from graspext.callbacks import Callback
from graspext.cli import main
from graspext.init import INITS, apply_init_, layer_scaled_init_, unit_scaled_init_
from tests.conftest import DEVICES, hypothesis_settings
from tests.helpers import ordered_loader, tiny_data, tiny_net

# E[x^4] / var^2 of each distribution: the variance of the estimator mean(x^2) is (kurtosis - 1) var^2 / n.
KURTOSIS = {"normal": 3.0, "uniform": 9 / 5}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _random_masks(model, density=0.1, seed=0):
    g = _gen(seed)
    return gx.Masks({f"{name}.weight" if name else "weight": torch.rand(m.weight.shape, generator=g) < density
                     for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))})


def _expected_var(mask, fan, gain):
    """gain / max(1, fan) per weight position, the fan counted from the mask ([out, in, *kernel])."""
    m = mask.double()
    fan_in = m.flatten(1).sum(1).view(-1, *[1] * (m.dim() - 1))
    fan_out = m.transpose(0, 1).flatten(1).sum(1).view(1, -1, *[1] * (m.dim() - 2))
    f = {"in": fan_in, "out": fan_out, "avg": (fan_in + fan_out) / 2}[fan].expand_as(m)
    return gain / f.clamp(min=1)


def _check_unit_variances(w, mask, var, distribution, z_max=6.0):
    """Per output unit and per input unit, the mean of w^2 / var over the kept weights is 1 within z_max
    standard errors of that estimator; their average over the units is 1 within z_max standard errors too."""
    y = torch.where(mask, w.double() ** 2 / var, torch.zeros((), dtype=torch.float64))
    rel_se = math.sqrt(KURTOSIS[distribution] - 1)  # of one normalised square
    for dims, what in (((1,), "output"), ((0,), "input")):
        other = tuple(d for d in range(w.dim()) if d not in dims)
        n = mask.sum(dim=other).double()
        est = y.sum(dim=other)[n > 0] / n[n > 0]
        z = (est - 1) / (rel_se / n[n > 0].sqrt())
        assert z.abs().max() < z_max, f"{what} unit {int(z.abs().argmax())}: z = {float(z.abs().max()):.2f}"
        assert abs(float(z.mean())) * math.sqrt(len(z)) < z_max, f"{what} units: mean z = {float(z.mean()):.3f}"


@pytest.mark.parametrize("layer", [lambda: nn.Linear(2000, 2000), lambda: nn.Conv2d(256, 256, 3)],
                         ids=["linear2000", "conv256"])
@pytest.mark.parametrize("distribution,gain", [("normal", 2.0), ("uniform", 1.0)])
@pytest.mark.parametrize("fan", ["in", "out", "avg"])
def test_unit_variance_follows_fan_of_the_mask(layer, fan, distribution, gain):
    torch.manual_seed(0)
    model = layer()
    bias = model.bias.detach().clone()
    mask = torch.rand(model.weight.shape, generator=_gen(1)) < 0.1   # 90 % sparse
    unit_scaled_init_(model, {"weight": mask}, fan=fan, distribution=distribution, gain=gain, generator=_gen(2))
    w = model.weight.detach()
    var = _expected_var(mask, fan, gain)
    assert torch.all(w[~mask] == 0)
    assert torch.equal(model.bias, bias)                             # biases are left as they are
    _check_unit_variances(w, mask, var, distribution)
    if distribution == "uniform":                                    # U(-sqrt(3 var), sqrt(3 var))
        assert torch.all(w.double().abs() <= (3 * var).sqrt() * (1 + 1e-6))


@pytest.mark.parametrize("fan", ["in", "out"])
def test_fan_is_counted_per_unit_from_the_mask(fan):
    """Units keep 10 to 2000 of their 2000 connections: each one's variance is 2 / its own kept count, not
    2 / 2000 (the dense fan) nor 2 / the layer's mean count."""
    counts = torch.tensor([10, 50, 200, 1000, 2000]).repeat_interleave(80)      # 400 units
    g = _gen(3)
    mask = torch.zeros(400, 2000, dtype=torch.bool)
    for unit, k in enumerate(counts.tolist()):
        mask[unit, torch.randperm(2000, generator=g)[:k]] = True
    if fan == "out":
        mask = mask.T.contiguous()                                   # columns are the input units
    model = nn.Linear(mask.shape[1], mask.shape[0])
    unit_scaled_init_(model, {"weight": mask}, fan=fan, generator=_gen(4))
    w = model.weight.detach().double()
    w_units, m_units = (w, mask) if fan == "in" else (w.T, mask.T)
    for k in counts.unique().tolist():
        rows = counts == k
        n = int(m_units[rows].sum())
        est = float((w_units[rows] ** 2).sum()) / n
        se = math.sqrt(2 / n) * 2 / k
        assert abs(est - 2 / k) < 5 * se, (k, est, 2 / k)
    assert torch.all(w[~mask] == 0)


def _mlp(width=1024, depth=8):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")       # He, on the dense fan-in
    return model


@torch.no_grad()
def _second_moment_ratio(model):
    x = torch.randn(256, 1024, generator=_gen(5))
    return float(model(x).pow(2).mean() / x.pow(2).mean())


@pytest.mark.parametrize("init", ["unit_scaled", "unit_scaled_fan_avg", "layer_scaled", None])
def test_activation_second_moment_through_90_percent_sparse_mlp(init):
    model = _mlp()
    masks = _random_masks(model, 0.1, seed=6)
    if init is not None:
        apply_init_(init, model, masks, generator=_gen(7))
    masks.apply_(model).remove()
    ratio = _second_moment_ratio(model)
    if init is None:    # the dense He init, masked: each layer shrinks the signal by the density
        assert ratio < 1e-5, ratio
    else:
        assert 0.5 < ratio < 2, ratio


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


def test_layer_scaled_divides_the_dense_init_by_sqrt_density_exactly():
    model = _conv_net()
    masks = {"0.weight": torch.rand(model[0].weight.shape, generator=_gen(8)) < 0.3,
             "3.weight": torch.zeros(model[3].weight.shape, dtype=torch.bool)}   # a collapsed layer: all zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layer_scaled_init_(model, masks)
    m = masks["0.weight"]
    density = int(m.sum()) / m.numel()
    assert torch.equal(model[0].weight, before["0.weight"] * m / math.sqrt(density))
    assert torch.equal(model[3].weight, torch.zeros_like(before["3.weight"]))
    for n in ("0.bias", "3.bias"):
        assert torch.equal(dict(model.named_parameters())[n], before[n])


def test_collapsed_layer_and_empty_units_are_zero():
    model = _conv_net()
    mask0 = torch.rand(model[0].weight.shape, generator=_gen(9)) < 0.5
    mask0[3] = False                                                  # an output unit with no kept input
    masks = {"0.weight": mask0, "3.weight": torch.zeros_like(model[3].weight, dtype=torch.bool)}
    for fan in ("in", "out", "avg"):
        unit_scaled_init_(model, masks, fan=fan, generator=_gen(0))
        assert torch.all(model[3].weight == 0) and torch.all(model[0].weight[3] == 0)
        assert torch.isfinite(model[0].weight).all() and bool((model[0].weight[mask0] != 0).all())


@pytest.mark.parametrize("name", INITS)
def test_deterministic_given_the_generator(name):
    def run(seed, reverse=False):
        model = _conv_net()
        masks = _random_masks(model, 0.2, seed=10)
        items = list(masks.items())
        apply_init_(name, model, dict(reversed(items) if reverse else items), generator=None if seed is None else _gen(seed))
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(0), run(0), run(0, reverse=True)  # the order of the masks' keys does not change the draw
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    if name != "layer_scaled":
        assert not torch.equal(a[0], run(1)[0])
        torch.manual_seed(11)
        d = run(None)
        torch.manual_seed(11)
        assert all(torch.equal(x, y) for x, y in zip(d, run(None)))     # generator=None: the global RNG


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_does_not_depend_on_the_device(device, dtype):
    cpu = _conv_net().to(dtype)
    other = copy.deepcopy(cpu).to(device)
    masks = _random_masks(cpu, 0.3, seed=12)
    unit_scaled_init_(cpu, masks, fan="avg", generator=_gen(13))
    unit_scaled_init_(other, masks.to(device), fan="avg", generator=_gen(13))
    for p, q in zip(cpu.parameters(), other.parameters()):
        assert q.device.type == device and q.dtype == dtype
        assert torch.equal(p, q.cpu())


@given(out_ch=st.integers(1, 6), in_ch=st.integers(1, 6), k=st.integers(1, 3), density=st.floats(0, 1),
       fan=st.sampled_from(["in", "out", "avg"]), distribution=st.sampled_from(["normal", "uniform"]),
       seed=st.integers(0, 2**31))
@hypothesis_settings(50)
def test_pruned_zero_kept_finite_and_gain_scales_linearly(out_ch, in_ch, k, density, fan, distribution, seed):
    layer = nn.Conv2d(in_ch, out_ch, k)
    mask = torch.rand(layer.weight.shape, generator=_gen(seed)) < density
    unit_scaled_init_(layer, {"weight": mask}, fan=fan, distribution=distribution, gain=2.0, generator=_gen(seed))
    w2 = layer.weight.detach().clone()
    unit_scaled_init_(layer, {"weight": mask}, fan=fan, distribution=distribution, gain=8.0, generator=_gen(seed))
    assert torch.all(w2[~mask] == 0) and torch.isfinite(w2).all()
    torch.testing.assert_close(layer.weight.detach(), 2 * w2)         # std ~ sqrt(gain)
    if distribution == "uniform":
        var = _expected_var(mask, fan, 2.0)
        assert torch.all(w2.double().abs() <= (3 * var).sqrt() * (1 + 1e-6))


BAD = [
    ("masks not a mapping", lambda m: unit_scaled_init_(m, [1]), TypeError, "masks must be a mapping"),
    ("mask not bool", lambda m: unit_scaled_init_(m, {"0.weight": torch.ones(16, 3, 3, 3)}), TypeError,
     r"masks\['0.weight'\] must be a bool tensor"),
    ("mask of no parameter", lambda m: unit_scaled_init_(m, {"9.weight": torch.ones(2, dtype=torch.bool)}),
     ValueError, "masks: '9.weight' is not a parameter"),
    ("mask of the wrong shape", lambda m: layer_scaled_init_(m, {"0.weight": torch.ones(2, dtype=torch.bool)}),
     ValueError, "masks: '0.weight' has shape"),
    ("mask of a bias", lambda m: unit_scaled_init_(m, {"0.bias": torch.ones(16, dtype=torch.bool)}),
     ValueError, "masks: '0.bias' is not the weight of a Conv2d or Linear"),
    ("mask of a BatchNorm weight", lambda m: apply_init_("layer_scaled", nn.Sequential(nn.BatchNorm2d(4)),
                                                         {"0.weight": torch.ones(4, dtype=torch.bool)}),
     ValueError, "masks: '0.weight' is not the weight of a Conv2d or Linear"),
    ("unknown fan", lambda m: unit_scaled_init_(m, {}, fan="sum"), ValueError, "fan must be one of"),
    ("unknown distribution", lambda m: unit_scaled_init_(m, {}, distribution="cauchy"), ValueError,
     "distribution must be one of"),
    ("unknown init", lambda m: apply_init_("he", m, {}), ValueError, "init name must be one of"),
    ("generator not a Generator", lambda m: unit_scaled_init_(m, {}, generator=0), TypeError,
     "generator must be a CPU torch.Generator"),
    ("model not a Module", lambda m: unit_scaled_init_(object(), {}), TypeError, "model must be a torch.nn.Module"),
] + [(f"gain {g!r}", lambda m, g=g: unit_scaled_init_(m, {}, gain=g), ValueError,
      "gain must be a positive finite number") for g in (0, -1.0, float("nan"), float("inf"), "2", True, None)]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(call, error, message):
    model = _conv_net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        call(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))   # nothing was changed


# ---------------------------------------------------------------------- the trainer and the CLI
def _tiny():
    model = tiny_net(torch.float32)
    data = tiny_data(torch.float32, n=16)
    return model, _random_masks(model, 0.2, seed=14), ordered_loader(data), ordered_loader(data)


class _Weights(Callback):
    """The masked weights the first step trains from."""

    def on_fit_start(self, trainer):
        self.weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("init", INITS)
def test_trainer_trains_from_the_initialised_weights(init):
    model, masks, train, test = _tiny()
    expected = copy.deepcopy(model)
    apply_init_(init, expected, masks, generator=_gen(5))            # the trainer seeds it from config.seed
    masks.apply_(expected).remove()
    seen = _Weights()
    gx.train(model, train, test, masks=masks, init=init, seed=5, epochs=1, kernels="dense", progress=False,
             callbacks=[seen])
    for n, p in expected.named_parameters():
        assert torch.equal(seen.weights[n], p), n


def test_trainer_init_with_default_kernels_keeps_masks():
    model, masks, train, test = _tiny()
    result = gx.train(model, train, test, masks=masks, init="unit_scaled", epochs=1, progress=False)
    assert result.summary["config"]["init"] == "unit_scaled"
    params = dict(model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in masks.items())


def test_trainer_refuses_init_without_masks_or_unknown():
    model, masks, train, test = _tiny()
    with pytest.raises(ValueError, match="init='unit_scaled' needs masks"):
        gx.Trainer(model, train, test, gx.TrainConfig(init="unit_scaled", epochs=1, progress=False))
    with pytest.raises(ValueError, match="init must be None or one of"):
        gx.train(model, train, test, masks=masks, init="xavier", epochs=1, progress=False)
    bad = gx.Masks({**masks, "bn1.weight": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks: 'bn1.weight' is not the weight"):
        gx.Trainer(model, train, test, gx.TrainConfig(init="layer_scaled", epochs=1, progress=False), bad)


def test_resume_with_another_init_is_refused(tmp_path):
    model, masks, train, test = _tiny()
    gx.train(model, train, test, masks=masks, epochs=1, progress=False, out_dir=str(tmp_path))
    model, masks, train, test = _tiny()
    with pytest.raises(ValueError, match="init=None.*init='unit_scaled'"):
        gx.train(model, train, test, masks=masks, init="unit_scaled", epochs=1, progress=False, out_dir=str(tmp_path))


def test_cli_init_option(capsys):
    assert main(["train", "--init", "unit_scaled", "--epochs", "1"]) == 2
    assert "--init unit_scaled needs --masks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--init", "xavier", "--masks", "m.pt"])
    assert "--init: invalid choice" in capsys.readouterr().err
