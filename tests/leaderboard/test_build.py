"""The static site: pages and downloads, escaping of submitter strings, byte-identical rebuilds, odd stores.

The stores here hold synthetic results (``leaderboard.synthetic``); ``tests/leaderboard/test_browser.py`` builds a
site from real evaluations and drives it in chromium.
"""

from __future__ import annotations

import csv
import filecmp
import hashlib
import html as html_module
import io
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from markupsafe import escape
from sqlalchemy import select

from bench.analysis.records import load_records
from bench.cli import main
from bench.provenance import utcnow
from bench.store import Evaluation, Model, SampleResult, Store
from leaderboard import build as build_module
from leaderboard import plots, render
from leaderboard.build import MARKER, build_site
from leaderboard.columns import COLUMNS, check_order
from leaderboard.formatting import model_slug, safe_url
from leaderboard.per_sample import records_csv
from leaderboard.synthetic import fill_synthetic, spec_for
from methods.base import get_method, list_methods
from tests.analysis_store import add_evaluation, add_model, digits_spec

real_pool = build_module._pool
XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _html(root: Path) -> dict[Path, str]:
    return {p: (root / p).read_text(encoding="utf-8") for p in _files(root) if p.suffix == ".html"}


@pytest.fixture
def synthetic(store):
    """A dense parent and four pruned children (HYDRA at 90/95/99 %, RAP-ADMM at 90 %), 300 samples each."""
    ids = fill_synthetic(store, n_models=5, n_samples=300)
    return store, ids


def test_site_has_every_page_plot_and_download(synthetic, tmp_path):
    store, ids = synthetic
    index = build_site(store, tmp_path / "site")
    site = tmp_path / "site"
    assert index == site / "index.html"
    for page in ("index.html", "methodology.html", "methods.html", "downloads.html", "data/papers.bib", MARKER):
        assert (site / page).is_file(), page
    with store.session() as s:
        models = list(s.scalars(select(Model).order_by(Model.id)))
        evaluations = {ev.model_id: ev.id for ev in s.scalars(select(Evaluation))}
        records = {mid: load_records(s, eid) for mid, eid in evaluations.items()}
    html = (site / "index.html").read_text()
    for m in models:
        page = site / "models" / f"{model_slug(m)}.html"
        assert page.is_file()
        assert f'href="models/{model_slug(m)}.html"' in html
        stem = f"{model_slug(m)}-e{evaluations[m.id]}"
        assert (site / "models" / f"{stem}-curve.svg").is_file()
        # The download is the evaluation's per-sample records, byte for byte as bench.analysis writes them.
        assert (site / "models" / f"{stem}.csv").read_text() == records[m.id].to_csv()
        text = page.read_text()
        assert f'src="{stem}-curve.svg"' in text
        if m.parent_id is None:
            assert "Samples on thin ice" not in text
        else:
            assert (site / "models" / f"{stem}-thin-ice.svg").is_file()
            assert f'src="{stem}-thin-ice.svg"' in text
            assert "AUC(ε<sub>10</sub> &lt; ε<sub>11</sub>)" in text
            assert "McNemar" in text
    # One table (cifar10, L∞ 8/255, resnet18, unstructured) with the dense parent in it, ranked by AutoAttack.
    assert len(list((site / "data").glob("table-*.csv"))) == 1
    table = next((site / "data").glob("table-*.csv"))
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert {r["model"] for r in rows} == {m.name for m in models}
    robust = [float(r["autoattack"]) for r in rows]
    assert robust == sorted(robust, reverse=True)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    data = json.loads(table.with_suffix(".json").read_text())
    assert [r["model"] for r in data["rows"]] == [r["model"] for r in rows]
    expected = {"dataset": "cifar10", "norm": "Linf", "eps": "8/255", "arch": "resnet18", "structure": "US"}
    assert {k: data["table"][k] for k in expected} == expected
    spec = spec_for(300)
    assert data["table"]["protocol_hash"] == spec.protocol_hash and data["table"]["main_protocol"] is True
    assert data["table"]["protocol"]["n_samples"] == 300 and "device" not in data["table"]["protocol"]
    # Every registered method has a page with its paper; the ones with models have their sparsity plot.
    for key in list_methods():
        card = get_method(key).card
        page = (site / "methods" / f"{key}.html").read_text()
        assert card.paper_url in page and str(escape(card.display_name)) in page
    assert (site / "methods" / "hydra-sparsity.svg").is_file()
    bib = (site / "data" / "papers.bib").read_text()
    assert "@inproceedings{Sehwag2020Hydra," in bib and "Samples on Thin Ice" in bib
    # Relative links only: the site works from file:// anywhere.
    for path, text in _html(site).items():
        for link in re.findall(r'(?:href|src)="([^"]+)"', text):
            if link.startswith(("http://", "https://")):
                continue
            target = (site / path).parent / link.split("#")[0]
            assert target.exists(), f"{path}: broken link {link}"


def test_a_store_with_seeds_best_known_and_old_evaluations_rebuilds_byte_identically(store, tmp_path, monkeypatch):
    _replicate_store(store)
    build_site(store, tmp_path / "a", workers=1)
    pools = []
    monkeypatch.setattr(build_module, "MIN_TASKS_FOR_POOL", 1)
    monkeypatch.setattr(build_module, "_pool", lambda *a: pools.append(real_pool(*a)) or pools[-1])
    build_site(store.url, tmp_path / "b", workers=2)
    assert pools and pools[0] is not None
    a, b = tmp_path / "a", tmp_path / "b"
    assert _files(a) == _files(b)
    assert [str(p) for p in _files(a) if not filecmp.cmp(a / p, b / p, shallow=False)] == []


def test_fast_csv_writer_matches_records_to_csv(synthetic):
    store, _ = synthetic
    with store.session() as s:
        rec = load_records(s, 2)
    assert records_csv(rec) == rec.to_csv()
    # NaN distances, a stage name and negative margins all survive; a value needing quotes falls back.
    odd = rec.aa_broken_by.copy()
    odd[0] = 'a,"b'
    odd_rec = replace(rec, aa_broken_by=odd)
    assert records_csv(odd_rec) == odd_rec.to_csv()


def test_two_builds_of_the_same_store_are_byte_identical(synthetic, tmp_path, monkeypatch):
    store, _ = synthetic
    # Worker processes or not, the files are the same.
    build_site(store, tmp_path / "a", workers=1)
    pools = []
    monkeypatch.setattr(build_module, "MIN_TASKS_FOR_POOL", 1)
    monkeypatch.setattr(build_module, "_pool", lambda *a: pools.append(real_pool(*a)) or pools[-1])
    build_site(store.url, tmp_path / "b", workers=2)
    assert pools and pools[0] is not None
    a, b = tmp_path / "a", tmp_path / "b"
    assert _files(a) == _files(b)
    assert len(_files(a)) > 20
    different = [str(p) for p in _files(a) if not filecmp.cmp(a / p, b / p, shallow=False)]
    assert different == []


def test_plot_templates_redraw_exactly_like_fresh_figures():
    rng = np.random.default_rng(0)

    def thin(n, scale):
        eps = rng.normal(0.03, scale, n)
        eps[:2] = np.nan
        return eps, 9 * eps, rng.choice(["S00", "S01", "S10", "S11"], n)

    a, b = thin(3000, 0.05), thin(200, 0.01)
    grid = np.linspace(0, 0.09, 241)
    # b: plain FMN distances only (an evaluation stored before best-known ones); a: best known, plain FMN overlaid.
    curve_b = dict(norm="Linf", nominal_eps=0.03, nominal_label="8/255", autoattack=0.4, best_known=0.3)
    curve_a = dict(
        norm="L2",
        nominal_eps=0.5,
        nominal_label="0.5",
        autoattack=0.1,
        best_known=0.0,
        distance="best",
        fmn_robust=np.linspace(0.6, 0.1, 241),
    )
    plots._templates.clear()
    fresh_b = plots.thin_ice_svg(*b, norm="L2", nominal_eps=0.5)
    fresh_curve = plots.security_curve_svg(grid, np.linspace(1, 0, 241), **curve_b)
    fresh_a = plots.security_curve_svg(grid * 3, np.linspace(0.5, 0, 241), **curve_a)
    plots._templates.clear()
    plots.thin_ice_svg(*a, norm="Linf", nominal_eps=0.03, distance="best")
    assert plots.security_curve_svg(grid * 3, np.linspace(0.5, 0, 241), **curve_a) == fresh_a
    assert plots.thin_ice_svg(*b, norm="L2", nominal_eps=0.5) == fresh_b
    assert plots.security_curve_svg(grid, np.linspace(1, 0, 241), **curve_b) == fresh_curve
    assert "<dc:date>" not in fresh_b and "<text" in fresh_b and "robust accuracy (%)" in fresh_curve
    # The legend names the distances each curve reads; the overlay only where there is one.
    assert "plain FMN distances" in fresh_curve and "best-known distances" not in fresh_curve
    assert "best-known distances" in fresh_a and "plain FMN distances" in fresh_a
    with pytest.raises(ValueError, match="unknown distance"):
        plots.security_curve_svg(grid, np.linspace(1, 0, 241), **{**curve_b, "distance": "aa"})


