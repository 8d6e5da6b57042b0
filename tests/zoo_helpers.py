"""Test helpers for the zoo: a checkpoint server on 127.0.0.1 and valid manifests to break one field at a time."""

from __future__ import annotations

import copy
import hashlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

CHILD_ID = "HYDRA_Sehwag2020Hydra_SmallCNN_DIGITS_US_90"
PARENT_ID = "Dense_Test2024Digits_SmallCNN_DIGITS_US_0"


class CheckpointServer:
    """``http.server`` in a thread, serving bytes by path, with HTTP Range and scripted misbehaviour.

    Attributes:
        files: path -> bytes served.
        content_types: path -> Content-Type (default application/octet-stream).
        drop_once: paths whose next GET sends half of the body and then closes the connection.
        redirects: path -> Location of a 302.
        ranges: whether Range requests are honoured (206).
        lengths: path -> the Content-Length header to send instead of the true one (None: no header); the
            connection is then closed after the body, so a client can only count the bytes.
        requests: (path, Range header) of every GET, in order.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}
        self.drop_once: set[str] = set()
        # path -> seconds between bytes: a server that drips its file one byte at a time.
        self.drip: dict[str, float] = {}
        self.redirects: dict[str, str] = {}
        self.ranges = True
        self.lengths: dict[str, str | None] = {}
        self.requests: list[tuple[str, str | None]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> CheckpointServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                found = re.match(r"bytes=(\d+)-$", range_header or "")
                if found and server.ranges:
                    start = int(found.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", server.content_types.get(self.path, "application/octet-stream"))
                if self.path in server.lengths:
                    if server.lengths[self.path] is not None:
                        self.send_header("Content-Length", server.lengths[self.path])
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.drop_once:
                    server.drop_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.path in server.drip:
                    try:
                        for i in range(min(len(body), 100)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(server.drip[self.path])
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


def allow_loopback(monkeypatch) -> None:
    """Let the zoo download from this machine (the server above), as only tests may."""
    from bench.zoo.manifest import ALLOW_LOOPBACK_ENV

    monkeypatch.setenv(ALLOW_LOOPBACK_ENV, "1")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_submission(url: str, data: bytes, overrides: dict | None = None) -> dict:
    """A valid new submission (every field known) of a HYDRA subnet checkpoint of small_cnn on digits."""
    doc = {
        "schema_version": 1,
        "model_id": CHILD_ID,
        "method": "hydra",
        "paper": {
            "title": "HYDRA: Pruning Adversarially Robust Neural Networks",
            "authors": ["Vikash Sehwag", "Shiqi Wang", "Prateek Mittal", "Suman Jana"],
            "venue": "NeurIPS",
            "year": 2020,
            "url": "https://arxiv.org/abs/2002.10509",
            "bibtex": "@article{test,\n  title={Test}\n}\n",
        },
        "model": {
            "arch": "small_cnn",
            "dataset": "digits",
            "threat_model": "Linf",
            "eps": "0.2",
            "structure": "US",
            "granularity": "weights",
            "sparsity": 0.9,
            "claimed_sparsity": 0.9,
            "additional_data": False,
            "number_forward_passes": 1,
        },
        "checkpoint": {
            "url": url,
            "sha256": sha256(data),
            "size": len(data),
            "format": "hydra-subnet",
            "file_name": "model_best.pth.tar",
            "k": 0.1,
        },
        "reported": {"clean": 0.5, "robust": 0.1, "attack": "PGD-10, eps 0.2 (test)", "source": "this test"},
        "dense_parent": PARENT_ID,
        "license": "MIT",
        "verified": True,
        "source": "Written by the test suite.",
        "unknown": {},
    }
    return deep_update(doc, overrides or {})


def dense_submission(url: str, data: bytes, overrides: dict | None = None) -> dict:
    """A valid new submission of the dense parent (plain state dict)."""
    doc = new_submission(url, data)
    doc.update(model_id=PARENT_ID, method="dense", dense_parent=None)
    doc["model"].update(sparsity=0.0, claimed_sparsity=0.0)
    doc["checkpoint"] = {
        "url": url,
        "sha256": sha256(data),
        "size": len(data),
        "format": "plain",
        "file_name": "dense.pt",
    }
    doc["unknown"] = {"dense_parent": "it is the dense model"}
    return deep_update(doc, overrides or {})


def deep_update(doc: dict, overrides: dict) -> dict:
    """``overrides`` with dotted keys (``{"checkpoint.sha256": "x"}``) applied to a copy of ``doc``."""
    out = copy.deepcopy(doc)
    for dotted, value in overrides.items():
        target = out
        *parents, last = dotted.split(".")
        for part in parents:
            target = target[part]
        if value is _DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    return out


_DELETE = object()
DELETE = _DELETE


def write_manifest(root: Path, doc: dict, *, folder: str | None = None, name: str | None = None) -> Path:
    path = root / (folder or doc["method"]) / (name or f"{doc['model_id']}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
