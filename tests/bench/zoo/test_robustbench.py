"""RobustBench interoperability: model_info export in their conventions, import through a stand-in package."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from sqlalchemy import select
from torch import nn

from bench.checkpoints import NonFiniteWeightsError
from bench.models import ARCHS
from bench.provenance import utcnow
from bench.spec import RunSpec
from bench.store import Evaluation, Model
from bench.store.registration import register_model
from bench.zoo.robustbench import import_robustbench, model_info
from tests.cli import invoke

# The keys of RobustBench/robustbench model_info/cifar10/Linf/Sehwag2020Hydra.json, in their order.
ROBUSTBENCH_KEYS = [
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
]


@pytest.fixture
def evaluated(store, tmp_path, small_cnn_init):
    """A stored HYDRA-like model with reported numbers and two complete evaluations (plus and standard)."""
    path = tmp_path / "m.pt"
    torch.save(small_cnn_init.state_dict(), path)
    row = register_model(
        store,
        path,
        small_cnn_init,
        arch="small_cnn",
        dataset="digits",
        method="hydra",
        structure="US",
        name="hydra-digits",
        reported={"clean": 0.8897, "robust": 0.6224, "attack": "PGD-50"},
    )
    with store.session() as s:
        for version, clean, aa, best, n in (("plus", 0.5, 0.3, 0.3, 360), ("standard", 0.8898, 0.5714, 0.5601, 100)):
            spec = RunSpec(dataset="digits", n_samples=n, norm="Linf", eps="0.2", eps_value=0.2, version=version)
            s.add(
                Evaluation(
                    model_id=row.id,
                    spec_hash=spec.hash,
                    protocol_hash=spec.protocol_hash,
                    spec=spec.to_dict(),
                    status="complete",
                    n_samples=n,
                    clean_accuracy=clean,
                    aa_robust_accuracy=aa,
                    best_robust_accuracy=best,
                    unreliable=False,
                    started_at=utcnow(),
                )
            )
    return row


def test_model_info_follows_robustbench_conventions(store, evaluated, tmp_path):
    result = invoke("export", "robustbench", "hydra-digits", "--out", tmp_path / "mi", "--db", store.url)
    assert result.exit_code == 0, result.output
    path = tmp_path / "mi" / "digits" / "Linf" / "hydra-digits.json"
    info = json.loads(path.read_text())
    assert list(info)[: len(ROBUSTBENCH_KEYS)] == ROBUSTBENCH_KEYS
    # AutoAttack standard is RobustBench's, so that evaluation is exported; percentages as strings, 2 decimals.
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == ("88.98", "57.14", "62.24")
    assert info["external"] == "56.01" and info["unreliable"] is False
    assert info["eps"] == "0.2" and info["dataset"] == "digits" and info["number_forward_passes"] == 1
    assert info["name"] == "HYDRA: Pruning Adversarially Robust Neural Networks" and info["venue"] == "NeurIPS 2020"
    assert "first 100 test samples" in info["footnote"]


def test_model_info_escapes_text_for_robustbench_html(store, evaluated):
    from bench.zoo.manifest import Manifest
    from tests.zoo_helpers import new_submission

    doc = new_submission("https://example.org/m.pt", b"x", {"paper.title": "<i>A</i> & B", "paper.authors": ["O'Neil"]})
    manifest = Manifest.model_validate(doc)
    with store.session() as s:
        row = s.get(Model, evaluated.id)
        ev = s.scalars(select(Evaluation).where(Evaluation.model_id == row.id)).first()
        info = model_info(row, ev, manifest)
    assert info["name"] == "&lt;i&gt;A&lt;/i&gt; &amp; B" and info["authors"] == "O&#x27;Neil"
    assert manifest.paper.title == "<i>A</i> & B"  # the manifest itself keeps the text verbatim


def _stand_in(monkeypatch, build):
    """Install a fake ``robustbench`` package whose ``utils.load_model`` returns ``build()``."""
    calls = []

    def load_model(model_name, dataset, threat_model, model_dir):
        calls.append((model_name, dataset, threat_model, model_dir))
        return build()

    package = types.ModuleType("robustbench")
    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model
    package.utils = utils
    monkeypatch.setitem(sys.modules, "robustbench", package)
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    return calls


def _resnet56_with_unused_block():
    torch.manual_seed(0)
    net = ARCHS.get("resnet56").builder(10)
    net.sub_block1 = nn.Conv2d(16, 16, 3)  # defined, never called in forward (as in TRADES's WideResNet)
    return net.eval()


def test_a_robustbench_model_with_non_finite_weights_names_its_file(store, tmp_path, monkeypatch):
    def diverged():
        net = _resnet56_with_unused_block()
        with torch.no_grad():
            net.conv1.weight[0, 0, 0, 0] = float("nan")
        return net

    _stand_in(monkeypatch, diverged)
    folder = tmp_path / "rb"
    with pytest.raises(NonFiniteWeightsError) as raised:
        import_robustbench(store, "Test2099Nan", dataset="cifar10", model_dir=folder)
    message = str(raised.value)
    assert f"checkpoint {folder / 'cifar10' / 'Linf' / 'Test2099Nan.pt'} holds 1 non-finite entry" in message
    assert "conv1.weight (1 NaN)" in message
    with store.session() as s:
        assert s.scalars(select(Model)).all() == []
    assert not list(folder.rglob("*.apbench.pt"))


def test_import_registers_a_robustbench_model_as_a_dense_parent(store, tmp_path, monkeypatch, small_cnn_init):
    calls = _stand_in(monkeypatch, _resnet56_with_unused_block)
    # A zoo child naming it as its parent, registered before the import.
    child_path = tmp_path / "child.pt"
    torch.save(small_cnn_init.state_dict(), child_path)
    child = register_model(
        store,
        child_path,
        small_cnn_init,
        arch="small_cnn",
        dataset="digits",
        method="hydra",
        name="child",
        source="zoo",
        provenance={"zoo": {"dense_parent": "robustbench:Test2099Stand"}},
    )
    row = import_robustbench(store, "Test2099Stand", dataset="cifar10", model_dir=tmp_path / "rb")
    assert calls == [("Test2099Stand", "cifar10", "Linf", str(tmp_path / "rb"))]
    assert (row.name, row.arch, row.method, row.source) == (
        "robustbench:Test2099Stand",
        "resnet56",
        "dense",
        "robustbench",
    )
    assert row.provenance["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert row.provenance["robustbench"]["dropped_keys"] == ["sub_block1.bias", "sub_block1.weight"]
    with store.session() as s:
        assert s.get(Model, child.id).parent_id == row.id
    # The stored model is rebuilt from the saved file with the same logits as RobustBench's.
    from bench.store.registration import load_stored_model

    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_stored_model(row)(x), _resnet56_with_unused_block()(x), atol=1e-5)


def test_import_through_the_cli(store, monkeypatch):
    _stand_in(monkeypatch, _resnet56_with_unused_block)
    result = invoke("zoo", "import-robustbench", "Test2099Stand", "--db", store.url)
    assert result.exit_code == 0, result.output
    assert "model robustbench:Test2099Stand: resnet56 on cifar10" in result.output


def test_an_unknown_architecture_is_named(store, monkeypatch):
    _stand_in(monkeypatch, lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)))
    result = invoke("zoo", "import-robustbench", "Test2099Odd", "--db", store.url)
    assert result.exit_code != 0 and "no registered architecture has these weights" in result.output


def test_without_robustbench_the_message_says_what_to_install(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.delitem(sys.modules, "robustbench.utils", raising=False)
    result = invoke("zoo", "import-robustbench", "Carmon2019Unlabeled", "--db", store.url)
    assert result.exit_code != 0
    assert "pip install 'apbench[robustbench]'" in result.output and "Traceback" not in result.output
    with store.session() as s:
        assert s.scalars(select(Model)).first() is None


def test_a_broken_robustbench_install_is_explained(store, monkeypatch, tmp_path):
    # robustbench 1.1.1 from PyPI imports `autoattack`, which no PyPI package provides.
    package = tmp_path / "site" / "robustbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "utils.py").write_text("from autoattack import AutoAttack\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("robustbench", "robustbench.utils", "autoattack"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    result = invoke("zoo", "import-robustbench", "Carmon2019Unlabeled", "--db", store.url)
    assert result.exit_code != 0
    assert "needs the module 'autoattack'" in result.output and "fra31/auto-attack" in result.output


def test_additional_data_is_always_a_boolean(store, evaluated):
    from bench.zoo.manifest import Manifest
    from tests.zoo_helpers import new_submission

    unstated = Manifest.model_validate(
        new_submission("https://example.org/m.pt", b"x", {"model.additional_data": None})
    )
    stated = Manifest.model_validate(new_submission("https://example.org/m.pt", b"x", {"model.additional_data": True}))
    with store.session() as s:
        row = s.get(Model, evaluated.id)
        ev = s.scalars(select(Evaluation).where(Evaluation.model_id == row.id)).first()
        infos = {name: model_info(row, ev, m) for name, m in (("none", None), ("unstated", unstated), ("yes", stated))}
    assert [infos[k]["additional_data"] for k in ("none", "unstated", "yes")] == [False, False, True]
    assert "not stated (exported as false)" in infos["unstated"]["footnote"]
    assert "not stated" not in infos["yes"]["footnote"]


def test_a_reevaluation_is_never_exported_as_the_authors_claim(store, evaluated):
    # The APB-seeded manifests' numbers are the APB's AutoAttack measurements (kind: reevaluation), not claims.
    with store.session() as s:
        row = s.get(Model, evaluated.id)
        ev = s.scalars(select(Evaluation).where(Evaluation.model_id == row.id)).first()
        assert model_info(row, ev, None)["reported"] == "62.24"
        row.reported = {**row.reported, "kind": "reevaluation"}
        assert model_info(row, ev, None)["reported"] is None


def test_apb_seeded_manifests_mark_their_numbers_as_reevaluations():
    from bench.zoo.zoo import load_zoo

    zoo = load_zoo()
    apb = [e for e in zoo.entries.values() if e.manifest.reported.source.startswith("APB leaderboard")]
    assert len(apb) == 35 and all(e.manifest.reported.kind == "reevaluation" for e in apb)
    claims = [e for e in zoo.entries.values() if e.manifest.model_id.endswith("_Authors")]
    assert claims and all(e.manifest.reported.kind == "claim" for e in claims)