def _poison(store, model_id: int) -> None:
    """Put the attack string into every field a submitter controls."""
    with store.session() as s:
        m = s.get(Model, model_id)
        m.name = f"evil {XSS}"
        m.method = f"evil-method {XSS}"
        m.arch = f"arch {XSS}"
        m.source = XSS
        m.taxonomy = {"pipeline": XSS, "criterion": XSS, XSS: "key"}
        paper = {"title": f"Paper {XSS}", "authors": [XSS, "B"], "url": "javascript:alert(1)", "venue": XSS}
        external = {"display_name": f"Evil {XSS}", "ap_key": "Evil_Script2024Alert"}
        m.provenance = {"zoo": {"paper": paper, "external_method": external}, "note": XSS}
        m.reported = {
            "clean": 0.9,
            "robust": 0.6,
            "attack": XSS,
            "source": XSS,
            "note": f"note {XSS}",
            "source_url": "javascript:alert(1)",
            "other": [{"robust": 0.4, "attack": XSS, "source": f"other {XSS}", "source_url": "javascript:alert(2)"}],
        }
        m.layer_sparsity = {XSS: {"numel": 10, "zeros": 5, "sparsity": 0.5}}
        m.normalization = f"{XSS}/1"  # not MEAN/STD numbers: shown as stored, as text
        ev = s.scalars(select(Evaluation).where(Evaluation.model_id == model_id)).one()
        ev.flags = [*ev.flags, XSS]
        ev.unreliable = True
        ev.provenance = {"note": XSS, XSS: XSS}


def test_submitter_strings_are_shown_as_text_everywhere(synthetic, tmp_path):
    store, ids = synthetic
    _poison(store, ids[1])
    with store.session() as s:
        s.get(Model, ids[2]).name = '=HYPERLINK("http://x","y")'
    build_site(store, tmp_path / "site")
    site = tmp_path / "site"
    pages = _html(site)
    shown_on = [p for p, text in pages.items() if XSS_ESCAPED in text]
    for path, text in pages.items():
        assert XSS not in text, path
        assert not re.search(r'(?:href|src)="\s*javascript:', text, re.IGNORECASE), path
        assert text.count("<script") == 1, path  # only the site's own sorting script
    with store.session() as s:
        evil = s.get(Model, ids[1])
        evil_page = Path("models") / f"{model_slug(evil)}.html"
    method_page = next(p for p in pages if p.parts[0] == "methods" and p.name.startswith("evil-method"))
    for page in (Path("index.html"), Path("methods.html"), Path("downloads.html"), evil_page, method_page):
        assert page in shown_on, page
    evil_html = pages[evil_page]
    for where in ("Paper " + XSS_ESCAPED, "note " + XSS_ESCAPED, "evil " + XSS_ESCAPED, "other " + XSS_ESCAPED):
        assert where in evil_html or where in pages[method_page], where
    # The claim and the other re-evaluation are listed, their javascript: source_url as text, never as a link.
    assert "<strong>Authors' claim</strong>" in evil_html and "Re-evaluation by another benchmark" in evil_html
    assert "javascript:alert(1)" in evil_html and 'href="javascript' not in evil_html.lower()
    assert "potentially unreliable" in pages[Path("index.html")]
    # Downloads: JSON round-trips the string but never contains a raw "<"; CSV cells hold it as data and
    # cannot start a spreadsheet formula.
    for path in (site / "data").glob("*.json"):
        raw = path.read_text()
        assert "<" not in raw and ">" not in raw, path
        json.loads(raw)
    everything = json.loads((site / "data" / "leaderboard.json").read_text())
    assert f"evil {XSS}" in {r["model"] for r in everything}
    rows = list(csv.DictReader(io.StringIO((site / "data" / "leaderboard.csv").read_text())))
    names = {r["model"] for r in rows}
    assert f"evil {XSS}" in names and '\'=HYPERLINK("http://x","y")' in names
    assert not any(v.startswith("=") for r in rows for v in r.values())
    bib = (site / "data" / "papers.bib").read_text()
    assert "javascript:" not in bib
    for svg in site.rglob("*.svg"):
        assert "<script" not in svg.read_text(), svg


def test_safe_url_allows_only_absolute_http_links():
    assert safe_url("https://arxiv.org/abs/2002.10509") == "https://arxiv.org/abs/2002.10509"
    for bad in (
        "javascript:alert(1)",
        "JaVaScRiPt:x",
        "data:text/html,x",
        "//evil.org",
        "/etc/passwd",
        None,
        3,
        "http://",
    ):
        assert safe_url(bad) is None, bad


def test_safe_url_refuses_credentials_and_control_characters():
    for bad in ("https://user:pw@example.org", "https://example.org/a\x07b", "https://exa\u200bmple.org/"):
        assert safe_url(bad) is None, repr(bad)


def test_empty_store_builds_a_site_that_says_so(store, tmp_path):
    index = build_site(store, tmp_path / "site")
    text = index.read_text()
    assert 'id="empty"' in text and "holds no models yet" in text
    hydra = (tmp_path / "site" / "methods" / "hydra.html").read_text()
    assert "No model of this method has a complete evaluation yet" in hydra
    assert json.loads((tmp_path / "site" / "data" / "leaderboard.json").read_text()) == []


def test_models_without_a_complete_evaluation_are_listed_not_evaluated(synthetic, tmp_path):
    store, ids = synthetic
    spec = spec_for(300)
    with store.session() as s:
        bare = Model(
            name="registered-only", checkpoint_sha256="1" * 64, arch="resnet18", dataset="cifar10", created_at=utcnow()
        )
        partial = Model(
            name="half-done", checkpoint_sha256="2" * 64, arch="resnet18", dataset="cifar10", created_at=utcnow()
        )
        s.add_all([bare, partial])
        s.flush()
        ev = Evaluation(
            model_id=partial.id,
            spec_hash=spec.hash,
            protocol_hash=spec.protocol_hash,
            spec=spec.to_dict(),
            status="running",
            n_samples=300,
            started_at=utcnow(),
        )
        s.add(ev)
        s.flush()
        source = s.scalars(select(SampleResult).where(SampleResult.evaluation_id == 1).limit(40)).all()
        for r in source:
            cols = {c.name: getattr(r, c.name) for c in SampleResult.__table__.columns if c.name != "id"}
            s.add(SampleResult(**{**cols, "evaluation_id": ev.id}))
        bare_slug, partial_slug = model_slug(bare), model_slug(partial)
    build_site(store, tmp_path / "site")
    index = (tmp_path / "site" / "index.html").read_text()
    section = index[index.index('id="not-evaluated"') :]
    assert "registered-only" in section and "half-done" in section
    assert "40 of 300 samples stored" in section
    assert "half-done" not in index[: index.index('id="not-evaluated"')]
    for slug in (bare_slug, partial_slug):
        assert "Not evaluated" in (tmp_path / "site" / "models" / f"{slug}.html").read_text()


