"""Benchmark workloads shared by the pytest-benchmark suites and ``ratios.py``.

Peak memory is measured in a fresh subprocess per run: after the model and data exist and one warm-up call
on 20 images has run, the resident-set high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``,
so the figure is what the scoring call itself adds. glibc is told to mmap large blocks so that freed memory is
returned and reuse of old heap space cannot hide a peak.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time

import torch

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")


# ---------------------------------------------------------------- selection
def selection_scores(total: int, num_tensors: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """``total`` float32 scores split over ``num_tensors`` layers of uneven sizes (as a network's)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.linspace(1, 4, num_tensors)
    sizes = (weights / weights.sum() * total).long()
    sizes[-1] += total - int(sizes.sum())
    return [torch.randn(int(n), generator=g) for n in sizes]


def kth_graspext(scores, k):
    from graspext import ops
    return ops.global_kth_value(scores, k)


def kth_torch(scores, k):
    return torch.kthvalue(torch.cat([s.flatten() for s in scores]), k).values


# ---------------------------------------------------------------- GraSP scoring
def vgg19_cifar_setup(seed: int = 0):
    from graspext.models import vgg19_bn
    torch.manual_seed(seed)
    model = vgg19_bn(num_classes=10)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(10)            # CIFAR-10 config: 10 images per class
    x = torch.randn(len(y), 3, 32, 32, generator=g)
    return model, x, y


def grasp_official(model, x, y, sparsity=0.98, seed=0):
    from graspext.testing.official import grasp_official as official
    # Seeded as graspext seeds its re-initialization (a CPU generator), so the masks compare.
    return official(model, sparsity, [(x, y)], reinit_generator=torch.Generator().manual_seed(seed),
                    exact_count=False)


def grasp_graspext(model, x, y, sparsity=0.98, seed=0, engine="exact", **options):
    import graspext as gx
    return gx.prune(model, "grasp", sparsity, (x, y), seed=seed, engine=engine, **options)


def differences_from_official(ours: dict, ref: dict) -> tuple[int, int]:
    """(kept only by the official loop, kept only by graspext). The official `<=` keeps the threshold weight
    itself, one more than asked, so the exact engine's expected difference is (1, 0)."""
    extra = sum(int((ref[n] & ~ours[n]).sum()) for n in ref)
    missing = sum(int((ours[n] & ~ref[n]).sum()) for n in ref)
    return extra, missing


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(name: str, kwargs: dict, queue) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, x, y = vgg19_cifar_setup()
    fn = {"official": grasp_official, "graspext": grasp_graspext}[name]
    import graspext  # noqa: F401  (load the extension before the baseline)
    # Warm-up on 20 images, for every implementation alike: one-time costs (oneDNN primitive setup, thread
    # pools, and modules torch imports lazily on first use, e.g. ~170 MiB with sympy for dispatch modes)
    # are not what a scoring call needs, and would otherwise be charged to whichever code touches them first.
    fn(model, x[::5], y[::5], **kwargs)
    gc.collect()
    base = _read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    masks = fn(model, x, y, **kwargs)
    seconds = time.perf_counter() - start
    peak = _read_status("VmHWM") - base
    # NumPy arrays pickle by value (tensors would travel as shared-memory handles that die with this process).
    queue.put((seconds, peak, {n: m.cpu().numpy() for n, m in masks.items()}))


def measure_grasp(name: str, **kwargs) -> tuple[float, int, dict]:
    """(seconds, peak bytes added, masks) of one scoring run in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, kwargs, queue))
    proc.start()
    seconds, peak, masks = queue.get()
    proc.join()
    return seconds, peak, {n: torch.from_numpy(m) for n, m in masks.items()}
