"""Downloading zoo checkpoints: size-capped, resumable, sha256-verified, cached under ``$BENCH_CACHE_DIR/zoo``.

A checkpoint is untrusted until its hash is checked, so the download never exceeds the cap (the declared size
when there is one, else :data:`DEFAULT_MAX_SIZE`), is hashed while it arrives, and only becomes the cached file
``zoo/<model_id>/<file_name>`` by an atomic rename once the hash matches. An interrupted download leaves
``<file_name>.part``; the next attempt asks the server for the rest (HTTP ``Range``) and re-hashes the part first.

Seeded entries whose sha256 nobody could compute yet (``verified: false``) are trusted on first use: the hash
of the first complete download is written to ``zoo/records.json`` (never into the manifest), and every later
fetch, on this machine, must match it.

Only public hosts are contacted: the host name of the URL, and of every redirect, is resolved
(``socket.getaddrinfo``) and refused when any of its addresses is loopback, private, link-local, multicast,
unspecified or reserved; the connection itself goes to one of the addresses that were checked, so a name that
resolves differently a moment later (DNS rebinding) gains nothing. A redirect may not leave https. Loopback hosts
(and plain http to them) are accepted only with ``APBENCH_ALLOW_LOOPBACK=1`` in the environment, which the test
suite sets for its server on 127.0.0.1. Through a proxy (``https_proxy``), the proxy connects, and only the
resolution check applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bench.checkpoints import NotACheckpointError, checkpoint_format, sha256_file
from bench.download import DownloadTooSlowError, TransferGuard
from bench.paths import atomic_write, cache_dir
from bench.provenance import utcnow
from bench.zoo.limits import DEFAULT_MAX_SIZE
from bench.zoo.manifest import FILE_NAME_PATTERN, check_download_url, printable, refused_address

RECORDS_FILE = "records.json"
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_USER_AGENT = "apbench-zoo/1"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,199}$")
_FILE_RE = re.compile(FILE_NAME_PATTERN)
_HTML_TYPES = ("text/html", "application/xhtml+xml")


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


def direct_download_url(url: str) -> str:
    """The URL to request for ``url``: Google Drive share links become Drive's direct-download endpoint.

    ``drive.google.com/uc?id=ID`` and ``/file/d/ID/view`` answer large files with an HTML "can't scan for
    viruses" page; ``drive.usercontent.google.com/download?id=ID&export=download&confirm=t`` skips it.
    """
    parts = urlsplit(url)
    if parts.hostname != "drive.google.com":
        return url
    file_id = parse_qs(parts.query).get("id", [None])[0]
    found = re.match(r"^/file/d/([A-Za-z0-9_-]+)", parts.path)
    if found:
        file_id = found.group(1)
    if not file_id or not re.fullmatch(r"[A-Za-z0-9_-]+", file_id):
        return url
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


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
        digest, received = _download(
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
        raise CheckpointTooLarge(_too_large_message(actual, limit, size, max_size, str(source)))
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
            f"checkpoint.size claims {size:,} bytes ({_human(size)}), over the cap of {max_size:,} bytes "
            f"({_human(max_size)}); nothing was downloaded. Fix: correct checkpoint.size, or raise the cap "
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


def check_resolved(url: str) -> None:
    """Refuse ``url`` when its host name resolves to any address that is not public (see the module docstring).

    Raises:
        DownloadFailed: an address is refused. OSError (``socket.gaierror``): the name does not resolve.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for *_rest, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        reason = refused_address(sockaddr[0])
        if reason is not None:
            raise DownloadFailed(
                f"refused {url}: its host {host} resolves to {sockaddr[0]}, {reason}; checkpoints are downloaded "
                "from public hosts only"
            )


def _checked_connection(address, timeout, source_address=None):
    """``socket.create_connection`` that resolves once, checks every address, and connects to a checked one."""
    host, port = address[:2]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_rest, sockaddr in infos:
        reason = refused_address(sockaddr[0])
        if reason is not None:
            raise DownloadFailed(f"refused to connect to {host} ({sockaddr[0]}): {reason}")
    error: OSError | None = None
    for *_rest, sockaddr in infos:
        try:
            return socket.create_connection((sockaddr[0], sockaddr[1]), timeout, source_address)
        except OSError as err:
            error = err
    raise error or OSError(f"{host} resolves to no address")


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _checked_connection


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _checked_connection


