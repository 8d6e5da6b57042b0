"""The zoo end to end over HTTP on 127.0.0.1: validate → fetch → evaluate, and the downloader's defences."""

from __future__ import annotations

import io
import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from bench.data import load_split
from bench.formats import load_converted_model
from bench.sparsity import measure_sparsity
from bench.store import Evaluation, Model, Store
from bench.zoo.downloader import _SafeRedirects
from bench.zoo.fetch import (
    CheckpointTooLarge,
    ChecksumMismatch,
    DownloadFailed,
    NotACheckpoint,
    direct_download_url,
    fetch_checkpoint,
    read_records,
)
from bench.zoo.manifest import ALLOW_LOOPBACK_ENV, Manifest
from bench.zoo.zoo import ZooEntry, entry_taxonomy, load_zoo, prepare_entry
from methods.base import get_method
from tests.cli import invoke
from tests.paths import REPO_ROOT
from tests.zoo_helpers import (
    CHILD_ID,
    PARENT_ID,
    CheckpointServer,
    allow_loopback,
    dense_submission,
    new_submission,
    sha256,
    write_manifest,
)

EVAL_ARGS = ["--n-samples", "4", "--version", "standard", "--fmn-steps", "3", "--workers", "1", "--no-progress"]
HTML_TITLE = '<script>alert("x")</script> HYDRA & <b>friends</b>'


@pytest.fixture(autouse=True)
def _loopback(monkeypatch):
    # These tests serve checkpoints from 127.0.0.1; the tests of the refusal remove the opt-in again.
    allow_loopback(monkeypatch)


def _bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoints(digits_cnn, tmp_path_factory):
    """A trained small_cnn as a plain dense state dict, and as a HYDRA subnet file (scores = |w|, k = 0.1)."""
    net = digits_cnn.net
    dense_sd = {k: v.clone() for k, v in net.state_dict().items()}
    subnet_sd = {}
    for key, value in dense_sd.items():
        subnet_sd[key] = value
        if key.endswith("weight") and value.dim() > 1:
            subnet_sd[key.removesuffix("weight") + "popup_scores"] = value.abs()
    child = _bytes({"epoch": 20, "arch": "small_cnn", "state_dict": subnet_sd, "best_prec1": 51.2})
    dense = _bytes(dense_sd)
    folder = tmp_path_factory.mktemp("zoo-ckpt")
    (folder / "model_best.pth.tar").write_bytes(child)
    model = load_converted_model(folder / "model_best.pth.tar", "hydra-subnet", "small_cnn", "digits", k=0.1)
    x, y = load_split("digits", "test")
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        dense_accuracy = (digits_cnn(x).argmax(1) == y).float().mean().item()
    return {
        "child": child,
        "dense": dense,
        "sparsity": round(measure_sparsity(model).sparsity, 4),
        "accuracy": round(accuracy, 4),
        "dense_accuracy": round(dense_accuracy, 4),
    }


def _zoo(root: Path, server: CheckpointServer, ck: dict, **child_overrides) -> None:
    server.files["/dense.pt"] = ck["dense"]
    server.files["/hydra/model_best.pth.tar"] = ck["child"]
    write_manifest(
        root, dense_submission(server.url("/dense.pt"), ck["dense"], {"reported.clean": ck["dense_accuracy"]})
    )
    overrides = {"model.claimed_sparsity": ck["sparsity"], "reported.clean": ck["accuracy"], **child_overrides}
    write_manifest(root, new_submission(server.url("/hydra/model_best.pth.tar"), ck["child"], overrides))


# --------------------------------------------------------------------------------------------------------
# The whole path


