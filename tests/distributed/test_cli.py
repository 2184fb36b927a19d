"""`graspext run --nproc 2`: two processes under torchrun give the single-process masks, and bad input fails
with one clear line."""

import json
import subprocess
import sys

import pytest
import torch

import graspext as gx
from graspext.cli import main
from graspext.config import load_config
from graspext.experiment import run_experiment


def _graspext(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "graspext.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_run_with_two_processes_gives_the_single_process_masks(tmp_path):
    done = _graspext("run", "--config", "digits-vgg11-grasp-98", "--nproc", "2", "--epochs", "1",
                     "--out", str(tmp_path / "ddp"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("best test accuracy") == 1  # one report, from rank 0
    cfg = load_config("digits-vgg11-grasp-98")
    cfg.train = None  # pruning only
    run_experiment(cfg, str(tmp_path / "single"), progress=False)
    ddp, single = (gx.Masks.load(tmp_path / d / "masks.pt") for d in ("ddp", "single"))
    assert all(torch.equal(ddp[n], single[n]) for n in single)  # bit for bit: GraSP's two chunks on two ranks
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["epochs"] == 1

    # Resuming the finished run with another world size is refused before anything trains.
    again = _graspext("run", "--config", "digits-vgg11-grasp-98", "--epochs", "1", "--out", str(tmp_path / "ddp"),
                      "--no-progress")
    assert again.returncode == 2 and "written by a run of 2 process(es); this run has 1" in again.stderr


def test_global_batch_not_divisible_by_the_processes(tmp_path):
    done = _graspext("train", "--model", "vgg11_bn", "--epochs", "1", "--batch-size", "127", "--nproc", "2",
                     "--no-progress")
    assert done.returncode != 0
    assert "batch_size (the global batch) = 127 is not divisible by the 2 processes" in done.stderr


def test_nproc_must_be_positive(capsys):
    assert main(["train", "--nproc", "0"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err


def test_comm_needs_processes(capsys):
    assert main(["train", "--comm", "topk", "--epochs", "1"]) == 2
    assert "--comm topk needs data-parallel processes: add --nproc 2" in capsys.readouterr().err
