"""Gradient-flow diagnostics (Evci et al., AAAI 2022): masked gradient norms, the callback, distance to init,
linear interpolation."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import graspext as gx
from graspext.analysis.gradflow import (
    GRADIENT_FLOW_JSONL,
    GradientFlow,
    default_alphas,
    distance_to_init,
    interpolate,
    masked_gradient_norms,
)
from graspext.callbacks import Callback
from graspext.dst import SET, RigL
from graspext.lottery.tickets import state_copy
from tests.helpers import TinyNet, die_in_epoch, ordered_loader, tiny_data, tiny_net


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops run faster on one thread than on two contended ones (a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup():
    net, data = tiny_net(), tiny_data()
    masks = gx.prune(net, "random", 0.7, seed=0)
    return net, data, masks, data[:16]


def _pruned(net, masks):
    net = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return net


def _reference_norms(net, masks, batch):
    """The masked gradient by plain autograd in float64, on a pruned copy in train mode."""
    model = _pruned(net, masks).train()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.double() * masks.get(n, 1)
        out[n] = float(g.norm())
    out["total"] = math.sqrt(sum(v * v for v in out.values()))
    return out


def _assert_norms(got, want, rel=1e-10):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-14), k


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()}, torch.get_rng_state(),
            [m.training for m in model.modules()])


def _assert_same(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] is None and y[k] is None) or torch.equal(x[k], y[k]), k
    assert torch.equal(a[3], b[3]) and a[4] == b[4]


# ---------------------------------------------------------------------------------------------- norms
def test_masked_norms_match_autograd_for_masked_dense_and_sparse_layers():
    net, _, masks, batch = _setup()
    want = _reference_norms(net, masks, batch)
    assert want["conv2.weight"] > 0
    _assert_norms(masked_gradient_norms(net, masks, batch), want)  # unpruned weights: taken at w * m
    _assert_norms(masked_gradient_norms(_pruned(net, masks), masks, batch), want)
    sparse = gx.sparsify(net, masks)
    assert isinstance(sparse.conv2, gx.nn.SparseConv2d) and sparse.conv2.values.dtype == torch.float64
    _assert_norms(masked_gradient_norms(sparse, None, batch), want, rel=1e-9)
    _assert_norms(masked_gradient_norms(sparse, masks, batch), want, rel=1e-9)
    # Without masks, a dense model's whole gradient.
    dense = masked_gradient_norms(net, None, batch)
    assert dense["conv2.weight"] > want["conv2.weight"]


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_norms_do_not_disturb_training(kind):
    net, _, masks, batch = _setup()
    model = gx.sparsify(net, masks) if kind == "sparse" else _pruned(net, masks)
    handle = masks.apply_(model) if kind == "dense" else None
    model.train()
    F.cross_entropy(model(batch[0]), batch[1]).backward()  # .grad fields in place
    if handle is not None:  # a dense gradient RigL asked for must not be consumed or filled
        handle.request_dense_grad("conv2.weight")
    else:
        model.conv2.request_dense_grad()
    torch.rand(3)
    before = _snapshot(model)
    first = masked_gradient_norms(model, masks if kind == "dense" else None, batch)
    _assert_same(before, _snapshot(model))
    if handle is not None:
        assert handle.grads["conv2.weight"].dense_grad is None and handle.grads["conv2.weight"].capture
    else:
        assert model.conv2._dense_grad_request and model.conv2._dense_grad_box is None
    assert masked_gradient_norms(model, masks if kind == "dense" else None, batch) == first
    model.eval()  # computed in the current mode: running statistics instead of the batch's
    assert masked_gradient_norms(model, masks if kind == "dense" else None, batch)["total"] != first["total"]


# ---------------------------------------------------------------------------------------------- callback
class _States(Callback):
    """Snapshots the trained model (dense state dict and masks) at every step's start and end."""

    def __init__(self):
        self.start, self.end = {}, {}

    def _state(self, trainer):
        return state_copy(trainer.model), trainer.current_masks()

    def on_train_batch_start(self, trainer, inputs, targets):
        self.start[trainer.global_step] = self._state(trainer)

    def on_train_batch_end(self, trainer, loss):
        self.end[trainer.global_step] = self._state(trainer)


def _norms_at(state, batch):
    model = TinyNet().double()
    model.load_state_dict(state[0])
    return masked_gradient_norms(model.train(), state[1], batch)


def _run(data, masks, callbacks, epochs=2, **kw):
    net = tiny_net()
    return gx.train(net, ordered_loader(data), ordered_loader(data), masks=masks, callbacks=callbacks,
                    epochs=epochs, progress=False, lr=0.05, **kw)


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
def test_callback_logs_every_steps_before_the_step(tmp_path, kernels):
    _, data, masks, batch = _setup()
    flow, states = GradientFlow(batch, every=4), _States()
    result = _run(data, masks, [flow, states], kernels=kernels, out_dir=str(tmp_path))
    assert [r["step"] for r in flow.history] == [0, 4, 8]  # 6 steps per epoch, 12 in all
    assert flow.mask_updates == []
    for r in flow.history:
        want = _norms_at(states.start[r["step"]], batch)
        assert r["total"] == pytest.approx(want["total"], rel=1e-9)
        _assert_norms(r["layers"], {k: v for k, v in want.items() if k != "total"}, rel=1e-9)
    assert [r["grad_flow_total"] for r in result.history] == [flow.history[1]["total"], flow.history[2]["total"]]
    lines = [json.loads(line) for line in (tmp_path / GRADIENT_FLOW_JSONL).read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in lines] == [("norm", 0), ("norm", 4), ("norm", 8)]
    assert lines[2]["total"] == flow.history[2]["total"]


