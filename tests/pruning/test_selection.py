import copy
import math

import pytest
import torch
from torch import nn

import graspext as gx
from graspext.pruning.selection import erk_densities, layer_removals, num_to_remove
from tests.conftest import class_sorted_batch
from tests.pruning.rounds import assert_round_counts, assert_rounds_nested, masks_by_round, record_round_masks, revivals


@pytest.mark.parametrize("method", ["grasp", "snip", "synflow", "magnitude", "random"])
@pytest.mark.parametrize("scope, distribution", [("global", "uniform"), ("layerwise", "uniform"),
                                                 ("layerwise", "erk")])
def test_every_method_and_scope_removes_exact_count(make_model, method, scope, distribution):
    model = make_model("resnet")
    masks = gx.prune(model, method, 0.9, class_sorted_batch(), scope=scope, distribution=distribution,
                     **({"rounds": 3} if method == "synflow" else {}), on_collapse="ignore")
    assert masks.num_total() - masks.num_kept() == num_to_remove(masks.num_total(), 0.9)


def test_layerwise_uniform_density_per_layer(make_model):
    model = make_model("vgg")
    masks = gx.prune(model, "magnitude", 0.75, scope="layerwise")
    for name, d in masks.layer_densities().items():
        assert abs(d - 0.25) <= 1.0 / masks[name].numel() + 1e-9, name


def test_erk_formula_and_dense_capping():
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    dens = erk_densities(shapes, 0.1)
    sizes = [math.prod(s) for s in shapes]
    assert abs(sum(d * n for d, n in zip(dens, sizes)) - 0.1 * sum(sizes)) < 1e-6 * sum(sizes)
    raw = [sum(s) / math.prod(s) for s in shapes]
    free = [i for i, d in enumerate(dens) if d < 1]
    ratios = {round(dens[i] / raw[i], 9) for i in free}
    assert len(ratios) == 1  # density proportional to the ERK raw probability
    high = erk_densities([(4, 3, 3, 3), (512, 512, 3, 3)], 0.5)
    assert high[0] == 1.0 and high[1] < 0.5


def test_layer_removals_exact_total():
    sizes = [10, 33, 1000, 7]
    densities = [0.1, 0.37, 0.05, 1.0]
    counts = layer_removals(sizes, densities, 980)  # ideal 9 + 20.79 + 950 + 0 = 979.79
    assert counts == [9, 21, 950, 0]
    capped = layer_removals(sizes, densities, 1040)  # more than the densities ask: spread, never past a layer
    assert sum(capped) == 1040 and capped[3] == 0
    assert all(0 <= c <= n for c, n in zip(capped, sizes))
    with pytest.raises(ValueError, match="cannot remove 1044"):
        layer_removals(sizes, densities, 1044)
    floored = layer_removals(sizes, densities, 980, minimum=[10, 0, 900, 0])
    assert sum(floored) == 980 and floored[0] == 10 and floored[2] >= 900


def test_round_checks_catch_a_revived_weight_swapped_for_another():
    """The round comparison fails on a revival hidden behind unchanged totals (one weight back, another gone)."""
    old = [torch.tensor([True, True, False, False]), torch.tensor([[True, False], [False, True]])]
    swapped = [torch.tensor([True, False, True, False]), old[1].clone()]  # index 2 revived, index 1 dropped
    assert sum(int(m.sum()) for m in swapped) == sum(int(m.sum()) for m in old)
    assert revivals(old, swapped) == [(0, 1)]
    with pytest.raises(AssertionError, match=r"round 2 revives .*\[\(0, 1\)\]"):
        assert_rounds_nested([old, swapped])
    nested = [torch.tensor([True, False, False, False]), torch.tensor([[True, False], [False, False]])]
    assert revivals(old, nested) == []
    assert_rounds_nested([old, nested, nested])
    with pytest.raises(AssertionError):
        assert_rounds_nested([nested, old])  # growing back is a revival too


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_layerwise_iterative_rounds_are_monotone_and_exact(make_model, monkeypatch, distribution):
    model = make_model("resnet")
    calls = record_round_masks(monkeypatch)
    masks = gx.prune(model, "synflow", 0.95, input_shape=(3, 8, 8), rounds=7, scope="layerwise",
                     distribution=distribution, on_collapse="ignore")
    names = list(masks)
    assert len(calls) == 7 * len(names)  # one selection per layer per round
    for got, num_remove in calls:
        assert len(got) == 1 and got[0].numel() - int(got[0].sum()) == num_remove
    rounds = masks_by_round(calls, len(names), 7)
    for r, round_masks in enumerate(rounds):
        assert [tuple(m.shape) for m in round_masks] == [tuple(masks[n].shape) for n in names], r
    assert_rounds_nested(rounds)
    assert_round_counts(rounds, 0.95)
    assert all(torch.equal(masks[n], rounds[-1][i].to(masks[n].device)) for i, n in enumerate(names))
    assert masks.num_total() - masks.num_kept() == num_to_remove(masks.num_total(), 0.95)


