"""gx.pruning.masks_from_scores: one scoring, masks at several sparsities, identical to prune's."""

import math

import pytest
import torch

import graspext as gx
from graspext.pruning import masks_from_scores
from tests.helpers import tiny_data, tiny_net


def _batch():
    data = tiny_data(torch.float32, n=20)
    return data.tensors


@pytest.mark.parametrize("method", ["grasp", "snip", "magnitude"])
@pytest.mark.parametrize("scope,distribution", [("global", "uniform"), ("layerwise", "uniform"),
                                                ("layerwise", "erk")])
def test_masks_equal_prunes(method, scope, distribution):
    model = tiny_net(torch.float32)
    batch = _batch()
    options = {"seed": 0} if method != "magnitude" else {}  # the same re-initialization draw in both calls
    scores = gx.scores(model, method, batch, **options)
    for sparsity in (0.5, 0.9, 0.97):
        expected = gx.prune(model, method, sparsity, batch, scope=scope, distribution=distribution,
                            on_collapse="ignore", **options)
        got = masks_from_scores(scores, method, sparsity, scope=scope, distribution=distribution, on_collapse="ignore")
        assert got.meta["collapsed_layers"] == expected.meta["collapsed_layers"]
        assert list(got) == list(expected)
        for name in expected:
            assert torch.equal(got[name], expected[name]), (name, sparsity)
        assert got.meta["scope"] == scope and got.meta["sparsity"] == sparsity
        assert got.num_total() - got.num_kept() == math.floor(sparsity * got.num_total() + 1e-6)


def test_grasp_removes_largest():
    scores = {"a.weight": torch.tensor([3.0, -1.0, 2.0, 0.5])}
    masks = masks_from_scores(scores, "GraSP", 0.5)
    assert masks["a.weight"].tolist() == [False, True, False, True]
    masks = masks_from_scores(scores, "snip", 0.5)
    assert masks["a.weight"].tolist() == [True, False, True, False]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"method": "obd"}, ValueError, "method must be one of"),
    ({"sparsity": 1.0}, ValueError, "sparsity must be in"),
    ({"scope": "per_layer"}, ValueError, "scope must be one of"),
    ({"distribution": "erk"}, ValueError, "distribution applies to scope='layerwise' only"),
    ({"scores": {}}, ValueError, "scores is empty"),
    ({"scores": {"a.weight": torch.ones(3, dtype=torch.int64)}}, TypeError, "floating-point tensors"),
    ({"scores": [torch.ones(3)]}, TypeError, "scores must map parameter names"),
])
def test_bad_input(kwargs, error, match):
    args = {"scores": {"a.weight": torch.randn(8)}, "method": "grasp", "sparsity": 0.5} | kwargs
    sparsity, method, scores = args.pop("sparsity"), args.pop("method"), args.pop("scores")
    with pytest.raises(error, match=match):
        masks_from_scores(scores, method, sparsity, **args)


def test_nan_score_is_refused():
    with pytest.raises(RuntimeError, match="(?i)nan|finite"):
        masks_from_scores({"a.weight": torch.tensor([1.0, float("nan"), 2.0])}, "snip", 0.5)
