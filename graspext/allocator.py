"""Keeping freed memory in the process, so large CPU tensors are not page-faulted in on every step.

glibc returns freed blocks over its mmap threshold (at most 32 MiB) to the OS, and each new activation of
that size is then zero-filled page by page by the kernel: for a VGG19-CIFAR step at batch 128 that costs
more than some sparse layers do (benchmarks/RESULTS.md). PyTorch's CPU performance guide suggests jemalloc
or tcmalloc for the same reason; this is the no-install equivalent for glibc. The trainer, the demo and
the benchmarks call it on CPU (dense and sparse runs alike); set GRASPEXT_KEEP_FREED_MEMORY=0 to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse. Returns whether the setting is in force."""
    global _applied
    if _applied:
        return True
    if os.environ.get("GRASPEXT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc: its allocator has its own policy
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Serve large blocks from the heap and never trim it: freed activations are reused as they are.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