def test_validate_fetch_evaluate_over_http(checkpoints, tmp_path):
    root, db = tmp_path / "submissions", tmp_path / "r.db"
    with CheckpointServer() as server:
        _zoo(root, server, checkpoints, **{"paper.title": HTML_TITLE})

        validated = invoke("submit", "validate", "--submissions", root, root)
        assert validated.exit_code == 0, validated.output
        assert "2 manifest(s): 2 ok, 0 failed" in validated.output
        assert f"sparsity {checkpoints['sparsity']:.4f} vs claim" in validated.output
        assert "clean accuracy" in validated.output and "fetch and sha256 (manifest)" in validated.output

        fetched = invoke("zoo", "fetch", CHILD_ID, "--submissions", root)
        assert fetched.exit_code == 0, fetched.output
        assert sha256(checkpoints["child"]) in fetched.output and "verified against the manifest" in fetched.output

        store = Store(f"sqlite:///{db}")
        prepare_entry(store, load_zoo(root).get(PARENT_ID))  # the dense parent, registered first
        evaluated = invoke("evaluate", "--model-id", CHILD_ID, "--submissions", root, "--db", db, *EVAL_ARGS)
        assert evaluated.exit_code == 0, evaluated.output
        assert f"model {CHILD_ID}" in evaluated.output
        # Validation downloaded each file once; fetch and evaluate used the verified cache.
        assert [p for p, _ in server.requests].count("/hydra/model_best.pth.tar") == 1

    with store.session() as s:
        row = s.scalars(select(Model).where(Model.name == CHILD_ID)).one()
        assert row.checkpoint_sha256 == sha256(checkpoints["child"])
        assert (row.method, row.structure, row.target_sparsity, row.source) == ("hydra", "US", 0.9, "zoo")
        assert row.measured_sparsity == pytest.approx(checkpoints["sparsity"], abs=1e-4)
        assert row.parent is not None and row.parent.name == PARENT_ID
        assert row.reported["clean"] == checkpoints["accuracy"] and row.reported["robust"] == 0.1
        assert row.reported["attack"] == "PGD-10, eps 0.2 (test)"
        assert row.taxonomy == get_method("hydra").card.taxonomy
        zoo_prov = row.provenance["zoo"]
        assert zoo_prov["model_id"] == CHILD_ID and zoo_prov["checkpoint_sha256"] == row.checkpoint_sha256
        manifest_bytes = (root / "hydra" / f"{CHILD_ID}.yaml").read_bytes()
        assert zoo_prov["manifest_sha256"] == sha256(manifest_bytes)
        assert zoo_prov["paper"]["title"] == HTML_TITLE  # stored verbatim, not escaped or stripped
        assert row.provenance["native_format"] == "hydra-subnet" and row.provenance["k"] == 0.1
        (ev,) = s.scalars(select(Evaluation).where(Evaluation.model_id == row.id)).all()
        assert ev.status == "complete" and ev.n_samples == 4
        assert ev.provenance  # protocol provenance recorded by the evaluator
        clean = ev.clean_accuracy

    again = invoke("evaluate", "--zoo", "--method", "hydra", "--submissions", root, "--db", db, *EVAL_ARGS)
    assert again.exit_code == 0, again.output
    assert f"{CHILD_ID}: already evaluated under this protocol" in again.output

    exported = invoke(
        "export", "robustbench", CHILD_ID, "--out", tmp_path / "model_info", "--submissions", root, "--db", db
    )
    assert exported.exit_code == 0, exported.output
    path = tmp_path / "model_info" / "digits" / "Linf" / "Sehwag2020Hydra_SmallCNN_US_90.json"
    assert exported.output.strip() == str(path)
    info = json.loads(path.read_text())
    assert info["clean_acc"] == f"{100 * clean:.2f}" and info["reported"] == "10.00"
    assert info["name"] == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; HYDRA &amp; &lt;b&gt;friends&lt;/b&gt;"
    assert info["venue"] == "NeurIPS 2020" and info["eps"] == "0.2"


