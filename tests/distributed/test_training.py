"""DDP training with 2 gloo processes equals one process on the same global batch (float64), resumes after a
kill, refuses masks that differ between ranks and a checkpoint of another world size."""

import pytest
import torch

import graspext as gx
from tests.distributed import workers
from tests.distributed.spawn import spawn

# Float64 everywhere: DDP averages the two half-batch gradients where one process takes the mean over the
# whole batch, so the runs differ by rounding alone.
RTOL = 1e-9


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=RTOL, atol=1e-12, msg=name)


def _same_history(a, b) -> None:
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "test_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=RTOL), key
        for key in ("train_acc", "test_acc", "epoch", "lr"):
            assert ra[key] == rb[key], key


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_ddp_equals_single_process(tmp_path, kernels):
    spawn(workers.train_run, str(tmp_path / "ddp"), kernels=kernels)
    workers.train_run(None, str(tmp_path / "single"), kernels=kernels)
    ddp, single = (torch.load(tmp_path / n, weights_only=False) for n in ("ddp", "single"))
    _close(ddp["state"], single["state"])
    _same_history(ddp["history"], single["history"])
    assert ddp["summary"]["sparse_kernels"] == (kernels == "sparse")


def test_rigl_across_ranks_equals_single_process(tmp_path):
    # An update every 2 of the 8 steps: the dense gradients are all-reduced before growth, and after each update
    # the masks are checked identical on both ranks (an error otherwise).
    spawn(workers.train_run, str(tmp_path / "ddp"), dst=gx.dst.RigL(frequency=2, drop_fraction=0.3))
    workers.train_run(None, str(tmp_path / "single"), dst=gx.dst.RigL(frequency=2, drop_fraction=0.3))
    ddp, single = (torch.load(tmp_path / n, weights_only=False) for n in ("ddp", "single"))
    assert ddp["summary"]["mask_updates"] == single["summary"]["mask_updates"] >= 3
    initial = workers.masks_for(workers.plain_net())
    assert any(not torch.equal(ddp["masks"][n], initial[n]) for n in initial)  # the masks moved
    for name in single["masks"]:
        assert torch.equal(ddp["masks"][name], single["masks"][name]), name
    _close(ddp["state"], single["state"])


def test_set_across_ranks(tmp_path):
    spawn(workers.train_run, str(tmp_path / "ddp"), dst=gx.dst.SET(frequency=2))
    workers.train_run(None, str(tmp_path / "single"), dst=gx.dst.SET(frequency=2))
    ddp, single = (torch.load(tmp_path / n, weights_only=False) for n in ("ddp", "single"))
    for name in single["masks"]:
        assert torch.equal(ddp["masks"][name], single["masks"][name]), name


def test_resume_after_kill_is_bit_for_bit(tmp_path):
    spawn(workers.train_run, str(tmp_path / "whole"), out_dir=str(tmp_path / "a"))
    spawn(workers.train_run, str(tmp_path / "killed"), out_dir=str(tmp_path / "b"), die_epoch=1)
    assert not (tmp_path / "killed").exists() and (tmp_path / "b" / "checkpoint.pt").exists()
    spawn(workers.train_run, str(tmp_path / "resumed"), out_dir=str(tmp_path / "b"))
    whole, resumed = (torch.load(tmp_path / n, weights_only=False) for n in ("whole", "resumed"))
    for name in whole["state"]:
        assert torch.equal(whole["state"][name], resumed["state"][name]), name
    assert [r["train_loss"] for r in whole["history"]] == [r["train_loss"] for r in resumed["history"]]
    # Rank 0 alone wrote the files, once each.
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())

    # The checkpoint of 2 processes does not resume in 1: each rank's share of every batch would change.
    with pytest.raises(ValueError, match=r"written by a run of 2 process\(es\); this run has 1.*--nproc 2"):
        workers.train_run(None, str(tmp_path / "single"), out_dir=str(tmp_path / "b"))


def test_masks_that_differ_between_ranks_are_refused(tmp_path):
    spawn(workers.train_run, str(tmp_path / "out"), mask_seed=1)
    for rank in (0, 1):
        error = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=False)["error"]
        assert "masks at the start of training" in error and "differs between rank" in error


def test_comm_meter_counts_only_kept_values(tmp_path):
    spawn(workers.meter_run, str(tmp_path / "sparse"))
    out = torch.load(tmp_path / "sparse", weights_only=False)
    masks = workers.masks_for(workers.plain_net())
    model = workers.plain_net()
    kept = sum(int(m.sum()) for m in masks.values())
    biases = sum(p.numel() for n, p in model.named_parameters() if n not in masks)
    # One float64 per kept weight and per bias: the sparse layers send their values alone.
    assert out["summary"]["comm_bytes_per_step"] == 8 * (kept + biases)
