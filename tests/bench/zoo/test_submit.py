"""bench submit validate / schema offline: seeded manifests, the schema file, and malicious or careless manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.zoo.fetch import CheckpointTooLarge, fetch_checkpoint
from bench.zoo.manifest import ALLOW_LOOPBACK_ENV, Manifest, manifest_json_schema
from bench.zoo.seeded import SEEDED
from bench.zoo.validate import Problem, ValidationOptions, validate_paths
from bench.zoo.zoo import load_zoo
from tests.cli import invoke
from tests.paths import REPO_ROOT
from tests.zoo_helpers import (
    CHILD_ID,
    DELETE,
    PARENT_ID,
    CheckpointServer,
    allow_loopback,
    dense_submission,
    new_submission,
    write_manifest,
)

REPO_SUBMISSIONS = REPO_ROOT / "submissions"
URL = "https://example.org/model_best.pth.tar"
DATA = b"not fetched in offline tests"
OFFLINE = ValidationOptions(offline=True)


def _errors(report) -> dict[str, str]:
    return {p.field: p.message + " " + p.fix for p in report.problems if p.level == "error"}


@pytest.fixture
def subs(tmp_path) -> Path:
    """A submissions folder holding a valid dense parent."""
    root = tmp_path / "submissions"
    write_manifest(root, dense_submission("https://example.org/dense.pt", b"dense"))
    return root


def _validate(root: Path, doc: dict, **kw):
    path = write_manifest(root, doc, **kw)
    (report,) = validate_paths([path], root=root, options=OFFLINE)
    return report


# --------------------------------------------------------------------------------------------------------
# Seeded manifests and the published schema


def test_every_seeded_manifest_passes_offline_and_says_it_is_unverified():
    reports = validate_paths([REPO_SUBMISSIONS], root=REPO_SUBMISSIONS, options=OFFLINE)
    assert {r.model_id for r in reports} == set(SEEDED)
    for r in reports:
        assert r.ok, [p.render() for p in r.problems]
        assert r.manifest.verified is False and r.manifest.checkpoint.sha256 is None
        notes = " ".join(p.message for p in r.problems if p.level == "note")
        assert "unverified seeded entry" in notes and "records the hash of the first download" in notes
        # Every null knowable field says why.
        assert r.manifest.source.strip()


def test_the_cli_validates_the_seeded_zoo_offline():
    result = invoke("submit", "validate", "--offline", str(REPO_SUBMISSIONS))
    assert result.exit_code == 0, result.output
    assert f"{len(SEEDED)} manifest(s): {len(SEEDED)} ok, 0 failed" in result.output
    assert "skipped fetch, sha256, load, sparsity, clean accuracy: --offline" in result.output


def test_seeded_numbers_match_the_specs():
    zoo = load_zoo(REPO_SUBMISSIONS)
    mad = zoo.get("MAD_Lee2022Masking_R18_CIFAR10_US_90").manifest
    assert (mad.reported.clean, mad.reported.robust, mad.reported.eps) == (0.7367, 0.411, "0.031")
    hydra_rb = zoo.get("HYDRA_Sehwag2020Hydra_WRN28x10_CIFAR10_US_90").manifest
    assert (hydra_rb.reported.clean, hydra_rb.reported.robust) == (0.8897, 0.6224)
    assert (hydra_rb.other_reports[0].clean, hydra_rb.other_reports[0].robust) == (0.8898, 0.5714)
    assert "1pi8GHwAVkxVH41hEnf0IAJb_7y-Q8a2Y" in hydra_rb.checkpoint.url
    child = zoo.get("HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90_Authors").manifest
    assert child.dense_parent == "Dense_Sehwag2020Hydra_V16_CIFAR10_US_0" and child.checkpoint.url is None


def test_schema_json_is_generated_from_the_model_and_up_to_date():
    published = json.loads((REPO_SUBMISSIONS / "schema.json").read_text())
    assert published == manifest_json_schema()
    result = invoke("submit", "schema", "--out", str(REPO_SUBMISSIONS / "schema.json"), "--check")
    assert result.exit_code == 0, result.output
    printed = json.loads(invoke("submit", "schema").output)
    assert printed["properties"]["model_id"]["pattern"].startswith("^")
    assert printed["additionalProperties"] is False


def test_schema_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "schema.json"
    stale.write_text("{}\n")
    result = invoke("submit", "schema", "--out", str(stale), "--check")
    assert result.exit_code != 0 and "out of date" in result.output


# --------------------------------------------------------------------------------------------------------
# A new submission


def test_a_complete_new_submission_passes_offline(subs):
    report = _validate(subs, new_submission(URL, DATA))
    assert report.ok, [p.render() for p in report.problems]
    assert "schema" in report.passed and "names and registries" in report.passed


def test_a_new_submission_must_carry_sha256_and_cannot_be_unverified(subs):
    report = _validate(subs, new_submission(URL, DATA, {"checkpoint.sha256": None, "verified": False}))
    errors = _errors(report)
    assert "checkpoint.sha256" in errors and "required for a new submission" in errors["checkpoint.sha256"]
    assert "verified" in errors and "seeded entries" in errors["verified"]


def test_a_seeded_entry_cannot_point_at_another_url(tmp_path):
    doc = yaml.safe_load((REPO_SUBMISSIONS / "mad" / "MAD_Lee2022Masking_R18_CIFAR10_US_90.yaml").read_text())
    doc["checkpoint"]["url"] = "https://attacker.example/model.t7"
    report = _validate(tmp_path / "submissions", doc)
    assert "pinned" in _errors(report)["checkpoint.url"]


def test_failures_name_file_field_reason_and_fix_with_exit_status_1(subs):
    path = write_manifest(subs, new_submission(URL, DATA, {"checkpoint.sha256": "12ab"}))
    result = invoke("submit", "validate", "--offline", "--submissions", str(subs), str(path))
    assert result.exit_code == 1
    assert f"FAIL {path}" in result.output
    line = next(line for line in result.output.splitlines() if "checkpoint.sha256" in line)
    assert line.strip().startswith("error") and "'12ab'" in line and "Fix: run `sha256sum FILE`" in line
    assert "1 failed" in result.output


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"method": "hydar"}, "method", "did you mean 'hydra'"),
        ({"model.arch": "small_cn"}, "model.arch", "did you mean 'small_cnn'"),
        ({"model.dataset": "digit"}, "model.dataset", "did you mean 'digits'"),
        ({"checkpoint.format": "hydra-subnett"}, "checkpoint.format", "did you mean 'hydra-subnet'"),
        ({"checkpoint.k": DELETE}, "checkpoint.k", "needs HYDRA's kept fraction"),
        ({"model.sparsity": 0.95}, "model_id", "use 95 in the id"),
        ({"model.structure": "S", "model.granularity": "filters"}, "model_id", "says US"),
        (
            {"model_id": "MAD_Lee2022Masking_SmallCNN_DIGITS_US_90"},
            "model_id",
            "start the id with HYDRA_Sehwag2020Hydra_",
        ),
        ({"model.eps": "8/0"}, "model.eps", "division by zero"),
        ({"reported.clean": 43.34}, "reported.clean", "less than or equal to 1"),
        ({"checkpoint.url": "ftp://example.org/x.pt"}, "checkpoint.url", "https://"),
        ({"checkpoint.url": "http://example.org/x.pt"}, "checkpoint.url", "127.0.0.1/localhost"),
        ({"checkpoint.url": "https://user:pw@example.org/x.pt"}, "checkpoint.url", "password"),
        ({"paper.url": "javascript:alert(1)"}, "paper.url", "http:// or https://"),
        ({"dense_parent": "Dense_Nobody2024Missing_SmallCNN_DIGITS_US_0"}, "dense_parent", "not a manifest"),
        ({"license": None}, "license", "required for a new submission"),
        ({"paper.bibtex": None}, "paper.bibtex", "null without a reason"),
        ({"surprise": 1}, "surprise", "not a field of the manifest"),
        ({"unknown": {"checkpoint.url.x": "why"}}, "unknown.checkpoint.url.x", "not a field that may be unknown"),
        ({"paper.title": "two\u202elines"}, "paper.title", "U+202E"),
    ],
)
def test_a_wrong_field_is_named_with_the_reason(subs, overrides, field, words):
    doc = new_submission(URL, DATA, overrides)
    if "model_id" in overrides:
        report = _validate(subs, doc, folder="hydra")
    else:
        report = _validate(subs, doc)
    errors = _errors(report)
    assert field in errors, [p.render() for p in report.problems]
    assert words in errors[field]


def test_a_ten_gigabyte_size_claim_is_refused_before_any_download(subs, monkeypatch):
    allow_loopback(monkeypatch)
    ten_gb = 10 * 1000**3
    report = _validate(subs, new_submission(URL, DATA, {"checkpoint.size": ten_gb}))
    assert "over the cap" in _errors(report)["checkpoint.size"]
    with CheckpointServer() as server:
        server.files["/big.pt"] = b"x" * 10
        with pytest.raises(CheckpointTooLarge, match="nothing was downloaded"):
            fetch_checkpoint(CHILD_ID, server.url("/big.pt"), "big.pt", size=ten_gb)
        assert server.requests == []


# --------------------------------------------------------------------------------------------------------
# Malicious files


def test_path_traversal_and_odd_names_are_refused(subs, tmp_path):
    doc = new_submission(URL, DATA)
    good = write_manifest(subs, doc)
    traversal = subs / "hydra" / ".." / "hydra" / good.name
    (report,) = validate_paths([traversal], root=subs, options=OFFLINE)
    assert "contains '..'" in _errors(report)["file"]

    odd = subs / "hydra" / "x;rm -rf ~.yaml"
    odd.write_text(good.read_text())
    (report,) = validate_paths([odd], root=subs, options=OFFLINE)
    assert "not a plain <model_id>.yaml name" in _errors(report)["file"]

    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(good.read_text())
    link = subs / "hydra" / "Link_Sehwag2020Hydra_SmallCNN_DIGITS_US_90.yaml"
    link.symlink_to(outside)
    (report,) = validate_paths([link], root=subs, options=OFFLINE)
    assert "symbolic link" in _errors(report)["file"]

    misplaced = write_manifest(subs, doc, folder="mad")
    (report,) = validate_paths([misplaced], root=subs, options=OFFLINE)
    assert "differs from the folder" in _errors(report)["method"]

    deep = write_manifest(subs, doc, folder="hydra/nested")
    (report,) = validate_paths([deep], root=subs, options=OFFLINE)
    assert "is not at" in _errors(report)["file"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("checkpoint.file_name", "../../.bashrc"),
        ("checkpoint.file_name", "/etc/passwd"),
        ("checkpoint.file_name", "a/b.pt"),
        ("dense_parent", "../dense/Dense_Test2024Digits_SmallCNN_DIGITS_US_0"),
        ("model_id", "../HYDRA_Sehwag2020Hydra_SmallCNN_DIGITS_US_90"),
        ("method", "../hydra"),
    ],
)
def test_path_like_fields_cannot_traverse(subs, field, value):
    report = _validate(subs, new_submission(URL, DATA, {field: value}), folder="hydra", name=f"{CHILD_ID}.yaml")
    assert field in _errors(report), [p.render() for p in report.problems]


def test_yaml_that_would_run_code_is_refused_without_running_it(subs, tmp_path):
    marker = tmp_path / "pwned"
    path = subs / "hydra" / f"{CHILD_ID}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'model_id: !!python/object/apply:os.system ["touch {marker}"]\n')
    (report,) = validate_paths([path], root=subs, options=OFFLINE)
    assert "tags such as !!python/object are not allowed" in _errors(report)["file"]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: &x [1, 2]\nb: *x\n", "anchors and aliases"),
        ("model_id: A\nmodel_id: B\n", "duplicate key 'model_id'"),
        ("- just\n- a list\n", "not a mapping"),
        ("model_id: [unclosed\n", "not valid YAML"),
        ("? [a, b]\n: 1\n", "mapping key must be a plain value"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_unsafe_or_malformed_yaml_is_refused(subs, text, words):
    path = subs / "hydra" / f"{CHILD_ID}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (report,) = validate_paths([path], root=subs, options=OFFLINE)
    assert words in _errors(report)["file"]


def test_html_in_text_fields_is_kept_verbatim_as_text(subs):
    title = '<script>alert("x")</script> Pruning & <b>Robustness</b>'
    notes = "<img src=x onerror=alert(1)>\nsecond line"
    report = _validate(subs, new_submission(URL, DATA, {"paper.title": title, "notes": notes}))
    assert report.ok, [p.render() for p in report.problems]
    assert report.manifest.paper.title == title and report.manifest.notes == notes
    # Round trip through the pydantic model and JSON: nothing is escaped, stripped or interpreted.
    again = Manifest.model_validate_json(report.manifest.model_dump_json())
    assert again.paper.title == title and again.notes == notes


def test_duplicate_ids_are_refused(subs, tmp_path):
    write_manifest(subs, new_submission(URL, DATA))
    copy = write_manifest(tmp_path / "draft", new_submission(URL, DATA))
    (report,) = validate_paths([copy], root=subs, options=OFFLINE)
    assert "is also the id of" in _errors(report)["model_id"]


def test_the_zoo_leaves_out_invalid_manifests_and_resolves_the_rest(subs):
    write_manifest(subs, new_submission(URL, DATA))
    write_manifest(subs, new_submission(URL, DATA, {"model_id": "HYDRA_Sehwag2020Hydra_SmallCNN_DIGITS_US_95"}))
    zoo = load_zoo(subs)
    assert set(zoo.entries) == {CHILD_ID, PARENT_ID}
    assert len(zoo.invalid) == 1
    with pytest.raises(ValueError, match="is invalid"):
        zoo.get("HYDRA_Sehwag2020Hydra_SmallCNN_DIGITS_US_95")
    assert zoo.resolve(method="hydra", sparsity=0.9, dataset="digits", arch=None).model_id == CHILD_ID
    assert zoo.find(arch="SmallCNN") and zoo.find(arch="small_cnn")
    with pytest.raises(ValueError, match="no zoo entry matches"):
        zoo.resolve(method="hydra", sparsity=0.5, dataset="digits", arch=None)


def test_evaluate_resolves_through_the_zoo_and_lists_ambiguous_candidates(tmp_path):
    db = tmp_path / "r.db"
    result = invoke("evaluate", "--method", "hydra", "--sparsity", "0.9", "--dataset", "cifar10", "--db", str(db))
    assert result.exit_code != 0
    assert "5 zoo entries match --method hydra --sparsity 0.9 --dataset cifar10" in result.output
    assert "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90 (hydra, resnet18" in result.output
    assert "HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90_Authors" in result.output
    assert not db.exists()
    unknown = invoke("evaluate", "--model-id", "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_91", "--db", str(db))
    assert unknown.exit_code != 0 and "did you mean" in unknown.output
    assert "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90?" in unknown.output
    no_url = invoke("evaluate", "--model-id", "HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90_Authors", "--db", str(db))
    assert no_url.exit_code != 0 and "--from FILE" in no_url.output
    assert not db.exists()


def test_submissions_folder_comes_from_the_environment(subs, monkeypatch):
    monkeypatch.setenv("BENCH_SUBMISSIONS_DIR", str(subs))
    listed = invoke("zoo", "list")
    assert listed.exit_code == 0 and PARENT_ID in listed.output
    monkeypatch.setenv("BENCH_SUBMISSIONS_DIR", str(subs / "missing"))
    missing = invoke("zoo", "list")
    assert missing.exit_code != 0 and "no submissions folder" in missing.output


# --------------------------------------------------------------------------------------------------------
# Download URLs: public hosts only


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:8000/x.pt", f"only with {ALLOW_LOOPBACK_ENV}=1"),
        ("http://localhost/x.pt", f"only with {ALLOW_LOOPBACK_ENV}=1"),
        ("https://127.0.0.1/x.pt", "points at this machine"),
        ("https://[::1]/x.pt", "points at this machine"),
        ("https://sub.localhost./x.pt", "points at this machine"),
        ("https://127.1/x.pt", "points at this machine"),
        ("https://0x7f000001/x.pt", "points at this machine"),
        ("https://10.0.0.1/x.pt", "a private address"),
        ("https://192.168.0.10/x.pt", "a private address"),
        ("https://[::ffff:10.0.0.1]/x.pt", "a private address"),
        ("https://169.254.169.254/latest/meta-data/", "a link-local address"),
        ("https://[fe80::1]/x.pt", "a link-local address"),
        ("https://224.0.0.1/x.pt", "a multicast address"),
        ("https://0.0.0.0/x.pt", "an unspecified address"),
        ("https://100.64.0.1/x.pt", "not a public address"),
        ("HTTPS://example.org/x.pt", "https://"),
    ],
)
def test_a_download_url_must_name_a_public_host(subs, monkeypatch, url, words):
    monkeypatch.delenv(ALLOW_LOOPBACK_ENV, raising=False)
    report = _validate(subs, new_submission(URL, DATA, {"checkpoint.url": url}))
    assert words in _errors(report).get("checkpoint.url", ""), [p.render() for p in report.problems]


def test_the_loopback_opt_in_admits_this_machine_only(subs, monkeypatch):
    allow_loopback(monkeypatch)
    for url in ("http://127.0.0.1:8000/x.pt", "http://[::1]/x.pt", "https://localhost/x.pt"):
        report = _validate(subs, new_submission(URL, DATA, {"checkpoint.url": url}))
        assert report.ok, [p.render() for p in report.problems]
    for url in ("http://10.0.0.1/x.pt", "https://169.254.169.254/x", "http://example.org/x.pt"):
        report = _validate(subs, new_submission(URL, DATA, {"checkpoint.url": url}))
        assert "checkpoint.url" in _errors(report), url


def test_the_published_schema_says_urls_are_http_and_keys_are_plain():
    schema = manifest_json_schema()
    for definition, name in (("Checkpoint", "url"), ("Paper", "url")):
        (text, _null) = schema["$defs"][definition]["properties"][name]["anyOf"]
        assert text["pattern"] == "^https?://"
    for keys in (schema["properties"]["unknown"], schema["$defs"]["Taxonomy"]["properties"]["training"]):
        assert list(keys["patternProperties"]) == ["^[A-Za-z0-9_./ -]{1,64}$"]
        assert keys["additionalProperties"] is False


# --------------------------------------------------------------------------------------------------------
# One checkpoint, one manifest


def test_the_same_checkpoint_under_two_manifests_is_refused(subs, tmp_path):
    child = write_manifest(subs, new_submission(URL, DATA))
    # The same bytes again, read another way: as a plain state dict, under another id.
    other_id = "HYDRA_Sehwag2020Hydra_SmallCNN_DIGITS_US_90_Plain"
    twin = new_submission(URL, DATA, {"model_id": other_id, "checkpoint.format": "plain", "checkpoint.k": DELETE})

    draft = write_manifest(tmp_path / "draft", twin)
    (report,) = validate_paths([draft], root=subs, options=OFFLINE)
    message = _errors(report)["checkpoint.sha256"]
    assert f"{other_id}'s checkpoint" in message and f"the same file that is already submitted as {CHILD_ID}" in message

    twin_path = write_manifest(subs, twin)
    reports = validate_paths([subs], root=subs, options=OFFLINE)
    by_id = {r.model_id: _errors(r).get("checkpoint.sha256", "") for r in reports}
    assert f"already submitted as {other_id} ({twin_path.absolute()})" in by_id[CHILD_ID]
    assert f"already submitted as {CHILD_ID} ({child.absolute()})" in by_id[other_id]
    assert by_id[PARENT_ID] == ""

    result = invoke("submit", "validate", "--offline", "--submissions", str(subs), str(twin_path))
    assert result.exit_code == 1 and f"the same file that is already submitted as {CHILD_ID}" in result.output
    # The zoo sets both aside: which of the two readings is right is not for it to guess.
    assert set(load_zoo(subs).entries) == {PARENT_ID}


# --------------------------------------------------------------------------------------------------------
# Nothing a manifest says reaches a log unescaped


def _external(overrides: dict) -> dict:
    return new_submission(
        URL,
        DATA,
        {
            "model_id": "NEW_Test2024Method_SmallCNN_DIGITS_US_90",
            "method": "newmeth",
            "external_method": {
                "display_name": "NEW",
                "ap_key": "NEW_Test2024Method",
                "taxonomy": {
                    "pipeline": "A",
                    "training": {"pretraining": "AT", "1S/IT": "1S"},
                    "structure": "US",
                    "scope": "global",
                    "criterion": "LWM",
                },
            },
            **overrides,
        },
    )


INJECTED = "\n::error file=README.md,line=1::manifest approved\x1b[2J"


def _with_extra_key(key: str) -> dict:
    doc = new_submission(URL, DATA)
    doc[key] = 1
    return doc


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (_with_extra_key(INJECTED), "\\n::error"),
        (new_submission(URL, DATA, {"unknown": {INJECTED: "why"}}), "unknown."),
        (_external({"external_method.taxonomy.training": {INJECTED: "AT"}}), "external_method.taxonomy.training."),
    ],
    ids=["extra key", "unknown", "training"],
)
def test_control_characters_in_keys_are_refused_and_printed_escaped(subs, doc, field):
    path = write_manifest(subs, doc)
    result = invoke("submit", "validate", "--offline", "--submissions", str(subs), str(path))
    assert result.exit_code == 1
    assert not [line for line in result.output.splitlines() if line.lstrip().startswith("::")], result.output
    assert "\x1b" not in result.output and "\\x1b[2J" in result.output
    assert any(line.strip().startswith(f"error   {field}") for line in result.output.splitlines()), result.output


def test_a_valid_external_method_with_plain_keys_passes(subs):
    report = _validate(subs, _external({}))
    assert report.ok, [p.render() for p in report.problems]


def test_a_problem_renders_on_one_line_without_escape_sequences():
    line = Problem("error", "a\nb", "c\x1b]0;title\x07", "d\u202ee").render()
    assert line == "error   a\\nb: c\\x1b]0;title\\x07 Fix: d\\u202ee"
