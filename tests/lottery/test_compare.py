import json
import os

import pytest
import torch

from graspext.cli import main
from graspext.lottery import IMPConfig
from graspext.lottery.compare import Comparison, comparison_table, format_comparison, run_comparison
from graspext.lottery.config import list_lottery_configs, load_lottery_config
from graspext.lottery.report import lottery_report
from graspext.masks import Masks
from tests.helpers import TinyNet, ordered_loader, tiny_data

OPTIONS = {"epochs": 1, "lr": 0.05, "progress": False}


def _loaders():
    train = torch.utils.data.DataLoader(tiny_data(torch.float32, n=40), batch_size=8, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    return train, ordered_loader(tiny_data(torch.float32, n=16, seed=1)), ordered_loader(tiny_data(torch.float32,
                                                                                                   n=16, seed=2))


@pytest.fixture(scope="module")
def comparison_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lottery")
    comparison = Comparison(methods=("rr", "random", "omp", "snip"), seeds=(0, 1), reference_accuracy=0.1,
                            pai_options={"snip": {"samples_per_class": 1}})
    run_comparison(TinyNet, *_loaders(), IMPConfig(rounds=1, rate=0.5), comparison, str(out), log=lambda _: None,
                   **OPTIONS)
    return out


def test_baselines_share_what_they_must_and_differ_where_they_should(comparison_dir):
    for seed in (0, 1):
        lt = Masks.load(comparison_dir / f"seed-{seed}" / "imp" / "round-01" / "masks.pt")
        runs = comparison_dir / f"seed-{seed}" / "round-01"
        assert set(os.listdir(runs)) == {"rr", "random", "omp", "snip", "snip-shuffle", "snip-reinit", "snip-invert"}
        for name in os.listdir(runs):
            record = json.loads((runs / name / "run.json").read_text())
            assert record["method"] == name and record["seed"] == seed and 0 <= record["test_acc"] <= 1
        checkpoint = torch.load(runs / "rr" / "checkpoint.pt", weights_only=False)
        assert all(torch.equal(checkpoint["masks"][n], lt[n].cpu()) for n in lt)  # RR trains LT's mask
        init = torch.load(comparison_dir / f"seed-{seed}" / "imp" / "init.pt", weights_only=True)
        rr_state = torch.load(runs / "rr" / "checkpoint.pt", weights_only=False)["model"]
        assert not torch.equal(rr_state["conv2.weight"], init["conv2.weight"])  # ... on other weights
        random = torch.load(runs / "random" / "checkpoint.pt", weights_only=False)["masks"]
        assert all(int(random[n].sum()) == int(lt[n].sum()) for n in lt)  # random pruning: LT's layer counts
        assert any(not torch.equal(random[n], lt[n].cpu()) for n in lt)
        omp = torch.load(runs / "omp" / "checkpoint.pt", weights_only=False)["masks"]
        assert sum(int(m.sum()) for m in omp.values()) == lt.num_kept()


def test_the_table_and_its_verdict(comparison_dir, tmp_path):
    table = comparison_table(str(comparison_dir))
    assert table["complete"] and table["dense_reached_reference"] is True
    (row,) = table["rows"]
    assert row["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert set(row["methods"]) == {"lt", "rr", "random", "omp", "snip", "snip-shuffle", "snip-reinit", "snip-invert"}
    mean, low, high = row["lt_minus_rr"]
    assert low <= mean <= high
    assert row["winning_ticket"] is None  # two seeds: no verdict
    assert "undecided (needs 3 seeds)" in format_comparison(table)
    text = format_comparison(table)
    assert "INCOMPLETE" not in text and "LT − RR" in text and "reached" in text
    paths = lottery_report(str(comparison_dir), str(tmp_path / "report"))
    assert {os.path.basename(p) for p in paths} >= {"comparison.md", "accuracy_vs_sparsity.png", "time_per_round.png",
                                                     "lt_minus_rr.svg"}
    assert all(os.path.getsize(p) > 200 for p in paths)
    # A missing run: the report says so and gives no verdict.
    done = comparison_dir / "seed-1" / "round-01" / "rr" / "run.json"
    saved = done.read_text()
    done.unlink()
    try:
        partial = comparison_table(str(comparison_dir))
        assert not partial["complete"] and partial["missing"] == ["seed 1 round 1 rr"]
        assert partial["rows"][0]["winning_ticket"] is None
        assert format_comparison(partial).startswith("**INCOMPLETE: 1 run(s) missing**")
    finally:
        done.write_text(saved)


def test_shipped_lottery_configs_load():
    assert set(list_lottery_configs()) >= {"digits-vgg11-imp", "cifar10-resnet20-imp-lr0.1", "cifar10-resnet20-imp-lr0.01",
                                           "cifar10-vgg16-imp"}
    for name in list_lottery_configs():
        cfg = load_lottery_config(name)
        assert cfg.name == name
    ma = load_lottery_config("cifar10-resnet20-imp-lr0.01")
    assert (ma.batch_size, ma.train["epochs"], ma.train["lr"], ma.train["weight_decay"]) == (64, 160, 0.01, 1e-4)
    assert ma.imp.rounds == 14 and ma.imp.keep_first_dense and ma.imp.keep_last_dense
    assert 1 - 0.8 ** ma.imp.rounds == pytest.approx(0.956, abs=1e-3)


@pytest.mark.parametrize("text, match", [
    ('model = "resnet20"\ndataset = "digits"\ncolour = 1\n', "unknown key"),
    ('model = "resnet20"\ndataset = "digits"\n[imp]\nrate = 1.5\n', "imp: rate must be a fraction"),
    ('model = "resnet20"\ndataset = "digits"\n[imp]\nrewnd = "init"\n', r"imp: unknown key\(s\) \['rewnd'\]"),
    ('model = "resnet20"\ndataset = "digits"\n[compare]\nmethods = ["lt2"]\n', "not comparison methods"),
    ('model = "resnet20"\ndataset = "digits"\n[train]\nseed = 3\n', "seed is set per run"),
    ('model = "resnet20"\ndataset = "digits"\nval_fraction = 1\n', "val_fraction must be"),
    ('model = "resnet20"\ndataset = "digits"\nselect_on = "train"\n', "select_on must be one of"),
])
def test_bad_lottery_configs_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_lottery_config(str(path))


def test_the_verdict_needs_a_positive_interval_and_a_trained_baseline(tmp_path):
    import shutil

    from graspext.lottery import compare

    out = tmp_path / "cmp"
    comparison = Comparison(methods=("rr",), seeds=(0, 1, 2), reference_accuracy=0.1, sanity_checks=False)
    run_comparison(TinyNet, *_loaders(), IMPConfig(rounds=1, rate=0.5), comparison, str(out), log=lambda _: None,
                   **OPTIONS)
    table = compare.comparison_table(str(out))
    (row,) = table["rows"]
    assert row["winning_ticket"] == (row["lt_minus_rr"][1] > 0)

    def set_acc(path, value):
        record = json.loads(path.read_text())
        record["test_acc"] = value
        path.write_text(json.dumps(record))

    for seed, (lt, rr) in enumerate([(0.9, 0.5), (0.8, 0.5), (0.85, 0.5)]):
        set_acc(out / f"seed-{seed}" / "imp" / "round-01" / "round.json", lt)
        set_acc(out / f"seed-{seed}" / "round-01" / "rr" / "run.json", rr)
    assert compare.comparison_table(str(out))["rows"][0]["winning_ticket"] is True
    for seed in range(3):  # the dense baseline far below its reference: no winning ticket, however large the gap
        set_acc(out / f"seed-{seed}" / "imp" / "round-00" / "round.json", 0.01)
    assert compare.comparison_table(str(out))["dense_reached_reference"] is False
    assert compare.comparison_table(str(out))["rows"][0]["winning_ticket"] is False
    shutil.rmtree(out)


def test_pruning_at_init_masks_do_not_depend_on_where_training_left_the_loader(comparison_dir):
    from graspext.lottery.compare import _run_masks_and_model
    from graspext.lottery.tickets import reinitialized

    train, _, _ = _loaders()
    lt = Masks.load(comparison_dir / "seed-0" / "imp" / "round-01" / "masks.pt")
    dense = torch.load(comparison_dir / "seed-0" / "imp" / "round-00" / "pruned_on.pt", weights_only=True)

    def snip_masks():
        masks, _ = _run_masks_and_model("snip", lt, lambda s: reinitialized(TinyNet, s), 0, dense, train,
                                        IMPConfig(rounds=1, rate=0.5), {"snip": {"samples_per_class": 1}}, {})
        return masks

    first = snip_masks()
    for _ in train:  # the loader's generator moves on, as a training epoch moves it
        pass
    again = snip_masks()
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_a_folder_of_another_comparison_is_refused(comparison_dir):
    other = Comparison(methods=("rr",), seeds=(0, 1), reference_accuracy=0.1)
    with pytest.raises(ValueError, match="holds a lottery comparison with other comparison settings"):
        run_comparison(TinyNet, *_loaders(), IMPConfig(rounds=1, rate=0.5), other, str(comparison_dir),
                       log=lambda _: None, **OPTIONS)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["lottery", "run", "--config", "no-such", "--out", str(tmp_path / "x")]) == 2
    assert "neither a .toml file nor a shipped lottery config" in capsys.readouterr().err
    assert main(["lottery", "report", str(tmp_path)]) == 2
    assert "holds no lottery comparison" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_a_config_on_digits_and_reports_it(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\nmodel = "resnet20"\ndataset = "digits"\nbatch_size = 128\n'
                      '[imp]\nrounds = 1\nrate = 0.5\nkeep_first_dense = true\nkeep_last_dense = true\n'
                      '[train]\nepochs = 1\n[compare]\nseeds = [0]\nmethods = ["rr"]\nsanity_checks = false\n'
                      'reference_accuracy = 0.99\n')
    out = tmp_path / "run"
    assert main(["lottery", "run", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    assert main(["lottery", "report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sparsity | lt | rr |" in printed and "not reached" in printed  # 1 epoch cannot reach 99 %
    assert (out / "report" / "comparison.md").exists()
    record = json.loads((out / "seed-0" / "imp" / "round-01" / "round.json").read_text())
    assert 0 <= record["test_acc"] <= 1 and record["best_eval_acc"] >= 0  # chosen on validation, scored on test
