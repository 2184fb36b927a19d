import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import graspext as gx
from graspext.pruning import data as D
from graspext.testing.official import grasp_official
from tests.conftest import DEVICES, class_sorted_batch


def _agreement(a, b):
    return sum(int((a[n] & b[n]).sum()) for n in a) / a.num_kept()


def _loader(n=120, num_classes=10, size=8, batch_size=32, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_identical_to_official_loop_float64(make_model, kind, sparsity):
    model = make_model(kind, dtype=torch.float64)
    x, y = class_sorted_batch(per_class=4, dtype=torch.float64)
    ours = gx.prune(model, "grasp", sparsity, (x, y), seed=3)
    ref = grasp_official(model, sparsity, [(x, y)], reinit_generator=torch.Generator().manual_seed(3))
    assert list(ours) == list(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    assert ours.num_total() - ours.num_kept() == int(ours.num_total() * sparsity)


def test_loader_class_balanced_iterations_match_official(make_model):
    model = make_model("vgg", dtype=torch.float64)
    loader = _loader()
    ours = gx.prune(model, "grasp", 0.9, loader, samples_per_class=2, iterations=2, num_classes=10, seed=1)
    sets = [D.class_balanced_batch(loader, 10, 2) for _ in range(2)]
    ref = grasp_official(model, 0.9, sets, reinit_generator=torch.Generator().manual_seed(1))
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


def test_reinit_off_and_temperature_match_official(make_model):
    model = make_model("resnet", dtype=torch.float64)
    x, y = class_sorted_batch(per_class=3, dtype=torch.float64)
    ours = gx.prune(model, "grasp", 0.8, (x, y), reinit_linear=False, temperature=1.0)
    ref = grasp_official(model, 0.8, [(x, y)], reinit=False, temperature=1.0)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


def test_official_selection_differs_only_by_its_off_by_one(make_model):
    # The official `<=` test keeps the k-th largest score itself: it removes one weight fewer than asked.
    # Otherwise (no ties at the threshold) the two selections agree exactly.
    model = make_model("vgg", dtype=torch.float64)
    x, y = class_sorted_batch(per_class=4, dtype=torch.float64)
    ours = gx.prune(model, "grasp", 0.9, (x, y), seed=0)
    ref = grasp_official(model, 0.9, [(x, y)], reinit_generator=torch.Generator().manual_seed(0), exact_count=False)
    extra_kept = sum(int((ref[n] & ~ours[n]).sum()) for n in ref)
    missing = sum(int((ours[n] & ~ref[n]).sum()) for n in ref)
    assert (extra_kept, missing) == (1, 0)


@pytest.mark.parametrize("engine", ["forward_over_reverse", "finite_difference"])
@pytest.mark.parametrize("kind", ["vgg", "resnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_engines_keep_99_percent_of_exact_at_90(make_model, engine, kind, dtype):
    model = make_model(kind, dtype=dtype, width=16)
    x, y = class_sorted_batch(per_class=10, dtype=dtype)
    exact = gx.prune(model, "grasp", 0.9, (x, y), seed=0)
    fast = gx.prune(model, "grasp", 0.9, (x, y), seed=0, engine=engine)
    assert _agreement(exact, fast) >= 0.99


def test_finite_difference_needs_frozen_activations_in_float32(make_model):
    # Without freezing, the difference quotient crosses ReLU/max-pool kinks: far from autograd's Hg.
    model = make_model("vgg", width=16)
    x, y = class_sorted_batch(per_class=10)
    exact = gx.prune(model, "grasp", 0.9, (x, y), seed=0)
    loose = gx.prune(model, "grasp", 0.9, (x, y), seed=0, engine="finite_difference", fd_freeze_activations=False)
    assert _agreement(exact, loose) < 0.95


def test_scores_sign_convention(make_model):
    # GraSP removes its largest scores: every kept score is <= every removed score.
    model = make_model("vgg", dtype=torch.float64)
    x, y = class_sorted_batch(dtype=torch.float64)
    s = gx.scores(model, "grasp", (x, y), seed=0)
    m = gx.prune(model, "grasp", 0.7, (x, y), seed=0)
    kept = torch.cat([s[n][m[n]] for n in s])
    removed = torch.cat([s[n][~m[n]] for n in s])
    assert kept.max() <= removed.min()


@pytest.mark.parametrize("method, options", [
    ("grasp", {}), ("grasp", {"engine": "forward_over_reverse"}), ("grasp", {"engine": "finite_difference"}),
    ("grasp", {"rounds": 2}), ("snip", {}), ("snip", {"rounds": 2}), ("synflow", {"rounds": 2}),
    ("magnitude", {}), ("random", {}),
])
def test_model_not_modified(make_model, method, options):
    model = make_model("vgg")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    gx.prune(model, method, 0.9, class_sorted_batch(), **options)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device_and_masks_stay_there(make_model, device):
    model = make_model("vgg").to(device)
    masks = gx.prune(model, "grasp", 0.9, class_sorted_batch(), seed=0)
    assert all(m.device.type == device for m in masks.values())


@pytest.mark.cuda
@pytest.mark.parametrize("method,options", [
    ("grasp", {"seed": 0}), ("grasp", {"engine": "finite_difference", "seed": 0}), ("snip", {"seed": 0}),
    ("synflow", {}), ("random", {"seed": 0}),
])
def test_cuda_masks_identical_to_cpu_in_float64(make_model, monkeypatch, method, options):
    """Seeded draws (re-initialization, random scores) come from a CPU generator, and in float64 the two
    devices' arithmetic differs by far less than the gaps between neighbouring scores."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model = make_model("vgg").double()
    x, y = class_sorted_batch(dtype=torch.float64)
    cpu_masks = gx.prune(model, method, 0.9, (x, y), **options)
    cuda_masks = gx.prune(model.cuda(), method, 0.9, (x.cuda(), y.cuda()), **options)
    for name, mask in cpu_masks.items():
        assert torch.equal(mask, cuda_masks[name].cpu()), name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("num_chunks", [2, 3])
def test_cuda_graphs_scores_identical_to_eager(make_model, monkeypatch, dtype, num_chunks):
    """The captured double backward replays the eager loop's kernels: the same scores, bit for bit, and so the
    same masks; with 3 chunks of 40 samples the last chunk has another shape and runs eagerly."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    x, y = class_sorted_batch(dtype=dtype)
    for kind in ("vgg", "resnet"):
        model = make_model(kind).to(dtype).cuda()
        data = (x.cuda(), y.cuda())
        eager = gx.scores(model, "grasp", data, seed=0, num_chunks=num_chunks)
        graphed = gx.scores(model, "grasp", data, seed=0, num_chunks=num_chunks, cuda_graphs=True)
        for name in eager:
            assert torch.equal(eager[name], graphed[name]), (kind, name)


def test_bad_options(make_model):
    model = make_model("vgg")
    data = class_sorted_batch()
    with pytest.raises(ValueError, match="cuda_graphs applies to engine='exact'"):
        gx.prune(model, "grasp", 0.9, data, engine="finite_difference", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device, got cpu"):
        gx.prune(model, "grasp", 0.9, data, cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs must be"):
        gx.prune(model, "grasp", 0.9, data, cuda_graphs=1)
    with pytest.raises(ValueError, match="engine must be one of"):
        gx.prune(model, "grasp", 0.9, data, engine="magic")
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        gx.prune(model, "grasp", 0.9, data, temperature=0)
    with pytest.raises(ValueError, match="num_chunks must be an int >= 1"):
        gx.prune(model, "grasp", 0.9, data, num_chunks=0)
    with pytest.raises(ValueError, match="num_chunks=41 exceeds the 40 scoring samples"):
        gx.prune(model, "grasp", 0.9, data, num_chunks=41)
    with pytest.raises(ValueError, match="pair is used exactly as given"):
        gx.prune(model, "grasp", 0.9, data, iterations=2)
    with pytest.raises(TypeError, match="unknown option.*'temprature'.*for method 'grasp'"):
        gx.prune(model, "grasp", 0.9, data, temprature=100)


def test_too_small_loader(make_model):
    model = make_model("vgg")
    loader = _loader(n=30, dtype=torch.float32)
    with pytest.raises(ValueError, match="data: the loader ran out after 30 samples.*samples_per_class=10"):
        gx.prune(model, "grasp", 0.9, loader, samples_per_class=10)
    with pytest.raises(ValueError, match="data: the loader yielded no samples"):
        gx.prune(model, "grasp", 0.9, DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0).long())))


def test_nan_scores_raise(make_model):
    model = make_model("vgg")
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        gx.prune(model, "grasp", 0.9, class_sorted_batch())
