"""Rendering: the Jinja2 environment and the page writers.

Autoescape is on, so every string a submitter controls is shown as text; the templates live in
``leaderboard/templates``. The overview (index, methodology, methods, downloads, the method pages and their plots,
the data files) needs only the evaluations' stored aggregates, so it is written while the per-sample jobs run; the
model pages need their results and come last (:class:`Pages`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

import bench
from bench.analysis.format import number, p_value
from bench.analysis.replicates import seed_of
from bench.analysis.thin_ice import POPULATIONS
from leaderboard import plots
from leaderboard.formatting import (
    format_value,
    human_count,
    model_slug,
    pct,
    safe_slug,
    safe_url,
    slugify,
    sort_value,
    word_breaks,
)
from leaderboard.per_sample import write_text
from leaderboard.site_data import SiteData
from leaderboard.tables import build_tables, download_files
from leaderboard.view_models import STRUCTURE_NAMES, Entry, MethodInfo, inputs_label, inputs_text, is_ranked

FLAG_TEXT = {
    "randomized_defense": "AutoAttack saw a randomised forward pass",
    "softmax_output": "the model seems to output probabilities, not logits",
    "zero_gradients": "zero gradients for some samples",
    "dynamic_model": "the forward pass changes between calls",
    "square_beat_white_box": "Square (black-box) broke samples the white-box attacks could not",
    "too_few_classes": "too few classes for the targeted attacks",
    "fmn_beat_autoattack": "FMN found adversarials within eps that AutoAttack missed",
    "clean_pass_disagreement": (
        "AutoAttack's own clean pass disagreed with ours on some samples (a randomised or input-dependent "
        "model); a sample counts as robust only if both passes classified it correctly"
    ),
    "autoattack_adversarial_not_reproduced": (
        "an adversarial example AutoAttack returned was not adversarial in our forward pass (a randomised or "
        "input-dependent model): FMN did not start from it and its norm is no best-known distance"
    ),
    "best_known_above_eps": (
        "a sample AutoAttack broke at ε has a best-known distance just above ε (AutoAttack's perturbation, rounded "
        "in float32, exceeds ε by a last-place unit, and neither FMN run found a smaller one); shown, not unreliable"
    ),
    "mixed_execution_settings": (
        "the evaluation's chunks ran under different execution settings (memory layout, TF32, cuDNN "
        "determinism): flags and "
        "predictions are those of either, distances may differ in the last float bits; shown, not unreliable"
    ),
}
# The badge a flag gets: FMN's and the best-known notes inform; every other flag is an AutoAttack or consistency
# check that marks the evaluation potentially unreliable (bench.evaluate.UNRELIABLE_FLAGS; a test checks the split).
FLAG_BADGE = {"fmn_beat_autoattack": "fmn", "best_known_above_eps": "notice", "mixed_execution_settings": "notice"}
# Who found a sample's best-known distance (SampleResult.best_attack), in words.
BEST_ATTACK_TEXT = {"fmn": "plain FMN", "fmn_from_autoattack": "FMN from AutoAttack's adversarial"}

# Papers the protocol rests on (cited on the methodology page and in papers.bib).
PROTOCOL_PAPERS = [
    {
        "key": "Croce2020Reliable",
        "kind": "inproceedings",
        "title": "Reliable Evaluation of Adversarial Robustness with an Ensemble of Diverse Parameter-Free Attacks",
        "author": "Croce, Francesco and Hein, Matthias",
        "venue": "ICML",
        "year": 2020,
        "url": "https://arxiv.org/abs/2003.01690",
    },
    {
        "key": "Pintor2021Fast",
        "kind": "inproceedings",
        "title": "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints",
        "author": "Pintor, Maura and Roli, Fabio and Brendel, Wieland and Biggio, Battista",
        "venue": "NeurIPS",
        "year": 2021,
        "url": "https://arxiv.org/abs/2102.12827",
    },
    {
        "key": "Piras2023Samples",
        "kind": "inproceedings",
        "title": "Samples on Thin Ice: Re-Evaluating Adversarial Pruning of Neural Networks",
        "author": "Piras, Giorgio and Pintor, Maura and Demontis, Ambra and Biggio, Battista",
        "venue": "ICMLC",
        "year": 2023,
        "url": "https://arxiv.org/abs/2310.08073",
    },
    {
        "key": "Piras2024Adversarial",
        "kind": "article",
        "title": "Adversarial Pruning: A Survey and Benchmark of Pruning Methods for Adversarial Robustness",
        "author": (
            "Piras, Giorgio and Pintor, Maura and Demontis, Ambra and Biggio, Battista and Giacinto, Giorgio "
            "and Roli, Fabio"
        ),
        "venue": "Pattern Recognition",
        "year": 2025,
        "url": "https://arxiv.org/abs/2409.01249",
    },
]


def best_attack_text(name: str) -> str:
    """A ``best_attack`` value in words: "plain FMN", "AutoAttack (apgd-ce)"."""
    if name.startswith("autoattack:"):
        return f"AutoAttack ({name.split(':', 1)[1]})"
    return BEST_ATTACK_TEXT.get(name, name)


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("leaderboard", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        pct=pct,
        human=human_count,
        sortval=sort_value,
        value=format_value,
        p=p_value,
        norm=plots.norm_symbol,
        url=safe_url,
        wbr=word_breaks,
        num=number,
    )
    env.globals.update(
        version=bench.__version__,
        FLAG_TEXT=FLAG_TEXT,
        FLAG_BADGE=FLAG_BADGE,
        best_attack_text=best_attack_text,
        normalization_label=inputs_label,
        normalization_text=inputs_text,
        seed_of=seed_of,
        POPULATIONS=POPULATIONS,
        model_slug=model_slug,
        is_ranked=is_ranked,
    )
    return env


class Pages:
    """The pages and files of one site, written into ``folder``: :meth:`overview` first, :meth:`models` once every
    entry has its per-sample results (:attr:`Entry.results <leaderboard.view_models.Entry.results>`)."""

    def __init__(self, data: SiteData, folder: Path) -> None:
        self.data = data
        self.folder = folder
        self.env = environment()
        self.tables = build_tables(data)
        # What every page's template gets.
        self.context = {
            "data": data,
            "methods": data.method_list,
            "tables": self.tables.tables,
            "structure_names": STRUCTURE_NAMES,
        }

    def write(self, rel: str, content: str) -> None:
        write_text(self.folder / rel, content)

    def render(self, template: str, root: str, page: str, **kw: Any) -> str:
        return self.env.get_template(template).render(root=root, page=page, **kw, **self.context)

    def overview(self) -> None:
        """Index, methods, methodology and downloads pages, the data files, the method pages and their plots."""
        data, methods = self.data, self.data.method_list
        for mi in methods:
            mi.plot = _method_plot(data, mi)
        self.write(
            "index.html",
            self.render(
                "index.html.j2",
                "",
                "index",
                rows=self.tables.rows,
                columns=self.tables.columns,
                not_evaluated=data.not_evaluated,
                unranked=data.unranked,
            ),
        )
        self.write("methodology.html", self.render("methodology.html.j2", "", "methodology"))
        self.write("methods.html", self.render("methods.html.j2", "", "methods"))
        for rel, text in download_files(self.tables):
            self.write(rel, text)
        papers = _papers(methods)
        self.write("data/papers.bib", "\n\n".join(bibtex(p) for p in papers) + "\n")
        self.write("downloads.html", self.render("downloads.html.j2", "", "downloads", papers=papers))
        for mi in methods:
            if mi.plot:
                self.write(f"methods/{mi.slug}-sparsity.svg", mi.plot)
            self.write(f"methods/{mi.slug}.html", self.render("method.html.j2", "../", "method", mi=mi))

    def models(self) -> None:
        """One page per model."""
        data = self.data
        for model in data.models:
            self.write(
                f"models/{model_slug(model)}.html",
                self.render(
                    "model.html.j2",
                    "../",
                    "model",
                    model=model,
                    entries=data.entries.get(model.id, []),
                    method=data.methods.get(model.method),
                    parent=data.by_id.get(model.parent_id) if model.parent_id else None,
                    children=data.children.get(model.id, []),
                    incomplete=data.incomplete.get(model.id, []),
                ),
            )


def _method_plot(data: SiteData, mi: MethodInfo) -> str | None:
    """Robust accuracy against sparsity, one series per (protocol, architecture) with its dense parents under the
    same protocol: points from different protocols are never joined by a line. A setting pruned with several seeds
    is one point: the mean over its seeds with a min–max bar."""
    if not mi.entries:
        return None
    groups: dict[tuple[str, str], dict[int, Entry]] = defaultdict(dict)
    for e in mi.entries:
        if not is_ranked(e.model):
            continue
        key = (e.ev.protocol_hash, e.model.arch)
        groups[key][e.model.id] = e
        parent = data.by_id.get(e.model.parent_id) if e.model.parent_id else None
        if parent is not None:
            pe = data.entry(parent.id, e.ev.protocol_hash)
            if pe is not None and is_ranked(parent):
                groups[key].setdefault(parent.id, pe)
    if not groups:
        return None
    order = {p.hash: i for i, p in enumerate(data.protocols)}
    series = []
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1])):
        protocol_hash, arch = key
        p = data.protocol_of[protocol_hash]
        points: list[tuple[float, int, float, float, float, int]] = []
        seen: set[int] = set()
        for e in sorted(groups[key].values(), key=lambda e: (e.model.measured_sparsity, e.model.id)):
            across = e.setting.summary.get("autoattack") if e.setting else None
            if across is None:
                low, high = e.interval(e.ev.aa_robust_accuracy)
                robust = e.ev.aa_robust_accuracy or 0.0
                points.append((e.model.measured_sparsity, e.model.id, robust, low, high, 1))
            elif id(e.setting) not in seen:
                seen.add(id(e.setting))
                first = min(x.model.id for x in e.setting.entries)
                points.append((e.setting.sparsity, first, across.mean, across.min, across.max, across.n))
        points.sort()
        series.append(
            plots.Series(
                label=f"{arch} · {p.dataset} · {p.threat} · AA {p.spec.get('version', '?')} · N = {p.n}{p.fmn_note}",
                sparsity=[pt[0] for pt in points],
                robust=[pt[2] for pt in points],
                low=[pt[3] for pt in points],
                high=[pt[4] for pt in points],
                replicates=[pt[5] for pt in points],
            )
        )
    return plots.sparsity_svg(series, ylabel="AutoAttack robust accuracy (%)")


def _papers(methods: list[MethodInfo]) -> list[dict[str, Any]]:
    papers = []
    seen = set()
    for mi in methods:
        if not mi.paper_title:
            continue
        key = mi.ap_key.split("_", 1)[-1] if mi.ap_key else safe_slug(mi.key)
        if key in seen:
            continue
        seen.add(key)
        papers.append(
            {
                "key": key,
                "kind": "inproceedings",
                "title": mi.paper_title,
                "author": mi.authors,
                "venue": mi.venue,
                "year": mi.year,
                "url": mi.paper_url,
                "method": mi,
            }
        )
    return papers + [p for p in PROTOCOL_PAPERS if p["key"] not in seen]


def _bib_field(text: Any) -> str:
    # Braces and backslashes would end or escape the BibTeX field; nothing else needs care.
    return re.sub(r"[{}\\]", "", str(text)).replace("\n", " ").strip()


def bibtex(entry: dict[str, Any]) -> str:
    kind = entry.get("kind", "inproceedings")
    venue_field = "journal" if kind == "article" else "booktitle"
    lines = [f"@{kind}{{{slugify(str(entry['key']))},"]
    for name, value in (
        ("title", entry.get("title")),
        ("author", entry.get("author")),
        (venue_field, entry.get("venue")),
        ("year", entry.get("year")),
        ("url", safe_url(entry.get("url"))),
    ):
        if value:
            lines.append(f"  {name} = {{{_bib_field(value)}}},")
    lines.append("}")
    return "\n".join(lines)
