"""The ImageNet-shape GPU workloads (benchmarks/imagenet_workloads.py), built at CPU-test scale: the masks are
gx.prune's, the layer cases compute what dense torch computes, and the train step trains."""

import dataclasses

import pytest
import torch

import graspext as gx

import imagenet_workloads as W

TINY = dataclasses.replace(W.WORKLOADS["resnet50"], batch=4, image=32, classes=10, samples_per_class=2,
                           scoring_chunks=2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASPEXT_BENCH_CACHE", str(tmp_path))


def test_scoring_batch_is_class_balanced():
    x, y = W.scoring_batch(TINY)
    assert x.shape == (20, 3, 32, 32)
    assert torch.equal(torch.bincount(y), torch.full((10,), 2))


def test_masks_are_prunes_and_cached(tmp_path):
    x, y = W.scoring_batch(TINY)
    masks = W.grasp_masks(TINY, 0.98, "global")
    assert len(list(tmp_path.glob("*.pt"))) == len(W.SPARSITIES) * len(W.SCOPES)
    expected = gx.prune(W.model(TINY), "grasp", 0.98, (x, y), num_chunks=TINY.scoring_chunks, seed=0,
                        distributed=False, on_collapse="ignore")
    assert list(masks) == list(expected)
    assert all(torch.equal(masks[n], expected[n]) for n in expected)
    layerwise = W.grasp_masks(TINY, 0.9, "layerwise")  # read back from the cache
    for name, density in layerwise.layer_densities().items():
        assert density == pytest.approx(0.1, abs=2 / layerwise[name].numel() + 1e-9), name
    assert W.grasp_masks(TINY, 0.95).num_kept() == pytest.approx(0.05 * masks.num_total(), abs=1)


def test_bad_sparsity_or_scope():
    with pytest.raises(ValueError, match="sparsity must be one of"):
        W.grasp_masks(TINY, 0.5)
    with pytest.raises(ValueError, match="scope one of"):
        W.grasp_masks(TINY, 0.9, "per_layer")


def test_conv_layers_and_largest_stages():
    layers = W.conv_layers(TINY)
    assert layers["3->64 k7 s2 32x32"] == ("conv1", (4, 3, 32, 32))
    assert all(shape[0] == TINY.batch for _, shape in layers.values())
    largest = W.largest_stage_3x3(TINY)
    # ResNet-50 v1.5: layer3's and layer4's 3x3 convolutions, each once with stride 2 and once with stride 1.
    assert sorted(W.parse_key(k)[:4] for k in largest) == [(256, 256, 3, 1), (256, 256, 3, 2), (512, 512, 3, 1),
                                                           (512, 512, 3, 2)]
    assert all(layers[k][0].startswith(("layer3", "layer4")) for k in largest)
    vgg = dataclasses.replace(W.WORKLOADS["vgg16_bn"], image=32, classes=10)
    assert {W.parse_key(k)[1] for k in W.largest_stage_3x3(vgg)} == {512}
    assert len(W.conv_layers(vgg)) == 9  # 13 convolutions, 9 distinct (in, out, size)


def test_parse_key():
    assert W.parse_key("256->512 k3 s2 28x28") == (256, 512, 3, 2, 28)


@pytest.mark.parametrize("key", ["3->64 k7 s2 32x32", "256->256 k3 s2 4x4", "1024->256 k1 s1 2x2"])
def test_layer_case_matches_dense(key):
    case = W.conv_case(TINY, key, 0.9, "cpu")
    assert case.density == pytest.approx(0.1, abs=1e-3)
    case.dense()
    case.sparse()
    torch.testing.assert_close(case.values.grad, case.pattern.gather(case.weight.grad), rtol=1e-4, atol=1e-4)
    if case.needs_input_grad:
        torch.testing.assert_close(case.x_sparse.grad, case.x.grad, rtol=1e-4, atol=1e-4)
    case.compact()
    case.dense_bf16()
    case.sparse_bf16()
    assert case.sparse_macs < case.dense_macs


def test_train_step_trains():
    step = W.ImageNetStep(TINY, 0.9, "cpu", policy="auto")
    assert any(isinstance(m, gx.nn.SparseConv2d) for m in step.model.modules())
    before = [p.detach().clone() for p in step.model.parameters()]
    step.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, step.model.parameters()))
    dense = W.ImageNetStep(TINY, None, "cpu", amp=True, channels_last=True)
    dense.step()
