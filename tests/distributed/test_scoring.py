"""Data-parallel scoring with 2 gloo processes gives the single-process masks (float64, exact engine)."""

import pytest
import torch

import graspext as gx
from tests.distributed import workers
from tests.distributed.spawn import spawn

CASES = {
    # Two chunks on two ranks: g = g0 + g1 is the same single addition as one process makes, so bit for bit.
    "grasp-2-chunks": ("grasp", {"samples_per_class": 4, "num_chunks": 2, "num_classes": 10, "seed": 0}, True),
    # Four chunks: each rank sums two, then the all-reduce adds the sums (another order: equal to rounding).
    "grasp-4-chunks": ("grasp", {"samples_per_class": 4, "num_chunks": 4, "num_classes": 10, "seed": 0}, False),
    "grasp-fd": ("grasp", {"samples_per_class": 4, "num_chunks": 4, "num_classes": 10, "seed": 0,
                           "engine": "finite_difference"}, False),
    "grasp-fwd": ("grasp", {"samples_per_class": 4, "num_chunks": 2, "num_classes": 10, "seed": 0,
                            "engine": "forward_over_reverse"}, False),
    # SNIP shares one batch: with train-mode BatchNorm each share has its own statistics, so eval mode here.
    "snip": ("snip", {"train_mode": False, "seed": 0}, False),
    "synflow": ("synflow", {}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distributed_scores_equal_single_process(tmp_path, case):
    method, options, bitwise = CASES[case]
    spawn(workers.score_run, str(tmp_path / "out"), method, options)
    workers.score_run(None, str(tmp_path / "out"), method, options)
    ranks = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in (0, 1)]
    single = torch.load(f"{tmp_path / 'out'}.None", weights_only=False)
    for name in single["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name])
        assert torch.equal(ranks[0]["masks"][name], single["masks"][name]), name
        if bitwise:
            assert torch.equal(ranks[0]["scores"][name], single["scores"][name]), name
        else:
            torch.testing.assert_close(ranks[0]["scores"][name], single["scores"][name], rtol=1e-8, atol=1e-14)


def test_ranks_with_different_data_still_agree(tmp_path):
    # Each rank builds its scoring set from its own data: the all-reduced sums are still one set of scores.
    method, options, _ = CASES["grasp-2-chunks"]
    spawn(workers.score_run, str(tmp_path / "out"), method, options, True)
    ranks = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in (0, 1)]
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name])


def test_check_identical_names_the_tensor(tmp_path):
    spawn(workers.collective_error_run, str(tmp_path / "out"))
    for rank in (0, 1):
        assert "'t' differs between rank" in torch.load(f"{tmp_path / 'out'}.{rank}")["mismatch"]


def test_distributed_true_needs_a_group(make_model):
    with pytest.raises(ValueError, match="distributed=True needs a torch.distributed process group"):
        gx.prune(make_model(), "magnitude", 0.5, distributed=True)
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        gx.prune(make_model(), "magnitude", 0.5, distributed="yes")
