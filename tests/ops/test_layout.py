"""The layout conversion ops between NCHW and [H, W, C, N] storage against torch's permute copies."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graspext.nn.layout import is_batch_innermost
from tests.conftest import hypothesis_settings

_ops = torch.ops.graspext


def _hwcn(x):
    return x.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


@hypothesis_settings(50)
@given(n=st.integers(1, 40), c=st.integers(1, 40), h=st.integers(1, 9), w=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]))
def test_round_trip_equals_permute(n, c, h, w, dtype, layout):
    x = (torch.randn(n, c, h, w * 2) * 10).to(dtype)
    if layout == "strided":
        x = x[..., ::2]
    else:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = x[..., :w].contiguous(memory_format=fmt)
    y = _ops.to_batch_innermost(x)
    assert torch.equal(y, x) and y.permute(2, 3, 1, 0).is_contiguous()
    back = _ops.from_batch_innermost(y)
    assert torch.equal(back, x) and back.is_contiguous()
    other = _ops.from_batch_innermost(x)  # any other layout: a plain contiguous copy
    assert torch.equal(other, x) and other.is_contiguous() and other.data_ptr() != x.data_ptr()


def test_large_tiles_and_batch_innermost_detection():
    x = torch.randn(128, 64, 33, 31)
    y = _ops.to_batch_innermost(x)
    assert is_batch_innermost(y) and torch.equal(y, _hwcn(x))
    assert torch.equal(_ops.from_batch_innermost(y), x)


def test_opcheck():
    x = torch.randn(5, 3, 4, 6)
    torch.library.opcheck(_ops.to_batch_innermost.default, (x,))
    torch.library.opcheck(_ops.from_batch_innermost.default, (_hwcn(x),))
    torch.library.opcheck(_ops.from_batch_innermost.default, (x,))


def test_rejects_wrong_rank():
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        _ops.to_batch_innermost(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        _ops.from_batch_innermost(torch.randn(3, 4, 5))