def test_a_child_registered_before_its_parent_is_linked_when_the_parent_arrives(checkpoints, tmp_path):
    root = tmp_path / "submissions"
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    with CheckpointServer() as server:
        _zoo(root, server, checkpoints)
        zoo = load_zoo(root)
        child, _ = prepare_entry(store, zoo.get(CHILD_ID))
        assert child.parent_id is None
        parent, _ = prepare_entry(store, zoo.get(PARENT_ID))
    with store.session() as s:
        assert s.get(Model, child.id).parent_id == parent.id
        assert s.get(Model, parent.id).method == "dense"


def test_evaluate_zoo_goes_through_every_entry_and_reports_failures(checkpoints, tmp_path):
    root, db = tmp_path / "submissions", tmp_path / "r.db"
    with CheckpointServer() as server:
        _zoo(root, server, checkpoints)
        del server.files["/hydra/model_best.pth.tar"]  # the child's file is gone: 404
        args = ["evaluate", "--zoo", "--dataset", "digits", "--submissions", root, "--db", db, *EVAL_ARGS]
        first = invoke(*args)
        assert first.exit_code == 1
        assert f"evaluation #1 of {PARENT_ID}" in first.output
        assert f"FAILED {CHILD_ID}:" in first.output and "HTTP 404" in first.output
        assert "1 of 2 zoo entries failed" in first.output
        server.files["/hydra/model_best.pth.tar"] = checkpoints["child"]
        second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert f"{PARENT_ID}: already evaluated under this protocol (evaluation #1)" in second.output
    assert f"evaluation #2 of {CHILD_ID}" in second.output


def test_online_validation_measures_sparsity_and_clean_accuracy(checkpoints, tmp_path):
    root = tmp_path / "submissions"
    with CheckpointServer() as server:
        _zoo(root, server, checkpoints, **{"model.claimed_sparsity": 0.5, "reported.clean": 0.999})
        result = invoke("submit", "validate", "--submissions", root, root / "hydra")
    assert result.exit_code == 1
    assert "model.claimed_sparsity: claims 0.5000 but the checkpoint measures" in result.output
    assert "tolerance ±0.0050" in result.output
    assert "reported.clean: reported 99.90%, but the checkpoint gets" in result.output
    assert "first 360 digits test samples" in result.output