def test_pruned_model_whose_parent_lacks_the_protocol_gets_a_note(synthetic, tmp_path):
    store, ids = synthetic
    with store.session() as s:
        dense_eval = s.scalars(select(Evaluation).where(Evaluation.model_id == ids[0])).one()
        dense_eval.protocol_hash = "f" * 64
        child = s.get(Model, ids[1])
        child_slug = model_slug(child)
    build_site(store, tmp_path / "site")
    page = (tmp_path / "site" / "models" / f"{child_slug}.html").read_text()
    assert "No thin-ice analysis" in page and "has no complete evaluation under this protocol" in page


def test_out_dir_is_replaced_only_when_a_build_made_it(synthetic, tmp_path):
    store, _ = synthetic
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and was not built"):
        build_site(store, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    site = tmp_path / "site"
    build_site(store, site)
    (site / "models" / "stale.html").write_text("old")
    build_site(store, site)
    assert not (site / "models" / "stale.html").exists()


def test_cli_builds_and_prints_the_index_path(synthetic, tmp_path):
    store, _ = synthetic
    out = tmp_path / "public"
    result = CliRunner().invoke(main, ["leaderboard", "build", "--db", store.url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str((out / "index.html").resolve())
    refused = CliRunner().invoke(main, ["leaderboard", "build", "--db", store.url, "--out", str(tmp_path)])
    assert refused.exit_code == 1 and "Error: --out" in refused.output


def _page(site: Path, name: str) -> str:
    return next((site / "models").glob(f"*-{name}.html")).read_text()


def _text(html: str) -> str:
    return html_module.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def test_inconsistent_rows_and_failing_analyses_become_notes_not_a_failed_build(synthetic, tmp_path, monkeypatch):
    store, ids = synthetic
    with store.session() as s:
        evaluations = {ev.model_id: ev for ev in s.scalars(select(Evaluation))}

        def first_broken(model_id):
            return s.scalars(
                select(SampleResult).where(
                    SampleResult.evaluation_id == evaluations[model_id].id,
                    SampleResult.clean_correct.is_(True),
                    SampleResult.aa_robust.is_(False),
                )
            ).first()

        # bench.evaluate since the clean-pass fix: AutoAttack's own clean pass got this sample wrong, so no stage
        # attacked it and it is not robust (the run is flagged); and a stage name no AutoAttack version has.
        first_broken(ids[1]).aa_broken_by = None
        evaluations[ids[1]].flags = ["clean_pass_disagreement"]
        evaluations[ids[1]].unreliable = True
        first_broken(ids[2]).aa_broken_by = "mystery"
        names = {i: s.get(Model, i).name for i in ids}
    real_curve = plots.security_curve_svg

    def curve(*args, **kw):
        if kw["autoattack"] == evaluations[ids[3]].aa_robust_accuracy:
            raise RuntimeError("matplotlib fell over")
        return real_curve(*args, **kw)

    monkeypatch.setattr(plots, "security_curve_svg", curve)
    build_site(store, tmp_path / "site", workers=1)
    site = tmp_path / "site"

    disagreed = _text(_page(site, names[ids[1]]))
    assert "AutoAttack's clean pass disagreed 1 " in disagreed
    assert "clean_pass_disagreement AutoAttack's own clean pass disagreed with ours" in disagreed
    assert "potentially unreliable" in disagreed
    mystery = _text(_page(site, names[ids[2]]))
    assert f"Not shown: the AutoAttack stage breakdown failed: evaluation #{evaluations[ids[2]].id} has samples " in (
        mystery
    )
    assert "broken by mystery" in mystery and "Samples on thin ice" in mystery  # the rest of the page is there
    no_curve = _page(site, names[ids[3]])
    assert "the security curve failed (RuntimeError): matplotlib fell over" in no_curve
    assert "-curve.svg" not in no_curve and "No security curve for this evaluation" in no_curve
    # Every page links only files that exist.
    for path, text in _html(site).items():
        for link in re.findall(r'(?:href|src)="([^"]+)"', text):
            if not link.startswith(("http://", "https://")):
                assert ((site / path).parent / link.split("#")[0]).exists(), f"{path}: broken link {link}"


def test_degenerate_pairs_and_missing_parents_build_and_say_why(store, tmp_path):
    spec = spec_for(40)
    cifar = dict(arch="resnet18", dataset="cifar10")
    # FMN failed on every sample of the dense model: no distance to rank, no AUC (not a meaningless 0.500).
    dense = add_model(store, "dense-fmnfail", **cifar)
    add_evaluation(store, dense, clean_correct=[True] * 30 + [False] * 10, signed_eps=[None] * 40, spec=spec)
    child = add_model(store, "child-fmnfail", parent_id=dense, **cifar)
    add_evaluation(store, child, clean_correct=[True] * 24 + [False] * 6 + [True] * 4 + [False] * 6, spec=spec)
    # Every sample misclassified by both.
    wrong = add_model(store, "dense-allwrong", **cifar)
    add_evaluation(store, wrong, clean_correct=[False] * 40, spec=spec)
    wrong_child = add_model(store, "child-allwrong", parent_id=wrong, **cifar)
    add_evaluation(store, wrong_child, clean_correct=[False] * 40, spec=spec)
    # A parent never evaluated, and a parent evaluated under another protocol only.
    bare = add_model(store, "dense-unevaluated", **cifar)
    orphan = add_model(store, "child-of-unevaluated", parent_id=bare, **cifar)
    add_evaluation(store, orphan, clean_correct=[True] * 40, spec=spec)
    other = add_model(store, "dense-other-protocol", **cifar)
    add_evaluation(store, other, clean_correct=[True] * 40, spec=spec_for(40, version="standard"))
    stray = add_model(store, "child-other-protocol", parent_id=other, **cifar)
    add_evaluation(store, stray, clean_correct=[True] * 40, spec=spec)

    build_site(store, tmp_path / "site", workers=1)
    site = tmp_path / "site"

    fmnfail = _page(site, "child-fmnfail")
    text = _text(fmnfail)
    assert "AUC(ε 10 < ε 11 ) – –" in text and "AUC(|ε 01 | < |ε 00 |) – –" in text
    assert "no AUC(S10 < S11): FMN found no distance on the dense model for any S10 sample (6 samples)" in text
    svg = next((site / "models").glob("*-child-fmnfail-e*-thin-ice.svg")).read_text()
    # The legend counts the table's populations, not the points drawn (none: no distance), and says so.
    assert "S11 both correct (24)" in svg and "S10 dense right, pruned wrong (6)" in svg
    # (This protocol stores best-known distances: ε is the best known, which no attack found either.)
    assert "40 of 40 samples not drawn (no best-known distance on the dense model)" in svg
    allwrong = _text(_page(site, "child-allwrong"))
    assert "S 00 both wrong 40 100.00" in allwrong and "S10 is empty: no AUC(S10 < S11)" in allwrong
    unevaluated = _text(_page(site, "child-of-unevaluated"))
    assert "No thin-ice analysis: the dense parent dense-unevaluated has no complete evaluation; evaluate the " in (
        unevaluated
    )
    elsewhere = _text(_page(site, "child-other-protocol"))
    standard = spec_for(40, version="standard").protocol_hash[:12]
    assert (
        f"No thin-ice analysis: the dense parent dense-other-protocol has no complete evaluation under this "
        f"protocol ({spec.protocol_hash[:12]}); it was evaluated under {standard}; evaluate the parent" in elsewhere
    )


def test_claims_drops_and_other_reevaluations_are_separate(synthetic, tmp_path):
    # The synthetic HYDRA ResNet-18 90 % model matches the APB leaderboard's HYDRA R18 US 90 (an AutoAttack
    # re-evaluation, no claim); giving it an authors' claim makes the drop claim − measured.
    store, ids = synthetic
    with store.session() as s:
        hydra = s.get(Model, ids[1])
        name = hydra.name
        measured = s.scalars(select(Evaluation).where(Evaluation.model_id == ids[1])).one().aa_robust_accuracy
    build_site(store, tmp_path / "before", workers=1)
    row = next(
        r for r in csv.DictReader((tmp_path / "before" / "data" / "leaderboard.csv").open()) if r["model"] == name
    )
    assert (row["reported_robust"], row["drop_points"], row["reevaluation_robust"]) == ("", "", "0.4334")
    with store.session() as s:
        s.get(Model, ids[1]).reported = {"robust": 0.6, "attack": "PGD-20", "source": "HYDRA paper"}
    build_site(store, tmp_path / "after", workers=1)
    row = next(
        r for r in csv.DictReader((tmp_path / "after" / "data" / "leaderboard.csv").open()) if r["model"] == name
    )
    assert float(row["reported_robust"]) == 0.6 and row["reevaluation_robust"] == "0.4334"
    assert float(row["drop_points"]) == pytest.approx(100 * (0.6 - measured))
    index = (tmp_path / "after" / "index.html").read_text()
    assert "Claimed<br>%" in index and "Other<br>AA %" in index
    page = _text(_page(tmp_path / "after", name))
    assert "Claimed robust accuracy (the method's authors) 60.00 stored with the model" in page
    assert "Other benchmark's robust accuracy (APB leaderboard) 43.34 not subtracted" in page


# ------------------------------------------------------------------------------------------ links and protocols


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.links.append(value)
            if name == "id" and value is not None:
                self.ids.add(value)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _broken_links(site: Path) -> list[str]:
    """Every href and src of every page that names a missing file, or a fragment its target page lacks."""
    broken = []
    for page in _files(site):
        if page.suffix != ".html":
            continue
        for link in _parse(site / page).links:
            if link.startswith(("http://", "https://")):
                continue
            path, _, fragment = link.partition("#")
            target = (site / page).parent / path if path else site / page
            if not target.is_file():
                broken.append(f"{page}: {link} (no such file)")
            elif fragment and target.suffix == ".html" and fragment not in _parse(target).ids:
                broken.append(f"{page}: {link} (no such anchor)")
    return broken


def _sections(html: str, marker: str = '<section class="protocol') -> list[str]:
    return [part.split("</section>")[0] for part in html.split(marker)[1:]]


def _two_protocol_store(store):
    """The synthetic HYDRA/RAP-ADMM store (AutoAttack plus, N = 300) plus a quick protocol (standard, N = 40)
    under which the plus table's weakest model scores 100 %: ranked together, it would come first."""
    ids = fill_synthetic(store, n_models=5, n_samples=300)
    quick = spec_for(40, version="standard")
    with store.session() as s:
        weakest = min(s.scalars(select(Evaluation)), key=lambda ev: ev.aa_robust_accuracy).model_id
    add_evaluation(store, weakest, clean_correct=[True] * 40, spec=quick)
    add_evaluation(store, ids[0], clean_correct=[True] * 30 + [False] * 10, spec=quick)
    only = add_model(store, "quick-only", parent_id=ids[0], arch="resnet18", dataset="cifar10")
    add_evaluation(store, only, clean_correct=[True] * 35 + [False] * 5, spec=quick)
    return ids, weakest, only, quick


def test_two_protocols_are_never_ranked_together(store, tmp_path):
    ids, weakest, only, quick = _two_protocol_store(store)
    plus = spec_for(300)
    build_site(store, tmp_path / "site", workers=1)
    site = tmp_path / "site"
    with store.session() as s:
        names = {m.id: m.name for m in s.scalars(select(Model))}
        slugs = {m.id: model_slug(m) for m in s.scalars(select(Model))}

    # Every table, as downloaded, holds one protocol: the one its metadata names.
    tables = {}
    for path in sorted((site / "data").glob("table-*.json")):
        table = json.loads(path.read_text())
        assert {r["protocol_hash"] for r in table["rows"]} == {table["table"]["protocol_hash"]}, path.name
        tables[path.stem] = table
    assert sorted(t["table"]["protocol_hash"] for t in tables.values()) == sorted(
        [plus.protocol_hash, quick.protocol_hash]
    )
    rows = list(csv.DictReader(io.StringIO((site / "data" / "leaderboard.csv").read_text())))
    by_table = {}
    for r in rows:
        by_table.setdefault(r["table"], set()).add(r["protocol_hash"])
    assert len(by_table) == 2 and all(len(hashes) == 1 for hashes in by_table.values())

    # The index: the main protocol (plus, N = 300) first, the quick one apart below it, each headed by what it is.
    index = (site / "index.html").read_text()
    assert "Every model below was evaluated with the same protocol" not in index
    assert "Each table ranks models evaluated under <strong>one protocol</strong>" in index
    main, other = _sections(index)
    assert index.index('<section class="protocol main"') < index.index('id="other-protocols"')
    assert index.index('id="other-protocols"') < index.index('<section class="protocol other"')
    assert "Main protocol for cifar10" in main and "cifar10 · L∞ ε = 8/255 · AutoAttack plus · N = 300" in main
    assert "Other protocol for cifar10" in other and "AutoAttack standard · N = 40" in other
    for section, spec in ((main, plus), (other, quick)):
        text = _text(section)
        assert f"samples the first {spec.n_samples} of the test split" in text
        assert f"FMN {spec.fmn_steps} steps" in text and f"hash {spec.protocol_hash[:12]}" in text
        slugs_here = re.findall(r'data-table="([^"]+)"', section)
        assert len(slugs_here) == 1
        assert tables[slugs_here[0]]["table"]["protocol_hash"] == spec.protocol_hash
    rows_of = {t["table"]["protocol_hash"]: t["rows"] for t in tables.values()}
    quick_rows, plus_rows = rows_of[quick.protocol_hash], rows_of[plus.protocol_hash]
    assert quick_rows[0]["model_id"] == weakest and quick_rows[0]["autoattack"] == 1.0
    weakest_plus = next(r for r in plus_rows if r["model_id"] == weakest)
    assert weakest_plus["autoattack"] == min(r["autoattack"] for r in plus_rows) < 0.6
    ranked = {h: [r["model_id"] for r in rows] for h, rows in rows_of.items()}
    assert only in ranked[quick.protocol_hash] and only not in ranked[plus.protocol_hash]

    # A model evaluated under both: two sections on its page, the main protocol first, each with its own figures.
    page = (site / "models" / f"{slugs[weakest]}.html").read_text()
    assert "This model was evaluated under 2 protocols" in page
    first, second = _sections(page, '<section class="protocol evaluation')
    assert "AutoAttack plus · N = 300" in first and "AutoAttack standard · N = 40" in second
    assert "Main protocol for cifar10" in first and "Other protocol for cifar10" in second
    assert "This model was evaluated under" not in (site / "models" / f"{slugs[only]}.html").read_text()

    # The method page: one table per protocol; the sparsity plot draws one line per protocol.
    hydra = (site / "methods" / "hydra.html").read_text()
    main_rows, other_rows = _sections(hydra)
    assert "AutoAttack plus · N = 300" in main_rows and names[only] not in main_rows
    assert "AutoAttack standard · N = 40" in other_rows and names[only] in other_rows
    svg = (site / "methods" / "hydra-sparsity.svg").read_text()
    assert "AA plus · N = 300" in svg and "AA standard · N = 40" in svg
    methodology = _text((site / "methodology.html").read_text())
    assert f"{plus.protocol_hash[:8]} main cifar10" in methodology
    assert f"{quick.protocol_hash[:8]} other cifar10" in methodology
    assert _broken_links(site) == []


def test_the_main_protocol_is_the_dataset_s_canonical_one(store, tmp_path):
    quick = digits_spec(n_samples=40, version="standard")
    full = digits_spec(n_samples=360)  # AutoAttack plus, the default eps 0.2, the whole test split
    other_eps = digits_spec(n_samples=360, eps="0.1", eps_value=0.1)
    # The quick protocol has the most models; the canonical one is still the main one.
    for i in range(4):
        add_evaluation(store, add_model(store, f"quick-{i}"), clean_correct=[True] * 40, spec=quick)
    for name in ("eps-a", "eps-b"):
        add_evaluation(store, add_model(store, name), clean_correct=[True] * 360, spec=other_eps)
    canonical = add_model(store, "canonical")
    add_evaluation(store, canonical, clean_correct=[True] * 300 + [False] * 60, spec=full)

    def order(site: Path) -> list[tuple[str, str]]:
        html = (site / "index.html").read_text()
        return re.findall(r'<section class="protocol (main|other)" id="protocol-([0-9a-f]+)"', html)

    build_site(store, tmp_path / "a", workers=1)
    expected = [("main", full), ("other", other_eps), ("other", quick)]
    assert order(tmp_path / "a") == [(role, spec.protocol_hash[:12]) for role, spec in expected]
    # Without it: the full split and AutoAttack plus come before the number of models.
    with store.session() as s:
        s.delete(s.get(Model, canonical))
    build_site(store, tmp_path / "b", workers=1)
    assert order(tmp_path / "b") == [("main", other_eps.protocol_hash[:12]), ("other", quick.protocol_hash[:12])]


def test_columns_are_defined_once_with_the_ranked_figures_after_the_pinned_ones(synthetic, tmp_path):
    assert [c.key for c in COLUMNS][:3] == ["rank", "model", "autoattack"]
    assert [c.pinned for c in COLUMNS][:3] == [True, True, False] and COLUMNS[2].ranked
    with pytest.raises(ValueError, match="ranked column"):
        check_order([COLUMNS[0], COLUMNS[1], COLUMNS[3], COLUMNS[2]])
    with pytest.raises(ValueError, match="pinned columns must come first"):
        check_order([COLUMNS[2], COLUMNS[0], COLUMNS[1]])
    optional = next(c for c in COLUMNS if c.present is not None)
    with pytest.raises(ValueError, match="cannot be optional"):
        check_order([COLUMNS[0], COLUMNS[1], replace(COLUMNS[2], present=optional.present)])
    store, _ = synthetic
    build_site(store, tmp_path / "site", workers=1)
    html = (tmp_path / "site" / "index.html").read_text()
    head = html[html.index("<thead>") : html.index("</thead>")]
    # No model of this store has seed replicates: that optional column is left out, every other one is drawn (the
    # RAP-ADMM model has a claim in thin-ice Table 1, the HYDRA ones the APB's re-evaluations).
    expected = [c.key for c in COLUMNS if c.key != "seeds"]
    assert re.findall(r'<th class="col-([a-z_]+)', head) == expected
    first_row = html[html.index("<tbody>") :].split("</tr>")[0]
    assert len(re.findall(r"<td ", first_row)) == len(expected)
    assert 'aria-sort="ascending"' in head.split("</th>")[0]  # the rows arrive in rank order


# ----------------------------------------------------------------------------------------------- atomicity


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_builds_are_removed_and_running_ones_kept(synthetic, tmp_path):
    store, _ = synthetic
    site = tmp_path / "site"
    build_site(store, site, workers=1)
    before = {p: (site / p).read_bytes() for p in _files(site)}
    # What a killed build leaves: a half-written staging folder, an old site moved aside; and a running build's.
    dead = _dead_pid()
    staging = tmp_path / f".site.building-{dead}-0a1b2c"
    (staging / "models").mkdir(parents=True)
    (staging / MARKER).write_text("x")
    (staging / "index.html").write_text('<a href="models/missing.html">x</a>')
    replaced = tmp_path / f".site.replaced-{dead}-3d4e5f"
    replaced.mkdir()
    (replaced / "index.html").write_text("old")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".site.building-{sleeper.pid}-777777"
        running.mkdir()
        unrelated = tmp_path / ".site.building-notes"
        unrelated.mkdir()
        build_site(store, site, workers=1)
        assert not staging.exists() and not replaced.exists()
        assert running.is_dir() and unrelated.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert {p: (site / p).read_bytes() for p in _files(site)} == before
    assert {p.name for p in tmp_path.iterdir() if p.name.startswith(".site.")} == {unrelated.name, running.name}


def test_a_failed_build_leaves_the_previous_site_and_nothing_else(synthetic, tmp_path, monkeypatch):
    store, _ = synthetic
    site = tmp_path / "site"
    build_site(store, site, workers=1)
    before = {p: (site / p).read_bytes() for p in _files(site)}

    def fail(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render.Pages, "models", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_site(store, site, workers=1)
    assert {p: (site / p).read_bytes() for p in _files(site)} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # A link is refused (the rename would replace the link, not the folder it points to); so is the root.
    (tmp_path / "link").symlink_to(site)
    with pytest.raises(ValueError, match="symbolic link"):
        build_site(store, tmp_path / "link")
    with pytest.raises(ValueError, match="root folder"):
        build_site(store, "/")


def _build_quietly(db: str, out: str) -> None:
    import logging

    logging.disable(logging.CRITICAL)
    build_site(db, out)


def _site_is_whole(site: Path) -> None:
    """A site folder, if there is one, is a finished build: marker, index, every link resolves."""
    if not site.exists():
        return
    assert (site / MARKER).is_file() and (site / "index.html").is_file()
    assert _broken_links(site) == []


def _children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks builds and reads /proc (Linux)")
def test_a_build_killed_at_random_moments_never_blocks_the_next_or_leaves_broken_links(tmp_path, monkeypatch):
    """20 builds SIGKILLed at random moments (their pool workers too, through the parent-death signal), each in a
    real process; then the real command builds a whole site and leaves nothing behind."""
    db = f"sqlite:///{tmp_path / 'results.db'}"
    store = Store(db)
    fill_synthetic(store, n_models=6, n_samples=200)
    store.dispose()
    monkeypatch.setattr(build_module, "MIN_TASKS_FOR_POOL", 2)  # the forked builds use the worker pool too
    site = tmp_path / "site"
    # A first build here draws the plot templates once; the forked builds inherit them, so each takes ~1 s.
    build_site(db, site)
    fork = multiprocessing.get_context("fork")

    def start():
        proc = fork.Process(target=_build_quietly, args=(db, str(site)))
        proc.start()
        return proc

    began = time.monotonic()
    proc = start()
    proc.join(120)
    assert proc.exitcode == 0
    full = time.monotonic() - began
    rng = random.Random(20)
    mid_build = with_workers = 0
    for _ in range(20):
        assert time.monotonic() - began < 25 * full + 60, "the kill loop took too long"
        proc = start()
        time.sleep(rng.uniform(0.0, 1.1 * full))
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        # 0: it finished before the kill; -9: killed. Never 1 (a refused folder or a failed build).
        assert proc.exitcode in (0, -signal.SIGKILL), proc.exitcode
        mid_build += any(p.name.startswith(".site.") for p in tmp_path.iterdir())
        with_workers += bool(workers)
        _site_is_whole(site)
        # The pool's workers die with the build; none lives on writing into a folder the next build removes.
        deadline = time.monotonic() + 10
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, workers)), "pool workers outlived the killed build"
    assert mid_build >= 5, f"only {mid_build} of 20 kills hit a build in progress"
    assert with_workers >= 1, "no kill hit the worker pool"

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bench.cli import main; main()",
            "leaderboard",
            "build",
            "--db",
            db,
            "--out",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    _site_is_whole(site)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_unranked_sanity_runs_are_shown_apart_never_ranked(synthetic, tmp_path):
    store, ids = synthetic
    with store.session() as s:
        sanity = s.get(Model, ids[2])
        sanity.ranked = False  # bench evaluate --unranked
        name, slug = sanity.name, model_slug(sanity)
    build_site(store, tmp_path / "site", workers=1)
    site = tmp_path / "site"
    rows = json.loads((site / "data" / "leaderboard.json").read_text())
    assert name not in {r["model"] for r in rows} and len(rows) == len(ids) - 1
    assert [r["rank"] for r in rows] == list(range(1, len(ids)))
    index = (site / "index.html").read_text().replace("<wbr>", "")
    tables, unranked = index.split('id="unranked"')
    assert sum(name in _text(t) for t in _sections(index)) == 0 and name in index
    assert name not in _text(tables) and name in _text(unranked.split('id="not-evaluated"')[0])
    page = _text((site / "models" / f"{slug}.html").read_text())
    assert "Unranked: a sanity run ( bench evaluate --unranked ). Its evaluations are shown here" in page
    assert "AutoAttack robust accuracy" in page  # its figures are still there
    assert _broken_links(site) == []


# --------------------------------------------------------------- seeds, best-known distances, input normalisation

SEEDS = (0, 1, 2)
N = 40
EPS = 0.2


def _outcomes(n_correct: int, n_broken: int, shrink: float) -> dict:
    """``add_evaluation`` arguments for N samples: the first ``n_correct`` classified correctly, the first
    ``n_broken`` of them broken by AutoAttack (plain FMN within eps there, beyond it elsewhere); on every other
    broken sample FMN's start from AutoAttack's adversarial found ``shrink`` times plain FMN's distance, and on the
    last broken one plain FMN found nothing (only the warm start did)."""
    signed, best, broken = [], [], []
    for i in range(N):
        if i >= n_correct:
            signed.append(-0.05)
            best.append(-0.05)
            broken.append(None)
            continue
        d = 0.02 * (i + 1) if i < n_broken else 0.21 + 0.01 * i
        broken.append("apgd-ce" if i < n_broken else None)
        if i == n_broken - 1:
            signed.append(None)
            best.append(0.9 * d)
        else:
            signed.append(d)
            best.append(round(d * shrink, 6) if i < n_broken and i % 2 == 0 else d)
    return dict(clean_correct=[i < n_correct for i in range(N)], signed_eps=signed, best_eps=best, aa_broken_by=broken)


def _seed_provenance(seed: int, **config) -> dict:
    # What `bench prune` records: the seed, the method config (with the seed in it) and the schedule.
    return {"seed": seed, "config": {"epochs": 2, "seed": seed, **config}, "schedule": "digits", "eps": EPS}


def _replicate_store(store) -> dict[str, int]:
    """Digits models under the current protocol (best-known distances stored): a dense parent; a HYDRA 90 % setting
    pruned with seeds 0, 1, 2 (ranked) and 3 (an unranked sanity run); a HYDRA 95 % setting with one seed; two
    dense models behind other input normalisations. Under the old protocol (no best-known distances): a dense
    parent and a child."""

    def model(name: str, **kw) -> int:
        return add_model(store, name, checkpoint_sha256=hashlib.sha256(name.encode()).hexdigest(), **kw)

    spec = digits_spec(n_samples=N)
    ids = {"dense": model("dense_digits")}
    add_evaluation(store, ids["dense"], spec=spec, **_outcomes(36, 6, 0.8))
    for seed, (n_correct, n_broken) in zip((*SEEDS, 3), ((34, 5), (32, 8), (30, 9), (20, 19)), strict=True):
        name = f"HYDRA_small_cnn_digits_US_90_c0ffee00_s{seed}"
        ids[f"s{seed}"] = model(name, parent_id=ids["dense"], provenance=_seed_provenance(seed), ranked=seed != 3)
        add_evaluation(store, ids[f"s{seed}"], spec=spec, **_outcomes(n_correct, n_broken, 0.7))
    ids["single"] = model(
        "HYDRA_small_cnn_digits_US_95_c0ffee00_s0",
        parent_id=ids["dense"],
        provenance=_seed_provenance(0),
        target_sparsity=0.95,
        measured_sparsity=0.95,
    )
    add_evaluation(store, ids["single"], spec=spec, **_outcomes(31, 7, 0.9))
    ids["raw"] = model("dense_digits_raw", normalization="0.0/1.0")
    add_evaluation(store, ids["raw"], spec=spec, **_outcomes(33, 4, 1.0))
    ids["custom"] = model("dense_digits_custom", normalization="0.5/0.25")
    add_evaluation(store, ids["custom"], spec=spec, **_outcomes(35, 10, 0.5))
    old = digits_spec(n_samples=N, fmn_init="none")
    ids["old_dense"] = model("old_dense", arch="mlp")
    add_evaluation(store, ids["old_dense"], spec=old, **_outcomes(36, 6, 0.8))
    ids["old_child"] = model("old_child", parent_id=ids["old_dense"], arch="mlp")
    add_evaluation(store, ids["old_child"], spec=old, **_outcomes(30, 10, 0.8))
    return ids


def _stored(store, model_id: int):
    """The model's evaluation row and its per-sample rows as arrays, straight from the tables."""
    with store.session() as s:
        ev = s.scalars(select(Evaluation).where(Evaluation.model_id == model_id)).one()
        rows = s.scalars(select(SampleResult).where(SampleResult.evaluation_id == ev.id)).all()
        s.expunge(ev)
    col = {
        name: np.array([getattr(r, name) for r in rows], dtype=float if "distance" in name else None)
        for name in ("clean_correct", "aa_robust", "fmn_success", "fmn_distance", "best_distance", "best_robust")
    }
    col["clean_correct"] = col["clean_correct"].astype(bool)
    return ev, col


def _accuracy(col) -> dict[str, float]:
    correct = col["clean_correct"]
    fmn_broke = correct & col["fmn_success"].astype(bool) & (np.nan_to_num(col["fmn_distance"], nan=9.0) <= EPS)
    return {
        "clean": correct.mean(),
        "autoattack": col["aa_robust"].astype(bool).mean(),
        "fmn": (correct & ~fmn_broke).mean(),
        "best_known": col["best_robust"].astype(bool).mean(),
    }


def _gap(col) -> dict[str, float]:
    """Plain FMN against the best known, computed here from the rows: medians and counts directly, the local
    optimality by integrating the two security curves numerically (AttackBench's way, not the exact areas)."""
    correct = col["clean_correct"]
    fmn = np.where(col["fmn_success"].astype(bool), col["fmn_distance"], np.nan)
    best = col["best_distance"]
    known = correct & ~np.isnan(best) & (np.nan_to_num(best) > 0)
    found = known & ~np.isnan(fmn)
    horizon = np.nanmax(best[known])
    grid = np.linspace(0, horizon, 200_001)

    def area(d):
        # Robust accuracy at e: correct and a distance above e (none found: above every e).
        dist = np.sort(np.where(correct, np.where(np.isnan(d), np.inf, d), 0.0))
        curve = (len(dist) - np.searchsorted(dist, grid, side="right")) / len(dist)
        return np.trapezoid(curve, grid)

    area_max = correct.mean() * horizon
    return {
        "best_median": float(np.median(best[known])),
        "ratio": float(np.median(fmn[found] / best[found])),
        "above": int(np.sum(known & ~(np.nan_to_num(fmn, nan=np.inf) <= best * 1.01))),
        "n_known": int(known.sum()),
        "local_optimality": (area_max - area(fmn)) / (area_max - area(best)),
    }


def test_seed_replicates_show_mean_and_range_beside_the_wilson_interval(store, tmp_path):
    ids = _replicate_store(store)
    build_site(store, tmp_path / "site", workers=1)
    site = tmp_path / "site"
    acc = {seed: _accuracy(_stored(store, ids[f"s{seed}"])[1]) for seed in SEEDS}
    aa = [acc[s]["autoattack"] for s in SEEDS]
    mean, low, high = float(np.mean(aa)), min(aa), max(aa)
    assert len(set(aa)) == 3  # the seeds differ: mean, min and max are three different numbers
    sentence = f"seeds 0–2: mean {100 * mean:.2f} %, range {100 * low:.2f}–{100 * high:.2f} %"
    with store.session() as s:
        names = {k: s.get(Model, i).name for k, i in ids.items()}
        slugs = {k: model_slug(s.get(Model, i)) for k, i in ids.items()}

    # The downloads carry the figures; the unranked seed 3 is in none of them.
    rows = {r["model"]: r for r in json.loads((site / "data" / "leaderboard.json").read_text())}
    for seed in SEEDS:
        r = rows[names[f"s{seed}"]]
        assert r["seed"] == seed and r["replicates"] == 3 and r["replicate_seeds"] == list(SEEDS)
        assert r["autoattack_seeds_mean"] == pytest.approx(mean, abs=1e-12)
        assert (r["autoattack_seeds_min"], r["autoattack_seeds_max"]) == (pytest.approx(low), pytest.approx(high))
        assert r["autoattack_seeds_std"] == pytest.approx(float(np.std(aa, ddof=1)))
    for other in ("dense", "single", "raw"):
        assert rows[names[other]]["replicates"] is None and rows[names[other]]["autoattack_seeds_mean"] is None
    assert names["s3"] not in rows
    # The core's summary of the three ranked runs says the same (the site leaves unranked sanity runs out).
    from bench.analysis.replicates import summarize_evaluations

    with store.session() as s:
        ranked = s.scalars(select(Evaluation).where(Evaluation.model_id.in_([ids[f"s{k}"] for k in SEEDS]))).all()
        reference = summarize_evaluations(ranked)["autoattack"]
    assert reference.mean == pytest.approx(mean) and reference.seeds == SEEDS

    # The index: a column right of the ranked one, its cell the mean, the range and the seeds; "–" elsewhere.
    index = (site / "index.html").read_text()
    main = _sections(index)[0]
    head = main[main.index("<thead>") : main.index("</thead>")]
    keys = re.findall(r'<th class="col-([a-z_]+)', head)
    assert keys[:4] == ["rank", "model", "autoattack", "seeds"] and "local_optimality" in keys
    # No model here has a claim or another benchmark's figure: those columns are left out of the table.
    assert not {"claimed", "drop", "other_aa"} & set(keys)
    cells = dict(re.findall(r'models/(\d+)-[^"]*\.html">.*?<td class="col-seeds num"[^>]*>(.*?)</td>', main, re.S))
    for seed in SEEDS:
        cell = cells[str(ids[f"s{seed}"])]
        assert f"<strong>{100 * mean:.2f}</strong>" in cell and f"{100 * low:.2f}–{100 * high:.2f}" in cell
        assert "seeds 0–2" in cell
    assert cells[str(ids["dense"])] == "–" and cells[str(ids["single"])] == "–"
    assert html_module.escape(sentence) in main  # the cell's tooltip, as `bench report` words it
    # "By setting": one row for the replicated setting, each seed linked.
    settings = main[main.index('class="settings"') :]
    assert "By setting: 1 setting pruned with several seeds" in _text(main)
    assert "HYDRA_<wbr>small_<wbr>cnn_<wbr>digits_<wbr>US_<wbr>90_<wbr>c0ffee00" in settings
    text = _text(settings)
    assert f"3 0–2 {100 * mean:.2f} {100 * low:.2f}–{100 * high:.2f} {100 * np.std(aa, ddof=1):.2f}" in text
    for seed in SEEDS:
        assert f'href="models/{slugs[f"s{seed}"]}.html#evaluation-' in settings

    # A replicate's page: the across-seeds column beside each Wilson interval, and each seed with its link.
    page = (site / "models" / f"{slugs['s1']}.html").read_text()
    text = _text(page)
    assert "Across 3 seeds: mean [range]" in text
    for metric, label in (("clean", "Clean accuracy"), ("autoattack", "AutoAttack robust accuracy")):
        values = [acc[s][metric] for s in SEEDS]
        own = acc[1][metric]
        assert (
            f"{label} {100 * own:.2f} [" in text
            and f"] {100 * np.mean(values):.2f} [{100 * min(values):.2f}–{100 * max(values):.2f}]" in text
        )
    assert f"AutoAttack robust accuracy across training seeds: {sentence}" in text
    replicates = page[page.index('id="replicates-') :]
    assert "Replicates: this setting pruned with 3 seeds" in _text(page)
    body = replicates[replicates.index("<tbody>") : replicates.index("</tbody>")]
    assert re.findall(r'<td class="num">(\d+)</td><td class="model">', body) == [str(s) for s in SEEDS]
    assert "(this model)" in _text(body.split("</tr>")[1]) and f'href="{slugs["s1"]}.html' not in body
    for seed in (0, 2):
        assert f'href="{slugs[f"s{seed}"]}.html#evaluation-' in body
    foot = replicates[replicates.index("<tfoot>") : replicates.index("</tfoot>")]
    clean = [acc[s]["clean"] for s in SEEDS]
    fmn = [acc[s]["fmn"] for s in SEEDS]
    best = [acc[s]["best_known"] for s in SEEDS]
    mean_row = _text(foot.split("</tr>")[0])
    assert f"mean of 3 seeds {100 * np.mean(clean):.2f} {100 * mean:.2f} {100 * np.mean(fmn):.2f}" in mean_row
    assert mean_row.strip().endswith(f"{100 * np.mean(best):.2f}")
    range_row = _text(foot.split("</tr>")[1])
    assert (
        f"range (min–max) {100 * min(clean):.2f}–{100 * max(clean):.2f} {100 * low:.2f}–{100 * high:.2f}" in range_row
    )
    sd_row = _text(foot.split("</tr>")[2])
    assert f"sd across seeds (points) {100 * np.std(clean, ddof=1):.2f} {100 * np.std(aa, ddof=1):.2f}" in sd_row
    assert names["s3"] not in page  # the unranked run is no replicate
    single = _text((site / "models" / f"{slugs['single']}.html").read_text())
    assert "Pruning seed 0: no other seed of this setting is evaluated under this protocol" in single
    assert "Across" not in single and "Replicates:" not in single
    assert "Pruning seed" not in _text((site / "models" / f"{slugs['dense']}.html").read_text())
    unranked = _text((site / "models" / f"{slugs['s3']}.html").read_text())
    assert "Pruning seed 3: an unranked run is never summarised with the other seeds" in unranked
    assert "Across" not in unranked
    assert _broken_links(site) == []


def test_method_plot_draws_a_setting_as_its_mean_with_a_min_max_bar(store, tmp_path, monkeypatch):
    ids = _replicate_store(store)
    drawn = {}
    real = plots.sparsity_svg

    def capture(series, **kw):
        drawn[series[0].label] = series
        return real(series, **kw)

    monkeypatch.setattr(plots, "sparsity_svg", capture)
    build_site(store, tmp_path / "site", workers=1)
    series = [s for group in drawn.values() for s in group if "digits" in s.label and "small_cnn" in s.label]
    assert len(series) == 1
    line = series[0]
    aa = [_accuracy(_stored(store, ids[f"s{seed}"])[1])["autoattack"] for seed in SEEDS]
    points = sorted(zip(line.sparsity, line.robust, line.low, line.high, line.replicates, strict=True))
    # The dense parent (one model, its Wilson interval), the 90 % setting (3 seeds), the 95 % model (one seed).
    assert [p[4] for p in points] == [1, 3, 1]
    assert points[1][:4] == (pytest.approx(0.9), pytest.approx(np.mean(aa)), min(aa), max(aa))
    dense_ev, dense_col = _stored(store, ids["dense"])
    k = int(dense_col["aa_robust"].sum())
    from bench.analysis.stats import wilson_interval

    assert points[0][1:4] == (pytest.approx(k / N), *map(pytest.approx, wilson_interval(k, N)))
    svg = (tmp_path / "site" / "methods" / "hydra-sparsity.svg").read_text()
    assert "3 seeds" in svg and "mean over seeds, min–max" in svg and "one model, Wilson 95 %" in svg
    method_page = (tmp_path / "site" / "methods" / "hydra.html").read_text()
    assert "mean over its seeds with a min–max bar" in method_page


def test_best_known_figures_next_to_plain_fmn_and_old_evaluations_show_dashes(store, tmp_path):
    ids = _replicate_store(store)
    with store.session() as s:
        flagged = s.scalars(select(Evaluation).where(Evaluation.model_id == ids["s0"])).one()
        flagged.flags = ["best_known_above_eps"]
        unreliable = s.scalars(select(Evaluation).where(Evaluation.model_id == ids["s2"])).one()
        unreliable.flags = ["autoattack_adversarial_not_reproduced"]
        unreliable.unreliable = True
        slugs = {k: model_slug(s.get(Model, i)) for k, i in ids.items()}
    build_site(store, tmp_path / "site", workers=1)
    site = tmp_path / "site"
    ev, col = _stored(store, ids["s1"])
    gap, acc = _gap(col), _accuracy(col)
    # The stored figures are the ones computed here from the rows.
    assert ev.best_median_distance == pytest.approx(gap["best_median"])
    assert ev.fmn_best_median_ratio == pytest.approx(gap["ratio"]) and gap["ratio"] >= 1
    assert ev.n_fmn_above_best == gap["above"] > 0
    assert ev.fmn_local_optimality == pytest.approx(gap["local_optimality"], abs=1e-5) and ev.fmn_local_optimality < 1
    fmn_found = col["fmn_distance"][col["clean_correct"] & col["fmn_success"].astype(bool)]
    page = _text((site / "models" / f"{slugs['s1']}.html").read_text())
    assert f"Plain FMN robust accuracy at ε {100 * acc['fmn']:.2f} % FMN alone" in page
    assert f"Plain FMN median distance {np.median(fmn_found):.4f} L∞" in page
    assert f"Best-known median distance {gap['best_median']:.4f} L∞" in page
    assert f"over {gap['n_known']} correctly classified samples" in page
    assert f"Median ratio plain FMN / best known {gap['ratio']:.4f}" in page
    assert f"Local optimality of plain FMN {ev.fmn_local_optimality:.4f} AttackBench's" in page
    assert f"Samples above the best known {gap['above']} of {gap['n_known']} plain FMN" in page
    warm = int(np.sum(col["clean_correct"] & (col["best_distance"] < np.nan_to_num(col["fmn_distance"], nan=9))))
    assert f"FMN from AutoAttack's adversarial {warm}" in page
    assert "Security curve (best-known distances)" in page and "plain FMN's curve dashed" in page
    svg = next((site / "models").glob(f"{slugs['s1']}-e*-curve.svg")).read_text()
    assert "best-known distances" in svg and "plain FMN distances" in svg and "AutoAttack at ε" in svg
    # Thin ice: which distance, and the paper-comparable figures with plain FMN's ε beside them.
    assert "ε is the dense model's signed best-known distance" in page
    assert "AUC best known p (Mann–Whitney) AUC plain FMN (paper) p" in page
    from bench.analysis.records import load_records
    from bench.analysis.thin_ice import thin_ice

    with store.session() as s:
        dense_ev = s.scalars(select(Evaluation).where(Evaluation.model_id == ids["dense"])).one()
        dense_rec, child_rec = load_records(s, dense_ev.id), load_records(s, ev.id)
    best_ti, fmn_ti = thin_ice(dense_rec, child_rec), thin_ice(dense_rec, child_rec, distance="fmn")
    assert best_ti.auc_01_00 != fmn_ti.auc_01_00 or best_ti.auc_10_11 != fmn_ti.auc_10_11
    assert f"{best_ti.auc_10_11:.3f}" in page and f"{fmn_ti.auc_10_11:.3f}" in page
    thin_svg = next((site / "models").glob(f"{slugs['s1']}-e*-thin-ice.svg")).read_text()
    assert "signed best-known distance" in thin_svg
    assert "Not shown" not in page

    # The index column, with the figures behind it in its tooltip.
    index = (site / "index.html").read_text()
    main, other = _sections(index)
    cell = re.search(rf'{slugs["s1"]}\.html".*?<td class="col-local_optimality num"[^>]*>(.*?)</td>', main, re.S)
    assert cell.group(1) == f"{ev.fmn_local_optimality:.3f}"
    assert f"median ratio plain FMN / best known {gap['ratio']:.3f}; {gap['above']} samples" in main
    # New flags: shown with the others, with their words; only the one that marks the run unreliable does.
    assert "best known &gt; ε" in main and main.count("potentially unreliable</span>") == 1
    flagged_page = (site / "models" / f"{slugs['s0']}.html").read_text()
    assert '<span class="badge notice">best_known_above_eps</span>' in flagged_page
    assert "exceeds ε by a last-place unit" in flagged_page and "potentially unreliable" not in flagged_page
    unreliable_page = (site / "models" / f"{slugs['s2']}.html").read_text()
    assert '<span class="badge unreliable">autoattack_adversarial_not_reproduced</span>' in unreliable_page
    assert "was not adversarial in our forward pass" in _text(unreliable_page)

    # An evaluation stored before best-known distances: "–", a note, plain FMN's curve and thin ice; no error.
    old = (site / "models" / f"{slugs['old_child']}.html").read_text()
    text = _text(old)
    for label in ("Best-known median distance", "Median ratio plain FMN / best known", "Local optimality of plain FMN"):
        assert f"{label} – " in text, label
    assert "Samples above the best known – " in text
    assert "stored before FMN also started from AutoAttack's adversarial examples" in text
    assert "Security curve (plain FMN distances)" in text and "plain FMN distance (this protocol stores no" in text
    assert "Not shown" not in text and "AUC plain FMN (paper)" not in text
    old_svg = next((site / "models").glob(f"{slugs['old_child']}-e*-curve.svg")).read_text()
    assert "plain FMN distances" in old_svg and "best-known distances" not in old_svg
    assert "signed FMN distance" in next((site / "models").glob(f"{slugs['old_child']}-e*-thin-ice.svg")).read_text()
    # Its protocol says so in its title (it differs from the current one only there); its table has no
    # local-optimality column (no row has the figure); the downloads say None.
    assert "digits · L∞ ε = 0.2 · AutoAttack plus · N = 40 · plain FMN only" in other
    assert "plain FMN only" not in main and "N = 40 · plain FMN only</h2>" in old
    assert "plain FMN only" in (site / "methods" / "hydra-sparsity.svg").read_text()
    assert "col-local_optimality" not in other and "col-local_optimality" in main
    rows = {r["model"]: r for r in json.loads((site / "data" / "leaderboard.json").read_text())}
    assert rows["old_child"]["fmn_local_optimality"] is None and rows["old_child"]["best_median_distance"] is None
    # The methodology page explains the figures, the flags, the seeds and the normalisation.
    methodology = _text((site / "methodology.html").read_text())
    for words in (
        "best-known distance",
        "LO = (A max − A FMN ) / (A max − A best )",
        "autoattack_adversarial_not_reproduced",
        "best_known_above_eps",
        "mixed_execution_settings",
        "replicates of one setting",
        "seeds 0–2: mean m, range a–b",
        "bench evaluate --normalization dataset|none|MEAN/STD",
    ):
        assert words in methodology, words
    assert _broken_links(site) == []


def test_flag_badges_follow_the_evaluator_s_unreliable_flags():
    from bench.evaluate import UNRELIABLE_FLAGS

    assert set(UNRELIABLE_FLAGS) <= set(render.FLAG_TEXT)
    for flag in render.FLAG_TEXT:
        marks_unreliable = render.FLAG_BADGE.get(flag, "unreliable") == "unreliable"
        assert marks_unreliable == (flag in UNRELIABLE_FLAGS), flag


def test_input_normalisation_is_shown_and_marked(store, tmp_path):
    ids = _replicate_store(store)
    build_site(store, tmp_path / "site", workers=1)
    site = tmp_path / "site"
    with store.session() as s:
        slugs = {k: model_slug(s.get(Model, i)) for k, i in ids.items()}
    index = (site / "index.html").read_text()
    main = _sections(index)[0]
    cells = re.findall(r'<td class="col-model model pin"[^>]*>(.*?)</td>', main, re.S)
    by_slug = {re.search(r'models/([^"]+)\.html', c).group(1): c for c in cells}
    assert "inputs: none</span>" in by_slug[slugs["raw"]]
    assert "inputs: own mean/std</span>" in by_slug[slugs["custom"]]
    assert 'title="Input normalisation: mean/std 0.5/0.25, not the dataset' in by_slug[slugs["custom"]]
    for key in ("dense", "s0", "single"):
        assert "inputs:" not in by_slug[slugs[key]], key
    raw = _text((site / "models" / f"{slugs['raw']}.html").read_text())
    assert "Input normalisation none (raw [0, 1] inputs) ( --normalization none ): not the dataset's" in raw
    custom = _text((site / "models" / f"{slugs['custom']}.html").read_text())
    assert "Input normalisation mean/std 0.5/0.25 ( --normalization 0.5/0.25 )" in custom
    dense = _text((site / "models" / f"{slugs['dense']}.html").read_text())
    assert "Input normalisation the dataset's own mean/std ( --normalization dataset )" in dense
    downloads = {r["model"]: r["normalization"] for r in json.loads((site / "data" / "leaderboard.json").read_text())}
    assert downloads["dense_digits_raw"] == "none" and downloads["dense_digits_custom"] == "0.5/0.25"
    assert downloads["dense_digits"] == "dataset"
