"""The site in a real browser: Debian's chromium driven by playwright, opened from file://, network blocked.

The store is made here with real evaluations (the project's evaluator on the first digits test samples): a small
clean-trained MLP and two copies of it with 50 % and 70 % of their weights removed by global magnitude pruning,
registered as its children, and two copies with 30 % removed at random, with seeds 0 and 1 (seed replicates of one
setting). The test checks that the index opens from file://, that clicking a column header re-orders the rows and
so do Tab and Enter, that the filter box hides rows (and says so when none is left), that the replicates' mean and
range across seeds sit next to their AutoAttack figure, and that a model page's SVG plots load and are visible; all
at 1400 px. At 390 px (a phone) it checks that the ranked AutoAttack column is on screen, that a wide table shows it
scrolls and keeps its first columns in view, and that no page is wider than the screen.

Screenshots of the index (1400 and 390 px) and of one model page are written to the test's tmp folder; with
``APBENCH_UPDATE_SCREENSHOTS=1`` they are also copied to ``docs/screenshots/`` (the ones the README shows).
The test is skipped, with the reason, only when ``/usr/bin/chromium`` is missing (``make test`` installs it).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.evaluate import evaluate
from bench.spec import RunSpec
from bench.store.registration import register_model
from leaderboard.build import build_site
from leaderboard.formatting import model_slug
from tests.paths import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (root in a container), no GPU, and none of chromium's own background traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
SPARSITIES = (0.5, 0.7)
RANDOM_SPARSITY = 0.3
SEEDS = (0, 1)


@pytest.fixture
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(
            f"browser test skipped: Debian's chromium is not installed ({CHROMIUM} is missing); "
            "`apt-get install chromium` or `make test` installs it"
        )
    return str(CHROMIUM)


def _magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the globally smallest |w| of every Linear weight (no fine-tuning): a real, if crude, pruned child."""
    pruned = copy.deepcopy(model)
    layers = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    threshold = weights.kthvalue(int(sparsity * len(weights))).values
    with torch.no_grad():
        for m in layers:
            m.weight[m.weight.abs() <= threshold] = 0.0
    return pruned


def _random_prune(model: nn.Module, sparsity: float, seed: int) -> nn.Module:
    """Zero a random ``sparsity`` fraction of every Linear weight, drawn with ``seed``: a pruning run whose result
    depends on its seed, as a real method's does."""
    pruned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape, generator=gen) < sparsity] = 0.0
    return pruned


@pytest.fixture
def real_site(chromium, store, digits, digits_mlp, tmp_path):
    _, _, xte, yte = digits
    spec = RunSpec(
        dataset="digits",
        n_samples=100,
        norm="Linf",
        eps="0.1",
        eps_value=0.1,
        version="standard",
        fmn_steps=30,
        batch_size=50,
        seed=0,
    )

    def add(model, **kw):
        path = tmp_path / f"{kw['name']}.pt"
        torch.save(model.state_dict(), path)
        row = register_model(store, path, model, arch="mlp", dataset="digits", source="test_browser", **kw)
        evaluate(store, row.id, model, xte, yte, spec, progress=False, workers=1)
        return row

    dense = add(digits_mlp, name="MLP_digits_dense")
    children = [
        add(
            _magnitude_prune(digits_mlp, sp),
            name=f"Magnitude_MLP_digits_US_{sp * 100:g}",
            method="magnitude",
            structure="US",
            parent_id=dense.id,
            target_sparsity=sp,
            taxonomy={"pipeline": "A", "structure": "US", "scope": "global", "criterion": "LWM"},
            provenance={"note": "global magnitude pruning of the test's clean MLP, without fine-tuning"},
        )
        for sp in SPARSITIES
    ]
    # What `bench prune` records for a pruning run (seed, config, schedule): the two seeds are one setting.
    replicates = [
        add(
            _random_prune(digits_mlp, RANDOM_SPARSITY, seed),
            name=f"Random_MLP_digits_US_{RANDOM_SPARSITY * 100:g}_s{seed}",
            method="random",
            structure="US",
            parent_id=dense.id,
            target_sparsity=RANDOM_SPARSITY,
            provenance={
                "seed": seed,
                "config": {"sparsity": RANDOM_SPARSITY, "seed": seed},
                "schedule": "none (no fine-tuning)",
                "note": "random unstructured pruning of the test's clean MLP, without fine-tuning",
            },
        )
        for seed in SEEDS
    ]
    index = build_site(store, tmp_path / "site")
    return index, dense, children, replicates


