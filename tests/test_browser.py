"""The site in a real browser: Debian's chromium driven by playwright, opened from file://, network blocked.

The store is made here with real evaluations (the project's evaluator on the first digits test samples): a small
clean-trained MLP and two copies of it with 50 % and 70 % of their weights removed by global magnitude pruning,
registered as its children. The test checks that the index opens from file://, that clicking a column header
re-orders the rows, that the filter box hides rows, and that a model page's SVG plots load and are visible.

Screenshots of the index and of one model page are written to the test's tmp folder; with
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

from bench.catalog import register_model
from bench.evaluate import evaluate
from bench.spec import RunSpec
from leaderboard.build import build_site, model_slug

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
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SPARSITIES = (0.5, 0.7)


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
    index = build_site(store, tmp_path / "site")
    return index, dense, children


def _column(page, table, header: str) -> tuple[list[str], list[str]]:
    """The model names and the data-sort values of one column, in the rows' current order."""
    headers = table.locator("thead th").all_inner_texts()
    col = next(i for i, h in enumerate(headers) if h.replace("\n", " ").startswith(header))
    rows = table.locator("tbody tr")
    names = rows.locator("td.model a.name").all_inner_texts()
    values = [rows.nth(i).locator("td").nth(col).get_attribute("data-sort") for i in range(rows.count())]
    return names, values


def test_site_works_in_chromium_from_file_urls(real_site, tmp_path):
    from playwright.sync_api import sync_playwright

    index, dense, children = real_site
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
            context = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", lambda req: requested.append(req.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda err: errors.append(str(err)))

            page.goto(index.as_uri())
            assert page.title().startswith("Leaderboard")
            page.screenshot(path=str(shots / "index.png"), full_page=True)
            table = page.locator("table.leaderboard").first
            names, values = _column(page, table, "AutoAttack")
            assert sorted(names) == sorted([dense.name, *(c.name for c in children)])
            numbers = [float(v) for v in values]
            assert numbers == sorted(numbers, reverse=True) and len(set(numbers)) > 1  # ranked, not all tied

            # Clicking a header sorts by that column's data-sort value; clicking again reverses it.
            table.locator("thead th", has_text="AutoAttack").click()
            asc_names, asc_values = _column(page, table, "AutoAttack")
            assert [float(v) for v in asc_values] == sorted(numbers)
            assert asc_names != names
            assert table.locator("thead th", has_text="AutoAttack").get_attribute("aria-sort") == "ascending"
            table.locator("thead th", has_text="Sparsity").click()
            by_sparsity, sparsity_values = _column(page, table, "Sparsity")
            assert [float(v) for v in sparsity_values] == sorted(float(v) for v in sparsity_values)
            assert by_sparsity[0] == dense.name
            table.locator("thead th", has_text="Sparsity").click()
            assert _column(page, table, "Sparsity")[0][0] == children[-1].name

            # The filter box hides the rows that do not match.
            page.fill("#filter", children[0].name)
            visible = table.locator("tbody tr:visible td.model a.name").all_inner_texts()
            assert visible == [children[0].name]
            page.fill("#filter", "")
            assert table.locator("tbody tr:visible").count() == 3

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
            page.screenshot(path=str(shots / "model.png"), full_page=True)

            # The method page (an unregistered method: what the store holds) has its sparsity plot.
            page.locator('a[href$="methods/magnitude.html"]').first.click()
            page.wait_for_load_state("load")
            method_plot = page.locator("img.plot")
            assert method_plot.count() == 1
            assert method_plot.evaluate("el => el.complete && el.naturalWidth > 0")
        finally:
            browser.close()

    assert requested and all(url.startswith("file://") for url in requested), requested
    assert blocked == []
    assert dialogs == [] and errors == []
    if os.environ.get("APBENCH_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copyfile(shot, SCREENSHOTS / shot.name)