def test_callback_without_out_dir_writes_nothing(tmp_path, monkeypatch):
    _, data, _, batch = _setup()
    monkeypatch.chdir(tmp_path)
    _run(data, None, [GradientFlow(batch, every=6)], epochs=1)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
def test_rigl_updates_record_the_norm_just_before_and_after(kernels):
    _, data, masks, batch = _setup()
    flow, states = GradientFlow(batch, every=5), _States()
    _run(data, masks, [flow, states], dst=RigL(frequency=4, end_step=8, drop_fraction_anneal="constant"),
         kernels=kernels)
    assert [u["step"] for u in flow.mask_updates] == [0, 4, 8]
    for u in flow.mask_updates:
        t = u["step"]
        assert any(not torch.equal(states.start[t][1][n], states.end[t][1][n]) for n in masks)  # the masks moved
        assert u["before"] == pytest.approx(_norms_at(states.start[t], batch)["total"], rel=1e-9)
        assert u["after"] == pytest.approx(_norms_at(states.end[t], batch)["total"], rel=1e-9)
        assert u["change"] == u["after"] - u["before"]


def test_set_updates_follow_the_optimizer_step():
    """SET moves the masks after the step: "before" is after the step, "after" what the next step starts from
    (at step 5, the epoch's last, taken at the epoch's end)."""
    _, data, masks, batch = _setup()
    flow, states = GradientFlow(batch, every=100), _States()
    _run(data, masks, [flow, states], dst=SET(frequency=5, end_step=10), kernels="dense")
    assert [u["step"] for u in flow.mask_updates] == [0, 5, 10]
    for u in flow.mask_updates:
        t = u["step"]
        assert u["before"] == pytest.approx(_norms_at(states.end[t], batch)["total"], rel=1e-9)
        assert u["after"] == pytest.approx(_norms_at(states.start[t + 1], batch)["total"], rel=1e-9)


def test_resume_after_kill_continues_the_same_history(tmp_path):
    _, data, masks, batch = _setup()
    cfg = {"epochs": 2, "lr": 0.05, "progress": False, "kernels": "dense"}

    def trainer(out, flow):
        return gx.Trainer(tiny_net(), ordered_loader(data), ordered_loader(data), gx.TrainConfig(**cfg, out_dir=out),
                          masks, callbacks=[flow], dst=RigL(frequency=3, end_step=9))

    full = GradientFlow(batch, every=2)
    trainer(str(tmp_path / "full"), full).fit()
    killed = trainer(str(tmp_path / "killed"), GradientFlow(batch, every=2))
    die_in_epoch(killed, 1)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    lines = (tmp_path / "killed" / GRADIENT_FLOW_JSONL).read_text().splitlines()
    assert len(lines) == 3 + 2  # norms at steps 0, 2, 4; updates at 0, 3
    resumed = GradientFlow(batch, every=2)
    trainer(str(tmp_path / "killed"), resumed).fit()
    assert resumed.history == full.history and len(full.history) == 6
    assert resumed.mask_updates == full.mask_updates and len(full.mask_updates) == 4
    assert ((tmp_path / "killed" / GRADIENT_FLOW_JSONL).read_text()
            == (tmp_path / "full" / GRADIENT_FLOW_JSONL).read_text())
    with pytest.raises(ValueError, match="every"):
        GradientFlow(batch, every=3).load_state_dict(full.state_dict())


# ---------------------------------------------------------------------------------------------- distance, interpolation
def _sgd_step(model, batch, lr=0.1):
    model.train()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def test_distance_to_init():
    net, _, masks, batch = _setup()
    init = state_copy(net)
    at_init = distance_to_init(net, init)
    assert at_init["l2_distance"] == 0 and at_init["cosine_similarity"] == pytest.approx(1, abs=1e-15)
    assert all(v["l2_distance"] == 0 and v["cosine_similarity"] == pytest.approx(1, abs=1e-15)
               for v in at_init["layers"].values())
    _sgd_step(net, batch)
    got = distance_to_init(net, init)
    a = torch.cat([p.detach().flatten() for p in net.parameters()])
    b = torch.cat([init[n].flatten() for n, _ in net.named_parameters()])
    assert got["l2_distance"] == pytest.approx(float((a - b).norm()), rel=1e-12) and got["l2_distance"] > 0
    assert got["cosine_similarity"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)
    w, w0 = net.fc.weight.detach(), init["fc.weight"]
    assert got["layers"]["fc.weight"]["l2_distance"] == pytest.approx(float((w - w0).norm()), rel=1e-12)
    # A sparsified model compares its dense weights by name with a state taken before sparsify.
    pruned = _pruned(net, masks)
    want = distance_to_init(pruned, init)
    got = distance_to_init(gx.sparsify(pruned, masks), init)
    assert got["layers"].keys() == want["layers"].keys() and want["l2_distance"] > 0
    for a, b in [(got, want), *((got["layers"][k], want["layers"][k]) for k in want["layers"])]:
        assert a["l2_distance"] == pytest.approx(b["l2_distance"], rel=1e-12)
        assert a["cosine_similarity"] == pytest.approx(b["cosine_similarity"], rel=1e-12)


