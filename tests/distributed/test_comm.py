"""The top-k communication hook against an independent simulation of two ranks with error feedback."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from graspext.distributed import TopKCompression, top_k_indices
from tests.distributed import workers
from tests.distributed.spawn import spawn


def _simulate(ratio: float, sign: bool, world: int = 2, lr: float = 0.1):
    """One epoch of SGD (no momentum) where each rank sends its top-k of gradient + residual."""
    model = workers.plain_net()
    params = dict(model.named_parameters())
    residual = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in range(world)]
    loader = DataLoader(workers.dataset(), batch_size=workers.BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # the trainer's epoch-0 order
    local = workers.BATCH // world
    for x, y in loader:
        sent = []
        for r in range(world):
            xs, ys = x[r * local:(r + 1) * local], y[r * local:(r + 1) * local]
            grads = torch.autograd.grad(F.cross_entropy(model(xs), ys), list(params.values()))
            mine = {}
            for (n, p), g in zip(params.items(), grads):
                acc = (g + residual[r][n]).flatten()
                k = max(1, math.ceil(ratio * acc.numel()))
                idx = torch.topk(acc.abs(), k).indices
                out = torch.zeros_like(acc)
                out[idx] = torch.sign(acc[idx]) * acc[idx].abs().mean() if sign else acc[idx]
                residual[r][n] = (acc - out).view_as(p)
                mine[n] = out.view_as(p)
            sent.append(mine)
        with torch.no_grad():
            for n, p in params.items():
                p -= lr * (sum(s[n] for s in sent) / world)
    return model.state_dict()


@pytest.mark.parametrize("ratio,sign", [(1.0, False), (0.1, False), (0.1, True)])
def test_topk_hook_matches_the_simulation(tmp_path, ratio, sign):
    spawn(workers.topk_run, str(tmp_path / "out"), ratio, sign)
    out = torch.load(tmp_path / "out", weights_only=False)
    expected = _simulate(ratio, sign)
    for name in expected:
        torch.testing.assert_close(out["state"][name], expected[name], rtol=1e-10, atol=1e-13, msg=name)
    # Bytes each rank hands the all-gather per step: an int32 index and a float64 value (or an int8 sign and
    # one float64 scale per parameter) per sent entry.
    model = workers.plain_net()
    ks = [max(1, math.ceil(ratio * p.numel())) for p in model.parameters()]
    per_step = sum(5 * k + 8 for k in ks) if sign else sum(12 * k for k in ks)
    assert out["summary"]["comm_bytes_per_step"] == per_step


def test_topk_residuals_resume_bit_for_bit(tmp_path):
    spawn(workers.topk_run, str(tmp_path / "whole"), 0.1, True, epochs=2, out_dir=str(tmp_path / "a"))
    spawn(workers.topk_run, str(tmp_path / "killed"), 0.1, True, epochs=2, out_dir=str(tmp_path / "b"), die_epoch=1)
    spawn(workers.topk_run, str(tmp_path / "resumed"), 0.1, True, epochs=2, out_dir=str(tmp_path / "b"))
    whole, resumed = (torch.load(tmp_path / n, weights_only=False) for n in ("whole", "resumed"))
    for name in whole["state"]:
        assert torch.equal(whole["state"][name], resumed["state"][name]), name
    assert whole["summary"]["comm_bytes_per_step"] == resumed["summary"]["comm_bytes_per_step"]


def test_top_k_indices_uses_exact_count_selection():
    v = torch.tensor([0.5, -2.0, 1.0, -1.0, 0.1])
    # |1.0| ties |-1.0|: as graspext's pruning selection, the lower index goes first, so the higher one stays
    assert top_k_indices(v, 2).tolist() == [1, 3]
    assert top_k_indices(v, 5).tolist() == [0, 1, 2, 3, 4]


def test_bad_options_and_no_group():
    with pytest.raises(ValueError, match="ratio must be a positive finite number"):
        TopKCompression(0)
    with pytest.raises(ValueError, match=r"ratio must be a fraction in \(0, 1\]"):
        TopKCompression(1.5)
    with pytest.raises(TypeError, match="sign must be True or False"):
        TopKCompression(0.1, sign=1)
    with pytest.raises(ValueError, match="needs a torch.distributed process group"):
        workers.train_run(None, "unused", callback=TopKCompression(0.1), epochs=1)
