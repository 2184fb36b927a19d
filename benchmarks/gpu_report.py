"""Tables from the JSON of benchmarks/test_gpu_imagenet.py (pytest-benchmark's --benchmark-json).

    python benchmarks/gpu_report.py imagenet_layers.json [imagenet_steps.json ...]

Per layer: the median of every mode, the fastest dense configuration (TF32 or bfloat16 channels_last), the
fastest of graspext's modes (the mode chosen by measurement) and the ratio of the two, side by side from one run;
the 3x3 convolutions of the two largest stages at 98 % carry issue 19's target (>= 2x); the useful TFLOP/s (the
dense layer's multiply-adds over the dense time, the kept weights' over the chosen mode's) place each side against
the GPU's peaks. Per train step: each
sparse configuration against the fastest dense step of the same model (eager or CUDA graph, TF32 or bfloat16),
with the targets at 95 % (>= 1.1x) and 98 % (>= 1.3x).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

DENSE_LAYER_IMPLS = ("dense_tf32", "dense_bf16_cl")
LAYER_TARGET = (0.98, 2.0)
STEP_TARGETS = {0.95: 1.1, 0.98: 1.3}


def _median_ms(bench: dict) -> float:
    return 1000.0 * bench["stats"]["median"]


def layer_rows(benchmarks: list[dict]) -> list[dict]:
    """One row per (model, layer, sparsity) with every impl's median (ms), the best dense and best graspext
    impl, their ratio and whether the row carries the per-layer target."""
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    info: dict[tuple, dict] = {}
    for b in benchmarks:
        e = b.get("extra_info", {})
        if "layer" not in e:
            continue
        key = (e["model"], e["layer"], e["sparsity"])
        groups[key][e["impl"]] = _median_ms(b)
        info[key] = e
    rows = []
    for key, times in groups.items():
        dense = {k: v for k, v in times.items() if k in DENSE_LAYER_IMPLS}
        ours = {k: v for k, v in times.items() if k not in DENSE_LAYER_IMPLS}
        if not dense or not ours:
            continue
        best_dense, best_ours = min(dense, key=dense.get), min(ours, key=ours.get)
        e = info[key]
        # Useful work per second: the dense layer's multiply-adds over the dense time, the kept weights' over the
        # chosen mode's (whatever that mode computes), as 2 flops per multiply-add.
        rate = {"dense_tflops": 2e-9 * e["dense_macs"] / dense[best_dense] if "dense_macs" in e else None,
                "sparse_tflops": 2e-9 * e["sparse_macs"] / ours[best_ours] if "sparse_macs" in e else None}
        rows.append({"model": key[0], "layer": key[1], "sparsity": key[2], "density": e.get("density"),
                     "times_ms": times, "best_dense": best_dense, "best_mode": best_ours, **rate,
                     "ratio": dense[best_dense] / ours[best_ours],
                     "target": LAYER_TARGET[1] if e.get("largest_stage_3x3") and key[2] == LAYER_TARGET[0] else None})
    return sorted(rows, key=lambda r: (r["model"], r["sparsity"], r["layer"]))


def step_rows(benchmarks: list[dict]) -> list[dict]:
    """One row per sparse step configuration: its median and the ratio to the model's fastest dense step."""
    by_model: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        e = b.get("extra_info", {})
        if "config" in e:
            by_model[e["model"]].append({**e, "ms": _median_ms(b)})
    rows = []
    for model, entries in by_model.items():
        dense = [d for d in entries if d["sparsity"] is None]
        if not dense:
            continue
        best = min(dense, key=lambda d: d["ms"])
        for d in entries:
            ratio = best["ms"] / d["ms"]
            target = STEP_TARGETS.get(d["sparsity"])
            rows.append({"model": model, "config": d["config"], "graphs": d["graphs"], "sparsity": d["sparsity"],
                         "ms": d["ms"], "ratio": ratio, "best_dense": best["config"] + (" graph" if best["graphs"]
                                                                                          else " eager"),
                         "modes": d.get("modes"), "target": target})
    return sorted(rows, key=lambda r: (r["model"], r["sparsity"] if r["sparsity"] is not None else -1, r["config"],
                                       r["graphs"]))


def _verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"{'met' if ratio >= target else 'MISSED'} (>= {target:g}x)"


def markdown(layers: list[dict], steps: list[dict]) -> str:
    lines = []
    if layers:
        impls = sorted({i for r in layers for i in r["times_ms"]})
        lines += ["| model | layer | sparsity | " + " | ".join(f"{i} ms" for i in impls)
                  + " | best dense | chosen mode | ratio | useful TFLOP/s dense / chosen | target |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in impls) + " | --- | --- | ---: | ---: | --- |"]
        for r in layers:
            cells = " | ".join(f"{r['times_ms'][i]:.2f}" if i in r["times_ms"] else "" for i in impls)
            rates = " / ".join(f"{r[k]:.1f}" if r[k] is not None else "?" for k in ("dense_tflops", "sparse_tflops"))
            lines.append(f"| {r['model']} | {r['layer']} | {r['sparsity']:.0%} | {cells} | {r['best_dense']} | "
                         f"{r['best_mode']} | {r['ratio']:.2f}x | {rates} | {_verdict(r['ratio'], r['target'])} |")
        lines.append("")
    if steps:
        lines += ["| model | step | execution | ms | vs fastest dense | modes | target |",
                  "| --- | --- | --- | ---: | ---: | --- | --- |"]
        for r in steps:
            modes = ", ".join(f"{k} {v}" for k, v in (r["modes"] or {}).items())
            lines.append(f"| {r['model']} | {r['config']} | {'CUDA graph' if r['graphs'] else 'eager'} | "
                         f"{r['ms']:.1f} | {r['ratio']:.2f}x (of {r['best_dense']}) | {modes} | "
                         f"{_verdict(r['ratio'], r['target'])} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    benchmarks = []
    for path in paths:
        with open(path) as f:
            benchmarks += json.load(f)["benchmarks"]
    print(markdown(layer_rows(benchmarks), step_rows(benchmarks)))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
