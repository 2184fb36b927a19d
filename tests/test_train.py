import json
import math
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import graspext as gx
from tests.conftest import SmallVGG
from tests.helpers import die_in_epoch


def _loaders(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator())
    test = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    return train, test


def _model_and_masks():
    torch.manual_seed(0)
    model = SmallVGG()
    train, _ = _loaders()
    masks = gx.prune(model, "snip", 0.9, next(iter(train)), seed=0)
    return model, masks


CFG = dict(epochs=4, lr=0.05, seed=3, progress=False)


def _metrics(history):
    """Everything but wall-clock throughput."""
    return [{k: v for k, v in r.items() if k != "train_images_per_s"} for r in history]


def _kill_and_resume(tmp_path, config):
    """Trains uninterrupted, then killed in epoch three and resumed from a fresh model; returns both runs'
    results and final state_dicts."""
    model, masks = _model_and_masks()
    full = gx.Trainer(model, *_loaders(), gx.TrainConfig(**config, out_dir=str(tmp_path / "full")), masks).fit()
    full_state = {k: v.clone() for k, v in model.state_dict().items()}

    model, masks = _model_and_masks()
    trainer = gx.Trainer(model, *_loaders(), gx.TrainConfig(**config, out_dir=str(tmp_path / "killed")), masks)
    die_in_epoch(trainer, 2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert not os.path.exists(tmp_path / "killed" / "summary.json")  # nothing looks complete
    assert len(open(tmp_path / "killed" / "results.jsonl").readlines()) == 2

    model, masks = _model_and_masks()  # a new process would rebuild everything
    resumed = gx.Trainer(model, *_loaders(), gx.TrainConfig(**config, out_dir=str(tmp_path / "killed")), masks).fit()
    return full, full_state, resumed, model.state_dict(), masks


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    full, full_state, resumed, resumed_state, _ = _kill_and_resume(tmp_path, CFG)
    assert _metrics(resumed.history) == _metrics(full.history)
    assert resumed.best_test_acc == full.best_test_acc and resumed.final_test_acc == full.final_test_acc
    for k, v in resumed_state.items():
        assert torch.equal(v, full_state[k]), k


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["dense", "sparse"])
def test_cuda_amp_keeps_masks_and_resumes_after_kill(tmp_path, monkeypatch, kernels):
    """AMP (float16 autocast + GradScaler, whose state is checkpointed) on CUDA, with masked dense layers or
    the CUDA sparse kernels (which compute in float16 under autocast, accumulating in float32)."""
    monkeypatch.setenv("GRASPEXT_CUDA_SPARSE", "1")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    # sparse_policy="sparse": every pruned layer on the CUDA kernels ("auto" keeps cuDNN on CUDA).
    config = {**CFG, "device": "cuda", "amp": True, "kernels": kernels, "sparse_policy": "sparse"}
    full, full_state, resumed, resumed_state, masks = _kill_and_resume(tmp_path, config)
    assert all(math.isfinite(r["train_loss"]) for r in full.history)
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]
    assert _metrics(resumed.history) == _metrics(full.history)
    for k, v in resumed_state.items():
        assert v.is_cuda and torch.equal(v, full_state[k]), k
    for name, mask in masks.items():
        assert not resumed_state[name][~mask.cuda()].any(), name
    assert torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["scaler"]["scale"] > 0