class _WritesMarker:
    """Unpickling it creates a file: proof that a checkpoint's code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_unpickles_objects_is_refused_unexecuted(checkpoints, tmp_path):
    root = tmp_path / "submissions"
    marker = tmp_path / "pwned"
    evil = _bytes({"state_dict": torch.load(io.BytesIO(checkpoints["dense"])), "extra": _WritesMarker(str(marker))})
    with CheckpointServer() as server:
        server.files["/evil.pth.tar"] = evil
        _zoo(root, server, checkpoints)
        doc = new_submission(server.url("/evil.pth.tar"), evil, {"model.claimed_sparsity": checkpoints["sparsity"]})
        write_manifest(root, doc)
        result = invoke("submit", "validate", "--submissions", root, root / "hydra")
    assert result.exit_code == 1
    assert "checkpoint.url: refused: checkpoint" in result.output
    assert "contains pickled Python objects beyond tensors" in result.output
    assert not marker.exists()


def test_a_sha256_mismatch_is_refused_and_nothing_is_kept(checkpoints, tmp_path):
    root = tmp_path / "submissions"
    with CheckpointServer() as server:
        _zoo(root, server, checkpoints, **{"checkpoint.sha256": "0" * 64})
        result = invoke("submit", "validate", "--submissions", root, root / "hydra")
    assert result.exit_code == 1
    assert "checkpoint.sha256:" in result.output and "the file was deleted and not loaded" in result.output
    cache = Path(os.environ["BENCH_CACHE_DIR"]) / "zoo" / CHILD_ID
    assert not any(cache.iterdir()) or [p.name for p in cache.iterdir()] == [".lock"]


def test_an_entry_without_url_is_fetched_by_hand_and_its_hash_recorded(tmp_path):
    repo = REPO_ROOT / "submissions"
    entry_id = "Dense_Sehwag2020Hydra_V16_CIFAR10_US_0"
    root = tmp_path / "submissions"
    (root / "dense").mkdir(parents=True)
    (root / "dense" / f"{entry_id}.yaml").write_bytes((repo / "dense" / f"{entry_id}.yaml").read_bytes())
    download = tmp_path / "model_best_dense.pth.tar"
    torch.save({"w": torch.zeros(3)}, download)  # --from takes checkpoints only
    first = invoke("zoo", "fetch", entry_id, "--submissions", root, "--from", download)
    assert first.exit_code == 0, first.output
    assert "the hash is recorded" in first.output
    assert read_records()[entry_id]["sha256"] == sha256(download.read_bytes())
    assert read_records()[entry_id]["url"] == "file:model_best_dense.pth.tar"
    second = invoke("zoo", "fetch", entry_id, "--submissions", root)
    assert second.exit_code == 0, second.output
    assert "verified against the recorded hash" in second.output
    torch.save({"w": torch.ones(3)}, download)
    third = invoke("zoo", "fetch", entry_id, "--submissions", root, "--from", download)
    assert third.exit_code != 0 and "the hash recorded at its first download" in third.output


# --------------------------------------------------------------------------------------------------------
# The downloader


@pytest.fixture
def server():
    with CheckpointServer() as s:
        # A real torch.save file of ~300 kB (the downloader refuses bytes that are no checkpoint).
        buffer = io.BytesIO()
        torch.save({"weight": torch.randn(75_000, generator=torch.Generator().manual_seed(0))}, buffer)
        s.files["/ckpt.pt"] = buffer.getvalue()
        yield s


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    data = server.files["/ckpt.pt"]
    server.drop_once.add("/ckpt.pt")
    result = fetch_checkpoint("E1", server.url("/ckpt.pt"), "ckpt.pt", sha256=sha256(data), root=tmp_path, backoff_s=0)
    assert result.path.read_bytes() == data and result.verified_by == "manifest"
    (first, _), (second, resumed_at) = server.requests
    assert first == second == "/ckpt.pt" and resumed_at == f"bytes={len(data) // 2}-"


def test_a_dripping_server_is_stopped_by_the_minimum_rate(server, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("BENCH_DOWNLOAD_GRACE_S", "1")
    monkeypatch.setenv("BENCH_DOWNLOAD_MIN_RATE", "1024")
    server.drip["/ckpt.pt"] = 0.2
    data = server.files["/ckpt.pt"]
    start = time.monotonic()
    with pytest.raises(DownloadFailed, match="too slow") as raised:
        fetch_checkpoint("E9", server.url("/ckpt.pt"), "ckpt.pt", sha256=sha256(data), root=tmp_path, backoff_s=0)
    assert time.monotonic() - start < 10
    assert "--from FILE" in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "E9" / "ckpt.pt").exists()


def test_a_download_interrupted_for_good_keeps_its_part_and_the_next_run_resumes(server, tmp_path):
    data = server.files["/ckpt.pt"]
    server.drop_once.add("/ckpt.pt")
    with pytest.raises(DownloadFailed, match="run the command again to resume"):
        fetch_checkpoint("E2", server.url("/ckpt.pt"), "ckpt.pt", sha256=sha256(data), root=tmp_path, retries=0)
    part = tmp_path / "E2" / "ckpt.pt.part"
    assert part.stat().st_size == len(data) // 2 and not (tmp_path / "E2" / "ckpt.pt").exists()
    result = fetch_checkpoint("E2", server.url("/ckpt.pt"), "ckpt.pt", sha256=sha256(data), root=tmp_path)
    assert result.path.read_bytes() == data and not part.exists()
    assert server.requests[-1][1] == f"bytes={len(data) // 2}-"


def test_a_server_that_ignores_ranges_is_downloaded_again_from_the_start(server, tmp_path):
    data = server.files["/ckpt.pt"]
    server.ranges = False
    server.drop_once.add("/ckpt.pt")
    result = fetch_checkpoint("E3", server.url("/ckpt.pt"), "ckpt.pt", sha256=sha256(data), root=tmp_path, backoff_s=0)
    assert result.path.read_bytes() == data


def test_a_download_over_the_cap_or_the_declared_size_is_aborted(server, tmp_path):
    data = server.files["/ckpt.pt"]
    with pytest.raises(CheckpointTooLarge, match="over the cap"):
        fetch_checkpoint("E4", server.url("/ckpt.pt"), "ckpt.pt", max_size=len(data) - 1, root=tmp_path)
    with pytest.raises(CheckpointTooLarge, match="checkpoint.size declares 1,000"):
        fetch_checkpoint("E5", server.url("/ckpt.pt"), "ckpt.pt", size=1000, root=tmp_path)
    assert not [p for p in tmp_path.rglob("ckpt.pt*")]


def test_a_wrong_hash_is_refused_and_the_first_download_of_an_unhashed_entry_is_recorded(server, tmp_path):
    data = server.files["/ckpt.pt"]
    with pytest.raises(ChecksumMismatch, match="the file was deleted"):
        fetch_checkpoint("E6", server.url("/ckpt.pt"), "ckpt.pt", sha256="f" * 64, root=tmp_path)
    assert not (tmp_path / "E6" / "ckpt.pt").exists()
    first = fetch_checkpoint("E7", server.url("/ckpt.pt"), "ckpt.pt", root=tmp_path)
    assert first.verified_by == "first download" and read_records(tmp_path)["E7"]["sha256"] == sha256(data)
    first.path.unlink()
    assert fetch_checkpoint("E7", server.url("/ckpt.pt"), "ckpt.pt", root=tmp_path).verified_by == "record"
    first.path.unlink()
    server.files["/ckpt.pt"] = _bytes({"weight": torch.zeros(3)})  # another checkpoint, replaced upstream
    with pytest.raises(ChecksumMismatch, match="hash recorded at its first download"):
        fetch_checkpoint("E7", server.url("/ckpt.pt"), "ckpt.pt", root=tmp_path)
    # An error page in its place is named as what it is (whose fix is the link), before any hash comparison.
    server.files["/ckpt.pt"] = b"replaced upstream"
    with pytest.raises(NotACheckpoint, match="not a checkpoint"):
        fetch_checkpoint("E7", server.url("/ckpt.pt"), "ckpt.pt", root=tmp_path)


def test_bytes_that_are_no_checkpoint_are_neither_cached_nor_recorded(server, tmp_path):
    # An error page sent as application/octet-stream to an unhashed entry: before, its hash became the entry's
    # recorded first hash and every later fetch of the real file failed as "replaced upstream".
    server.files["/not-a-checkpoint"] = b"Error 404: the file you asked for was removed\n" * 10
    with pytest.raises(NotACheckpoint, match="not a checkpoint .* no hash was recorded"):
        fetch_checkpoint("E11", server.url("/not-a-checkpoint"), "ckpt.pt", root=tmp_path)
    assert "E11" not in read_records(tmp_path)
    assert not list((tmp_path / "E11").glob("ckpt.pt*"))
    data = server.files["/ckpt.pt"]
    server.files["/not-a-checkpoint"] = data  # the link fixed: the real file is fetched and its hash recorded
    result = fetch_checkpoint("E11", server.url("/not-a-checkpoint"), "ckpt.pt", root=tmp_path)
    assert result.verified_by == "first download" and read_records(tmp_path)["E11"]["sha256"] == sha256(data)


def test_web_pages_and_unsafe_redirects_are_refused(server, tmp_path):
    server.files["/page"] = b"<html>Google Drive can't scan this file for viruses</html>"
    server.content_types["/page"] = "text/html; charset=utf-8"
    with pytest.raises(NotACheckpoint, match="returned a web page"):
        fetch_checkpoint("E8", server.url("/page"), "ckpt.pt", root=tmp_path)
    server.redirects["/moved"] = "http://example.org/ckpt.pt"
    with pytest.raises(DownloadFailed, match="refused redirect"):
        fetch_checkpoint("E9", server.url("/moved"), "ckpt.pt", root=tmp_path)
    server.redirects["/file"] = "file:///etc/passwd"
    with pytest.raises(DownloadFailed, match="is not allowed"):
        fetch_checkpoint("E10", server.url("/file"), "ckpt.pt", root=tmp_path)


def test_google_drive_links_use_the_direct_download_endpoint():
    direct = "https://drive.usercontent.google.com/download?id=1AbC-d_9&export=download&confirm=t"
    assert direct_download_url("https://drive.google.com/uc?export=download&id=1AbC-d_9") == direct
    assert direct_download_url("https://drive.google.com/file/d/1AbC-d_9/view?usp=sharing") == direct
    assert direct_download_url("https://example.org/x.pt") == "https://example.org/x.pt"


def test_a_file_given_by_hand_is_recorded_as_its_own_origin_not_the_manifest_url(tmp_path):
    repo = REPO_ROOT / "submissions"
    entry_id = "MAD_Lee2022Masking_R18_CIFAR10_US_90"  # a seeded entry with a download URL
    root = tmp_path / "submissions"
    (root / "mad").mkdir(parents=True)
    (root / "mad" / f"{entry_id}.yaml").write_bytes((repo / "mad" / f"{entry_id}.yaml").read_bytes())
    download = tmp_path / "from_a_colleague.t7"
    torch.save({"w": torch.zeros(3)}, download)
    result = invoke("zoo", "fetch", entry_id, "--submissions", root, "--from", download)
    assert result.exit_code == 0, result.output
    assert read_records()[entry_id]["url"] == "file:from_a_colleague.t7"


def test_evaluate_zoo_marks_an_entry_failed_on_any_expected_error_and_goes_on(tmp_path, monkeypatch):
    import bench.zoo.zoo as zoo_module

    root = tmp_path / "submissions"
    write_manifest(root, dense_submission("https://example.org/dense.pt", b"dense"))
    write_manifest(root, new_submission("https://example.org/child.pth.tar", b"child"))
    attempted = []

    def broken_fetch(entry, **_kw):
        attempted.append(entry.model_id)
        if entry.model_id == PARENT_ID:
            raise OSError(28, "No space left on device")
        raise KeyError("state_dict")

    monkeypatch.setattr(zoo_module, "fetch_entry", broken_fetch)
    result = invoke("evaluate", "--zoo", "--submissions", root, "--db", tmp_path / "r.db", *EVAL_ARGS)
    assert attempted == [PARENT_ID, CHILD_ID]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"FAILED {PARENT_ID}: [Errno 28] No space left on device" in result.output
    assert f"FAILED {CHILD_ID}: missing key 'state_dict'" in result.output
    assert "2 of 2 zoo entries failed" in result.output


def test_an_external_methods_training_types_cannot_overwrite_its_taxonomy(tmp_path):
    from leaderboard.site_data import _taxonomy_items

    doc = new_submission(
        "https://example.org/x.pth.tar",
        b"x",
        {
            "model_id": "NEW_Test2024Method_SmallCNN_DIGITS_US_90",
            "method": "newmeth",
            "external_method": {
                "display_name": "NEW",
                "ap_key": "NEW_Test2024Method",
                "taxonomy": {
                    "pipeline": "A",
                    "training": {"pretraining": "AT", "1S/IT": "1S", "pipeline": "Z", "criterion": "X"},
                    "structure": "US",
                    "scope": "global",
                    "criterion": "LWM",
                },
            },
        },
    )
    entry = ZooEntry(Manifest.model_validate(doc), tmp_path / "x.yaml")
    taxonomy = entry_taxonomy(entry)
    assert (taxonomy["pipeline"], taxonomy["criterion"]) == ("A", "LWM")
    assert taxonomy["training"] == {"pretraining": "AT", "1S/IT": "1S", "pipeline": "Z", "criterion": "X"}
    # The site shows the nested training types as one row.
    items = dict(_taxonomy_items(taxonomy))
    assert items["pipeline"] == "A" and items["training"] == "pretraining: AT, 1S/IT: 1S, pipeline: Z, criterion: X"


# --------------------------------------------------------------------------------------------------------
# Only public hosts


def _no_proxies(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """``socket.getaddrinfo`` answering ``answers[name]`` (one address per call, the last one repeated)."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        queue = answers[host]
        address = queue.pop(0) if len(queue) > 1 else queue[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:6379/x",
        "http://[::1]/x",
        "https://[::1]/x",
        "https://localhost/x",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1/x",
        "https://192.168.1.1/x",
        "https://[fd00::1]/x",
        "https://[::ffff:10.0.0.1]/x",
        "https://0.0.0.0/x",
        "https://224.0.0.1/x",
        "https://2130706433/x",  # 127.0.0.1 as one number
        "https://metadata.internal.example/x",  # resolves to 169.254.169.254
        "http://example.org/x.pt",  # leaves https
    ],
)
def test_redirects_to_this_machine_private_networks_or_plain_http_are_refused(target, monkeypatch):
    monkeypatch.delenv(ALLOW_LOOPBACK_ENV)
    _fake_dns(monkeypatch, {"metadata.internal.example": ["169.254.169.254"], "example.org": ["93.184.216.34"]})
    req = urllib.request.Request("https://example.org/model.pt")
    with pytest.raises(DownloadFailed, match="refused redirect"):
        _SafeRedirects().redirect_request(req, None, 302, "Found", {}, target)


