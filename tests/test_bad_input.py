"""One set of bad inputs, run against the Python API and the CLI alike: each fails with a message that names
the setting (the CLI: exit code 2 and that message on one line), before any work is done."""

import time

import pytest
import torch

import graspext as gx
from graspext.cli import main
from tests.conftest import SmallVGG, class_sorted_batch

# (id, API call on a small model and batch, CLI arguments, the message both must contain)
CASES = [
    ("sparsity above one", lambda m, d: gx.prune(m, "magnitude", 1.5), ["prune", "--method", "magnitude",
                                                                        "--sparsity", "1.5"], "sparsity must be in"),
    ("sparsity not a number", lambda m, d: gx.prune(m, "magnitude", float("nan")),
     ["prune", "--method", "magnitude", "--sparsity", "nan"], "sparsity must be in"),
    ("infinite lr", lambda m, d: gx.train(m, *d, epochs=1, lr=float("inf"), progress=False),
     ["train", "--epochs", "1", "--lr", "inf"], "lr must be a finite number"),
    ("NaN weight decay", lambda m, d: gx.train(m, *d, epochs=1, weight_decay=float("nan"), progress=False),
     ["train", "--epochs", "1", "--weight-decay", "nan"], "weight_decay must be a finite number"),
    ("zero epochs", lambda m, d: gx.train(m, *d, epochs=0, progress=False),
     ["train", "--epochs", "0"], "epochs must be an int >= 1"),
    ("negative seed", lambda m, d: gx.train(m, *d, epochs=1, seed=-1, progress=False),
     ["train", "--epochs", "1", "--seed", "-1"], "seed must be a non-negative int"),
]


def _api_data():
    x, y = class_sorted_batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)
    return loader, loader


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_api_and_cli_refuse_alike(case, capsys):
    _, api_call, argv, message = case
    with pytest.raises((ValueError, TypeError), match=message):
        api_call(SmallVGG(), _api_data())
    start = time.perf_counter()
    assert main([*argv, "--model", "vgg11_bn", *(["--no-progress"] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 10, "the CLI did work before failing"