@pytest.mark.slow
def test_cpu_bf16_amp_tracks_float32_keeps_masks_and_resumes_after_kill(tmp_path):
    """amp="bf16" on the CPU: the sparse layers compute in bfloat16 (the report says so), the loss curve tracks
    the float32 run's, pruned weights stay exactly zero, and a run killed in epoch three resumes bit for bit."""
    config = {**CFG, "amp": "bf16", "kernels": "sparse", "sparse_policy": "sparse"}
    full, full_state, resumed, resumed_state, masks = _kill_and_resume(tmp_path, config)
    assert _metrics(resumed.history) == _metrics(full.history)
    for k, v in resumed_state.items():
        assert torch.equal(v, full_state[k]), k
    for name, mask in masks.items():
        assert not resumed_state[name][~mask].any(), name
    report = (tmp_path / "full" / "sparsity_report.txt").read_text()
    assert "bfloat16" in report and "float32 " not in report, report

    model, masks = _model_and_masks()
    fp32 = gx.train(model, *_loaders(), masks=masks, **{**config, "amp": False})
    # Stated bound: each epoch's mean training loss within 5 % (plus 0.02) of the float32 run's; bfloat16
    # rounds activations to 8 significant bits, so the curves drift apart slowly, not at once.
    for ours, ref in zip(full.history, fp32.history):
        assert abs(ours["train_loss"] - ref["train_loss"]) <= 0.05 * ref["train_loss"] + 0.02, (ours, ref)
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]


@pytest.mark.parametrize("change,message", [
    ({"amp": "bf16"}, "amp=False; this run has amp='bf16'"),
    ({"lr": 0.01}, "lr=0.05; this run has lr=0.01"),
    ({"weight_decay": 0.0}, "weight_decay=0.0005; this run has weight_decay=0.0"),
    ({"lr_milestones": (0.3,)}, r"lr_milestones=\(0.5, 0.75\); this run has lr_milestones=\(0.3,\)"),
    ({"batch_size": 32}, "train_batch_size=16; this run has train_batch_size=32"),
])
def test_resume_refuses_changed_settings(tmp_path, change, message):
    """A resumed run must train what it records: any changed training setting is refused, by name."""
    model, masks = _model_and_masks()
    gx.train(model, *_loaders(), masks=masks, out_dir=str(tmp_path), **{**CFG, "epochs": 2})
    model, masks = _model_and_masks()
    train, test = _loaders()
    config = {**CFG, "epochs": 2, **change}
    if "batch_size" in config:
        train = DataLoader(train.dataset, batch_size=config.pop("batch_size"), shuffle=True,
                           generator=torch.Generator())
    with pytest.raises(ValueError, match=message):
        gx.train(model, train, test, masks=masks, out_dir=str(tmp_path), **config)
    # Settings that change nothing that trains may differ.
    model, masks = _model_and_masks()
    gx.train(model, *_loaders(), masks=masks, out_dir=str(tmp_path), **{**CFG, "epochs": 2, "progress": True})