def _column(page, table, header: str) -> tuple[list[str], list[str]]:
    """The model names and the data-sort values of one column, in the rows' current order."""
    headers = table.locator("thead th").all_inner_texts()
    col = next(i for i, h in enumerate(headers) if h.replace("\n", " ").startswith(header))
    rows = table.locator("tbody tr")
    names = rows.locator("td.model a.name").all_inner_texts()
    values = [rows.nth(i).locator("td").nth(col).get_attribute("data-sort") for i in range(rows.count())]
    return names, values


def _page_width(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


def _tab_to(page, label: str, limit: int = 80) -> None:
    """Press Tab until the focused element is the sort button of the header starting with ``label``."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => { const el = document.activeElement; const th = el && el.closest('th');"
            " return el && el.tagName === 'BUTTON' && th ? th.innerText.replace(/\\s+/g, ' ') : ''; }"
        )
        if focused.startswith(label):
            return
    raise AssertionError(f"Tab never reached the {label!r} header")


def _wide(page, index: Path, dense, children, replicates, shots: Path) -> None:
    """1400 px: ranking, mouse and keyboard sorting, the filter and its empty state, the seeds column, a model and a
    method page."""
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(index.as_uri())
    assert page.title().startswith("Leaderboard")
    assert page.locator("section.protocol.main").count() == 1  # one protocol: one section, the main one
    page.screenshot(path=str(shots / "index.png"), full_page=True)
    table = page.locator("table.leaderboard").first
    names, values = _column(page, table, "AutoAttack")
    assert sorted(names) == sorted([dense.name, *(m.name for m in (*children, *replicates))])
    numbers = [float(v) for v in values]
    assert numbers == sorted(numbers, reverse=True) and len(set(numbers)) > 1  # ranked, not all tied
    assert table.locator("thead th").first.get_attribute("aria-sort") == "ascending"  # rank order
    assert _page_width(page) <= 1400

    # The replicates: the mean and range of their AutoAttack figures across the two seeds, right of the ranked
    # column; "–" for the models pruned once.
    headers = table.locator("thead th").all_inner_texts()
    seeds_col = next(i for i, h in enumerate(headers) if h.startswith("Across"))
    assert headers[seeds_col - 1].startswith("AutoAttack")
    aa = {n: float(v) for n, v in zip(names, values, strict=True)}
    replicate_aa = [aa[m.name] for m in replicates]
    for i, name in enumerate(names):
        cell = table.locator("tbody tr").nth(i).locator("td").nth(seeds_col)
        if name in {m.name for m in replicates}:
            lines = cell.inner_text().split("\n")
            assert lines[0] == f"{100 * sum(replicate_aa) / 2:.2f}"
            assert lines[1] == f"{100 * min(replicate_aa):.2f}–{100 * max(replicate_aa):.2f}"
            assert lines[2] == "seeds 0,1"
            assert cell.get_attribute("title").startswith("seeds 0,1: mean ")
        else:
            assert cell.inner_text() == "–"

    # Every header is a button: clicking sorts by that column's data-sort value; clicking again reverses it.
    headers = table.locator("thead th")
    assert table.locator("thead th > button.sort").count() == headers.count()
    table.locator("thead th", has_text="AutoAttack").click()
    asc_names, asc_values = _column(page, table, "AutoAttack")
    assert [float(v) for v in asc_values] == sorted(numbers)
    assert asc_names != names
    assert table.locator("thead th", has_text="AutoAttack").get_attribute("aria-sort") == "ascending"
    assert table.locator("thead th").first.get_attribute("aria-sort") is None
    table.locator("thead th", has_text="Sparsity").click()
    by_sparsity, sparsity_values = _column(page, table, "Sparsity")
    assert [float(v) for v in sparsity_values] == sorted(float(v) for v in sparsity_values)
    assert by_sparsity[0] == dense.name
    table.locator("thead th", has_text="Sparsity").click()
    assert _column(page, table, "Sparsity")[0][0] == children[-1].name

    # The keyboard alone: Tab to the Clean header, Enter sorts ascending, Space reverses.
    page.goto(index.as_uri())
    table = page.locator("table.leaderboard").first
    before, _ = _column(page, table, "Clean")
    _tab_to(page, "Clean")
    page.keyboard.press("Enter")
    clean_names, clean_values = _column(page, table, "Clean")
    assert [float(v) for v in clean_values] == sorted(float(v) for v in clean_values)
    assert clean_names != before
    assert table.locator("thead th", has_text="Clean").get_attribute("aria-sort") == "ascending"
    page.keyboard.press("Space")
    desc_names, desc_values = _column(page, table, "Clean")
    assert [float(v) for v in desc_values] == sorted((float(v) for v in desc_values), reverse=True)
    assert table.locator("thead th", has_text="Clean").get_attribute("aria-sort") == "descending"

    # The filter hides the rows that do not match, and the count follows; no match at all says so.
    count = page.locator(".table-block .count").first
    no_match = page.locator(".table-block .no-match").first
    assert count.inner_text() == "5 models" and not no_match.is_visible()
    page.fill("#filter", children[0].name)
    assert table.locator("tbody tr:visible td.model a.name").all_inner_texts() == [children[0].name]
    assert count.inner_text() == "1 of 5 models"
    page.fill("#filter", "no model is called this")
    assert table.locator("tbody tr:visible").count() == 0
    assert no_match.is_visible() and no_match.inner_text() == "No matching models in this table."
    assert count.inner_text() == "0 of 5 models" and not table.is_visible()
    assert page.locator("#filter-status").inner_text() == "no matching models"
    page.fill("#filter", "")
    assert table.locator("tbody tr:visible").count() == 5
    assert count.inner_text() == "5 models" and not no_match.is_visible() and table.is_visible()

    # "By setting": one row for the random-pruning setting, opened with a click.
    settings = page.locator("details.settings")
    assert settings.count() == 1 and not settings.locator("table").is_visible()
    settings.locator("summary").click()
    row = settings.locator("tbody tr")
    assert row.count() == 1 and row.locator("td").nth(3).inner_text().startswith("2")

    # A model link opens its page; its SVG plots load (natural size) and are visible (bounding box).
    child = children[0]
    page.locator("a.name", has_text=child.name).click()
    page.wait_for_load_state("load")
    assert page.url.endswith(f"/models/{model_slug(child)}.html")
    plots = page.locator("img.plot")
    assert plots.count() == 2  # security curve and thin-ice scatter
    for i in range(plots.count()):
        img = plots.nth(i)
        img.scroll_into_view_if_needed()
        assert img.is_visible()
        box = img.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100
        assert img.evaluate("el => el.complete && el.naturalWidth > 0 && el.naturalHeight > 0")
        assert img.get_attribute("src").endswith(".svg")
    assert page.get_by_text("Samples on thin ice").is_visible()
    assert page.locator("h3", has_text="Plain FMN against the best-known distances").first.is_visible()
    assert page.locator("h3", has_text="Security curve (best-known distances)").first.is_visible()
    assert _page_width(page) <= 1400

    # A replicate's page: the other seed is linked from its "Replicates" section, and its plots load.
    page.goto((index.parent / "models" / f"{model_slug(replicates[0])}.html").as_uri())
    section = page.locator("table.replicates")
    section.scroll_into_view_if_needed()
    assert section.is_visible() and section.locator("tbody tr").count() == len(SEEDS)
    assert section.locator("tfoot tr").first.inner_text().startswith("mean of 2 seeds")
    for i in range(page.locator("img.plot").count()):
        assert page.locator("img.plot").nth(i).evaluate("el => el.complete && el.naturalWidth > 0")
    assert _page_width(page) <= 1400
    page.screenshot(path=str(shots / "model.png"), full_page=True)
    section.locator(f'a[href^="{model_slug(replicates[1])}.html"]').click()
    page.wait_for_load_state("load")
    assert page.url.split("#")[0].endswith(f"/models/{model_slug(replicates[1])}.html")
    page.go_back()
    page.wait_for_load_state("load")

    # The method pages (unregistered methods: what the store holds) have their sparsity plots; the replicates'
    # draws their setting as the mean over its seeds.
    page.locator('a[href$="methods/random.html"]').first.click()
    page.wait_for_load_state("load")
    assert page.locator("p", has_text="mean over its seeds with a min–max bar").count() == 1
    for method in ("random", "magnitude"):
        page.goto((index.parent / "methods" / f"{method}.html").as_uri())
        method_plot = page.locator("img.plot")
        assert method_plot.count() == 1
        assert method_plot.evaluate("el => el.complete && el.naturalWidth > 0")


def _phone(page, index: Path, children, replicates, shots: Path) -> None:
    """390 px: the ranked column in view, a visible cue that the table scrolls, pinned columns, pages that fit."""
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(index.as_uri())
    assert _page_width(page) <= 390, "the index overflows the phone's width"
    table = page.locator("table.leaderboard").first
    first = table.locator("tbody tr").first
    for column in ("td.col-rank", "td.col-model", "td.col-autoattack"):
        box = first.locator(column).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, f"{column} is off screen: {box}"
    # The table is wider than the phone: it says so, and its right edge fades.
    scroller = page.locator(".scroll").filter(has=table)
    assert scroller.evaluate("el => el.scrollWidth > el.clientWidth")
    cue = page.locator(".table-block .scroll-cue").first
    assert cue.is_visible() and "scroll the table sideways" in cue.inner_text()
    assert scroller.evaluate("el => el.parentNode.classList.contains('more-right')")
    page.screenshot(path=str(shots / "index-390.png"), full_page=True)
    # Scrolled to its end, the rank and model columns stay in view next to the last column.
    scroller.evaluate("el => { el.scrollLeft = el.scrollWidth; el.dispatchEvent(new Event('scroll')); }")
    name_box = first.locator("td.col-model").bounding_box()
    assert name_box and 0 <= name_box["x"] < 390 / 2
    assert first.locator("td.col-flags").bounding_box()["x"] + 10 < 390
    assert scroller.evaluate("el => el.parentNode.classList.contains('more-left')")
    # Keyboard sorting works at this width too.
    _tab_to(page, "Sparsity")
    page.keyboard.press("Enter")
    assert table.locator("thead th", has_text="Sparsity").get_attribute("aria-sort") == "ascending"

    # Model and method pages fit the width; their wide tables scroll inside their own box.
    for model in (children[0], replicates[0]):
        page.goto((index.parent / "models" / f"{model_slug(model)}.html").as_uri())
        assert _page_width(page) <= 390, f"the page of {model.name} overflows the phone's width"
        for i in range(page.locator("img.plot").count()):
            box = page.locator("img.plot").nth(i).bounding_box()
            assert box and box["width"] <= 390
    page.goto((index.parent / "methods" / "magnitude.html").as_uri())
    assert _page_width(page) <= 390, "the method page overflows the phone's width"
    for other in ("methods.html", "methodology.html", "downloads.html"):
        page.goto((index.parent / other).as_uri())
        assert _page_width(page) <= 390, f"{other} overflows the phone's width"


def test_site_works_in_chromium_from_file_urls_at_both_widths(real_site, tmp_path):
    from playwright.sync_api import sync_playwright

    index, dense, children, replicates = real_site
    shots = tmp_path / "screenshots"
    shots.mkdir()
    requested, blocked, dialogs, errors = [], [], [], []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", lambda req: requested.append(req.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda err: errors.append(str(err)))
            _wide(page, index, dense, children, replicates, shots)
            _phone(page, index, children, replicates, shots)
        finally:
            browser.close()

    assert requested and all(url.startswith("file://") for url in requested), requested
    assert blocked == []
    assert dialogs == [] and errors == []
    if os.environ.get("APBENCH_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copyfile(shot, SCREENSHOTS / shot.name)
