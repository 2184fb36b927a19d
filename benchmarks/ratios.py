"""One table of side-by-side ratios, measured in one run on this machine.

    python benchmarks/ratios.py [--quick] [--repeats N] [--skip-grasp] [--sparse] [--bf16]

Selection: median seconds of graspext.ops.global_kth_value vs torch.kthvalue(torch.cat(...)).
GraSP scoring: median seconds (in-process, repeated) and peak memory added by the call (fresh process per
measurement; see workloads.py), official loop vs each engine, with the masks compared to the official ones.
Sparse training (--sparse; see sparse_workloads.py): median forward+backward milliseconds per layer, dense
torch against graspext's sparse kernels (and torch.sparse CSR for Linear), and the end-to-end train step.
bfloat16 (--bf16): the train step against dense float32, dense bfloat16 autocast with channels_last, graspext
in float32 and bfloat16, and SparseProp.
Dynamic sparse training (--dst; see dst_workloads.py): the mean train step of a RigL run (updates every 100
steps included) against the static sparse step, dense float32, dense bfloat16 channels_last and rigl-torch.
Lottery tickets (--imp; see lottery_workloads.py): the train step at each IMP round's density against round 0.
Curvature (--analysis; see analysis_workloads.py): Hessian-vector products on VGG19-CIFAR, exact against the
frozen-activation finite difference, and SLQ's time and peak memory.
TopAgg (--topagg; see test_topagg.py): DataLens's vote aggregation, fused operator against the torch reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import (  # noqa: E402
    differences_from_official,
    grasp_graspext,
    grasp_official,
    kth_graspext,
    kth_torch,
    measure_grasp,
    selection_scores,
    vgg19_cifar_setup,
)


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def selection_table(sizes, repeats):
    rows = []
    for total in sizes:
        scores = selection_scores(total)
        k = int(total * 0.98)
        assert kth_graspext(scores, k).item() == kth_torch(scores, k).item()
        ours = median_seconds(lambda s=scores, k=k: kth_graspext(s, k), repeats)
        ref = median_seconds(lambda s=scores, k=k: kth_torch(s, k), max(2, repeats // 2))
        rows.append((f"{total / 1e6:.0f}M scores", ref, ours))
    return rows


def grasp_table(repeats):
    model, x, y = vgg19_cifar_setup()
    ref_masks = None
    rows = []
    for impl in ["official", "exact", "forward_over_reverse", "finite_difference"]:
        if impl == "official":
            fn = lambda: grasp_official(model, x, y)  # noqa: E731
            _, peak, masks = measure_grasp("official")
        else:
            fn = lambda impl=impl: grasp_graspext(model, x, y, engine=impl)  # noqa: E731
            _, peak, masks = measure_grasp("graspext", engine=impl)
        seconds = median_seconds(fn, repeats)
        if ref_masks is None:
            ref_masks, ref_seconds, ref_peak = masks, seconds, peak
            diff = "-"
        else:
            extra, missing = differences_from_official(masks, ref_masks)
            kept = sum(int((ref_masks[n] & masks[n]).sum()) for n in masks) / sum(int(m.sum()) for m in masks.values())
            diff = f"+{missing}/-{extra} ({kept:.2%} of kept shared)"
        rows.append((impl, seconds, peak, ref_seconds / seconds, peak / ref_peak, diff))
    return rows


def sparse_tables(repeats: int, quick: bool) -> None:
    from sparse_workloads import (
        BATCH_NORM_SHAPES,
        MODELS,
        SPARSITIES,
        BatchNormCase,
        ConvCase,
        LinearCase,
        StepCase,
        conv_layers,
    )

    sparsities = SPARSITIES[1:3] if quick else SPARSITIES
    ms = lambda fn: 1e3 * median_seconds(fn, repeats)  # noqa: E731
    header = " | ".join(f"{s:.0%}" for s in sparsities)
    print(f"\n| layer fwd+bwd, batch 128 | dense ms | sparse ms (speedup) at {header} |")
    print("| --- | ---: | " + " | ".join("---:" for _ in sparsities) + " |")
    for model_name in MODELS:
        for key in conv_layers(model_name):
            cells, dense_ms = [], None
            for sparsity in sparsities:
                case = ConvCase(model_name, key, sparsity)
                if dense_ms is None:
                    dense_ms = ms(case.dense)
                sparse_ms = ms(case.sparse)
                cells.append(f"{sparse_ms:.1f} ({dense_ms / sparse_ms:.1f}x)")
            print(f"| {model_name} {key} | {dense_ms:.1f} | " + " | ".join(cells) + " |", flush=True)
    print("\n| Linear 4096x4096, batch 256, fwd+bwd | dense ms | torch CSR ms | graspext ms | vs dense | vs CSR |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for sparsity in sparsities:
        case = LinearCase(sparsity)
        dense_ms, csr_ms, sparse_ms = ms(case.dense), ms(case.torch_csr), ms(case.sparse)
        print(f"| {sparsity:.0%} | {dense_ms:.1f} | {csr_ms:.1f} | {sparse_ms:.1f} | {dense_ms / sparse_ms:.1f}x | "
              f"{csr_ms / sparse_ms:.1f}x |", flush=True)
    print("\n| BatchNorm+ReLU fwd+bwd, batch 128 | torch ms | graspext fused ms | speedup |")
    print("| --- | ---: | ---: | ---: |")
    for channels, size in BATCH_NORM_SHAPES:
        case = BatchNormCase(channels, size)
        torch_ms, fused_ms = ms(case.torch), ms(case.fused)
        print(f"| {channels}x{size}x{size} | {torch_ms:.2f} | {fused_ms:.2f} | {torch_ms / fused_ms:.2f}x |",
              flush=True)
    print("\n| train step, batch 128 (GraSP masks) | dense ms | " + " | ".join(
        f"sparse {s:.0%} ms (speedup)" for s in sparsities[:3]) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in sparsities[:3]) + " |")
    for model_name in MODELS:
        dense_ms = ms(StepCase(model_name, None).step)
        cells = []
        for sparsity in ((0.90, 0.95, 0.98) if not quick else sparsities):
            sparse_ms = ms(StepCase(model_name, sparsity).step)
            cells.append(f"{sparse_ms:.0f} ({dense_ms / sparse_ms:.2f}x)")
        print(f"| {model_name} | {dense_ms:.0f} | " + " | ".join(cells) + " |", flush=True)


def bf16_step_table(repeats: int, quick: bool) -> None:
    """The train step against every configuration a CPU user would pick instead, side by side in one run:
    dense float32, dense bfloat16 autocast with channels_last (oneDNN/AMX), graspext in float32 and under
    bfloat16 autocast, and SparseProp (PyPI ``sparseprop``) on the same masked model."""
    from sparse_workloads import MODELS, ConvCase, StepCase, conv_layers

    try:
        import sparseprop  # noqa: F401
        has_sparseprop = True
    except ImportError:
        has_sparseprop = False
    rows = [("vgg19_bn", 0.98), ("resnet32_grasp", 0.98)] if quick else [
        ("vgg19_bn", 0.90), ("vgg19_bn", 0.95), ("vgg19_bn", 0.98), ("resnet32_grasp", 0.98)]
    print("\n| model @ sparsity, batch 128 train step, ms | dense fp32 | dense bf16 autocast, channels_last | "
          "graspext fp32 | graspext bf16 autocast | SparseProp | graspext bf16 vs best dense | vs SparseProp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model_name, sparsity in rows:
        cases = {"dense fp32": StepCase(model_name, None),
                 "dense bf16": StepCase(model_name, None, amp=True, channels_last=True),
                 "ours fp32": StepCase(model_name, sparsity), "ours bf16": StepCase(model_name, sparsity, amp=True)}
        if has_sparseprop:
            cases["sparseprop"] = StepCase(model_name, sparsity, library="sparseprop")
        t = interleaved_medians({k: c.step for k, c in cases.items()}, repeats)
        del cases
        best = min(t["dense fp32"], t["dense bf16"])
        peer = t.get("sparseprop", float("nan"))
        print(f"| {model_name} @ {sparsity:.0%} | {t['dense fp32']:.0f} | {t['dense bf16']:.0f} | {t['ours fp32']:.0f} | "
              f"{t['ours bf16']:.0f} | {peer:.0f} | {best / t['ours bf16']:.2f}x | "
              f"{peer / min(t['ours bf16'], t['ours fp32']):.2f}x |", flush=True)


    if quick:
        return
    cores = torch.get_num_threads()
    print("\n| layer fwd+bwd, batch 128 | sparsity | dense bf16 CL ms | sparse fp32 ms | sparse bf16 ms | "
          "fp32 GMAC/s/core | bf16 GMAC/s/core | bf16/fp32 | bf16 vs dense bf16 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model_name in MODELS:
        for key in conv_layers(model_name):
            for sparsity in (0.95, 0.98):
                case = ConvCase(model_name, key, sparsity)
                t = interleaved_medians({"dense": case.dense_bf16, "fp32": case.sparse, "bf16": case.sparse_bf16},
                                        repeats, warmup=1)
                rate = {k: case.sparse_macs / (t[k] * 1e-3) / 1e9 / cores for k in ("fp32", "bf16")}
                print(f"| {model_name} {key} | {sparsity:.0%} | {t['dense']:.1f} | {t['fp32']:.1f} | {t['bf16']:.1f} | "
                      f"{rate['fp32']:.1f} | {rate['bf16']:.1f} | {t['fp32'] / t['bf16']:.2f}x | "
                      f"{t['dense'] / t['bf16']:.2f}x |", flush=True)


def dst_step_table(repeats: int, quick: bool) -> None:
    """RigL's mean step (ΔT = 100) against the static sparse step, dense fp32, dense bf16 channels_last and
    rigl-torch, in one run; the update iteration is timed separately and amortized over ΔT steps."""
    from dst_workloads import DELTA_T, RigLStepCase, RigLTorchCase, optimizer_state_bytes
    from rigl_torch_peer import rigl_torch_available
    from sparse_workloads import StepCase

    rows = [("resnet32_grasp", 0.98)] if quick else [(m, s) for m in ("vgg19_bn", "resnet32_grasp")
                                                      for s in (0.90, 0.95, 0.98)]
    print(f"\n| model @ sparsity (ERK), batch 128, ms | dense fp32 | dense bf16 CL | ours static | ours update "
          f"iteration | of which dense gradient | ours RigL mean (ΔT={DELTA_T}) | update overhead | ours bf16 RigL "
          "mean | rigl-torch fp32 mean | rigl-torch bf16 CL mean | best ours vs best dense | vs best rigl-torch | "
          "optimizer state, ours / dense |")
    print("| --- | " + " | ".join(["---:"] * 13) + " |")
    for model_name, sparsity in rows:
        dense, dense_bf16 = StepCase(model_name, None), StepCase(model_name, None, amp=True, channels_last=True)
        ours, ours_bf16 = RigLStepCase(model_name, sparsity), RigLStepCase(model_name, sparsity, amp=True)
        steps = {"dense": dense.step, "dense bf16": dense_bf16.step, "static": ours.static_step,
                 "update": ours.update_step, "fwd+bwd": ours.forward_backward,
                 "dense-grad fwd+bwd": ours.dense_grad_forward_backward, "static bf16": ours_bf16.static_step,
                 "update bf16": ours_bf16.update_step}
        peers = {}
        if rigl_torch_available():
            peers = {"rt": RigLTorchCase(model_name, sparsity), "rt bf16": RigLTorchCase(model_name, sparsity, True,
                                                                                         True)}
            for name, case in peers.items():  # each round: one ordinary call, then one update call
                for kind in ("plain", "update"):
                    steps[f"{name} {kind}"] = case.step
        t = interleaved_medians(steps, repeats, warmup=2)

        def mean(static, update):
            return static + (update - static) / DELTA_T

        ours_mean, ours_bf16_mean = mean(t["static"], t["update"]), mean(t["static bf16"], t["update bf16"])
        rt = {n: mean(t[f"{n} plain"], t[f"{n} update"]) for n in peers}
        best_dense, best_ours = min(t["dense"], t["dense bf16"]), min(ours_mean, ours_bf16_mean)
        state = optimizer_state_bytes(ours.optimizer) / optimizer_state_bytes(dense.opt)
        print(f"| {model_name} @ {sparsity:.0%} | {t['dense']:.0f} | {t['dense bf16']:.0f} | {t['static']:.0f} | "
              f"{t['update']:.0f} | {t['dense-grad fwd+bwd'] - t['fwd+bwd']:.0f} | {ours_mean:.0f} | {(ours_mean - t['static']) / t['static']:.1%} | "
              f"{ours_bf16_mean:.0f} | {rt.get('rt', float('nan')):.0f} | {rt.get('rt bf16', float('nan')):.0f} | "
              f"{best_dense / best_ours:.2f}x | {min(rt.values(), default=float('nan')) / best_ours:.2f}x | "
              f"{state:.3f} |", flush=True)
        del dense, dense_bf16, ours, ours_bf16, peers, steps


def imp_round_table(repeats: int, quick: bool) -> None:
    """The train step at the density of each IMP round (20 % pruned per round), as graspext's trainer runs it,
    against round 0 (the dense model), for the shipped lottery configs' models at batch 64."""
    from lottery_workloads import IMPRoundCase

    rounds = (0, 4, 8, 14) if quick else tuple(range(15))
    for model_name in ("resnet20", "vgg16_bn"):
        cases = {r: IMPRoundCase(model_name, r) for r in rounds}
        t = interleaved_medians({r: c.step for r, c in cases.items()}, repeats, warmup=2)
        print(f"\n| {model_name}, batch 64: IMP round | density | runs as | train step ms | vs round 0 |")
        print("| ---: | ---: | --- | ---: | ---: |")
        for r, case in cases.items():
            print(f"| {r} | {case.density:.3f} | {case.runs_as} | {t[r]:.1f} | {t[0] / t[r]:.2f}x |", flush=True)
        del cases


