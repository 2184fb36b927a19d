"""``graspext datalens train | generate | evaluate``.

``train --config NAME --out DIR`` trains (and resumes) a run in DIR; ``generate DIR`` draws class-balanced
samples into ``DIR/samples.pt`` (and a PNG grid); ``evaluate DIR`` trains the evaluation classifier on them and
tests it on the real test set (``DIR/evaluation.json`` and ``.csv``, with the ε the run spent).
"""

from __future__ import annotations

import argparse
import json
import os

RESULTS = "results.json"  # written with every checkpoint; its "config" is the run's public config
SAMPLES = "samples.pt"


def _load_run(folder: str, args):
    from graspext.datalens.config import DataLensConfig
    from graspext.datalens.trainer import load_trained

    path = os.path.join(folder, RESULTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {RESULTS} in {folder}: not a folder written by `graspext datalens train` "
                                "(or one killed before its first checkpoint)")
    with open(path) as f:
        config = DataLensConfig(**json.load(f)["config"])
    return load_trained(folder, config, data_root=args.data_root, download=args.download, device=args.device)


def _train(args) -> int:
    from graspext.datalens.config import load_datalens_config
    from graspext.datalens.trainer import DataLens

    config = load_datalens_config(args.config)
    out = args.out or os.path.join("runs", config.name)
    os.makedirs(out, exist_ok=True)
    run = DataLens(config, out, data_root=args.data_root, download=args.download, device=args.device,
                   progress=not args.no_progress, resume=not args.restart)
    result = run.fit()
    print(f"{config.name}: {result.steps} generator steps ({result.epochs:.1f} epochs), {result.queries} queries, "
          f"ε = {result.epsilon:.3f} at δ = {result.delta:g} (stopped by {result.stopped}); results in {out}")
    return 0


def _write_samples(folder: str, run, n: int, seed: int) -> tuple:
    import torch

    from graspext import _io

    images, labels = run.generate(n, seed=seed)
    _io.atomic_write(os.path.join(folder, SAMPLES), lambda f: torch.save({"images": images, "labels": labels,
                                                                        "seed": seed}, f))
    try:
        from torchvision.utils import save_image

        order = torch.argsort(labels[:100], stable=True)
        save_image(images[:100][order], os.path.join(folder, "samples.png"), nrow=10)
    except ImportError:  # the grid is a convenience; the samples are saved
        pass
    return images, labels


def _generate(args) -> int:
    run = _load_run(args.folder, args)
    n = args.samples or run.config.evaluate.samples
    _write_samples(args.folder, run, n, args.seed)
    print(f"{n} samples in {os.path.join(args.folder, SAMPLES)} (ε = {run.accountant.epsilon():.3f})")
    return 0


def _evaluate(args) -> int:
    import dataclasses

    import torch

    from graspext import _io
    from graspext.datalens.data import load_images
    from graspext.datalens.evaluate import utility

    run = _load_run(args.folder, args)
    cfg = run.config.evaluate
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    path = os.path.join(args.folder, SAMPLES)
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        images, labels = saved["images"], saved["labels"]
    else:
        images, labels = _write_samples(args.folder, run, cfg.samples, cfg.seed)
    test_images, test_labels = load_images(run.config.dataset, False, run.config.image_size, args.data_root,
                                           args.download)
    out = utility(images, labels, test_images, test_labels, cfg, progress=not args.no_progress)
    summary = {"name": run.config.name, "dataset": run.config.dataset, "epsilon": run.accountant.epsilon(),
               "delta": run.config.delta, "queries": run.accountant.queries, "generator_steps": run.step,
               "samples": len(labels), "test_examples": len(test_labels), "chance": 1 / 10,
               "best_test_acc": out["best_test_acc"], "final_test_acc": out["final_test_acc"],
               "evaluation": dataclasses.asdict(cfg)}
    _io.write_text(os.path.join(args.folder, "evaluation.json"), json.dumps(summary, indent=2) + "\n")
    _io.write_text(os.path.join(args.folder, "evaluation.csv"), _io.csv_text(out["history"]))
    print(f"{run.config.name}: classifier trained on {len(labels)} generated samples, tested on "
          f"{len(test_labels)} real: accuracy {out['final_test_acc']:.4f} (best {out['best_test_acc']:.4f}, "
          f"chance 0.1) at ε = {summary['epsilon']:.3f}")
    return 0


def add_datalens_parser(sub: argparse._SubParsersAction) -> None:
    from graspext.datalens.config import list_datalens_configs

    p = sub.add_parser("datalens", help="DataLens: differentially private data generation with TopAgg votes")
    psub = p.add_subparsers(dest="datalens_command", required=True)

    def common(q):
        q.add_argument("--data-root", help="MNIST / Fashion-MNIST: the folder holding the IDX files")
        q.add_argument("--download", action="store_true", help="fetch missing IDX files with torchvision")
        q.add_argument("--device", help="cpu (default) or cuda")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = psub.add_parser("train", help="train (or resume) a DataLens run",
                        description="Shipped configs: " + ", ".join(list_datalens_configs()))
    t.add_argument("--config", required=True, help="a shipped config (digits-datalens-eps10, ...) or a .toml path")
    t.add_argument("--out", help="the run folder (default runs/<name>); rerunning resumes it")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out (a new run: it spends a new privacy budget)")
    common(t)
    t.set_defaults(run=_train)
    g = psub.add_parser("generate", help="draw class-balanced samples from a trained run")
    g.add_argument("folder")
    g.add_argument("--samples", type=int, help="how many (default: the config's evaluate.samples)")
    g.add_argument("--seed", type=int, default=0)
    common(g)
    g.set_defaults(run=_generate)
    e = psub.add_parser("evaluate", help="utility: a classifier trained on the samples, tested on real data")
    e.add_argument("folder")
    e.add_argument("--epochs", type=int, help="overrides the config's evaluate.epochs")
    common(e)
    e.set_defaults(run=_evaluate)
