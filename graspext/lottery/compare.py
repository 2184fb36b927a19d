"""The comparison Ma et al. (NeurIPS 2021) ask for: is the lottery ticket a winning ticket?

Per seed, :func:`run_comparison` runs IMP (its round 0 is the dense baseline, its rounds the lottery tickets,
LT), then trains at the sparsity of each compared IMP round:

- ``rr``: random re-initialisation, LT's mask on a fresh draw of the initialisation;
- ``random``: random pruning, LT's per-layer counts at random positions, from the initialisation;
- ``omp``: one-shot magnitude pruning of the trained dense baseline to LT's count, reset to the initialisation;
- each pruning-at-init method (``grasp``, ``snip``, ``synflow``) at LT's sparsity, and its sanity checks
  (Frankle et al. 2021): ``<m>-shuffle`` (its masks shuffled within each layer), ``<m>-reinit`` (its masks on a
  fresh initialisation) and ``<m>-invert`` (the weights it would remove kept instead).

Every run trains with the same recipe, chooses its checkpoint on the validation split and reports the test
accuracy of that checkpoint. Every run lives in its own folder and resumes; a run counts once its ``run.json``
is written. :func:`comparison_table` reads the folder back, and says which runs are missing rather than
reporting a partial comparison as complete.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from graspext._io import write_text
from graspext.lottery.imp import BestState, IMPConfig, result_settings, run_imp
from graspext.lottery.tickets import dense_masks, prune_to, random_masks_like, reinitialized, rewind_
from graspext.masks import Masks

BASELINES = ("rr", "random", "omp")
PAI_METHODS = ("grasp", "snip", "synflow")
SANITY_CHECKS = ("shuffle", "reinit", "invert")
RUN_DONE = "run.json"
# Fewer seeds give no verdict: with two, identical paired gaps (a small test set's accuracies are discrete) make a
# zero-width interval.
MIN_SEEDS_FOR_VERDICT = 3
_REINIT_SEED_OFFSET = 10_000  # the seed of a fresh initialisation draw (RR and the re-init checks)
# Two-sided 95 % Student t quantiles by degrees of freedom (a normal 1.96 beyond 30).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


@dataclass
class Comparison:
    """What :func:`run_comparison` runs. ``rounds``: the IMP rounds compared (default: all after round 0);
    ``reference_accuracy``: the dense baseline's stated test accuracy (a fraction), for the verdict."""

    methods: tuple[str, ...] = BASELINES + PAI_METHODS
    sanity_checks: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: tuple[int, ...] | None = None
    reference_accuracy: float | None = None
    reference_tolerance: float = 0.005  # the baseline counts as properly trained within this of the reference
    pai_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        self.methods, self.seeds = tuple(self.methods), tuple(self.seeds)
        unknown = [m for m in self.methods if m not in BASELINES + PAI_METHODS]
        if unknown:
            raise ValueError(f"methods {unknown} are not comparison methods; choose from {BASELINES + PAI_METHODS}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of ints >= 0, got {self.seeds!r}")
        if self.rounds is not None:
            self.rounds = tuple(self.rounds)
        if self.reference_accuracy is not None and not 0 < self.reference_accuracy <= 1:
            raise ValueError(f"reference_accuracy must be a fraction in (0, 1], got {self.reference_accuracy!r}")

    def run_names(self) -> list[str]:
        names = list(self.methods)
        if self.sanity_checks:
            names += [f"{m}-{c}" for m in self.methods if m in PAI_METHODS for c in SANITY_CHECKS]
        return names