@pytest.mark.parametrize("name", ["lr", "lr_gamma", "momentum", "weight_decay"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_hyperparameters_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        gx.TrainConfig(**{name: value})


def test_numpy_scalars_are_accepted_as_numbers():
    import numpy as np

    config = gx.TrainConfig(lr=np.float32(0.05), weight_decay=np.float64(1e-4), momentum=np.float32(0.9))
    assert type(config.lr) is float and config.lr == pytest.approx(0.05)


@pytest.mark.slow
def test_result_files_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        model, masks = _model_and_masks()
        gx.train(model, *_loaders(), masks=masks, out_dir=str(tmp_path), **{**CFG, "epochs": 1})
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "results.jsonl", "results.csv", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.slow
def test_deterministic_masks_enforced_and_results_written(tmp_path):
    runs = []
    for name in ("a", "b"):
        model, masks = _model_and_masks()
        result = gx.train(model, *_loaders(), masks=masks, out_dir=str(tmp_path / name), **CFG)
        runs.append(result)
        params = dict(model.named_parameters())
        for n, m in masks.items():
            assert torch.all(params[n][~m] == 0), n
    assert _metrics(runs[0].history) == _metrics(runs[1].history)
    out = tmp_path / "a"
    lines = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert [r["lr"] for r in lines] == pytest.approx([0.05, 0.05, 0.005, 0.0005])  # x0.1 at 50 % and 75 %
    assert open(out / "results.csv").readline().startswith("epoch,lr,train_loss")
    summary = json.load(open(out / "summary.json"))
    assert summary["best_test_acc"] == max(r["test_acc"] for r in lines)


def test_bad_input(tmp_path):
    model, masks = _model_and_masks()
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        gx.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr_milestones must be fractions"):
        gx.TrainConfig(lr_milestones=(50, 75))
    with pytest.raises(TypeError, match="valid training options"):
        gx.train(model, *_loaders(), epoch=3)
    with pytest.raises(ValueError, match="amp must be False, 'bf16' or 'fp16'"):
        gx.TrainConfig(amp="bfloat16")
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        gx.Trainer(model, *_loaders(), gx.TrainConfig(amp=True))
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        gx.Trainer(gx.models.resnet20(), *_loaders(), gx.TrainConfig(), masks)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        gx.train(model, *_loaders(), masks=masks, out_dir=str(out), **CFG)
    gx.train(model, *_loaders(), masks=masks, out_dir=str(tmp_path / "other"), **{**CFG, "epochs": 1})
    other_masks = gx.prune(model, "random", 0.5, seed=1)
    with pytest.raises(ValueError, match="other masks"):
        gx.train(model, *_loaders(), masks=other_masks, out_dir=str(tmp_path / "other"), **{**CFG, "epochs": 1})


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, masks = _model_and_masks()
    gx.train(model, *_loaders(), masks=masks, out_dir=str(tmp_path), tensorboard=True, **{**CFG, "epochs": 2})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "test_acc" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("test_acc")] == [1, 2]


@pytest.mark.slow
def test_sparse_kernels_train_like_masked_dense_weights(tmp_path):
    """kernels='sparse' (only kept weights computed) and kernels='dense' (masked) follow the same run."""
    runs = {}
    for kernels in ("sparse", "dense"):
        model, masks = _model_and_masks()
        out = tmp_path / kernels
        result = gx.train(model, *_loaders(), masks=masks, out_dir=str(out), kernels=kernels,
                          sparse_policy="sparse", **{**CFG, "epochs": 2})
        runs[kernels] = (model, result)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["sparse_kernels"] == (kernels == "sparse")
        assert (out / "sparsity_report.txt").exists() == (kernels == "sparse")
        # Either way the caller gets back a plain model whose pruned weights are zero.
        assert not any(isinstance(m, (gx.nn.SparseConv2d, gx.nn.SparseLinear)) for m in model.modules())
        for name, mask in masks.items():
            assert not model.get_parameter(name)[~mask].any()
    sparse_hist, dense_hist = runs["sparse"][1].history, runs["dense"][1].history
    for a, b in zip(sparse_hist, dense_hist):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    for (name, p), (_, q) in zip(runs["sparse"][0].named_parameters(), runs["dense"][0].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("sparsity, sparse_kernels", [(0.1, False), (0.97, True)])
def test_auto_kernels_train_masked_dense_weights_where_sparse_layers_would_not_pay(sparsity, sparse_kernels):
    """On the CPU kernels='auto' sparsifies only when the cost model predicts the sparse layers to save
    AUTO_MIN_SAVING: sparse layers that run dense add a scatter and a gather to every step and save nothing."""
    torch.manual_seed(0)
    model = SmallVGG()
    masks = gx.prune(model, "random", sparsity, seed=0)
    saving = gx.nn.predicted_saving(model, masks)
    assert (saving >= gx.nn.convert.AUTO_MIN_SAVING) == sparse_kernels
    trainer = gx.Trainer(model, *_loaders(), gx.TrainConfig(**{**CFG, "epochs": 1}), masks)
    assert trainer.uses_sparse_kernels == sparse_kernels
    result = trainer.fit()
    assert result.summary["sparse_kernels"] == sparse_kernels
    for name, mask in masks.items():
        assert not model.get_parameter(name)[~mask].any()


def test_kernels_option_errors(tmp_path):
    model, masks = _model_and_masks()
    with pytest.raises(ValueError, match="kernels must be one of"):
        gx.TrainConfig(kernels="fast")
    with pytest.raises(ValueError, match="sparse_policy must be one of"):
        gx.TrainConfig(sparse_policy="measure")
    with pytest.raises(ValueError, match="kernels='sparse' needs masks"):
        gx.Trainer(model, *_loaders(), gx.TrainConfig(kernels="sparse"))
    out = str(tmp_path / "run")
    gx.train(model, *_loaders(), masks=masks, out_dir=out, kernels="sparse", **{**CFG, "epochs": 1})
    with pytest.raises(ValueError, match="trained with kernels=sparse; resume it the same way"):
        gx.train(model, *_loaders(), masks=masks, out_dir=out, kernels="dense", **{**CFG, "epochs": 1})


def test_a_model_that_is_the_layer_trains_with_its_pruned_weights_at_zero():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3 * 8 * 8, 10)
    x, y = torch.randn(64, 3 * 8 * 8), torch.randint(0, 10, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    masks = gx.prune(layer, "magnitude", 0.9)
    gx.train(layer, loader, loader, masks=masks, epochs=2, lr=0.1, progress=False)
    assert not layer.weight[~masks["weight"]].any()
    assert layer.weight[masks["weight"]].ne(0).all()
    with pytest.raises(ValueError, match="kernels='sparse' cannot train a model that is itself the masked layer"):
        gx.train(layer, loader, loader, masks=masks, epochs=1, kernels="sparse", progress=False)


def test_tied_weights_train_as_one_masked_tensor():
    from tests.conftest import TiedLinears

    torch.manual_seed(0)
    model = TiedLinears()
    masks = gx.prune(model, "magnitude", 0.5)
    gx.train(model, *_loaders(), masks=masks, epochs=1, lr=0.05, progress=False)
    assert model.b.weight is model.a.weight
    for name, mask in masks.items():
        assert not dict(model.named_parameters())[name][~mask].any(), name
    with pytest.raises(ValueError, match="kernels='sparse' cannot train tied weights"):
        gx.Trainer(model, *_loaders(), gx.TrainConfig(kernels="sparse"), masks)


def test_loaders_are_checked_before_training():
    model, masks = _model_and_masks()
    train, _ = _loaders()
    with pytest.raises(TypeError, match="test_loader must be an iterable of .* got NoneType"):
        gx.Trainer(model, train, None, gx.TrainConfig(**CFG), masks)


class _ReturnsDict(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = SmallVGG()

    def forward(self, x):
        return {"logits": self.net(x)}


class _ViewsItsFeatures(SmallVGG):
    def forward(self, x):
        flat = self.features(x).view(x.shape[0], -1)  # a [N, C, 2, 2] view: batch-innermost storage refuses it
        return self.classifier(flat[:, :self.classifier.in_features])


def test_user_mistakes_get_errors_that_name_them():
    """Labels out of range, a model returning a dict, and Tensor.view on the sparse layers' storage: each an
    error naming the mistake and the fix, in the trainer and in pruning."""
    train, test = _loaders()
    x, y = next(iter(train))
    bad_labels = DataLoader(TensorDataset(x, y + 10), batch_size=16)
    model, masks = _model_and_masks()
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 10\) .* got values in \[1"):
        gx.train(model, bad_labels, test, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 10\)"):
        gx.prune(model, "snip", 0.5, (x, y + 10))
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 10\)"):
        gx.prune(model, "grasp", 0.5, (x, y + 10), num_chunks=1)
    with pytest.raises(TypeError, match="model must return a logits tensor .* got a dict"):
        gx.train(_ReturnsDict(), train, test, epochs=1, progress=False)
    with pytest.raises(TypeError, match="model must return a logits tensor .* got a dict"):
        gx.prune(_ReturnsDict(), "snip", 0.5, (x, y))
    torch.manual_seed(0)
    viewing = _ViewsItsFeatures()
    masks = gx.prune(viewing, "magnitude", 0.9)
    with pytest.raises(RuntimeError, match=r"batch-innermost storage .* x.reshape"):
        gx.train(viewing, train, test, masks=masks, epochs=1, kernels="sparse", sparse_policy="sparse",
                 progress=False)
