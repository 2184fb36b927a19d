import itertools
import json
import os

import pytest
import torch

from graspext.lottery import IMPConfig, RewindCapture, run_imp
from graspext.masks import Masks
from tests.helpers import TinyNet, ordered_loader, tiny_data

OPTIONS = {"epochs": 2, "lr": 0.05, "progress": False}


def _loaders(seed=0):
    data = tiny_data(torch.float32, n=32)
    train = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed))
    return train, ordered_loader(tiny_data(torch.float32, n=16, seed=1))


class _Starts:
    """round_callbacks: the state each round >= 1 starts training from (after its masks are applied)."""

    def __init__(self):
        self.captures = {}

    def __call__(self, r):
        if r == 0:
            return []
        self.captures[r] = RewindCapture(0)
        return [self.captures[r]]


def _timeless(records):
    return [{k: v for k, v in r.items() if not k.startswith("train_seconds")} for r in records]


@pytest.mark.parametrize("rewind", ["init", "step", "lr"])
def test_rounds_prune_exactly_and_start_from_the_rewind_point(tmp_path, rewind):
    train, val = _loaders()
    config = IMPConfig(rounds=2, rate=0.2, rewind=rewind, rewind_step=3 if rewind == "step" else 0)
    starts = _Starts()
    records = run_imp(TinyNet, train, val, config, str(tmp_path), seed=0, log=lambda _: None,
                      round_callbacks=starts, **OPTIONS)
    assert [r["round"] for r in records] == [0, 1, 2]
    masks = [Masks.load(tmp_path / f"round-{r:02d}" / "masks.pt") for r in range(3)]
    for before, after in itertools.pairwise(masks):
        assert after.num_kept() == before.num_kept() - int(0.2 * before.num_kept())
        assert all(not (after[n] & ~before[n]).any() for n in before)
    assert records[2]["density"] == pytest.approx(masks[2].density())
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    for r in (1, 2):
        if rewind == "init":
            point = init
        elif rewind == "step":
            point = torch.load(tmp_path / "rewind.pt", weights_only=True)
        else:
            point = torch.load(tmp_path / f"round-{r - 1:02d}" / "pruned_on.pt", weights_only=True)
        start = starts.captures[r].state
        for n in masks[r]:
            kept = masks[r][n]
            assert torch.equal(start[n][kept], point[n][kept]), (r, n)  # the kept weights, bit for bit
            assert not start[n][~kept].any()
    if rewind == "step":  # the rewind point is round 0 after 3 steps: not the initialisation
        point = torch.load(tmp_path / "rewind.pt", weights_only=True)
        assert not torch.equal(point["conv2.weight"], init["conv2.weight"])


class _KillingLoader:
    def __init__(self, loader, kill_at):
        self.loader, self.batch_size, self.kill_at, self.calls = loader, loader.batch_size, kill_at, -1
        self.dataset, self.generator = loader.dataset, loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.calls += 1
        for i, batch in enumerate(self.loader):
            if (self.calls, i) == self.kill_at:
                raise KeyboardInterrupt("killed")
            yield batch


@pytest.mark.parametrize("kill_at", [(3, 2), (2, 0)], ids=["inside round 1", "at the start of round 1"])
def test_resume_after_kill_is_bit_identical(tmp_path, kill_at):
    config = IMPConfig(rounds=2, rewind="step", rewind_step=2)
    train, val = _loaders()
    whole = run_imp(TinyNet, train, val, config, str(tmp_path / "a"), log=lambda _: None, **OPTIONS)
    train, val = _loaders()
    with pytest.raises(KeyboardInterrupt):
        run_imp(TinyNet, _KillingLoader(train, kill_at), val, config, str(tmp_path / "b"), log=lambda _: None,
                **OPTIONS)
    assert not os.path.exists(tmp_path / "b" / "round-01" / "round.json")
    train, val = _loaders()
    resumed = run_imp(TinyNet, train, val, config, str(tmp_path / "b"), log=lambda _: None, **OPTIONS)
    assert _timeless(resumed) == _timeless(whole)
    for name in ("round-02/pruned_on.pt", "rewind.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True) for run in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (Masks.load(tmp_path / run / "round-02" / "masks.pt") for run in ("a", "b"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    # A round that trained fully but was killed before it was recorded runs its last steps again, identically.
    os.unlink(tmp_path / "b" / "round-02" / "round.json")
    again = run_imp(TinyNet, *_loaders(), config, str(tmp_path / "b"), log=lambda _: None, **OPTIONS)
    assert _timeless(again) == _timeless(whole)


def test_bad_runs_are_refused(tmp_path):
    train, val = _loaders()
    run_imp(TinyNet, train, val, IMPConfig(rounds=1), str(tmp_path / "run"), log=lambda _: None, **OPTIONS)
    with pytest.raises(ValueError, match=r"holds an IMP run with imp=.*'rate': 0.2.*this one has"):
        run_imp(TinyNet, train, val, IMPConfig(rounds=1, rate=0.5), str(tmp_path / "run"), log=lambda _: None,
                **OPTIONS)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty and holds no IMP run"):
        run_imp(TinyNet, train, val, IMPConfig(rounds=1), str(tmp_path / "other"), log=lambda _: None, **OPTIONS)
    with pytest.raises(ValueError, match="rewind step 100 lies beyond the training"):
        run_imp(TinyNet, train, val, IMPConfig(rounds=1, rewind="step", rewind_step=100), str(tmp_path / "late"),
                log=lambda _: None, **OPTIONS)
    with pytest.raises(ValueError, match="masks is set by run_imp"):
        run_imp(TinyNet, train, val, IMPConfig(rounds=1), str(tmp_path / "m"), masks=None, **OPTIONS)
    for kwargs, match in (({"rate": 1.0}, "rate must be a fraction"), ({"rounds": 0}, "rounds must be"),
                          ({"rewind": "late"}, "rewind must be one of"),
                          ({"rewind_step": 5}, "applies to rewind='step' only"),
                          ({"prune_on": "test"}, "prune_on must be one of")):
        with pytest.raises(ValueError, match=match):
            IMPConfig(**kwargs)
    record = json.loads((tmp_path / "run" / "round-01" / "round.json").read_text())
    assert record["round"] == 1 and 0.79 < record["density"] < 0.81