def analysis_table(repeats: int, quick: bool) -> None:
    """Hessian-vector products on VGG19-CIFAR, exact against finite difference (dense and over 98 % masks), then
    SLQ's time and peak memory for one probe."""
    import time as _time

    from analysis_workloads import BATCH, HVPCase, current_rss_mib, peak_rss_mib, vgg19_curvature

    for masked in (False, True):
        cases = {engine: HVPCase(engine, masked) for engine in ("exact", "finite_difference")}
        t = interleaved_medians({k: c.step for k, c in cases.items()}, repeats, warmup=1)
        dim = cases["exact"].curvature.dim
        products = {k: c.curvature.flatten(c.curvature.hvp(c.v)) for k, c in cases.items()}
        print(f"\n| VGG19-CIFAR HVP, batch {BATCH}, {'98 % masks' if masked else 'dense'} ({dim:,} coordinates) "
              "| ms | products/s | vs exact | relative error vs exact |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for engine, ms in t.items():
            error = float((products[engine] - products["exact"]).norm() / products["exact"].norm())
            print(f"| {engine} | {ms:.0f} | {1e3 / ms:.2f} | {t['exact'] / ms:.2f}x | {error:.2g} |", flush=True)
        del cases
    steps = 5 if quick else 20
    curvature = vgg19_curvature("exact")
    before = current_rss_mib()
    start = _time.perf_counter()
    curvature.spectral_density(probes=1, steps=steps)
    seconds = _time.perf_counter() - start
    print("\n| SLQ VGG19-CIFAR, 1 probe | Lanczos steps | s | peak RSS added MiB | basis MiB (steps x dim x 8 B) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| exact | {steps} | {seconds:.1f} | {peak_rss_mib() - before:.0f} | "
          f"{steps * curvature.dim * 8 / 2**20:.0f} |")


def topagg_table(repeats: int, quick: bool) -> None:
    """TopAgg at DataLens's scale, the fused operator against the plain-torch reference."""
    from test_topagg import BETA, D, K, SAMPLES, SIGMA, TEACHERS

    from graspext.ops.topagg import topagg, topagg_reference

    teachers = 400 if quick else TEACHERS
    grads = torch.randn(SAMPLES, teachers, D, generator=torch.Generator().manual_seed(0))
    t = interleaved_medians({"fused": lambda: topagg(grads, K, 1.0, SIGMA, BETA, 0),
                             "reference": lambda: topagg_reference(grads, K, 1.0, SIGMA, BETA, 0)}, repeats, warmup=1)
    print(f"\n| TopAgg, T={teachers}, d={D}, {SAMPLES} samples, k={K} | ms | vs reference |")
    print("| --- | ---: | ---: |")
    for impl, ms in t.items():
        print(f"| {impl} | {ms:.0f} | {t['reference'] / ms:.2f}x |", flush=True)


def datalens_table(repeats: int, quick: bool) -> None:
    """DataLens's training step and generator step, and the batched teacher gradients against one call per
    teacher (the official structure)."""
    import test_datalens as bench

    from graspext.datalens.models import one_hot

    names = ["digits-eps10"] if quick else sorted(bench.WORKLOADS)
    print("\n| DataLens workload | teachers | samples/step | whole step ms | generator step ms "
          "| teacher grads, ensemble ms | per-teacher loop ms | ensemble speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        run, t = _datalens_row(bench, one_hot, name, repeats)
        print(f"| {name} | {run.config.teachers} | {run.batch_size} | {t['step']:.0f} | {t['generator']:.0f} | "
              f"{t['ensemble']:.0f} | {t['loop']:.0f} | {t['loop'] / t['ensemble']:.1f}x |", flush=True)


def _datalens_row(bench, one_hot, name: str, repeats: int):
    run = bench.make_run(name)
    z, labels = bench.step_inputs(run)
    with torch.no_grad():
        fake = run.generator(z, one_hot(labels, 10))
    loop = bench.per_teacher_loop(run)
    return run, interleaved_medians({"step": run.train_step, "generator": lambda: run._generator_step(z, labels, 0),
                                     "ensemble": lambda: run.teacher_gradients(fake, labels),
                                     "loop": lambda: loop(fake, labels)}, repeats, warmup=1)


def interleaved_medians(steps: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each step, timed in turn (one call of each per round), so that a slow phase of a
    noisy machine hits every configuration alike; each is warmed up first (allocator pools, oneDNN primitives)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[k].append(1e3 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-grasp", action="store_true")
    parser.add_argument("--sparse", action="store_true", help="only the sparse-training tables")
    parser.add_argument("--bf16", action="store_true",
                        help="only the train-step table against dense bfloat16 (AMX) and SparseProp")
    parser.add_argument("--imp", action="store_true",
                        help="only the train step per IMP round (lottery tickets) against the dense round")
    parser.add_argument("--analysis", action="store_true",
                        help="only the curvature table (HVP exact against finite difference, SLQ time and memory)")
    parser.add_argument("--topagg", action="store_true", help="only the TopAgg table (fused against reference)")
    parser.add_argument("--datalens", action="store_true",
                        help="only the DataLens step table (generator step, teacher gradients against a loop)")
    parser.add_argument("--dst", action="store_true",
                        help="only the RigL train-step table (update overhead, dense, rigl-torch)")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    for flag, table in (("analysis", analysis_table), ("topagg", topagg_table), ("datalens", datalens_table),
                        ("dst", dst_step_table),
                        ("imp", imp_round_table),
                        ("bf16", bf16_step_table),
                        ("sparse", sparse_tables)):
        if getattr(args, flag):  # one table only
            table(args.repeats, args.quick)
            return
    sizes = [2_000_000] if args.quick else [20_035_200, 138_357_544]
    print("| global k-th value (k = 98 %) | torch.kthvalue(cat) s | graspext s | speedup |")
    print("| --- | ---: | ---: | ---: |")
    for name, ref, ours in selection_table(sizes, args.repeats):
        print(f"| {name} | {ref:.3f} | {ours:.3f} | {ref / ours:.1f}x |")
    if args.skip_grasp:
        return
    print("\n| GraSP VGG19-CIFAR, 100 images, 98 % | median s | peak MiB added | speedup | memory ratio "
          "| mask vs official (+ours-only/-official-only) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for impl, s, peak, speed, mem, diff in grasp_table(max(1, args.repeats // 2)):
        print(f"| {impl} | {s:.2f} | {peak / 2**20:.0f} | {speed:.2f}x | {mem:.2f} | {diff} |")


if __name__ == "__main__":
    main()
