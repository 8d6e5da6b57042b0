"""Downloading one file over http(s) from public hosts only: resumable, size-capped, hashed as it arrives.

:func:`download` writes ``<file_name>.part``; an interrupted download keeps it, and the next attempt asks the
server for the rest (HTTP ``Range``) and re-hashes the part first. The download never exceeds its limit, and a
web page sent instead of the file is refused. Caching, hash checks and records are :mod:`bench.zoo.fetch`'s.

Only public hosts are contacted: the host name of the URL, and of every redirect, is resolved
(``socket.getaddrinfo``) and refused when any of its addresses is loopback, private, link-local, multicast,
unspecified or reserved; the connection itself goes to one of the addresses that were checked, so a name that
resolves differently a moment later (DNS rebinding) gains nothing. A redirect may not leave https. Loopback hosts
(and plain http to them) are accepted only with ``APBENCH_ALLOW_LOOPBACK=1`` in the environment, which the test
suite sets for its server on 127.0.0.1. Through a proxy (``https_proxy``), the proxy connects, and only the
resolution check applies.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bench.download import DownloadTooSlowError, TransferGuard
from bench.zoo.fetch_errors import CheckpointTooLarge, DownloadFailed, FetchError, NotACheckpoint, too_large_message
from bench.zoo.manifest import check_download_url, printable, refused_address

_CHUNK = 1 << 20
_USER_AGENT = "apbench-zoo/1"
_HTML_TYPES = ("text/html", "application/xhtml+xml")


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


def download(
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
    """Download ``url`` into ``part`` (continuing what it holds), hashing as bytes arrive.

    Args:
        url: the URL to request (already :func:`direct_download_url`'s).
        part: the partial file; kept when the connection keeps dropping, so a later call resumes it.
        limit: bytes beyond which the download is aborted and ``part`` deleted.
        declared, max_size: the manifest's size and the cap, for the message when ``limit`` is passed.
        retries, backoff_s, timeout_s, log: as :func:`bench.zoo.fetch.fetch_checkpoint`'s.

    Returns:
        ``(sha256 hex digest of the whole file, its size in bytes)``.

    Raises:
        CheckpointTooLarge, NotACheckpoint, DownloadFailed: see :func:`bench.zoo.fetch.fetch_checkpoint`.
    """
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
                    raise CheckpointTooLarge(too_large_message(total, limit, declared, max_size, url))
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
                                too_large_message(received, limit, declared, max_size, url, during=True)
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


def _file_digest(path: Path):
    """A running sha256 of the file's content (a resumed download continues it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest
