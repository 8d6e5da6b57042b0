"""Where the benchmark keeps its files, how it writes them, and the one JSON hash behind its content keys.

Folders (an environment variable set to the empty string counts as unset):

- ``$BENCH_CACHE_DIR`` (default ``~/.cache/apbench``): trained track models (``tracks/``), pruned checkpoints
  (``pruned/``) and zoo downloads (``zoo/``).
- ``$BENCH_DATA_DIR`` (default ``~/.cache/apbench/data``): dataset archives; it does not follow
  ``$BENCH_CACHE_DIR``.

This module imports nothing heavier than the standard library, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DATA_DIR",
    "ENV_CACHE_DIR",
    "ENV_DATA_DIR",
    "atomic_write",
    "cache_dir",
    "default_data_dir",
    "stable_hash",
]

ENV_CACHE_DIR = "BENCH_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/apbench")
ENV_DATA_DIR = "BENCH_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/apbench/data")


def cache_dir() -> Path:
    """``$BENCH_CACHE_DIR`` if set, else ``~/.cache/apbench``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR).expanduser()


def default_data_dir() -> Path:
    """``$BENCH_DATA_DIR`` if set, else ``~/.cache/apbench/data``."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(binary_file)`` into a temporary file beside it, then rename it into place.

    Readers see the old file or the complete new one, never a half-written file; when ``write`` raises (or the
    process is interrupted) the temporary file is removed and ``path`` is left as it was.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stable_hash(obj: Any, *, compact: bool = True, default: Callable[[Any], Any] | None = None) -> str:
    """sha256 (hex) of ``obj``'s canonical JSON: keys sorted at every level, non-ASCII escaped.

    Two spellings of that JSON key existing data, and each must keep its bytes:

    - ``compact=True``, separators ``","`` and ``":"``: :attr:`bench.spec.RunSpec.hash` and ``protocol_hash``,
      the keys of stored results.
    - ``compact=False``, :func:`json.dumps`' default separators ``", "`` and ``": "``: the digits track's recipe
      key and the pruned-checkpoint cache key (cached file names are prefixes of them), the config tag in pruned
      models' names and the replicate setting key.

    Args:
        obj: JSON-encodable data (dicts, lists, str, numbers, bools, None).
        compact: which separators (above).
        default: called on a value JSON cannot encode (``str`` where configs may hold paths); ``None`` makes
            such a value raise ``TypeError``.

    Returns:
        64 lowercase hex digits.
    """
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(obj, sort_keys=True, separators=separators, default=default)
    return hashlib.sha256(text.encode()).hexdigest()