def test_redirects_leaving_https_are_refused_even_to_loopback_in_tests():
    req = urllib.request.Request("https://example.org/model.pt")
    with pytest.raises(DownloadFailed, match="it leaves https"):
        _SafeRedirects().redirect_request(req, None, 302, "Found", {}, "http://127.0.0.1:8000/model.pt")


def test_the_server_cannot_redirect_to_private_or_link_local_addresses(server, tmp_path, monkeypatch):
    _fake_dns(monkeypatch, {"intranet.example": ["10.1.2.3"]})
    server.redirects["/meta"] = "https://169.254.169.254/latest/meta-data/iam"
    server.redirects["/lan"] = "https://10.0.0.1/x"
    server.redirects["/name"] = "https://intranet.example/x"
    for path, words in (("/meta", "a link-local address"), ("/lan", "a private address"), ("/name", "10.1.2.3")):
        with pytest.raises(DownloadFailed, match=words):
            fetch_checkpoint("E11", server.url(path), "ckpt.pt", root=tmp_path)
    assert [p for p, _ in server.requests] == ["/meta", "/lan", "/name"]


def test_a_host_name_resolving_to_a_private_address_is_refused_before_connecting(tmp_path, monkeypatch):
    asked = _fake_dns(monkeypatch, {"files.example": ["10.0.0.5"]})
    with pytest.raises(DownloadFailed, match="resolves to 10.0.0.5, a private address"):
        fetch_checkpoint("E12", "https://files.example/ckpt.pt", "ckpt.pt", root=tmp_path)
    assert asked == ["files.example"]


