import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graspext import ops
from tests.conftest import DEVICES, hypothesis_settings, skip_without_kernel


def _reference(scores, num_remove, remove_largest):
    flat = torch.cat([s.flatten().cpu() for s in scores])
    key = -flat if remove_largest else flat
    removed = torch.zeros(flat.numel(), dtype=torch.bool)
    removed[torch.sort(key, stable=True).indices[:num_remove]] = True
    out, start = [], 0
    for s in scores:
        out.append(~removed[start:start + s.numel()].view(s.shape))
        start += s.numel()
    return out


def _select(scores, num_remove, remove_largest):
    n = sum(s.numel() for s in scores)
    k = n - num_remove + 1 if remove_largest else num_remove
    return ops.masks_from_threshold(scores, ops.global_kth_value(scores, k), num_remove, remove_largest)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("remove_largest", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_scores_exact_count(device, remove_largest, dtype):
    skip_without_kernel("masks_from_threshold", device)
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in [(64, 3, 3, 3), (0,), (200_000,), (10, 7)]]
    n = sum(s.numel() for s in scores)
    for r in [1, n // 10, n // 2, n - 1, n]:
        masks, kept = _select(scores, r, remove_largest)
        assert sum(int(m.sum()) for m in masks) == n - r
        assert kept.tolist() == [int(m.sum()) for m in masks]
        for m, want in zip(masks, _reference(scores, r, remove_largest)):
            assert m.dtype == torch.bool and torch.equal(m.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("remove_largest", [False, True])
def test_ties_removed_in_global_order(device, remove_largest):
    skip_without_kernel("masks_from_threshold", device)
    # Every score ties: exactly num_remove go, the earliest (tensor order, then flat order) first.
    scores = [torch.full((5,), 0.5, device=device), torch.full((3, 2), 0.5, device=device),
              torch.full((70_000,), 0.5, device=device)]
    for r in [0, 1, 4, 5, 6, 11, 12, 5000, 70_011]:
        masks, kept = ops.masks_from_threshold(scores, torch.tensor(0.5, device=device), r, remove_largest)
        flat = torch.cat([m.flatten() for m in masks]).cpu()
        assert int((~flat).sum()) == r
        assert not flat[:r].any() and flat[r:].all()
        assert kept.tolist() == [int(m.sum()) for m in masks]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_masks_identical_to_cpu(dtype):
    skip_without_kernel("masks_from_threshold", "cuda")
    # Few distinct values: many ties, spread over many blocks of each tensor.
    g = torch.Generator().manual_seed(3)
    scores = [torch.randint(0, 7, s, generator=g).to(dtype) for s in [(300, 3, 3, 3), (1,), (0,), (123_457,)]]
    n = sum(s.numel() for s in scores)
    for remove_largest in (False, True):
        for r in [1, n // 7, n // 2, n - 3]:
            cpu_masks, cpu_kept = _select(scores, r, remove_largest)
            cuda_masks, cuda_kept = _select([s.cuda() for s in scores], r, remove_largest)
            assert cuda_kept.device.type == "cuda" and torch.equal(cuda_kept.cpu(), cpu_kept)
            for a, b in zip(cpu_masks, cuda_masks):
                assert torch.equal(a, b.cpu())


@hypothesis_settings(60)
@given(
    values=st.lists(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 1.0, 3.5]), min_size=0, max_size=30),
                    min_size=1, max_size=5).filter(lambda ls: sum(map(len, ls)) > 0),
    remove_largest=st.booleans(),
    data=st.data(),
)
def test_property_heavy_ties(values, remove_largest, data):
    scores = [torch.tensor(v, dtype=torch.float64) for v in values]
    n = sum(s.numel() for s in scores)
    r = data.draw(st.integers(1, n))
    masks, _ = _select(scores, r, remove_largest)
    for m, want in zip(masks, _reference(scores, r, remove_largest)):
        assert torch.equal(m, want)


@pytest.mark.parametrize("device", DEVICES)
def test_inconsistent_threshold_raises(device):
    skip_without_kernel("masks_from_threshold", device)
    scores = [torch.arange(10.0, device=device)]
    with pytest.raises(RuntimeError, match="cannot remove exactly num_remove=2"):
        ops.masks_from_threshold(scores, torch.tensor(5.0, device=device), 2, False)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_raises(device):
    skip_without_kernel("masks_from_threshold", device)
    s = torch.arange(10.0)
    s[4] = float("nan")
    with pytest.raises(RuntimeError, match=r"scores\[0\] contains NaN or Inf"):
        ops.masks_from_threshold([s.to(device)], torch.tensor(2.0, device=device), 2, False)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_remove must be in \[0, 10\]"):
        ops.masks_from_threshold([torch.randn(10)], torch.tensor(0.0), 11)
    with pytest.raises(ValueError, match="threshold must hold one value"):
        ops.masks_from_threshold([torch.randn(10)], torch.zeros(2), 1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_without_kernel("masks_from_threshold", device)
    scores = [torch.randn(5, 3, device=device), torch.randn(8, device=device)]
    t = ops.global_kth_value(scores, 4)
    torch.library.opcheck(torch.ops.graspext.masks_from_threshold.default, (scores, t, 4, False))
