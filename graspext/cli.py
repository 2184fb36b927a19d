"""The ``graspext`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _prune(args) -> int:
    import graspext as gx
    from graspext.data import digits_dataset
    from graspext.models import create

    torch.manual_seed(args.seed)
    model = create(args.model, num_classes=10)
    loader = torch.utils.data.DataLoader(digits_dataset(train=True), batch_size=128, shuffle=True,
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
    print(f"\n{args.method} on {args.model} with the embedded digits data: {seconds:.2f} s, "
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
    from graspext.data import digits_dataset
    from graspext.models import create

    torch.manual_seed(args.seed)
    model = create(args.model, num_classes=10)
    masks = None
    if args.masks:
        masks = gx.Masks.load(args.masks)
        masks.check_fits(model)
    train_loader = torch.utils.data.DataLoader(digits_dataset(train=True), batch_size=args.batch_size, shuffle=True,
                                               generator=torch.Generator())
    test_loader = torch.utils.data.DataLoader(digits_dataset(train=False), batch_size=256)
    result = gx.train(model, train_loader, test_loader, masks=masks, epochs=args.epochs, lr=args.lr,
                      weight_decay=args.weight_decay, seed=args.seed, out_dir=args.out, resume=not args.restart,
                      progress=not args.no_progress)
    kind = f"{masks.sparsity():.1%} sparse" if masks is not None else "dense"
    print(f"{args.model} ({kind}) on the embedded digits data, {args.epochs} epochs: "
          f"best test accuracy {result.best_test_acc:.4f}, final {result.final_test_acc:.4f}")
    if args.out:
        print(f"checkpoint and results in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from graspext.models import REGISTRY
    from graspext.pruning import METHODS

    parser = argparse.ArgumentParser(prog="graspext", description="Pruning at initialization.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune a model at initialization on the embedded digits data and report")
    p.add_argument("--model", default="vgg19_bn", choices=sorted(REGISTRY))
    p.add_argument("--method", default="grasp", choices=sorted(METHODS))
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--scope", default="global", choices=["global", "layerwise"])
    p.add_argument("--samples-per-class", type=int, default=10, help="GraSP/SNIP: images per class (CIFAR-10 config: 10)")
    p.add_argument("--engine", default="exact", choices=["exact", "forward_over_reverse", "finite_difference"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the masks here (graspext.Masks.save format)")
    p.add_argument("--json", action="store_true", help="also print a JSON line of the results")
    p.set_defaults(run=_prune)

    t = sub.add_parser("train", help="train a model (dense, or with masks from `prune --out`) on the embedded digits")
    t.add_argument("--model", default="vgg11_bn", choices=sorted(REGISTRY))
    t.add_argument("--masks", help="a masks file written by `graspext prune --out`; omit to train dense")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="folder for the per-epoch checkpoint and results (resumed when present)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"graspext {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