def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``loader``."""
    device = next(model.parameters()).device
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            seen += len(y)
    return correct / max(1, seen)


def _inverted_masks(model, method, sparsity, data, options, keep_first_dense, keep_last_dense) -> Masks:
    """The masks keeping the weights ``method`` would remove (its scores inverted), at ``sparsity``."""
    from graspext.pruning import METHODS, scores
    from graspext.pruning.selection import num_to_remove, select_masks

    found = scores(model, method, data, keep_first_dense=keep_first_dense, keep_last_dense=keep_last_dense,
                   **options)
    total = sum(s.numel() for s in found.values())
    masks, _ = select_masks(list(found.values()), num_to_remove(total, sparsity),
                            remove_largest=not METHODS[method].remove_largest)
    return Masks(dict(zip(found, masks)), {"method": f"{method}-invert", "sparsity": sparsity})


def _scoring_data(train_loader, seed: int):
    """The data the pruning-at-init methods score on: the training set in an order fixed by the seed, so that a
    resumed comparison scores the same batches (the training loader's own generator is wherever training left
    it)."""
    dataset = getattr(train_loader, "dataset", None)
    if dataset is None:
        return train_loader
    return torch.utils.data.DataLoader(dataset, batch_size=train_loader.batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def _run_masks_and_model(name: str, lt_masks: Masks, make_init: Callable[[int], nn.Module], seed: int,
                         dense_trained: dict, train_loader, imp: IMPConfig, pai_options,
                         pai_masks: dict[str, Masks]) -> tuple[Masks, nn.Module]:
    """The masks a comparison run trains, and the model it starts from.

    ``pai_masks`` caches each pruning-at-init method's masks of this seed and round: the method, its shuffle and
    its re-init check share them, so they are scored once.
    """
    import graspext as gx

    if name == "rr":
        return lt_masks, make_init(seed + _REINIT_SEED_OFFSET)
    init = make_init(seed)
    if name == "random":
        return random_masks_like(lt_masks, seed), init
    if name == "omp":
        trained = rewind_(make_init(seed), dense_trained)
        omp = prune_to(trained, dense_masks(trained, keep_first_dense=imp.keep_first_dense,
                                            keep_last_dense=imp.keep_last_dense), lt_masks.num_kept())
        return omp, init
    method, _, check = name.partition("-")
    options = dict(pai_options.get(method, {}))
    if method in ("grasp", "snip"):
        options.setdefault("seed", seed)
    layer_choice = {"keep_first_dense": imp.keep_first_dense, "keep_last_dense": imp.keep_last_dense}
    sparsity = lt_masks.sparsity()
    if check == "invert":
        return _inverted_masks(init, method, sparsity, _scoring_data(train_loader, seed), options,
                               **layer_choice), init
    if method not in pai_masks:
        pai_masks[method] = gx.prune(init, method, sparsity, _scoring_data(train_loader, seed), on_collapse="ignore",
                                     **layer_choice, **options)
    masks = pai_masks[method]
    if check == "shuffle":
        return random_masks_like(masks, seed), init
    if check == "reinit":
        return masks, make_init(seed + _REINIT_SEED_OFFSET)
    return masks, init


def run_comparison(make_model: Callable[[], nn.Module], train_loader, val_loader, test_loader, imp: IMPConfig,
                   comparison: Comparison, out_dir: str, *, log: Callable[[str], Any] = print,
                   **train_options: Any) -> None:
    """Runs (or resumes) every seed's IMP and comparison runs in ``out_dir`` (see the module docstring)."""
    import graspext as gx

    def make_init(seed: int) -> nn.Module:
        return reinitialized(make_model, seed)

    settings = json.loads(json.dumps({"imp": asdict(imp), "comparison": asdict(comparison),
                                      "train": result_settings(train_options)}))
    path = os.path.join(out_dir, "comparison.json")
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        changed = sorted(k for k in settings if stored.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out_dir} holds a lottery comparison with other {' and '.join(changed)} settings "
                             f"({path}); use another folder, or delete that one")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty and holds no lottery comparison; use an empty or new folder")
    os.makedirs(out_dir, exist_ok=True)
    write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    for seed in comparison.seeds:
        seed_dir = os.path.join(out_dir, f"seed-{seed}")
        imp_dir = os.path.join(seed_dir, "imp")
        run_imp(make_model, train_loader, val_loader, imp, imp_dir, seed=seed, log=log,
                evaluate=lambda m: accuracy(m, test_loader), **train_options)
        dense_trained = torch.load(os.path.join(imp_dir, "round-00", "pruned_on.pt"), weights_only=True)
        rounds = comparison.rounds or tuple(range(1, imp.rounds + 1))
        for r in rounds:
            if not 1 <= r <= imp.rounds:
                raise ValueError(f"rounds: {r} is not an IMP round of this run (1..{imp.rounds})")
            lt_masks = Masks.load(os.path.join(imp_dir, f"round-{r:02d}", "masks.pt"))
            pai_masks: dict[str, Masks] = {}
            for name in comparison.run_names():
                run_dir = os.path.join(seed_dir, f"round-{r:02d}", name)
                if os.path.exists(os.path.join(run_dir, RUN_DONE)):
                    continue
                masks, model = _run_masks_and_model(name, lt_masks, make_init, seed, dense_trained, train_loader,
                                                    imp, comparison.pai_options, pai_masks)
                best = BestState()
                result = gx.train(model, train_loader, val_loader, masks=masks, callbacks=[best], out_dir=run_dir,
                                  **{"seed": seed, **train_options})
                rewind_(model, best.state)
                record = {"method": name, "seed": seed, "round": r, "sparsity": masks.sparsity(),
                          "best_val_acc": result.best_test_acc, "test_acc": accuracy(model, test_loader),
                          "collapsed_layers": masks.collapsed_layers()}
                write_text(os.path.join(run_dir, RUN_DONE), json.dumps(record, indent=2) + "\n")
                log(f"seed {seed} round {r} {name}: test accuracy {record['test_acc']:.4f}")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _t95(dof: int) -> float:
    usable = [d for d in _T95 if d <= dof]
    return _T95[max(usable)] if dof <= 30 else 1.96


