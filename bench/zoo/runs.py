"""Evaluate zoo entries under one protocol: fetch, verify, convert, register, hand each to the evaluator.

``bench evaluate --model-id`` evaluates one entry, ``--method/--sparsity/--dataset/--arch`` the one entry they
pick, ``--zoo`` every entry they match that this protocol has not evaluated yet (resumable: one whose bytes are
already evaluated under the same protocol is skipped before its download). With ``--zoo`` an entry that fails
(its download, its file, its dataset) does not stop the others; the failures are reported together at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.formats import converted_provenance
from bench.models.normalize import normalization_key
from bench.store import Evaluation, Model, Store
from bench.store.db import resolve_db_url
from bench.zoo import zoo
from bench.zoo.fetch import cached_path
from bench.zoo.manifest import printable


class ZooRunFailed(RuntimeError):
    """Some entries of a ``--zoo`` run failed; the message lists each reason once with the entries it stopped."""


def evaluate_entries(
    entries: Sequence[zoo.ZooEntry],
    *,
    skip_done: bool,
    db: str | None,
    max_size: int,
    make_spec: Callable[[str], tuple[Any, Any, Any]],
    run: Callable[..., Any],
    log: Callable[[str], None],
) -> None:
    """Evaluate zoo entries, one after the other, in one store.

    Args:
        entries: the entries to evaluate (:meth:`bench.zoo.zoo.Zoo.get`, ``find`` or ``resolve``).
        skip_done: ``--zoo``: skip an entry already evaluated under this protocol, or one without a download URL
            and not in the cache, and go on past a failed entry (reported at the end).
        db: the store; opened once the first entry is ready to store, so a failed lookup leaves no file behind.
        max_size: the largest checkpoint download accepted, in bytes.
        make_spec: ``make_spec(dataset) -> (RunSpec, x, y)``, the protocol over a dataset and its test split.
        run: ``run(store, row, model, x=..., y=..., spec=...)``: evaluates one registered entry.
        log: where progress lines go.

    Raises:
        ZooRunFailed: with ``skip_done``, after every entry was tried, when some failed.
    """
    store = None
    # reason -> the entries it stopped. A missing dataset or an unreachable host stops many entries the same way:
    # it is reported once, with their ids, not once per entry.
    failures: dict[str, list[str]] = {}
    unusable_datasets: dict[str, str] = {}
    for i, entry in enumerate(entries):
        m = entry.manifest
        if skip_done and m.model.dataset in unusable_datasets:
            failures[unusable_datasets[m.model.dataset]].append(m.model_id)
            continue
        if i:
            log("")
        try:
            if skip_done:
                try:
                    spec, _x, _y = make_spec(m.model.dataset)
                except (ValueError, RuntimeError, OSError) as err:
                    reason = _reason(err)
                    unusable_datasets[m.model.dataset] = reason
                    failures.setdefault(reason, []).append(m.model_id)
                    log(f"FAILED {m.model_id} (and every other {m.model.dataset} entry): {reason}")
                    continue
                sha = zoo.known_sha256(entry)
                done = _complete_evaluation(db, sha, spec, entry) if sha is not None else None
                if done is not None:
                    log(f"{m.model_id}: already evaluated under this protocol (evaluation #{done})")
                    continue
                if m.checkpoint.url is None and cached_path(m.model_id, m.checkpoint.file_name) is None:
                    log(f"skipping {m.model_id}: no download URL; bench zoo fetch {m.model_id} --from FILE first")
                    continue
            log(f"zoo entry {entry.describe()}")
            fetched = zoo.fetch_entry(entry, max_size=max_size, log=lambda msg: log(printable(msg)))
            model = zoo.load_model(entry, fetched.path)
            spec, x, y = make_spec(m.model.dataset)
            store = store or Store(db)
            row = zoo.register_entry(store, entry, fetched, model)
            run(store, row, model, x=x, y=y, spec=spec)
        # Whatever one entry's file or server does wrong (KeyError: a state dict without an expected key), the
        # others are still evaluated.
        except (ValueError, RuntimeError, OSError, KeyError) as err:
            if not skip_done:
                raise
            reason = _reason(err)
            failures.setdefault(reason, []).append(m.model_id)
            log(f"FAILED {m.model_id}: {reason}")
    if failures:
        n_failed = sum(len(ids) for ids in failures.values())
        lines = []
        for reason, ids in failures.items():
            shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            head = f"{len(ids)} entr{'y' if len(ids) == 1 else 'ies'} ({shown}):"
            lines.append(head + "\n    " + reason.replace("\n", "\n    "))
        raise ZooRunFailed(f"{n_failed} of {len(entries)} zoo entries failed:\n  " + "\n  ".join(lines))


def _reason(err: BaseException) -> str:
    """An error's message for the terminal: its own line breaks kept, control characters in each line escaped
    (a server's or a file's words may be in it)."""
    text = f"missing key {err}" if type(err) is KeyError else str(err)  # str() of a bare KeyError is only the key
    return "\n".join(printable(line) for line in text.splitlines() or [""])


def _complete_evaluation(db: str | None, sha256: str, spec, entry: zoo.ZooEntry) -> int | None:
    """A complete evaluation of these bytes behind the entry's input normalisation under the same protocol (any
    device or batch size), if stored."""
    url = resolve_db_url(db)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    fmt, dataset = entry.manifest.checkpoint.format, entry.manifest.model.dataset
    key = normalization_key(dataset, converted_provenance(fmt, dataset)["normalization"])
    store = Store(db)
    try:
        with store.session() as s:
            return s.scalars(
                select(Evaluation.id)
                .join(Model)
                .where(
                    Model.checkpoint_sha256 == sha256,
                    Model.normalization == key,
                    Evaluation.protocol_hash == spec.protocol_hash,
                    Evaluation.status == "complete",
                )
            ).first()
    finally:
        store.dispose()