def test_a_name_that_resolves_elsewhere_when_connecting_is_refused(tmp_path, monkeypatch):
    # DNS rebinding: public when checked, this machine a moment later. The connection uses a checked address.
    monkeypatch.delenv(ALLOW_LOOPBACK_ENV)
    _no_proxies(monkeypatch)
    asked = _fake_dns(monkeypatch, {"rebind.example": ["93.184.216.34", "127.0.0.1"]})
    with pytest.raises(DownloadFailed, match=r"refused to connect to rebind.example \(127.0.0.1\)"):
        fetch_checkpoint("E13", "https://rebind.example/ckpt.pt", "ckpt.pt", root=tmp_path, retries=0)
    assert asked == ["rebind.example", "rebind.example"]


def test_without_the_opt_in_this_machine_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_LOOPBACK_ENV)
    with pytest.raises(DownloadFailed, match=f"only with {ALLOW_LOOPBACK_ENV}=1"):
        fetch_checkpoint("E14", server.url("/ckpt.pt"), "ckpt.pt", root=tmp_path)
    assert server.requests == []


# --------------------------------------------------------------------------------------------------------
# The cap, whatever the server says about the size


@pytest.mark.parametrize("length", [None, "-1", "lots"])
def test_a_download_without_a_true_length_is_aborted_by_counting_bytes(server, tmp_path, length):
    data = server.files["/ckpt.pt"]
    server.lengths["/ckpt.pt"] = length
    cap = len(data) // 3
    with pytest.raises(CheckpointTooLarge, match=f"more than {cap:,} bytes arrived"):
        fetch_checkpoint("E15", server.url("/ckpt.pt"), "ckpt.pt", max_size=cap, root=tmp_path, retries=0)
    assert not [p for p in tmp_path.rglob("ckpt.pt*")]


