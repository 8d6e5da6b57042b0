"""Reported numbers: the shipped tables load and validate, models find theirs, drops are reported − measured."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

import bench.analysis.reported as reported_module
from bench.analysis.reported import (
    ENTRY_FIELDS,
    OWN_LABEL,
    REPORTED_DIR,
    Reported,
    load_reported_table,
    matching_entries,
    parse_reported,
    reevaluation_drop,
    reported_for,
    reported_numbers,
)
from bench.models import ARCHS
from methods.base import get_method


def _model(**kw):
    base = dict(
        name="x",
        method="hydra",
        arch="vgg16_bn",
        dataset="cifar10",
        structure="US",
        target_sparsity=0.9,
        measured_sparsity=0.8991,
        reported={},
        provenance={},
    )
    return SimpleNamespace(**{**base, **kw})


def test_every_shipped_file_loads_and_validates():
    files = sorted(REPORTED_DIR.glob("*.json"))
    assert {p.name for p in files} >= {"thin_ice_table1.json", "apb_leaderboard.json", "authors_papers.json"}
    table = load_reported_table()
    assert len(table) == sum(len(json.loads(p.read_text())["entries"]) for p in files)
    assert len({e["id"] for e in table}) == len(table)
    for e in table:
        assert all(k in e for k in ENTRY_FIELDS), e["id"]
        for key in ("clean", "robust"):
            assert e[key] is None or 0.0 <= e[key] <= 1.0, e["id"]
        assert e["robust"] is not None, e["id"]
        assert e["attack"].strip() and e["source"].strip() and e["source_url"].startswith("https://")
        # Matchable: apbench's own method keys, architectures and datasets.
        get_method(e["method"])
        assert e["arch"] in dict(ARCHS.items())
        assert e["dataset"] in ("cifar10", "cifar100")
        assert 0 < e["sparsity"] < 1


def test_thin_ice_table1_is_transcribed_with_its_drops():
    # The paper's Drop % column is Rep. Rob. − A.A. Rob.; the shipped fractions reproduce it to the digit,
    # except on the two rows where the printed table disagrees with itself, which say so.
    entries = [e for e in load_reported_table() if e["file"] == "thin_ice_table1.json"]
    assert len(entries) == 12
    inconsistent = {"thin-ice-t1-atmc-resnet18-90": "4.93", "thin-ice-t1-admm-vgg16_bn-90": "3.06"}
    for e in entries:
        drop = 100 * (e["robust"] - e["reevaluated"]["robust"])
        if e["id"] in inconsistent:
            assert f"Rep. Rob. - A.A. Rob. = {inconsistent[e['id']]}" in e["note"]
            assert f"{drop:.2f}" == inconsistent[e["id"]]
        else:
            assert drop == pytest.approx(e["reevaluated"]["drop_points"], abs=0.006), e["id"]
    admm = next(e for e in entries if e["id"] == "thin-ice-t1-admm-resnet18-90")
    assert (admm["clean"], admm["robust"], admm["reevaluated"]["robust"]) == (0.8143, 0.4337, 0.4407)


def test_apb_entries_carry_the_apb_model_id():
    apb = {e["apb_id"]: e for e in load_reported_table() if e.get("apb_id")}
    assert len(apb) == 36
    hydra = apb["HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90"]
    assert (hydra["clean"], hydra["robust"], hydra["arch"], hydra["eps"]) == (0.7674, 0.4334, "resnet18", "0.031")
    assert apb["RADMM_Ye2019Adversarial_V16_CIFAR10_S_90"]["robust"] == 0.3179


def test_a_model_matches_by_fields_claims_first():
    found = matching_entries(_model())
    ids = [e["id"] for e in found]
    # HYDRA VGG16 90 %: thin-ice Table 1 and HYDRA's own Table 1(a) (claims) before the APB re-evaluation.
    assert ids == [
        "thin-ice-t1-hydra-vgg16_bn-90",
        "hydra-paper-t1a-vgg16_bn-90",
        "apb-HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90",
    ]
    rep = reported_for(_model())
    assert (rep.clean, rep.robust, rep.origin, rep.kind) == (0.805, 0.495, "thin-ice-t1-hydra-vgg16_bn-90", "claim")


@pytest.mark.parametrize(
    "change",
    [
        {"method": "mad"},
        {"arch": "resnet34"},
        {"dataset": "cifar100"},
        {"structure": "S"},
        {"target_sparsity": 0.88},
        {"method": "dense", "structure": "dense"},
    ],
)
def test_a_different_model_does_not_match(change):
    ids = [e["id"] for e in matching_entries(_model(**change))]
    assert not any(
        i.startswith(("thin-ice-t1-hydra-vgg16_bn-90", "apb-HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90")) for i in ids
    )


def test_sparsity_tolerance_and_measured_fallback():
    assert matching_entries(_model(target_sparsity=0.904))
    assert not matching_entries(_model(target_sparsity=0.906))
    assert matching_entries(_model(target_sparsity=None, measured_sparsity=0.8961))


def test_the_threat_model_filters_stated_numbers_only():
    # APB states Linf 0.031 (within 2 % of 8/255); thin-ice states none, so it matches any threat model.
    linf = [e["id"] for e in matching_entries(_model(), norm="Linf", eps=8 / 255)]
    assert "apb-HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90" in linf
    l2 = [e["id"] for e in matching_entries(_model(), norm="L2", eps=0.5)]
    assert l2 == ["thin-ice-t1-hydra-vgg16_bn-90"]
    assert "apb-HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90" not in [
        e["id"] for e in matching_entries(_model(), norm="Linf", eps=16 / 255)
    ]


def test_an_apb_match_is_a_reevaluation_never_the_claim_the_drop_uses():
    # The APB leaderboard's number for this very checkpoint is an AutoAttack re-evaluation: the drop is the authors'
    # claim − measured (thin-ice Table 1), so the claims come first and the APB number is shown beside them.
    model = _model(name="HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90")
    assert [e["id"] for e in matching_entries(model)] == [
        "thin-ice-t1-hydra-vgg16_bn-90",
        "hydra-paper-t1a-vgg16_bn-90",
        "apb-HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90",
    ]
    found = reported_numbers(model, "Linf", 8 / 255)
    assert [r.origin for r in found.claims] == ["thin-ice-t1-hydra-vgg16_bn-90", "hydra-paper-t1a-vgg16_bn-90"]
    assert [r.origin for r in found.reevaluations] == [
        "apb-HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90",  # the same checkpoint first
        "thin-ice-t1-hydra-vgg16_bn-90:reevaluated",  # thin-ice's own AutoAttack columns for the setting
    ]
    assert (found.claim.robust, found.claim.kind) == (0.495, "claim")
    assert (found.reevaluation.robust, found.reevaluation.label) == (0.4381, "APB leaderboard")
    assert found.reevaluations[1].robust == 0.467 and "'A.A.' columns" in found.reevaluations[1].source
    assert reported_for(model, "Linf", 8 / 255) == found.claim
    # Matched by id only (a dense row named like the checkpoint, or an apb_id in provenance): no claim at all.
    named = _model(name="HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90", method="dense", structure="dense")
    assert [e["id"] for e in matching_entries(named)] == ["apb-HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90"]
    assert reported_for(named) is None
    via_provenance = _model(name="mine", method="dense", provenance={"apb_id": "MAD_Lee2022Masking_R18_CIFAR10_US_99"})
    assert reported_for(via_provenance) is None
    assert reported_numbers(via_provenance).reevaluation.robust == 0.2926


OWN = {"clean": 0.8, "robust": 0.5, "attack": "PGD-20", "source": "https://example.org", "eps": "8/255", "norm": "Linf"}


def test_the_models_own_kind_is_honoured():
    # The zoo marks APB-sourced manifests "kind": "reevaluation": such numbers never become the claim.
    found = reported_numbers(_model(reported={**OWN, "kind": "reevaluation"}))
    assert found.claim.origin == "thin-ice-t1-hydra-vgg16_bn-90"
    assert (found.reevaluation.origin, found.reevaluation.robust, found.reevaluation.label) == (
        "model",
        0.5,
        "stored with the model",
    )
    assert reported_for(_model(reported={**OWN, "kind": "claim"})).origin == "model"
    with pytest.raises(ValueError, match="unknown kind 'guess'; use claim or reevaluation"):
        reported_for(_model(reported={**OWN, "kind": "guess"}))


def test_own_numbers_without_a_kind_that_are_the_apb_figure_are_a_reevaluation():
    # A model registered from an APB manifest before the zoo wrote "kind": its numbers are APB's, to the digit.
    apb = {"clean": 0.7674, "robust": 0.4334, "attack": "AutoAttack standard", "source": "APB leaderboard"}
    model = _model(name="HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90", arch="resnet18", reported=apb)
    found = reported_numbers(model)
    assert found.reevaluation.origin == "model" and found.reevaluation.kind == "reevaluation"
    assert found.claim is None or found.claim.origin != "model"
    # The shipped APB entry with the same numbers is not listed twice.
    assert [r.robust for r in found.reevaluations].count(0.4334) == 1
    # Other numbers without a kind stay the authors' claim.
    claimed = _model(name="HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90", arch="resnet18", reported={**apb, "robust": 0.5})
    assert reported_for(claimed).origin == "model"


def test_further_numbers_of_a_submission_are_reevaluations_unless_marked_claims():
    robustbench = {"clean": 0.8898, "robust": 0.5714, "attack": "AutoAttack standard (RobustBench)", "source": "RB"}
    readme = {"clean": 0.89, "robust": 0.63, "attack": "PGD-50", "source": "README", "kind": "claim"}
    model = _model(method="mad", reported={**OWN, "other": [robustbench, readme]})
    found = reported_numbers(model)
    assert [(r.origin, r.robust) for r in found.claims][:2] == [("model", 0.5), ("model:other[1]", 0.63)]
    assert [(r.origin, r.robust) for r in found.reevaluations][0] == ("model:other[0]", 0.5714)
    with pytest.raises(ValueError, match=r"other\[0\]: 'source' is required"):
        reported_numbers(_model(reported={**OWN, "other": [{"robust": 0.4}]}))


def test_a_manifest_with_null_attack_and_accuracies_parses():
    # The manifest schema allows attack: null and null accuracies (bench.zoo stores what is not null).
    rep = parse_reported({"clean": None, "robust": None, "attack": None, "source": "paper"})
    assert (rep.clean, rep.robust, rep.attack, rep.kind) == (None, None, None, "claim")
    assert parse_reported({"clean": 0.8, "robust": 0.5, "source": "paper"}).attack is None
    own = reported_for(_model(method="structured", structure="S", reported={"clean": 0.8, "source": "paper"}))
    assert own.origin == "model" and own.robust is None
    # A claim without a robust number does not hide one that has it: the drop uses the first with a number.
    assert reported_for(_model(reported={"clean": 0.8, "source": "paper"})).origin == "thin-ice-t1-hydra-vgg16_bn-90"
    assert reevaluation_drop(own, 0.4) is None
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_reported(["robust", 0.4])


def test_the_models_own_reported_numbers_come_first_and_are_validated():
    own = OWN
    rep = reported_for(_model(reported=own))
    assert rep == Reported(
        0.8, 0.5, "PGD-20", "https://example.org", "8/255", None, norm="Linf", origin="model", label=OWN_LABEL
    )
    # Under another threat model the model's own numbers do not apply; the shipped ones that say nothing still do.
    assert reported_for(_model(reported=own), norm="L2", eps=0.5).origin == "thin-ice-t1-hydra-vgg16_bn-90"
    with pytest.raises(
        ValueError, match=r"robust 45.3 is not a fraction in \[0, 1\] \(it looks like a percentage: write 0.453\)"
    ):
        reported_for(_model(reported={**own, "robust": 45.3}))
    with pytest.raises(ValueError, match="'source' is required"):
        parse_reported({"robust": 0.4, "attack": "x"})
    assert reported_for(_model(method="structured", structure="S")) is None


def test_drop_is_reported_minus_measured_in_points():
    rep = Reported(0.8, 0.4337, "PGD", "paper", None, None)
    assert reevaluation_drop(rep, 0.4407) == pytest.approx(-0.70)
    assert reevaluation_drop(rep, 0.38) == pytest.approx(5.37)
    assert reevaluation_drop(None, 0.4) is None
    assert reevaluation_drop(Reported(0.8, None, "PGD", "paper", None, None), 0.4) is None
    assert reevaluation_drop(rep, None) is None and reevaluation_drop(rep, math.nan) is None


def test_a_broken_data_file_is_refused_with_its_name(tmp_path, monkeypatch):
    bad = {"kind": "claim", "entries": [{"id": "x", "method": "hydra", "arch": "resnet18", "dataset": "cifar10"}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    monkeypatch.setattr(reported_module, "REPORTED_DIR", tmp_path)
    reported_module._table.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"bad.json entry 0 \(x\): missing structure, sparsity"):
            load_reported_table()
    finally:
        reported_module._table.cache_clear()
