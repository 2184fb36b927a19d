"""``graspext ... --nproc N``: the same command under ``torchrun`` on this machine.

The equivalent by hand is ``torchrun --standalone --nproc-per-node N -m graspext.cli <command> ...``: a
rendezvous on localhost, N processes, gloo on the CPU or NCCL with one GPU per process.
"""

from __future__ import annotations

import os
import subprocess
import sys


def under_launcher() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def launch(argv: list[str], nproc: int) -> int:
    """Runs ``graspext <argv>`` in ``nproc`` processes under torchrun; returns its exit status."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an int >= 1, got {nproc!r}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "graspext.cli", *strip_nproc(argv)]
    env = dict(os.environ)
    # torchrun's default of one thread per process, said here so it does not warn about it.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