def _evaluate(state, loader):
    model = TinyNet().double()
    model.load_state_dict(state)
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += float(F.cross_entropy(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
    return loss / seen, correct / seen


def test_interpolate_ends_at_both_models_and_restores():
    net, data, _, batch = _setup()
    state_a = state_copy(net)
    for _ in range(3):
        _sgd_step(net, batch)
    state_b = state_copy(net)
    assert not torch.equal(state_a["bn1.running_mean"], state_b["bn1.running_mean"])
    net.train()
    loader = ordered_loader(data, batch_size=16)
    rows = interpolate(net, state_a, state_b, loader, alphas=[0.0, 0.5, 1.0])
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    for row, state in ((rows[0], state_a), (rows[2], state_b)):
        loss, acc = _evaluate(state, loader)
        assert row["loss"] == pytest.approx(loss, rel=1e-12) and row["accuracy"] == acc
    mid = {k: (0.5 * v + 0.5 * state_b[k]) if v.is_floating_point() else v for k, v in state_a.items()}
    assert rows[1]["loss"] == pytest.approx(_evaluate(mid, loader)[0], rel=1e-12)
    after = state_copy(net)
    assert all(torch.equal(after[k], state_b[k]) for k in state_b) and net.training
    alphas = default_alphas()
    assert len(alphas) == 29 and alphas[0] == -0.2 and alphas[-1] == 1.2 and 0.0 in alphas and 1.0 in alphas
    assert len(interpolate(net, state_a, state_b, loader)) == 29


def test_interpolate_a_sparsified_model_leaves_it_alone():
    net, data, masks, batch = _setup()
    sparse = gx.sparsify(_pruned(net, masks), masks)
    state_a = state_copy(sparse)
    _sgd_step(sparse, batch)
    state_b = state_copy(sparse)
    loader = ordered_loader(data, batch_size=24)
    rows = interpolate(sparse, state_a, state_b, loader, alphas=[0, 1])
    assert rows[1]["loss"] == pytest.approx(_evaluate(state_b, loader)[0], rel=1e-9)
    assert all(torch.equal(v, state_b[k]) for k, v in state_copy(sparse).items())
    assert isinstance(sparse.conv2, gx.nn.SparseConv2d)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    net, data, masks, batch = _setup()
    other = gx.Masks({"conv9.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks: 'conv9.weight' is not a parameter"):
        masked_gradient_norms(net, other, batch)
    with pytest.raises(ValueError, match="masks: 'fc.weight' has shape"):
        masked_gradient_norms(net, {"fc.weight": torch.ones(5, 3, dtype=torch.bool)}, batch)
    sparse = gx.sparsify(net, masks)
    with pytest.raises(ValueError, match="masks: 'conv2.weight' differs from the sparse layer"):
        masked_gradient_norms(sparse, {"conv2.weight": ~masks["conv2.weight"]}, batch)
    bad = (batch[0].clone(), batch[1])
    bad[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch: the loss on it is not finite"):
        masked_gradient_norms(net, masks, bad)
    with pytest.raises(ValueError, match="batch must be an"):
        masked_gradient_norms(net, masks, batch[0])
    for every in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="every must be a positive int"):
            GradientFlow(batch, every=every)
    with pytest.raises(ValueError, match="batch must be an"):
        GradientFlow([batch[0]])
    init = state_copy(net)
    wrong = {**init, "fc.weight": torch.zeros(3, 3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="init_state: 'fc.weight' has shape"):
        distance_to_init(net, wrong)
    with pytest.raises(ValueError, match="init_state: it lacks 'fc.bias'"):
        distance_to_init(net, {k: v for k, v in init.items() if k != "fc.bias"})
    loader = ordered_loader(data)
    with pytest.raises(ValueError, match="state_a: it lacks"):
        interpolate(net, {k: v for k, v in init.items() if k != "bn1.running_var"}, init, loader)
    with pytest.raises(ValueError, match="state_b: 'fc.weight' has shape"):
        interpolate(net, init, wrong, loader)
    with pytest.raises(ValueError, match="state_b: 'extra' is not in the model's state dict"):
        interpolate(net, init, {**init, "extra": torch.zeros(1)}, loader)
    with pytest.raises(ValueError, match="alphas must be"):
        interpolate(net, init, init, loader, alphas=[0.0, float("nan")])
    with pytest.raises(ValueError, match="loader: it yielded no samples"):
        interpolate(net, init, init, [], alphas=[0.0])
    assert all(torch.equal(v, init[k]) for k, v in state_copy(net).items())  # restored after the failure too
