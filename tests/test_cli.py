import json
import os
import time

import pytest

import graspext as gx
from graspext.cli import main


def test_prune_command_writes_masks(tmp_path, capsys):
    out = tmp_path / "masks.pt"
    assert main(["prune", "--model", "vgg11_bn", "--method", "snip", "--sparsity", "0.9",
                 "--samples-per-class", "2", "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["method"] == "snip" and abs(result["sparsity"] - 0.9) < 1e-6
    masks = gx.Masks.load(out)
    assert masks.num_kept() == result["kept"] and "features.0.weight" in printed


def test_prune_command_bad_input(capsys):
    assert main(["prune", "--model", "vgg11_bn", "--method", "magnitude", "--sparsity", "1.5"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_train_command_with_masks_and_resume(tmp_path, capsys):
    masks = tmp_path / "masks.pt"
    assert main(["prune", "--model", "vgg11_bn", "--method", "magnitude", "--sparsity", "0.9",
                 "--out", str(masks)]) == 0
    out = tmp_path / "run"
    args = ["train", "--model", "vgg11_bn", "--masks", str(masks), "--epochs", "1", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    assert "90.0% sparse" in capsys.readouterr().out
    assert (out / "summary.json").exists() and (out / "checkpoint.pt").exists()
    bf16 = tmp_path / "bf16"
    assert main([*args[:-3], "--out", str(bf16), "--no-progress", "--amp", "bf16"]) == 0
    assert json.loads((bf16 / "summary.json").read_text())["config"]["amp"] == "bf16"
    assert "bfloat16" in (bf16 / "sparsity_report.txt").read_text()
    for option, value in (("--lr", "inf"), ("--weight-decay", "nan")):
        assert main([*args[:-3], "--no-progress", option, value]) == 2
        err = capsys.readouterr().err
        assert "must be a finite number" in err and len(err.strip().splitlines()) == 1, err
    assert main(["train", "--model", "resnet20", "--masks", str(masks), "--epochs", "1", "--no-progress"]) == 2
    assert "is not a parameter of the model" in capsys.readouterr().err


@pytest.mark.slow
def test_commands_read_cifar_from_disk_and_report_missing_data(tmp_path, capsys):
    from tests.data.test_datasets import _write_cifar

    _write_cifar(str(tmp_path), n=30)
    assert main(["prune", "--model", "vgg11_bn", "--method", "snip", "--sparsity", "0.5", "--data", "cifar10",
                 "--data-root", str(tmp_path)]) == 0
    assert "with the cifar10 data" in capsys.readouterr().out
    assert main(["train", "--model", "resnet20", "--epochs", "1", "--data", "cifar10", "--data-root", str(tmp_path),
                 "--no-progress"]) == 0
    assert main(["prune", "--data", "cifar100", "--data-root", str(tmp_path / "nothing")]) == 2
    assert "cifar100 not found" in capsys.readouterr().err
    assert main(["prune", "--model", "vgg42"]) == 2
    assert "model must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_run_command_prunes_trains_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--config", "digits-vgg11-grasp-98", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "digits-vgg11-grasp-98: best test accuracy" in printed
    for name in ("masks.pt", "layers.txt", "checkpoint.pt", "results.jsonl", "summary.json"):
        assert (out / name).exists(), name
    assert main(args) == 0  # finished run: resumes from the checkpoint, trains nothing more
    assert "resuming with the masks" in capsys.readouterr().out
    # The same folder for another method or sparsity: refused by name, never the old run under the new name.
    for option, value, named in (("--method", "snip", "method='grasp'"), ("--sparsity", "0.9", "sparsity=0.98")):
        assert main([*args, option, value]) == 2
        err = capsys.readouterr().err
        assert f"holds a run with {named}" in err and len(err.strip().splitlines()) == 1, err
    assert main(["run", "--model", "vgg11_bn"]) == 2
    assert "needs --config, or all of" in capsys.readouterr().err
    assert main(["run", "--config", "cifar10-vgg19-grasp-90", "--data", "cifar100"]) == 2
    assert "contradicts the config's dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_run_command_trains_rigl_from_a_config(tmp_path, capsys):
    out = tmp_path / "rigl"
    args = ["run", "--config", "digits-vgg11-rigl-90", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dst"]["method"] == "rigl" and summary["mask_updates"] == 2  # steps 0 and 5 of 12 (end 9)
    assert 0 < summary["mean_changed_fraction"] <= 0.3
    initial, final = gx.Masks.load(out / "masks.pt"), gx.Masks.load(out / "final_masks.pt")
    assert set(initial) == set(final) and initial.num_kept() == final.num_kept()
    assert any(not bool((initial[n] == final[n]).all()) for n in initial)
    assert "features.0.weight" not in initial  # the first layer stays dense


@pytest.mark.slow
def test_sweep_table_and_resume(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", "resnet20", "--methods", "magnitude,random", "--sparsities", "0.5,0.9",
            "--seeds", "0,1", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| magnitude | 0.9 | 2 |" in table and "| random | 0.5 | 2 |" in table
    runs = (out / "sweep_runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 8 and runs[0].startswith("method,seed,best_test_acc")
    mtime = (out / "random-0.9-s1" / "checkpoint.pt").stat().st_mtime
    assert main(args) == 0  # everything finished: read back, nothing retrained
    assert (out / "random-0.9-s1" / "checkpoint.pt").stat().st_mtime == mtime
    # Another model or epoch count into the same folder: refused, not the old table printed as the new one.
    for changed in (["--model", "resnet32"], ["--epochs", "2"]):
        new_args = list(args)
        new_args[new_args.index(changed[0]) + 1] = changed[1]
        assert main(new_args) == 2
        assert "holds a run with" in capsys.readouterr().err
    assert main(["sweep", "--methods", "", "--out", str(out)]) == 2
    # A corrupt summary of a finished run names its file.
    summary = out / "random-0.9-s1" / "summary.json"
    good = summary.read_text()
    summary.write_text("{not json")
    assert main(args) == 2
    assert f"{summary}: not valid JSON" in capsys.readouterr().err
    summary.write_text(good)

    assert main(["report", str(out)]) == 0
    for stem in ("accuracy_vs_sparsity", "layer_density", "training_curves"):
        for ext in ("png", "svg"):
            path = out / "report" / f"{stem}.{ext}"
            assert path.stat().st_size > 2000, path
    from PIL import Image

    with Image.open(out / "report" / "accuracy_vs_sparsity.png") as img:
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 20  # lines, markers and text, not a blank canvas
    assert main(["report", str(tmp_path / "nothing")]) == 2

    # A moved sweep reports its own runs: paths are kept relative to the sweep folder.
    import shutil

    assert "random-0.9-s1" in (out / "sweep_runs.csv").read_text().splitlines()[-1]
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    shutil.rmtree(moved / "report")
    assert main(["report", str(moved)]) == 0
    for stem in ("layer_density", "training_curves"):  # drawn from the runs, found in the moved folder
        assert (moved / "report" / f"{stem}.png").stat().st_size > 2000, stem


@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "resnet20", "--sparsity", "0.9", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for method in ("grasp", "snip", "synflow", "random"):
        assert f"| {method} | 0.9 | 1 |" in printed
    assert "training step at batch 128: dense" in printed and "under bfloat16 autocast: dense (channels_last)" in printed
    timing = json.loads((out / "demo.json").read_text())["timing"]
    assert timing["dense_step_s"] > 0 and timing["pruned_step_s"] > 0 and timing["pruned_bf16_step_s"] > 0
    assert (out / "report" / "accuracy_vs_sparsity.png").stat().st_size > 2000
    assert (out / "demo.txt").read_text().startswith("graspext demo: resnet20")


def test_cli_mistakes_fail_before_any_work_in_one_line(tmp_path, capsys):
    """An --out that cannot be written, or a misspelt method in a sweep list, fails at once: exit code 2 and
    one line, before pruning or training anything."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [
        (["prune", "--model", "vgg11_bn", "--method", "magnitude", "--out", str(tmp_path / "missing" / "m.pt")],
         "does not exist"),
        (["prune", "--model", "vgg11_bn", "--method", "magnitude", "--out", str(tmp_path)], "is a folder"),
        (["train", "--model", "vgg11_bn", "--epochs", "1", "--out", str(a_file)], "is a file; give a folder"),
        (["sweep", "--methods", "magnitude,snpi", "--sparsities", "0.5", "--epochs", "1",
          "--out", str(tmp_path / "sw"), "--no-progress"], "['snpi'] are not pruning methods"),
        (["sweep", "--methods", "magnitude", "--sparsities", "0.5", "--out", str(a_file)], "is a file"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["run", "--config", "digits-vgg11-grasp-98", "--out", str(read_only / "run")],
                      "is not writable"))
    for argv, message in cases:
        start = time.perf_counter()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert time.perf_counter() - start < 5, f"{argv} did work before failing"
    assert not (tmp_path / "sw").exists()
