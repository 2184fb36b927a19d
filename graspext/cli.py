"""The ``graspext`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _datasets(args, train: bool = True):
    from graspext import data

    return data.load(args.data, args.data_root, train=train, download=args.download), data.NUM_CLASSES[args.data]


def _seeded_model_and_data(args):
    """Seeds torch, loads the training split and builds the model for its classes (prune and train)."""
    from graspext.models import create

    torch.manual_seed(args.seed)
    dataset, num_classes = _datasets(args, train=True)
    return create(args.model, num_classes=num_classes), dataset


def _check_out(path: str | None, kind: str) -> None:
    """Fails before any work where ``--out`` cannot be written: a ``kind`` "file" whose folder is missing or
    read-only, or a "folder" that is a file or cannot be created."""
    import os

    if path is None:
        return
    if kind == "file":
        if os.path.isdir(path):
            raise ValueError(f"--out {path!r} is a folder; give a file name for the masks")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"--out {path!r}: the folder {parent!r} does not exist")
    else:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--out {path!r} is a file; give a folder")
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {path!r}: {parent!r} is not writable")


def _prune(args) -> int:
    import graspext as gx

    _check_out(args.out, "file")
    model, dataset = _seeded_model_and_data(args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    options = {}
    if args.method == "grasp":
        options = dict(samples_per_class=args.samples_per_class, engine=args.engine, seed=args.seed)
    elif args.method == "snip":
        options = dict(samples_per_class=args.samples_per_class, seed=args.seed)
    elif args.method == "random":
        options = dict(seed=args.seed)
    start = time.perf_counter()
    masks = gx.prune(model, args.method, args.sparsity, loader, scope=args.scope, **options)
    seconds = time.perf_counter() - start
    print(masks.summary())
    print(f"\n{args.method} on {args.model} with the {args.data} data: {seconds:.2f} s, "
          f"{masks.num_kept()} of {masks.num_total()} weights kept")
    if args.out:
        masks.save(args.out)
        print(f"masks written to {args.out}")
    if args.json:
        print(json.dumps({"method": args.method, "model": args.model, "sparsity": masks.sparsity(),
                          "kept": masks.num_kept(), "total": masks.num_total(), "seconds": seconds,
                          "layer_density": masks.layer_densities()}))
    return 0


def _train(args) -> int:
    import graspext as gx

    _check_out(args.out, "folder")
    settings = dict(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, out_dir=args.out,
                    resume=not args.restart, progress=not args.no_progress, kernels=args.kernels,
                    init=args.init, amp=args.amp or False)
    gx.TrainConfig(**settings)  # every setting checked before the data is loaded
    callbacks = _comm_callbacks(args)
    if args.init and not args.masks:
        raise ValueError(f"--init {args.init} needs --masks: it scales each weight by its unit's kept connections")
    model, train_set = _seeded_model_and_data(args)
    test_set, _ = _datasets(args, train=False)
    masks = None
    if args.masks:
        masks = gx.Masks.load(args.masks)
        masks.check_fits(model)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                               generator=torch.Generator(), num_workers=args.workers)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, num_workers=args.workers)
    result = gx.train(model, train_loader, test_loader, masks=masks, callbacks=callbacks, **settings)
    kind = f"{masks.sparsity():.1%} sparse" if masks is not None else "dense"
    print(f"{args.model} ({kind}) on the {args.data} data, {args.epochs} epochs: "
          f"best test accuracy {result.best_test_acc:.4f}, final {result.final_test_acc:.4f}")
    if args.out:
        print(f"checkpoint and results in {args.out}")
    return 0


def _config_from_args(args):
    from graspext.config import ExperimentConfig, load_config

    if args.config:
        cfg = load_config(args.config)
        if args.data != "digits" and args.data != cfg.dataset:
            raise ValueError(f"--data {args.data} contradicts the config's dataset {cfg.dataset!r}")
        for flag in ("method", "sparsity", "model"):
            if getattr(args, flag) is not None:
                setattr(cfg, flag, getattr(args, flag))
                if flag == "method":
                    cfg.prune_options = {}
    elif args.model and args.method and args.sparsity is not None:
        cfg = ExperimentConfig(name=f"{args.data}-{args.model}-{args.method}", model=args.model, dataset=args.data,
                               method=args.method, sparsity=args.sparsity, train={"epochs": args.epochs or 10})
    else:
        raise ValueError("run needs --config, or all of --model, --method and --sparsity")
    if args.epochs is not None:
        cfg.train = {**(cfg.train or {}), "epochs": args.epochs}
    return cfg


def _run(args) -> int:
    import os

    from graspext.experiment import run_experiment

    cfg = _config_from_args(args)
    _check_out(args.out or os.path.join("runs", cfg.name), "folder")
    callbacks = _comm_callbacks(args)
    summary = run_experiment(cfg, out_dir=args.out or os.path.join("runs", cfg.name), data_root=args.data_root,
                             download=args.download, workers=args.workers, progress=not args.no_progress,
                             log=print, callbacks=callbacks)
    if "best_test_acc" in summary:
        print(f"{cfg.name}: best test accuracy {summary['best_test_acc']:.4f}, final "
              f"{summary['final_test_acc']:.4f} ({summary['sparsity']:.1%} sparse); results in {summary['out_dir']}")
    return 0


def _sweep(args) -> int:
    from graspext.experiment import SWEEP_MARKDOWN, sweep

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.config:  # a base config from flags; method and sparsity vary per run
        args.model = args.model or "vgg11_bn"
        args.method, args.sparsity = (methods or [None])[0], (sparsities or [None])[0]
    cfg = _config_from_args(args)
    out = args.out or "runs/sweep"
    _check_out(out, "folder")
    sweep(cfg, methods, sparsities, seeds, out, data_root=args.data_root, download=args.download,
          workers=args.workers, progress=not args.no_progress)
    with open(f"{out}/{SWEEP_MARKDOWN}") as f:
        print(f.read())
    return 0


def _demo(args) -> int:
    from graspext.experiment import demo

    _check_out(args.out, "folder")
    demo(args.out, model=args.model, sparsity=args.sparsity, epochs=args.epochs, progress=not args.no_progress)
    return 0


def _report(args) -> int:
    from graspext.report import report

    for path in report(args.folder, args.out):
        print(path)
    return 0


def _lottery_run(args) -> int:
    from graspext.lottery.compare import run_lottery_config
    from graspext.lottery.config import load_lottery_config

    cfg = load_lottery_config(args.config)
    out = args.out or f"runs/{cfg.name}"
    _check_out(out, "folder")
    run_lottery_config(cfg, out, data_root=args.data_root, download=args.download, progress=not args.no_progress)
    print(f"{cfg.name}: finished; `graspext lottery report {out}` writes the comparison")
    return 0


def _lottery_report(args) -> int:
    from graspext.lottery.compare import comparison_table, format_comparison
    from graspext.lottery.report import lottery_report

    print(format_comparison(comparison_table(args.folder)))
    for path in lottery_report(args.folder, args.out):
        print(path)
    return 0


def _add_data_options(p: argparse.ArgumentParser) -> None:
    from graspext.data import NUM_CLASSES

    p.add_argument("--data", default="digits", choices=sorted(NUM_CLASSES),
                   help="digits (embedded, the default) or a dataset on disk under --data-root")
    p.add_argument("--data-root", help="folder holding the dataset (CIFAR: the extracted python-version archive)")
    p.add_argument("--download", action="store_true", help="CIFAR only: download into --data-root first")


def _add_nproc_option(p: argparse.ArgumentParser, comm: bool = False) -> None:
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine (torchrun, DDP: gloo on the CPU, NCCL on CUDA); "
                        "the batch size stays the global batch")
    if comm:
        p.add_argument("--comm", choices=["allreduce", "topk", "topk-sign"], default=None,
                       help="with --nproc: how gradients are communicated, counting the bytes per step (allreduce: "
                            "DDP's own; topk: the --topk-ratio largest entries per parameter with error feedback; "
                            "topk-sign: their signs, scaled)")
        p.add_argument("--topk-ratio", type=float, default=0.01, help="with --comm topk[-sign]: fraction sent")


def _comm_callbacks(args) -> list:
    """The communication callback --comm asks for (none without it)."""
    if getattr(args, "comm", None) is None:
        return []
    from graspext.distributed import CommunicationMeter, Distributed, TopKCompression

    if not Distributed().active:
        raise ValueError(f"--comm {args.comm} needs data-parallel processes: add --nproc 2 (or more)")
    if args.comm == "allreduce":
        return [CommunicationMeter()]
    return [TopKCompression(args.topk_ratio, sign=args.comm == "topk-sign")]


def build_parser() -> argparse.ArgumentParser:
    from graspext.models import REGISTRY
    from graspext.pruning import METHODS

    parser = argparse.ArgumentParser(prog="graspext", description="Pruning at initialization.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune a model at initialization and report per-layer densities")
    p.add_argument("--model", default="vgg19_bn", help=f"one of {', '.join(sorted(REGISTRY))} or a torchvision model")
    p.add_argument("--method", default="grasp", choices=sorted(METHODS))
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--scope", default="global", choices=["global", "layerwise"])
    p.add_argument("--samples-per-class", type=int, default=10, help="GraSP/SNIP: images per class (CIFAR-10 config: 10)")
    p.add_argument("--engine", default="exact", choices=["exact", "forward_over_reverse", "finite_difference"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the masks here (graspext.Masks.save format)")
    p.add_argument("--json", action="store_true", help="also print a JSON line of the results")
    _add_data_options(p)
    p.set_defaults(run=_prune)

    t = sub.add_parser("train", help="train a model, dense or with masks from `prune --out`")
    t.add_argument("--model", default="vgg11_bn", help="as for prune")
    t.add_argument("--masks", help="a masks file written by `graspext prune --out`; omit to train dense")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="folder for the per-epoch checkpoint and results (resumed when present)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--amp", choices=["bf16", "fp16"],
                   help="mixed precision: bf16 autocast (CPU or CUDA) or fp16 with loss scaling (CUDA)")
    t.add_argument("--kernels", default="auto", choices=["auto", "sparse", "dense"],
                   help="with --masks: sparse kernels (auto: where the device has them) or masked dense weights")
    from graspext.init import INITS

    t.add_argument("--init", choices=INITS, default=None,
                   help="with --masks: sparse-aware init before training (unit_scaled: He on each unit's kept "
                        "fan-in, Evci et al. 2022; layer_scaled: dense init / sqrt(layer density))")
    _add_nproc_option(t, comm=True)
    _add_data_options(t)
    t.set_defaults(run=_train)

    from graspext.config import list_configs

    r = sub.add_parser("run", help="prune + train from a config (shipped or a .toml file) or flags",
                       description="Shipped configs: " + ", ".join(list_configs()))
    r.add_argument("--config", help="a shipped config name or a .toml path")
    r.add_argument("--model", help="overrides the config's model")
    r.add_argument("--method", choices=sorted(METHODS), help="overrides the config's method (and drops its options)")
    r.add_argument("--sparsity", type=float, help="overrides the config's sparsity")
    r.add_argument("--epochs", type=int, help="overrides the config's epochs")
    r.add_argument("--out", help="run folder (default runs/<name>); rerunning resumes from it")
    r.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_nproc_option(r, comm=True)
    _add_data_options(r)
    r.set_defaults(run=_run)

    w = sub.add_parser("sweep", help="methods x sparsities x seeds into one results table (mean ± std)")
    w.add_argument("--config", help="base config (shipped name or .toml); its method and sparsity are replaced")
    w.add_argument("--model", help="without --config: the model (default vgg11_bn)")
    w.add_argument("--methods", default="grasp,snip,synflow,random")
    w.add_argument("--sparsities", default="0.9,0.95,0.98")
    w.add_argument("--seeds", default="0")
    w.add_argument("--epochs", type=int, help="overrides the config's epochs")
    w.add_argument("--out", help="sweep folder (default runs/sweep); rerunning resumes")
    w.add_argument("--workers", type=int, default=0)
    w.add_argument("--no-progress", action="store_true")
    _add_nproc_option(w)
    w.set_defaults(run=_sweep, method=None, sparsity=None)
    _add_data_options(w)

    o = sub.add_parser("report", help="plots (PNG and SVG) from a sweep or run folder")
    o.add_argument("folder", help="a folder written by `graspext sweep` or `graspext run`")
    o.add_argument("--out", help="where the plots go (default FOLDER/report)")
    o.set_defaults(run=_report)

    lot = sub.add_parser("lottery", help="lottery tickets: IMP with rewinding against its sanity-check baselines")
    lsub = lot.add_subparsers(dest="lottery_command", required=True)
    lr = lsub.add_parser("run", help="run (or resume) a lottery comparison from a config")
    lr.add_argument("--config", required=True, help="a shipped lottery config (digits-vgg11-imp, ...) or a .toml")
    lr.add_argument("--out", help="the comparison folder (default runs/<name>); rerunning resumes it")
    lr.add_argument("--data-root", default=None)
    lr.add_argument("--download", action="store_true")
    lr.add_argument("--no-progress", action="store_true")
    lr.set_defaults(run=_lottery_run)
    lp = lsub.add_parser("report", help="the comparison table, verdict and plots of a lottery folder")
    lp.add_argument("folder")
    lp.add_argument("--out", help="where the report goes (default FOLDER/report)")
    lp.set_defaults(run=_lottery_report)

    from graspext.analysis.cli import add_analyze_parser

    add_analyze_parser(sub)

    from graspext.datalens.cli import add_datalens_parser

    add_datalens_parser(sub)

    d = sub.add_parser("demo", help="the main job on the embedded data: GraSP, SNIP, SynFlow and random compared")
    d.add_argument("--model", default="vgg11_bn")
    d.add_argument("--sparsity", type=float, default=0.98)
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--out", default="runs/demo", help="demo folder; rerunning reuses finished runs")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from graspext.distributed.launch import launch, under_launcher

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        print(f"graspext {args.command}: error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    if nproc is not None and nproc > 1 and not under_launcher():
        return launch(argv, nproc)
    if nproc is not None and under_launcher() and int(os.environ["WORLD_SIZE"]) != nproc:
        print(f"graspext {args.command}: error: --nproc {nproc} contradicts the launcher's WORLD_SIZE="
              f"{os.environ['WORLD_SIZE']}", file=sys.stderr)
        return 2
    distributed = False
    if under_launcher():
        from graspext.distributed import init_from_env

        distributed = init_from_env()
        if distributed and int(os.environ.get("RANK", "0")) != 0:
            # One report, from rank 0 (errors still reach stderr); open for the life of the process.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    import torch.distributed as dist

    try:
        status = args.run(args)
        if distributed:
            dist.barrier()  # no rank tears the group down while a peer still talks to it
        return status
    except (ValueError, TypeError, OSError) as exc:  # user mistakes: one line, never a traceback
        print(f"graspext {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
