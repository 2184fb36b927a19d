"""Build script for graspext's C++/CUDA extension ``graspext._C``.

CPU kernels are always built. CUDA kernels are built when the installed torch is a CUDA build and a real
CUDA toolkit is found. Switches (environment variables):

    GRASPEXT_CUDA=auto|0|1   auto (default): CUDA when possible; 0: CPU only; 1: CUDA or fail.
    CUDA_HOME / CUDA_PATH    where the toolkit lives (checked, not trusted blindly).
    TORCH_CUDA_ARCH_LIST     CUDA architectures; defaults to the visible GPUs, else "9.0".
    GRASPEXT_DEBUG=1         -O0 -g builds.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
DEFAULT_CUDA_ARCH_LIST = "9.0"


def _log(msg: str) -> None:
    print(f"graspext setup: {msg}", file=sys.stderr)


def _is_cuda_toolkit(path: str | os.PathLike | None) -> bool:
    """A real toolkit has its compiler and runtime headers side by side (a wrapper's folder has not)."""
    if not path:
        return False
    p = Path(path)
    return (p / "bin" / "nvcc").is_file() and (p / "include" / "cuda_runtime.h").is_file()


def _nvcc_target_from_wrapper(nvcc: str) -> str | None:
    """`nvcc` on PATH may be a shell script that execs the real one: read the path it execs."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for token in head.decode("utf-8", "replace").split():
        token = token.strip("\"'")
        if token.endswith("/bin/nvcc") and os.path.isfile(token):
            return token
    return None


def find_cuda_home() -> str | None:
    """Locate a usable CUDA toolkit, or None."""
    candidates: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        for real in (os.path.realpath(nvcc), _nvcc_target_from_wrapper(nvcc)):
            if real:
                candidates.append(str(Path(real).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    for cand in candidates:
        if _is_cuda_toolkit(cand):
            return str(Path(cand).resolve())
    return None


def cuda_library_include_dirs(cuda_home: str) -> list[str]:
    """Headers of CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include.

    A minimal toolkit may ship only nvcc and the runtime; torch's pip wheels bring the library headers in
    the ``nvidia`` namespace packages, so use those when the toolkit lacks them.
    """
    if (Path(cuda_home) / "include" / "cusparse.h").is_file():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    dirs = set()
    for root in getattr(nvidia, "__path__", []):
        for header in glob.glob(os.path.join(root, "*", "include", "cusparse.h")):
            dirs.add(os.path.dirname(header))
    return sorted(dirs)


def _cuda_mode() -> str:
    mode = os.environ.get("GRASPEXT_CUDA", "auto").strip().lower()
    aliases = {"": "auto", "auto": "auto", "0": "0", "off": "0", "false": "0", "cpu": "0",
               "1": "1", "on": "1", "true": "1", "cuda": "1"}
    if mode not in aliases:
        raise SystemExit(f"GRASPEXT_CUDA must be one of auto, 0 or 1; got {mode!r}")
    return aliases[mode]


def _configure_cuda() -> bool:
    """Decide whether to build CUDA kernels; sets CUDA_HOME before torch's extension helpers read it."""
    mode = _cuda_mode()
    if mode == "0":
        _log("GRASPEXT_CUDA=0: building CPU kernels only")
        return False

    import torch  # only to ask whether it is a CUDA build; cpp_extension is imported later

    problem = None
    cuda_home = find_cuda_home()
    if torch.version.cuda is None:
        problem = f"the installed torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME to a folder holding bin/nvcc and include/)"
    else:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=False).stdout
        release = out.rsplit("release ", 1)[-1].split(",")[0].strip() if "release " in out else "?"
        if release.split(".")[0] != torch.version.cuda.split(".")[0]:
            problem = (f"the CUDA toolkit at {cuda_home} is release {release} but torch was built with "
                       f"CUDA {torch.version.cuda}; their major versions must match")
    if problem:
        if mode == "1":
            raise SystemExit(f"GRASPEXT_CUDA=1 but {problem}")
        _log(f"building CPU kernels only: {problem}")
        return False

    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    _log(f"building CUDA kernels with the toolkit at {cuda_home}, "
         f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')}")
    return True


def _write_version_file(with_cuda: bool) -> None:
    import torch

    text = (
        "# Written by setup.py at build time; not tracked.\n"
        f"__version__ = {VERSION!r}\n"
        f"torch_version = {torch.__version__!r}\n"
        f"built_with_cuda = {with_cuda!r}\n"
        f"cuda_arch_list = {os.environ.get('TORCH_CUDA_ARCH_LIST') if with_cuda else None!r}\n"
    )
    (ROOT / "graspext" / "version.py").write_text(text)


def get_extensions():
    with_cuda = _configure_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("GRASPEXT_DEBUG", "0") == "1"
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "ops").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "ops" / "cpu").glob("*.cpp"))
    # One file per instruction set; each picks its own target with `#pragma GCC target`, so no -m flag here.
    sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "ops" / "cpu" / "isa").glob("*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # ATen's parallel_for is OpenMP-backed in inline headers: without -fopenmp it silently runs serially.
    cxx += ["-fdiagnostics-color=always", "-fopenmp"]
    extra = {"cxx": cxx}
    include_dirs = [str(CSRC)]  # headers are included as "ops/..."
    define_macros = []
    ext_cls = CppExtension
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "ops" / "cuda").glob("*.cu"))
        extra["nvcc"] = ["-O3" if not debug else "-G", "--expt-relaxed-constexpr"]
        define_macros.append(("GRASPEXT_WITH_CUDA", None))
        # After the toolkit's own headers (-isystem is searched after every -I), so they fill gaps only.
        for d in cuda_library_include_dirs(os.environ["CUDA_HOME"]):
            extra["cxx"] += ["-isystem", d]
            extra["nvcc"] += ["-isystem", d]
        ext_cls = CUDAExtension
    _write_version_file(with_cuda)
    return [
        ext_cls(
            "graspext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            define_macros=define_macros,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


def _build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=True, use_ninja=shutil.which("ninja") is not None)


setup(
    packages=find_packages(include=["graspext", "graspext.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": _build_ext_cls()},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
