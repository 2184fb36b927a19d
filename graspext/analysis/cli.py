"""``graspext analyze gradflow | spectrum | limit``: each prints its headline and, with ``--out DIR``, writes its
JSON and plots there."""

from __future__ import annotations

import argparse


def _gradflow(args) -> int:
    from graspext.analysis.runs import run_gradflow

    out = run_gradflow(args.out, model=args.model, sparsity=args.sparsity, epochs=args.epochs, seed=args.seed,
                       progress=not args.no_progress)
    for init, run in out["runs"].items():
        first, last = run["history"][0]["total"], run["history"][-1]["total"]
        print(f"{init:>13}: gradient norm {first:.4g} at step 0, {last:.4g} at step {run['history'][-1]['step']}; "
              f"best test accuracy {run['best_test_acc']:.4f}")
    return 0


def _spectrum(args) -> int:
    from graspext.analysis.runs import run_spectrum

    out = run_spectrum(args.out, model=args.model, epochs=args.epochs, k=args.k, probes=args.probes,
                       steps=args.steps, engine=args.engine, seed=args.seed, progress=not args.no_progress)
    print(f"{out['model']}: {out['parameters']} parameters, loss {out['loss']:.4f}")
    print("top eigenvalues: " + ", ".join(f"{v:.4g}" for v in out["top_eigenvalues"]))
    print(f"trace (Hutchinson): {out['trace']:.4g} ± {out['trace_stderr']:.2g}")
    return 0


def _limit(args) -> int:
    from graspext.analysis.runs import run_limit

    out = run_limit(args.out, model=args.model, epochs=args.epochs, lmbda=args.lmbda, probes=args.probes,
                    steps=args.steps, seed=args.seed, progress=not args.no_progress)
    print(f"{out['model']} trained with L1 λ={out['lmbda']:g}: best test accuracy {out['best_test_acc']:.4f}, "
          f"ε (loss std over batches) {out['epsilon']:.4g}")
    print(f"predicted pruning limit: {out['predicted']:.1%} of the weights removed")
    print(f"actual pruning limit:    {out['actual']:.1%} of the weights removed")
    return 0


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("analyze", help="gradient flow, Hessian spectrum and the pruning limit (digits defaults)")
    asub = a.add_subparsers(dest="analyze_command", required=True)
    specs = (("gradflow", _gradflow, 3, "masked gradient norm of a sparse network from three initialisations"),
             ("spectrum", _spectrum, 5, "top eigenvalues, trace and SLQ density of the trained network's Hessian"),
             ("limit", _limit, 10, "the predicted and the actual one-shot pruning limit of an L1-trained network"))
    for name, run, epochs, help_text in specs:
        p = asub.add_parser(name, help=help_text)
        p.add_argument("--model", default="lenet5", help="a registered model (default lenet5, on the digits data)")
        p.add_argument("--epochs", type=int, default=epochs)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help="folder for the JSON results and plots")
        p.add_argument("--no-progress", action="store_true")
        if name == "gradflow":
            p.add_argument("--sparsity", type=float, default=0.9)
        if name in ("spectrum", "limit"):
            p.add_argument("--probes", type=int, default=4, help="SLQ probes")
            p.add_argument("--steps", type=int, default=60, help="Lanczos steps per probe")
        if name == "spectrum":
            p.add_argument("--k", type=int, default=5, help="how many top eigenvalues")
            p.add_argument("--engine", choices=("exact", "finite_difference"), default="exact")
        if name == "limit":
            p.add_argument("--lmbda", type=float, default=1e-4, help="the L1 coefficient")
        p.set_defaults(run=run)
