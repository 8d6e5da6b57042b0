"""Provenance recorded with every stored number (protocol section 5; lm-eval's result schema)."""

from __future__ import annotations

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
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