def test_layer_collapse_detected(make_model):
    model = make_model("vgg")
    with torch.no_grad():
        model.features[0].weight.mul_(1e-6)  # magnitude pruning will empty the first layer
    with pytest.warns(gx.LayerCollapseWarning, match="features.0.weight"):
        masks = gx.prune(model, "magnitude", 0.99)
    assert "features.0.weight" in masks.collapsed_layers()
    assert masks.meta["collapsed_layers"] == masks.collapsed_layers()
    assert "collapsed" in masks.summary()
    with pytest.raises(RuntimeError, match="layer collapse"):
        gx.prune(model, "magnitude", 0.99, on_collapse="raise")


def test_layer_selection_options(make_model):
    model = make_model("vgg")
    all_names = list(gx.prune(model, "magnitude", 0.5))
    assert all_names[0] == "features.0.weight" and all_names[-1] == "classifier.weight"
    assert list(gx.prune(model, "magnitude", 0.5, keep_first_dense=True)) == all_names[1:]
    assert list(gx.prune(model, "magnitude", 0.5, keep_last_dense=True)) == all_names[:-1]
    assert list(gx.prune(model, "magnitude", 0.5, exclude="classifier*")) == all_names[:-1]
    only_linear = gx.prune(model, "magnitude", 0.5, filter_fn=lambda m, n: isinstance(m, nn.Linear))
    assert list(only_linear) == ["classifier.weight"]


@pytest.mark.parametrize("keep", [{"keep_first_dense": True}, {"keep_last_dense": True},
                                  {"keep_first_dense": True, "keep_last_dense": True}])
def test_keep_dense_options_agree_on_a_one_layer_model(keep):
    """keep_first_dense and keep_last_dense both keep the only layer dense, so nothing is left to prune: an
    error naming the option, never a pruned 'kept' layer."""
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="leave no layer to prune: the model has 1 prunable layer"):
        gx.prune(model, "magnitude", 0.5, **keep)
    two = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="keep_first_dense and keep_last_dense leave no layer"):
        gx.prune(two, "magnitude", 0.5, keep_first_dense=True, keep_last_dense=True)
    if len(keep) == 1:
        assert list(gx.prune(two, "magnitude", 0.5, **keep)) == (["1.weight"] if "keep_first_dense" in keep
                                                                  else ["0.weight"])


def test_exclude_patterns_that_match_nothing_are_refused(make_model):
    model = make_model("vgg")
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) \['clasifier\*'\] match no module"):
        gx.prune(model, "magnitude", 0.5, exclude=["features.0", "clasifier*"])


@pytest.mark.parametrize("sparsity, match", [(1.0, r"sparsity must be in \[0, 1\)"), (-0.1, r"\[0, 1\)"),
                                             (float("nan"), r"\[0, 1\)"), (True, "sparsity must be a number"),
                                             ("0.9", "sparsity must be a number")])
