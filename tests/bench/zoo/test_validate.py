"""The validator's offline rules as functions ``(manifest, context) -> list[Problem]``, run one at a time.

The messages themselves are checked through ``bench submit validate`` in test_submit.py; here the contract:
each rule runs on its own, ``check_semantics`` is the rules' findings in registration order, and a rule list
can be swapped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.zoo.manifest import Manifest
from bench.zoo.validate import RULES, Context, FileReport, Problem, check_semantics
from bench.zoo.validate.report import warning
from bench.zoo.validate.rules import dense_parent_is_known, id_agrees_with_model, size_within_cap
from tests.zoo_helpers import DELETE, PARENT_ID, dense_submission, new_submission

URL = "https://example.org/model_best.pth.tar"
DATA = b"checkpoint bytes"


def _manifest(overrides: dict | None = None) -> Manifest:
    return Manifest.model_validate(new_submission(URL, DATA, overrides))


@pytest.fixture(scope="module")
def known() -> dict[str, Manifest]:
    parent = Manifest.model_validate(dense_submission("https://example.org/dense.pt", b"dense"))
    return {PARENT_ID: parent}


def test_a_valid_submission_passes_every_rule(known):
    m = _manifest({"checkpoint.format": "plain", "checkpoint.k": DELETE})  # hydra-subnet warns on small_cnn
    ctx = Context.for_manifest(m, known)
    assert not ctx.seeded and ctx.id_parts["arch"] == "SmallCNN"
    for rule in RULES:
        assert rule(m, ctx) == [], rule.__name__
    report = FileReport(Path("x.yaml"), manifest=m)
    check_semantics(report, known)
    assert report.problems == [] and report.passed == ["names and registries"]


def test_one_rule_runs_alone_with_its_message(known):
    m = _manifest({"checkpoint.size": 3 * 1024**3})
    (problem,) = size_within_cap(m, Context.for_manifest(m, known, max_size=2 * 1024**3))
    assert problem == Problem(
        "error",
        "checkpoint.size",
        f"claims {3 * 1024**3:,} bytes (3.0 GiB), over the cap of {2 * 1024**3:,} bytes (2.0 GiB); "
        "nothing will be downloaded",
        "checkpoints above the cap are not accepted; give the real size, or ask the maintainers to raise the cap",
    )
    assert size_within_cap(m, Context.for_manifest(m, known, max_size=4 * 1024**3)) == []


def test_check_semantics_is_the_rules_findings_in_order(known):
    # Three rules find something here; the report lists them in the order RULES holds them.
    m = _manifest(
        {"model.sparsity": 0.95, "checkpoint.format": "nosuch", "dense_parent": "Missing_X2020Y_R18_CIFAR10_US_0"}
    )
    ctx = Context.for_manifest(m, known)
    expected = [p for rule in RULES for p in rule(m, ctx)]
    assert [p.field for p in expected] == ["model_id", "checkpoint.format", "dense_parent"]
    assert expected.index(id_agrees_with_model(m, ctx)[0]) < expected.index(dense_parent_is_known(m, ctx)[0])
    report = FileReport(Path("x.yaml"), manifest=m)
    check_semantics(report, known)
    assert report.problems == expected and report.passed == []


def test_a_rule_list_can_be_swapped(known):
    def always_warns(m, ctx):
        return [warning("model.arch", f"{m.model.arch} is only a test")]

    report = FileReport(Path("x.yaml"), manifest=_manifest({"model.sparsity": 0.95}))
    check_semantics(report, known, rules=[always_warns])
    assert [p.render() for p in report.problems] == ["warning model.arch: small_cnn is only a test"]
    assert report.passed == ["names and registries"]  # a warning does not fail the rules


def test_rules_are_registered_once_and_documented():
    names = [rule.__name__ for rule in RULES]
    assert len(names) == len(set(names)) >= 15
    assert all(rule.__doc__ for rule in RULES)
