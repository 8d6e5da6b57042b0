"""Provenance recorded with every stored number (protocol section 5; lm-eval's result schema)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import bench

_REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """The project's git commit (with ``-dirty`` when the tree has changes), or None outside a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# The instruction-set extensions that select different float kernels (MKL, oneDNN, ATen's vectorised code):
# two CPUs that differ here can round differently, and an attack's outcome on a borderline sample with them.
_ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_info() -> dict[str, Any]:
    """The CPU a result was computed on: model name, the float-relevant ISA flags, and the kernel level torch picked.

    Same checkpoint bytes and the same seeds give the same results only on CPUs that agree on these (and on torch's
    version and thread count); they are recorded so a figure that moved can be traced to the machine.
    """
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "Model") and not model:
                model = value
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the platform module's name is all there is
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {
        "model": model or platform.processor() or platform.machine(),
        "isa": [flag for flag in _ISA_FLAGS if flag in flags],
        "torch_capability": capability,
        "machine": platform.machine(),
    }


def environment(device: str) -> dict[str, Any]:
    """Versions, device and host facts that can change a result."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "apbench": bench.__version__,
        "torch": torch.__version__,
        "pyautoattack": package_version("pyautoattack"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(dev),
        "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "cpu": cpu_info(),
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