def test_bad_sparsity(make_model, sparsity, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gx.prune(make_model("vgg"), "magnitude", sparsity)


def test_bad_arguments(make_model):
    model = make_model("vgg")
    with pytest.raises(ValueError, match="method must be one of"):
        gx.prune(model, "obd", 0.5)
    with pytest.raises(ValueError, match="scope must be one of"):
        gx.prune(model, "magnitude", 0.5, scope="blockwise")
    with pytest.raises(ValueError, match="distribution applies to scope='layerwise'"):
        gx.prune(model, "magnitude", 0.5, distribution="erk")
    with pytest.raises(ValueError, match="model: no prunable layer"):
        gx.prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "magnitude", 0.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gx.prune("vgg", "magnitude", 0.5)
    with pytest.raises(ValueError, match="data: this method needs data"):
        gx.prune(model, "snip", 0.5)
    with pytest.raises(TypeError, match="data must be a DataLoader"):
        gx.prune(model, "snip", 0.5, data=torch.randn(4, 3, 8, 8))
    with pytest.raises(TypeError, match="data: targets must be integer class indices"):
        gx.prune(model, "snip", 0.5, data=(torch.randn(4, 3, 8, 8), torch.randn(4)))
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        gx.prune(model, "magnitude", 0.5, rounds=0)
    with pytest.raises(TypeError, match="unknown option"):
        gx.prune(model, "magnitude", 0.5, seed=3)


def test_zero_sparsity_keeps_everything(make_model):
    masks = gx.prune(make_model("vgg"), "magnitude", 0.0)
    assert masks.density() == 1.0


def test_scores_api(make_model):
    model = make_model("vgg")
    s = gx.scores(model, "magnitude")
    params = dict(model.named_parameters())
    for n, t in s.items():
        assert torch.equal(t, params[n].detach().abs())
    masks = gx.prune(model, "magnitude", 0.5)
    s2 = gx.scores(model, "snip", class_sorted_batch(), masks=masks, seed=0)
    for n, t in s2.items():
        assert torch.all(t[~masks[n]] == 0)


def test_a_wrong_kernel_count_raises_instead_of_returning_masks(monkeypatch):
    from graspext import ops
    from graspext.pruning import selection

    real = ops.masks_from_threshold

    def faulty(*args):
        masks, kept = real(*args)
        masks[0].view(-1)[0] = ~masks[0].view(-1)[0]  # one flipped entry, counts as reported before
        return masks, kept

    monkeypatch.setattr(selection.ops, "masks_from_threshold", faulty)
    scores = [torch.randn(20), torch.randn(7, 3)]
    with pytest.raises(RuntimeError, match="bug in graspext"):
        selection.select_masks(scores, 10, remove_largest=True)


@pytest.mark.parametrize("method", ["grasp", "snip", "synflow", "magnitude", "random"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_scored_in_float32(make_model, method, dtype):
    """Scores of a float16/bfloat16 model are computed in float32 (GraSP's ~1e-9 scores underflow to zero in
    float16): the masks are those of the same values in float32, so reduced precision removes no layer that
    float32 keeps."""
    from tests.conftest import class_sorted_batch

    half = make_model("vgg").to(dtype)
    same_values = copy.deepcopy(half).float()
    data = class_sorted_batch()
    options = {"seed": 0} if method in ("grasp", "snip", "random") else {}
    ours = gx.prune(half, method, 0.9, data, **options)
    ref = gx.prune(same_values, method, 0.9, data, **options)
    assert list(ours) == list(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    assert ours.collapsed_layers() == ref.collapsed_layers()
    if method == "grasp":
        assert not ours.collapsed_layers()
    assert all(p.dtype == dtype for p in half.parameters())  # the caller's model is untouched


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_tied_weights_get_one_mask(method):
    """One tensor, one mask: a weight shared by two modules is counted once, masked once (under the name
    named_parameters() gives it), and the masks fit the model they came from."""
    from tests.conftest import TiedLinears

    torch.manual_seed(0)
    model = TiedLinears()
    masks = gx.prune(model, method, 0.5, **({"seed": 0} if method == "random" else {}))
    assert list(masks) == ["a.weight", "c.weight"]
    assert masks.num_total() == 8 * 8 + 10 * 8
    masks.check_fits(model)
    masks.apply_(model).remove()
    assert model.b.weight is model.a.weight and not model.b.weight[~masks["a.weight"]].any()


def test_reparametrized_layers_are_refused_by_name(make_model):
    model = make_model("vgg")
    torch.nn.utils.prune.l1_unstructured(model.features[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"layer 'features.0' computes its weight .*prune.remove"):
        gx.prune(model, "magnitude", 0.5)
    assert "features.0.weight" not in gx.prune(model, "magnitude", 0.5, exclude="features.0")


def test_numpy_sparsity_is_a_number(make_model):
    import numpy as np

    masks = gx.prune(make_model("vgg"), "magnitude", np.float32(0.5))
    assert masks.sparsity() == pytest.approx(0.5, abs=1e-3)


class _UnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(12, 10)
        self.spare = nn.Linear(12, 10)  # never called

    def forward(self, x):
        return self.used(x.flatten(1)[:, :12])


@pytest.mark.parametrize("method", ["grasp", "snip"])
def test_unused_and_meta_layers_are_named(method):
    from tests.conftest import class_sorted_batch

    data = class_sorted_batch()
    with pytest.raises(ValueError, match=r"spare.weight is not used by the forward pass .*exclude='spare'"):
        gx.prune(_UnusedLayer(), method, 0.5, data, **({"num_chunks": 1} if method == "grasp" else {}))
    assert "used.weight" in gx.prune(_UnusedLayer(), method, 0.5, data, exclude="spare",
                                     **({"num_chunks": 1} if method == "grasp" else {}))
    with torch.device("meta"):
        meta = _UnusedLayer()
    with pytest.raises(ValueError, match="meta device"):
        gx.prune(meta, method, 0.5, data)