def comparison_table(out_dir: str) -> dict[str, Any]:
    """Reads a comparison folder back: per sparsity, accuracy mean ± std per method, the LT − RR gap with its 95 %
    confidence interval (paired over seeds), whether the dense baseline reached its reference, and the verdict.

    ``"complete"`` is False, and ``"missing"`` lists the runs, when any expected run has not finished.
    """
    path = os.path.join(out_dir, "comparison.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out_dir!r} holds no lottery comparison (comparison.json); run it first")
    with open(path) as f:
        stored = json.load(f)
    imp, comparison = IMPConfig(**stored["imp"]), Comparison(**stored["comparison"])
    rounds = comparison.rounds or tuple(range(1, imp.rounds + 1))
    runs: dict[tuple[str, int, int], dict] = {}
    imp_rounds: dict[tuple[int, int], dict] = {}
    missing = []
    for seed in comparison.seeds:
        for r in range(imp.rounds + 1):
            done = os.path.join(out_dir, f"seed-{seed}", "imp", f"round-{r:02d}", "round.json")
            if os.path.exists(done):
                with open(done) as f:
                    imp_rounds[seed, r] = json.load(f)
            else:
                missing.append(f"seed {seed} IMP round {r}")
        for r in rounds:
            for name in comparison.run_names():
                done = os.path.join(out_dir, f"seed-{seed}", f"round-{r:02d}", name, RUN_DONE)
                if os.path.exists(done):
                    with open(done) as f:
                        runs[name, seed, r] = json.load(f)
                else:
                    missing.append(f"seed {seed} round {r} {name}")
    dense = [imp_rounds[s, 0]["test_acc"] for s in comparison.seeds if (s, 0) in imp_rounds]
    dense_ok = None
    if comparison.reference_accuracy is not None and dense:
        dense_ok = statistics.mean(dense) >= comparison.reference_accuracy - comparison.reference_tolerance
    rows = []
    for r in rounds:
        lt = {s: imp_rounds[s, r]["test_acc"] for s in comparison.seeds if (s, r) in imp_rounds}
        row: dict[str, Any] = {"round": r, "sparsity": None, "methods": {}}
        if lt:
            row["methods"]["lt"] = _mean_std(list(lt.values()))
            row["sparsity"] = statistics.mean(1 - imp_rounds[s, r]["density"] for s in lt)
        for name in comparison.run_names():
            accs = [runs[name, s, r]["test_acc"] for s in comparison.seeds if (name, s, r) in runs]
            if accs:
                row["methods"][name] = _mean_std(accs)
        gaps = [lt[s] - runs["rr", s, r]["test_acc"] for s in comparison.seeds if s in lt and ("rr", s, r) in runs]
        complete = (len(gaps) == len(comparison.seeds) >= MIN_SEEDS_FOR_VERDICT and "rr" in comparison.methods)
        if gaps:
            mean_gap, sd = _mean_std(gaps)
            half = _t95(len(gaps) - 1) * sd / math.sqrt(len(gaps)) if len(gaps) > 1 else math.inf
            row["lt_minus_rr"] = (mean_gap, mean_gap - half, mean_gap + half)
        # Ma et al.: a winning ticket beats its random re-initialisation under a properly trained dense baseline.
        row["winning_ticket"] = (None if not complete or dense_ok is None
                                 else bool(dense_ok and row["lt_minus_rr"][1] > 0))
        rows.append(row)
    if missing:  # a verdict only on the whole comparison
        for row in rows:
            row["winning_ticket"] = None
    return {"rows": rows, "seeds": len(comparison.seeds), "dense": _mean_std(dense) if dense else None,
            "dense_reached_reference": dense_ok,
            "reference_accuracy": comparison.reference_accuracy, "complete": not missing, "missing": missing,
            "round_seconds": {r: [imp_rounds[s, r].get("train_seconds") for s in comparison.seeds
                                  if (s, r) in imp_rounds] for r in range(imp.rounds + 1)},
            "densities": {r: statistics.mean(imp_rounds[s, r]["density"] for s in comparison.seeds
                                             if (s, r) in imp_rounds)
                          for r in range(imp.rounds + 1) if any((s, r) in imp_rounds for s in comparison.seeds)}}