def test_a_part_file_larger_than_the_cap_is_discarded_not_resumed(server, tmp_path):
    data = server.files["/ckpt.pt"]
    part = tmp_path / "E16" / "ckpt.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * (len(data) + 1000))
    result = fetch_checkpoint(
        "E16", server.url("/ckpt.pt"), "ckpt.pt", sha256=sha256(data), max_size=len(data), root=tmp_path
    )
    assert result.path.read_bytes() == data and not part.exists()
    assert server.requests == [("/ckpt.pt", None)]  # started over: no Range request


def test_evaluate_zoo_without_data_reports_the_missing_dataset_once(tmp_path):
    repo = REPO_ROOT / "submissions"
    root = tmp_path / "submissions"
    ids = [
        "MAD_Lee2022Masking_R18_CIFAR10_US_90",
        "MAD_Lee2022Masking_R18_CIFAR10_US_95",
        "MAD_Lee2022Masking_V16_CIFAR10_US_90",
    ]
    (root / "mad").mkdir(parents=True)
    for entry_id in ids:
        (root / "mad" / f"{entry_id}.yaml").write_bytes((repo / "mad" / f"{entry_id}.yaml").read_bytes())
    empty = tmp_path / "no-data"
    empty.mkdir()
    result = invoke("evaluate", "--zoo", "--submissions", root, "--data-dir", empty, "--db", tmp_path / "r.db")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "\\n" not in result.output  # real line breaks, not escaped ones
    # Once where it happened and once in the summary, not once per entry.
    assert result.output.count("CIFAR-10 not found in") == 2, result.output
    assert "3 of 3 zoo entries failed" in result.output and "3 entries (" in result.output
    assert not (tmp_path / "r.db").exists()


def test_the_default_submissions_folder_is_the_one_where_the_user_stands(tmp_path, monkeypatch):
    from bench.zoo.zoo import _REPO_SUBMISSIONS, ENV_SUBMISSIONS_DIR, submissions_dir

    monkeypatch.delenv(ENV_SUBMISSIONS_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert submissions_dir() == _REPO_SUBMISSIONS  # no ./submissions here: the installed checkout's
    (tmp_path / "submissions").mkdir()
    assert submissions_dir() == tmp_path / "submissions"  # a clone's own manifests, not the installed ones
    monkeypatch.setenv(ENV_SUBMISSIONS_DIR, str(_REPO_SUBMISSIONS))
    assert submissions_dir() == _REPO_SUBMISSIONS


def test_a_host_that_does_not_resolve_is_named_at_once_not_retried(tmp_path, monkeypatch):
    import socket

    def no_dns(*_args, **_kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    logged = []
    with pytest.raises(DownloadFailed, match="cannot resolve the host example.org") as raised:
        fetch_checkpoint("E10", "https://example.org/ckpt.pt", "ckpt.pt", root=tmp_path, backoff_s=0, log=logged.append)
    assert "--from FILE" in str(raised.value) and not any("retrying" in line for line in logged)
