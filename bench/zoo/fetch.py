"""Zoo checkpoints in the cache: sha256-verified, cached under ``$BENCH_CACHE_DIR/zoo``, one fetch at a time.

A checkpoint is untrusted until its hash is checked, so the download never exceeds the cap (the declared size
when there is one, else :data:`DEFAULT_MAX_SIZE`), is hashed while it arrives, and only becomes the cached file
``zoo/<model_id>/<file_name>`` by an atomic rename once the hash matches. The download itself (resumable, from
public hosts only, redirects and DNS answers checked) is :mod:`bench.zoo.downloader`'s; the errors are in
:mod:`bench.zoo.fetch_errors` and importable from here.

Seeded entries whose sha256 nobody could compute yet (``verified: false``) are trusted on first use: the hash
of the first complete download is written to ``zoo/records.json`` (never into the manifest), and every later
fetch, on this machine, must match it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.checkpoints import NotACheckpointError, checkpoint_format, sha256_file
from bench.paths import atomic_write, cache_dir
from bench.provenance import utcnow
from bench.zoo.downloader import direct_download_url, download
from bench.zoo.fetch_errors import (
    CheckpointTooLarge,
    ChecksumMismatch,
    DownloadFailed,
    FetchError,
    NotACheckpoint,
    human_size,
    too_large_message,
)
from bench.zoo.limits import DEFAULT_MAX_SIZE
from bench.zoo.manifest import FILE_NAME_PATTERN, check_download_url

__all__ = [
    "DEFAULT_MAX_SIZE",
    "RECORDS_FILE",
    "CheckpointTooLarge",
    "ChecksumMismatch",
    "DownloadFailed",
    "FetchError",
    "FetchResult",
    "NotACheckpoint",
    "cached_path",
    "direct_download_url",
    "fetch_checkpoint",
    "import_local_file",
    "read_records",
    "verify_cached",
    "zoo_cache_dir",
]

RECORDS_FILE = "records.json"
_TIMEOUT_S = 60
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")
_FILE_RE = re.compile(FILE_NAME_PATTERN)


@dataclass(frozen=True)
class FetchResult:
    """A cached, verified checkpoint.

    Attributes:
        path: the cached file.
        sha256: its hash.
        size: its size in bytes.
        verified_by: ``"manifest"`` (matches the manifest's sha256), ``"record"`` (matches the hash recorded at
            its first download) or ``"first download"`` (no hash known before; it has just been recorded).
        downloaded: whether bytes came over the network in this call.
    """

    path: Path
    sha256: str
    size: int
    verified_by: str
    downloaded: bool


def zoo_cache_dir(root: Path | None = None) -> Path:
    """``$BENCH_CACHE_DIR/zoo`` (``~/.cache/apbench/zoo``), or ``root`` when given."""
    if root is not None:
        return Path(root)
    return cache_dir() / "zoo"


def fetch_checkpoint(
    key: str,
    url: str,
    file_name: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    root: Path | None = None,
    retries: int = 3,
    backoff_s: float = 0.5,
    timeout_s: float = _TIMEOUT_S,
    log: Callable[[str], None] = lambda _msg: None,
) -> FetchResult:
    """Return the cached, verified checkpoint of zoo entry ``key``, downloading what is missing.

    Args:
        key: the entry's model id (the cache folder's name).
        url: where the file is (https; http only for this machine).
        file_name: the cached file's name (its extension tells the loader the format).
        sha256: the expected hash; None for an unverified seeded entry (then the first download's hash is
            recorded in ``records.json`` and later fetches must match it).
        size: the declared size in bytes; the download is aborted as soon as it exceeds it.
        max_size: the cap on any download, in bytes.
        root: the zoo cache folder (default :func:`zoo_cache_dir`).
        retries: how many times a dropped connection is resumed within this call.
        backoff_s: seconds before the first retry (doubling, at most 8 s).
        timeout_s: socket timeout.
        log: receives one-line progress messages.

    Returns:
        The :class:`FetchResult`.

    Raises:
        CheckpointTooLarge: the declared size exceeds ``max_size`` (checked before any network access), or the
            server's size or the bytes received exceed the limit.
        ChecksumMismatch: the file's sha256 differs from the manifest's or from the recorded one.
        NotACheckpoint: the server sent a web page.
        DownloadFailed: HTTP errors, refused redirects, or a connection that kept dropping (the partial file
            is kept; run again to resume).
    """
    target, expected, verified_by, limit = _prepare(key, file_name, url, sha256, size, max_size, root)
    with _locked(target.parent):
        if target.is_file():
            digest = sha256_file(target)
            if expected is None or digest == expected:
                _finish(key, url, target, digest, verified_by, root)
                return FetchResult(target, digest, target.stat().st_size, verified_by, downloaded=False)
            log(f"cached {target} has sha256 {digest[:12]}…, expected {expected[:12]}…; downloading it again")
            target.unlink()
        part = target.with_name(target.name + ".part")
        log(f"downloading {url} to {target}")
        digest, received = download(
            direct_download_url(url),
            part,
            limit=limit,
            declared=size,
            max_size=max_size,
            retries=retries,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            log=log,
        )
        # Bytes that are no checkpoint are named as such, not as a hash or size mismatch (whose fix differs).
        _check_is_checkpoint(part, url)
        _check_complete(part, digest, received, expected, size, verified_by, url)
        os.replace(part, target)
        _finish(key, url, target, digest, verified_by, root)
        return FetchResult(target, digest, received, verified_by, downloaded=True)


def import_local_file(
    key: str,
    source: Path,
    file_name: str,
    *,
    url: str | None,
    sha256: str | None = None,
    size: int | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    root: Path | None = None,
) -> FetchResult:
    """Put a file downloaded by hand (e.g. from a Dropbox folder) into the cache, with the same checks.

    The file is copied, never moved or linked; the hash rules are those of :func:`fetch_checkpoint`. A first
    hash recorded this way names its origin ``file:<name of the file>``, not the manifest's URL.
    """
    target, expected, verified_by, limit = _prepare(key, file_name, url, sha256, size, max_size, root)
    source = Path(source)
    # The checks every checkpoint path gets: a FIFO is never opened, a symlink's target is named, and a file that
    # is no checkpoint (a link to /etc/passwd) is not copied, nor its hash recorded as the entry's first one.
    try:
        checkpoint_format(source, what="checkpoint file")
    except FileNotFoundError as err:
        raise DownloadFailed(str(err)) from None
    except NotACheckpointError as err:
        raise NotACheckpoint(str(err)) from None
    actual = source.stat().st_size
    if actual > limit:
        raise CheckpointTooLarge(too_large_message(actual, limit, size, max_size, str(source)))
    with _locked(target.parent):
        part = target.with_name(target.name + ".part")
        shutil.copyfile(source, part)
        digest = sha256_file(part)
        _check_complete(part, digest, part.stat().st_size, expected, size, verified_by, str(source))
        os.replace(part, target)
        _finish(key, f"file:{source.name}", target, digest, verified_by, root)
        return FetchResult(target, digest, actual, verified_by, downloaded=False)


def verify_cached(
    key: str, file_name: str, *, sha256: str | None = None, size: int | None = None, root: Path | None = None
) -> FetchResult:
    """The already cached file of entry ``key``, checked against ``sha256`` or the recorded hash.

    Raises:
        FetchError: nothing is cached; ChecksumMismatch: the cached file does not match (it is deleted).
    """
    target, expected, verified_by, _limit = _prepare(key, file_name, None, sha256, size, DEFAULT_MAX_SIZE, root)
    if not target.is_file():
        raise FetchError(f"{key} has not been fetched: nothing at {target}")
    with _locked(target.parent):
        digest = sha256_file(target)
        received = target.stat().st_size
        _check_complete(target, digest, received, expected, size, verified_by, str(target))
        _finish(key, f"file:{file_name}", target, digest, verified_by, root)
    return FetchResult(target, digest, received, verified_by, downloaded=False)


def cached_path(key: str, file_name: str, root: Path | None = None) -> Path | None:
    """The cached file of entry ``key`` if it has been fetched (not re-verified here)."""
    path = zoo_cache_dir(root) / key / file_name
    return path if path.is_file() else None


def read_records(root: Path | None = None) -> dict[str, dict]:
    """The hashes recorded at first download: ``{model_id: {url, sha256, size, file_name, recorded_at}}``."""
    path = zoo_cache_dir(root) / RECORDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FetchError(
            f"cannot read {path} ({err}); fix or delete it (it only holds first-download hashes)"
        ) from None
    return dict(data.get("entries", {}))


# --------------------------------------------------------------------------------------------------------


def _prepare(key, file_name, url, sha256, size, max_size, root) -> tuple[Path, str | None, str, int]:
    # Defence in depth: the manifest was validated, but nothing here may ever leave the cache folder.
    if not _KEY_RE.match(key) or ".." in key:
        raise FetchError(f"invalid zoo key {key!r}")
    if not _FILE_RE.match(file_name):
        raise FetchError(f"invalid checkpoint file name {file_name!r}; use letters, digits, '.', '_' and '-' only")
    if url is not None:
        try:
            check_download_url(url)
        except ValueError as err:
            raise DownloadFailed(f"checkpoint URL {url!r} {err}") from None
    if max_size <= 0:
        raise ValueError(f"the download cap must be positive, got {max_size}")
    if size is not None and size > max_size:
        raise CheckpointTooLarge(
            f"checkpoint.size claims {size:,} bytes ({human_size(size)}), over the cap of {max_size:,} bytes "
            f"({human_size(max_size)}); nothing was downloaded. Fix: correct checkpoint.size, or raise the cap "
            "(--max-size) if the file really is that large."
        )
    folder = zoo_cache_dir(root) / key
    folder.mkdir(parents=True, exist_ok=True)
    expected, verified_by = sha256, "manifest"
    if expected is None:
        record = read_records(root).get(key)
        if record is not None:
            if url is not None and record.get("url") not in (url, None) and not str(record["url"]).startswith("file:"):
                raise ChecksumMismatch(
                    f"{key}: the hash recorded at its first download came from {record['url']}, but the manifest "
                    f"now says {url}. If the new URL is intended, delete {key!r} from "
                    f"{zoo_cache_dir(root) / RECORDS_FILE} and fetch again."
                )
            expected, verified_by = record["sha256"], "record"
        else:
            verified_by = "first download"
    limit = min(size, max_size) if size is not None else max_size
    return folder / file_name, expected, verified_by, limit


def _finish(key: str, url: str, target: Path, digest: str, verified_by: str, root: Path | None) -> None:
    if verified_by == "first download":
        _write_record(key, url, target, digest, root)


def _check_complete(part: Path, digest: str, received: int, expected, size, verified_by, where: str) -> None:
    if size is not None and received != size:
        part.unlink(missing_ok=True)
        raise CheckpointTooLarge(
            f"{where} gave {received:,} bytes but checkpoint.size says {size:,}; the file was deleted. "
            "Fix: put the exact size of the uploaded file in checkpoint.size (stat -c %s FILE)."
        )
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        what = "checkpoint.sha256" if verified_by == "manifest" else "the hash recorded at its first download"
        raise ChecksumMismatch(
            f"{where} has sha256 {digest}, but {what} is {expected}; the file was deleted and not loaded. "
            "Fix: if you replaced the file, put the new file's sha256 (sha256sum FILE) in the manifest; "
            "otherwise the file at that URL is not the one that was submitted."
        )


def _check_is_checkpoint(part: Path, where: str) -> None:
    """Refuse bytes that are no checkpoint (an error page sent as application/octet-stream, a wrong link) before
    they are cached or their hash is recorded as an unverified entry's first one; the partial file is deleted."""
    try:
        checkpoint_format(part, what="downloaded file")
    except (FileNotFoundError, NotACheckpointError):
        size = part.stat().st_size if part.exists() else 0
        part.unlink(missing_ok=True)
        raise NotACheckpoint(
            f"{where} sent {size:,} bytes that are not a checkpoint (neither a torch.save file nor safetensors); "
            "the file was deleted and no hash was recorded. Fix: checkpoint.url must give the file itself (a "
            "direct download link), not a page about it"
        ) from None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One fetch per entry at a time (two evaluators sharing a cache must not write the same part file)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock, still atomic renames
        yield
        return
    with open(folder / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_record(key: str, url: str, target: Path, digest: str, root: Path | None) -> None:
    folder = zoo_cache_dir(root)
    path = folder / RECORDS_FILE
    with _locked(folder):
        entries = read_records(root)
        entries[key] = {
            "url": url,
            "sha256": digest,
            "size": target.stat().st_size,
            "file_name": target.name,
            "recorded_at": utcnow().isoformat(),
        }
        text = json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True)
        atomic_write(path, lambda f: f.write(text.encode()))