def _checked_class(http_class, req):
    if req.has_proxy() or getattr(req, "_tunnel_host", None):
        return http_class  # the proxy connects; the URL's host was checked before the request
    return _CheckedHTTPSConnection if issubclass(http_class, http.client.HTTPSConnection) else _CheckedHTTPConnection


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_checked_class(http_class, req), req, **kwargs)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_checked_class(http_class, req), req, **kwargs)


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to public https hosts (or, in tests, from loopback http to loopback http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        shown = repr(newurl)
        if urlsplit(req.full_url).scheme == "https" and not newurl.startswith("https://"):
            raise DownloadFailed(f"refused redirect from {req.full_url} to {shown}: it leaves https")
        try:
            check_download_url(newurl)
        except ValueError as err:
            raise DownloadFailed(f"refused redirect from {req.full_url} to {shown}: it {err}") from None
        try:
            check_resolved(newurl)
        except DownloadFailed as err:
            raise DownloadFailed(f"refused redirect from {req.full_url}: {err}") from None
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.has_header("Range"):
            new.add_unredirected_header("Range", req.get_header("Range"))
        return new


def _opener() -> urllib.request.OpenerDirector:
    # Only http(s): no file://, ftp:// or data: handlers, whatever a redirect says.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _CheckedHTTPHandler(),
        _CheckedHTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _SafeRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _download(
    url: str,
    part: Path,
    *,
    limit: int,
    declared: int | None,
    max_size: int,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    log: Callable[[str], None],
) -> tuple[str, int]:
    opener = _opener()
    failures = 0
    # One guard over every attempt: resuming a dripping server must not restart its clock.
    guard = TransferGuard(url, fix="download the file by hand and use --from FILE")
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        if offset > limit:
            part.unlink()
            offset = 0
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            log(f"resuming at byte {offset:,} ({part.name})")
        received = offset
        try:
            check_resolved(url)
            request = urllib.request.Request(url, headers=headers)
            with opener.open(request, timeout=guard.socket_timeout(timeout_s)) as resp:
                content_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if content_type in _HTML_TYPES:
                    raise NotACheckpoint(
                        f"{url} returned a web page ({content_type}), not a checkpoint file. Fix: give a direct "
                        "download link (for Google Drive, drive.google.com/uc?export=download&id=FILE_ID; for "
                        "Dropbox, end the link with ?dl=1), or download it by hand and use --from FILE."
                    )
                total, resumed = _total_size(resp, offset)
                if offset and not resumed:
                    log("the server does not resume downloads; starting over")
                    offset = received = 0
                if total is not None and total > limit:
                    part.unlink(missing_ok=True)
                    raise CheckpointTooLarge(_too_large_message(total, limit, declared, max_size, url))
                digest = _file_digest(part) if resumed else hashlib.sha256()
                with open(part, "ab" if resumed else "wb") as out:
                    # read1 returns what has arrived, so a dripping server is judged as it drips.
                    while chunk := resp.read1(_CHUNK):
                        guard.update(len(chunk))
                        received += len(chunk)
                        if received > limit:
                            out.close()
                            part.unlink(missing_ok=True)
                            raise CheckpointTooLarge(
                                _too_large_message(received, limit, declared, max_size, url, during=True)
                            )
                        digest.update(chunk)
                        out.write(chunk)
                if total is not None and received < total:
                    raise http.client.IncompleteRead(b"", total - received)
                return digest.hexdigest(), received
        except FetchError:
            raise
        except DownloadTooSlowError as err:
            kept = f"; {received:,} bytes are kept in {part}" if received else ""
            raise DownloadFailed(f"{err}{kept}") from None
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:
                # The part is not a prefix the server can continue (e.g. the file changed): start over once.
                part.unlink(missing_ok=True)
                failures += 1
                if failures <= retries:
                    continue
            raise DownloadFailed(f"{url} answered HTTP {err.code} {printable(err.reason)}") from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as err:
            if isinstance(getattr(err, "reason", err), socket.gaierror):
                # A name that does not resolve will not resolve on a retry either: no network, or a wrong host.
                host = urlsplit(url).hostname
                raise DownloadFailed(
                    f"cannot resolve the host {host} of {url}: no network on this machine, or a wrong URL; "
                    "download the file elsewhere and use --from FILE"
                ) from None
            failures += 1
            reason = printable(getattr(err, "reason", None) or err.__class__.__name__)  # may be the server's words
            if failures > retries:
                kept = f"; {received:,} bytes are kept in {part}, run the command again to resume" if received else ""
                raise DownloadFailed(f"downloading {url} failed ({reason}) after {failures} attempts{kept}") from None
            log(f"connection lost after {received:,} bytes ({reason}); retrying ({failures}/{retries})")
            time.sleep(min(backoff_s * 2 ** (failures - 1), 8.0))


def _total_size(resp, offset: int) -> tuple[int | None, bool]:
    """(full file size or None, whether the response continues at ``offset``)."""
    if offset and resp.status == 206:
        found = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range") or "")
        if found and int(found.group(1)) == offset:
            return (None if found.group(3) == "*" else int(found.group(3))), True
        return None, False
    length = resp.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), False


def _too_large_message(
    size: int, limit: int, declared: int | None, max_size: int, where: str, *, during: bool = False
) -> str:
    got = f"more than {limit:,} bytes arrived" if during else f"it is {size:,} bytes ({_human(size)})"
    if declared is not None and limit == declared:
        return (
            f"download from {where} aborted: {got}, but checkpoint.size declares {declared:,}; nothing was kept. "
            "Fix: put the exact size of the uploaded file in checkpoint.size."
        )
    return (
        f"download from {where} aborted: {got}, over the cap of {max_size:,} bytes ({_human(max_size)}); nothing "
        "was kept. Fix: raise the cap (--max-size) if the file really is that large."
    )


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _file_digest(path: Path):
    """A running sha256 of the file's content (a resumed download continues it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest


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
