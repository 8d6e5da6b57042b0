"""How fetching a zoo checkpoint fails: one exception per cause, each naming the manifest field at fault.

:mod:`bench.zoo.downloader` raises them while bytes arrive, :mod:`bench.zoo.fetch` while it checks and caches
what arrived; both say "too large" with :func:`too_large_message`.
"""

from __future__ import annotations


class FetchError(RuntimeError):
    """A checkpoint could not be fetched; ``field`` is the manifest field at fault, the message says the fix."""

    field = "checkpoint.url"


class DownloadFailed(FetchError):
    """The server could not be reached, answered with an error, or the connection kept dropping."""


class CheckpointTooLarge(FetchError):
    """The file is (or claims to be) larger than the cap or than its declared size; nothing was kept."""

    field = "checkpoint.size"


class ChecksumMismatch(FetchError):
    """The file's sha256 is not the expected one; it was deleted."""

    field = "checkpoint.sha256"


class NotACheckpoint(FetchError):
    """The server returned a web page instead of the file, or a file given by hand is no checkpoint."""


def too_large_message(
    size: int, limit: int, declared: int | None, max_size: int, where: str, *, during: bool = False
) -> str:
    got = f"more than {limit:,} bytes arrived" if during else f"it is {size:,} bytes ({human_size(size)})"
    if declared is not None and limit == declared:
        return (
            f"download from {where} aborted: {got}, but checkpoint.size declares {declared:,}; nothing was kept. "
            "Fix: put the exact size of the uploaded file in checkpoint.size."
        )
    return (
        f"download from {where} aborted: {got}, over the cap of {max_size:,} bytes ({human_size(max_size)}); nothing "
        "was kept. Fix: raise the cap (--max-size) if the file really is that large."
    )


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
