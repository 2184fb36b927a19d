"""Report: RigL, SET and static sparse training on the embedded digits data, over several seeds.

    python benchmarks/dst_digits_report.py [--seeds 0 1 2] [--epochs 5] [--sparsity 0.9] [--out runs/dst-digits]

Each run trains graspext's CIFAR-style VGG11 from ERK masks (first layer dense) drawn with the run's seed, the
same masks for the three methods; RigL and SET move them every 5 steps until 75 % of the training (a 5-epoch
run has 60 steps). Prints the best test accuracy per run and the mean ± std per method. A report, not a test:
the accuracy differences between methods are small against the seed-to-seed spread on this data.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import graspext as gx
from graspext import data
from graspext.dst import SET, RigL, initial_masks

METHODS = {"static": None, "rigl": RigL(frequency=5), "set": SET(frequency=5)}


def run(method: str, seed: int, epochs: int, sparsity: float, out: str | None) -> dict:
    torch.manual_seed(seed)
    model = gx.models.create("vgg11_bn", num_classes=10)
    masks = initial_masks(model, sparsity, "erk", seed=seed)
    train = torch.utils.data.DataLoader(data.load("digits", None, train=True), batch_size=128, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed))
    test = torch.utils.data.DataLoader(data.load("digits", None, train=False), batch_size=256)
    dst = METHODS[method]
    if dst is not None:
        dst = type(dst)(**{**vars(dst), "seed": seed})
    result = gx.train(model, train, test, masks=masks, dst=dst, epochs=epochs, seed=seed, progress=False,
                      out_dir=f"{out}/{method}-s{seed}" if out else None)
    return {"method": method, "seed": seed, "best_test_acc": result.best_test_acc,
            "mask_updates": result.summary.get("mask_updates", 0),
            "mean_changed_fraction": result.summary.get("mean_changed_fraction", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", default=None, help="keep each run's folder here (resumable)")
    args = parser.parse_args()
    rows = [run(m, s, args.epochs, args.sparsity, args.out) for s in args.seeds for m in METHODS]
    print(f"\nVGG11 on digits at {args.sparsity:.0%} (ERK, first layer dense), {args.epochs} epochs, batch 128")
    print("\n| method | seed | best test accuracy (%) | mask updates | mean fraction moved per update |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['seed']} | {100 * r['best_test_acc']:.2f} | {r['mask_updates']} | "
              f"{r['mean_changed_fraction']:.3f} |")
    print("\n| method | runs | best test accuracy (%), mean ± std |")
    print("| --- | ---: | ---: |")
    for method in METHODS:
        accs = [100 * r["best_test_acc"] for r in rows if r["method"] == method]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {method} | {len(accs)} | {statistics.mean(accs):.2f} ± {spread:.2f} |")


if __name__ == "__main__":
    main()
