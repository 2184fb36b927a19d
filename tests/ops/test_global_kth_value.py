import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graspext import ops
from tests.conftest import DEVICES, hypothesis_settings, skip_without_kernel


def _reference(scores, k):
    return torch.kthvalue(torch.cat([s.flatten().cpu() for s in scores]), k).values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", [[(1,)], [(10,)], [(3, 5), (0,), (64, 3, 3, 3), (1000,)], [(300_001,), (7, 7)]])
def test_matches_torch_kthvalue(device, dtype, shapes):
    skip_without_kernel("global_kth_value", device)
    g = torch.Generator().manual_seed(sum(map(len, shapes)))
    scores = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    n = sum(s.numel() for s in scores)
    for k in sorted({1, min(2, n), n // 3 + 1, n // 2 + 1, max(n - 1, 1), n}):
        got = ops.global_kth_value(scores, k)
        assert got.dtype == dtype and got.shape == () and got.device.type == device
        assert got.item() == _reference(scores, k).item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal_misaligned", "few_values"])
def test_cuda_many_tensors_stash_and_its_overflow(dtype, kind):
    """More tensors than one launch takes (48), large enough that the later passes read the stash of scores
    matching the first digit ("normal_misaligned", every other tensor starting off a 16-byte boundary), or find
    it overflowed and read everything again ("few_values": a third of the scores share the first digit)."""
    skip_without_kernel("global_kth_value", "cuda")
    g = torch.Generator().manual_seed(7)
    sizes = [int(s) for s in torch.randint(1, 40_000, (100,), generator=g)]
    if kind == "few_values":
        scores = [torch.randint(0, 3, (s,), generator=g).to(dtype) for s in sizes]
    else:
        scores = [torch.randn(s, generator=g, dtype=dtype) for s in sizes]
    n = sum(sizes)

    def to_gpu(i, s):  # every other tensor a view starting one element into its storage
        if kind == "few_values" or i % 2 == 0:
            return s.cuda()
        storage = torch.empty(s.numel() + 1, dtype=dtype, device="cuda")
        storage[1:] = s.cuda()
        return storage[1:]

    on_gpu = [to_gpu(i, s) for i, s in enumerate(scores)]
    for k in [1, n // 50, n // 2, n - n // 50, n]:
        assert ops.global_kth_value(on_gpu, k).item() == _reference(scores, k).item()


@hypothesis_settings(60)
@given(
    values=st.lists(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=40),
                    min_size=1, max_size=5).filter(lambda ls: sum(map(len, ls)) > 0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
)
def test_property_with_ties_signed_zeros_and_extremes(values, dtype, data):
    scores = [torch.tensor(v, dtype=dtype) for v in values]
    n = sum(s.numel() for s in scores)
    k = data.draw(st.integers(1, n))
    assert ops.global_kth_value(scores, k).item() == _reference(scores, k).item()


@pytest.mark.parametrize("device", DEVICES)
def test_many_ties_and_negative_zero(device):
    skip_without_kernel("global_kth_value", device)
    scores = [torch.tensor([0.0, -0.0, 1.0, 1.0, -1.0], device=device), torch.tensor([-0.0, 1.0, 1.0], device=device)]
    for k in range(1, 9):
        assert ops.global_kth_value(scores, k).item() == _reference(scores, k).item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_raises_naming_tensor(bad, dtype, device):
    skip_without_kernel("global_kth_value", device)
    scores = [torch.randn(10, dtype=dtype), torch.randn(5, dtype=dtype)]
    scores[1][3] = bad
    scores = [s.to(device) for s in scores]
    with pytest.raises(RuntimeError, match=r"scores\[1\] contains 1 NaN or Inf"):
        ops.global_kth_value(scores, 3)


@pytest.mark.parametrize("k", [0, 16, -1])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, 15\]"):
        ops.global_kth_value([torch.randn(10), torch.randn(5)], k)


def test_bad_lists():
    with pytest.raises(TypeError, match="scores must be a list"):
        ops.global_kth_value(torch.randn(3), 1)
    with pytest.raises(TypeError, match=r"scores\[1\] has dtype"):
        ops.global_kth_value([torch.randn(3), torch.randn(3, dtype=torch.float64)], 1)
    with pytest.raises(TypeError, match=r"scores\[0\] must be float32 or float64"):
        ops.global_kth_value([torch.randn(3).half()], 1)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.graspext.global_kth_value([torch.randn(3)], 4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_without_kernel("global_kth_value", device)
    scores = [torch.randn(5, 3, device=device), torch.randn(8, device=device)]
    torch.library.opcheck(torch.ops.graspext.global_kth_value.default, (scores, 7))


def test_torch_compile_traces_through_fake_kernel():
    @torch.compile(backend="eager", fullgraph=True)
    def f(a, b):
        return torch.ops.graspext.global_kth_value([a * 2, b], 3)

    a, b = torch.randn(4), torch.randn(6)
    assert f(a, b).item() == _reference([a * 2, b], 3).item()