def format_comparison(table: dict[str, Any]) -> str:
    """The comparison as Markdown: a header on completeness and the baseline, then one row per sparsity."""
    lines = []
    if not table["complete"]:
        lines.append(f"**INCOMPLETE: {len(table['missing'])} run(s) missing** "
                     f"({', '.join(table['missing'][:5])}{', ...' if len(table['missing']) > 5 else ''}); "
                     "the figures below cover the finished runs only and give no verdict.\n")
    if table["dense"] is not None:
        mean, sd = table["dense"]
        ref = table["reference_accuracy"]
        reached = table["dense_reached_reference"]
        lines.append(f"Dense baseline: {100 * mean:.2f} ± {100 * sd:.2f} % test accuracy"
                     + ("" if ref is None else f"; reference {100 * ref:.2f} %: "
                        + ("reached" if reached else "**not reached**")) + ".\n")
    methods = sorted({m for row in table["rows"] for m in row["methods"]}, key=lambda m: (m != "lt", m))
    lines.append("| sparsity | " + " | ".join(methods) + " | LT − RR (95 % CI) | winning ticket |")
    lines.append("| ---: | " + " | ".join("---:" for _ in methods) + " | ---: | --- |")
    for row in table["rows"]:
        cells = [f"{100 * row['methods'][m][0]:.2f} ± {100 * row['methods'][m][1]:.2f}" if m in row["methods"]
                 else "—" for m in methods]
        gap = row.get("lt_minus_rr")
        gap_text = "—" if gap is None else f"{100 * gap[0]:+.2f} ({100 * gap[1]:+.2f}, {100 * gap[2]:+.2f})"
        verdict = {None: "undecided", True: "yes", False: "no"}[row["winning_ticket"]]
        if row["winning_ticket"] is None and table["seeds"] < MIN_SEEDS_FOR_VERDICT:
            verdict = f"undecided (needs {MIN_SEEDS_FOR_VERDICT} seeds)"
        sparsity = "—" if row["sparsity"] is None else f"{100 * row['sparsity']:.1f} %"
        lines.append(f"| {sparsity} | " + " | ".join(cells) + f" | {gap_text} | {verdict} |")
    return "\n".join(lines) + "\n"


def run_lottery_config(cfg, out_dir: str, *, data_root: str | None = None, download: bool = False,
                       progress: bool = False, log: Callable[[str], Any] = print) -> None:
    """:func:`run_comparison` for a :class:`graspext.lottery.config.LotteryConfig`: its model and dataset, the
    validation split (``val_fraction`` of the training set, drawn with a fixed seed) and its recipe."""
    from graspext import data
    from graspext.models import create

    train_set = data.load(cfg.dataset, data_root, train=True, download=download)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(12_345)).tolist()
    n_val = max(1, round(cfg.val_fraction * len(train_set)))
    val_set = torch.utils.data.Subset(train_set, order[:n_val])
    fit_set = torch.utils.data.Subset(train_set, order[n_val:])
    train_loader = torch.utils.data.DataLoader(fit_set, batch_size=cfg.batch_size, shuffle=True,
                                               generator=torch.Generator().manual_seed(0))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256)
    test_loader = torch.utils.data.DataLoader(data.load(cfg.dataset, data_root, train=False), batch_size=256)
    if cfg.select_on == "test":  # the official scripts' choice, which reads the test set: documented, not default
        val_loader = test_loader
    classes = data.NUM_CLASSES[cfg.dataset]
    run_comparison(lambda: create(cfg.model, num_classes=classes), train_loader, val_loader, test_loader, cfg.imp,
                   cfg.compare, out_dir, log=log, **{"progress": progress, **cfg.train})
