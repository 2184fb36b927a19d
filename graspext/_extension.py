"""Loads the compiled extension ``graspext._C`` and checks it matches the running torch."""

from __future__ import annotations

import importlib

import torch

REBUILD_HINT = (
    "Rebuild graspext against the installed torch: from the graspext source folder run\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "(or reinstall the torch version it was built with)."
)


class ExtensionMismatchError(ImportError):
    """The compiled kernels were built for another torch, or failed to load."""


def _build_info():
    try:
        return importlib.import_module("graspext.version")
    except ImportError as exc:  # a source tree that was never built
        raise ExtensionMismatchError(
            "graspext's compiled kernels are missing (no graspext/version.py: the package was not built).\n"
            + REBUILD_HINT
        ) from exc


def load() -> object:
    info = _build_info()
    if info.torch_version != torch.__version__:
        raise ExtensionMismatchError(
            f"graspext was built against torch {info.torch_version}, but torch {torch.__version__} is "
            "installed; its C++ kernels cannot be loaded safely.\n" + REBUILD_HINT
        )
    try:
        return importlib.import_module("graspext._C")
    except (ImportError, OSError) as exc:
        raise ExtensionMismatchError(f"graspext._C failed to load: {exc}\n" + REBUILD_HINT) from exc


def has_cuda_kernel(op: str) -> bool:
    """Whether ``graspext::<op>`` has a CUDA kernel in this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"graspext::{op}", "CUDA")
