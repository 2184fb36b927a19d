"""``graspext datalens train | generate | evaluate`` on a small digits config."""

import json

from graspext.cli import main

SMALL = """
dataset = "digits"
teachers = 20
k = 16
sigma = 20.0
beta = 0.2
max_eps = 30.0
z_dim = 8
gf = 4
gfc = 32
df = 4
dfc = 16
batch_size = 4
pretrain_d_steps = 2
d_steps = 1
noise_seed = 3
[evaluate]
samples = 200
epochs = 1
"""


def test_train_generate_evaluate(tmp_path, capsys):
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    out = tmp_path / "run"
    assert main(["datalens", "train", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stopped"] == "max_eps" and 0 < results["epsilon"] <= 30.0
    assert "noise_seed" not in results["config"]  # the secret one lives in the checkpoint only
    assert (out / "history.csv").read_text().startswith("step,epoch,d_loss")
    # A second train resumes the finished run: no further step, no further privacy spent.
    assert main(["datalens", "train", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["queries"] == results["queries"]
    assert main(["datalens", "generate", str(out), "--samples", "50"]) == 0
    assert (out / "samples.pt").is_file() and (out / "samples.png").is_file()
    assert main(["datalens", "evaluate", str(out), "--no-progress"]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["samples"] == 50 and evaluation["epsilon"] == results["epsilon"]
    assert 0 <= evaluation["final_test_acc"] <= 1
    assert "accuracy" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["datalens", "train", "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "neither a .toml file nor a shipped DataLens config" in capsys.readouterr().err
    assert main(["datalens", "evaluate", str(tmp_path)]) == 2
    assert "not a folder written by `graspext datalens train`" in capsys.readouterr().err
