"""A stored model's lifecycle: list, remove, rename, rank.

Plain functions over a :class:`~bench.store.Store`; the ``bench db`` commands only print what they return. Each
change is one transaction: a removal takes its models, their evaluations and their per-sample rows together or not
at all. Checkpoint files on disk are never touched (the store only records where they are).

A model is named by its name or its id (``3`` or ``#3``, as messages print it); a name wins over an id.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from bench.store.db import Store, StoreError, shown_url
from bench.store.schema import Evaluation, EvaluationChunk, Model, SampleResult

NAME_MAX_LENGTH = Model.__table__.c.name.type.length


class UnknownModelError(ValueError):
    """No stored model has this name or id."""


class HasChildrenError(ValueError):
    """A model to remove is the parent of models that are not removed with it."""


class NameTakenError(ValueError):
    """Another model already holds the name asked for."""


@dataclass(frozen=True)
class StoredModel:
    """What the commands show of one model, read inside the transaction that acted on it."""

    id: int
    name: str
    method: str
    arch: str
    dataset: str
    measured_sparsity: float
    ranked: bool
    parent_id: int | None
    checkpoint_path: str | None
    evaluations: int = 0
    # Evaluations not complete: in progress, or interrupted and resumable.
    unfinished: int = 0
    samples: int = 0

    @property
    def label(self) -> str:
        return f"model #{self.id} {self.name!r}"


@dataclass(frozen=True)
class Removal:
    """Models removed (or to be removed) in one transaction: those named first, then their descendants."""

    models: tuple[StoredModel, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(m.id for m in self.models)

    @property
    def evaluations(self) -> int:
        return sum(m.evaluations for m in self.models)

    @property
    def samples(self) -> int:
        return sum(m.samples for m in self.models)


def open_existing(db: str | None) -> Store:
    """The store at ``db`` opened for writing. A missing store is refused, never created; one at an older schema
    is refused with the upgrade command (the ``bench db`` commands change rows, not schemas)."""
    Store(db, read_only=True).dispose()
    store = Store(db)
    if store.read_only:
        store.dispose()
        raise StoreError(
            f"the store {shown_url(store.url)} cannot be written here (the file or its folder is read-only); "
            "run the command where the store is writable"
        )
    return store


def find_model(session: Session, ref: str | int) -> Model:
    """The model called ``ref``, else the model with id ``ref`` (``3`` or ``#3``).

    Raises:
        UnknownModelError: neither; the message suggests a close name.
    """
    text = str(ref).strip()
    row = session.scalars(select(Model).where(Model.name == text)).one_or_none()
    if row is not None:
        return row
    digits = text.removeprefix("#")
    if digits.isascii() and digits.isdigit():
        row = session.get(Model, int(digits))
        if row is not None:
            return row
    names = session.scalars(select(Model.name)).all()
    close = difflib.get_close_matches(text, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownModelError(
        f"no model {text!r} in this store (give a model's name or id); {hint}bench db list shows the stored models"
    )


def check_name(name: str) -> str:
    """``name`` if it can name a model, else ValueError with the rule it breaks."""
    if not name or not name.strip():
        raise ValueError("a model name cannot be empty; give one such as digits-dense-sanity")
    if name != name.strip():
        raise ValueError(f"model name {name!r} starts or ends with spaces; give it without them")
    if not name.isprintable():
        raise ValueError(f"model name {name!r} holds control characters; use letters, digits and - _ . only")
    if len(name) > NAME_MAX_LENGTH:
        raise ValueError(f"a model name has at most {NAME_MAX_LENGTH} characters; got {len(name)}")
    digits = name.removeprefix("#")
    if digits.isascii() and digits.isdigit():
        raise ValueError(f"model name {name!r} would read as a model id; give a name with a letter in it")
    return name


def list_models(store: Store) -> list[StoredModel]:
    """Every stored model, by id, with its evaluation and per-sample row counts."""
    with _transaction(store, write=False) as s:
        return _describe(s, s.scalars(select(Model).order_by(Model.id)).all(), every_model=True)


def describe_models(store: Store, refs: Sequence[str | int]) -> list[StoredModel]:
    """The models named (by name or id), once each, in the order given."""
    with _transaction(store, write=False) as s:
        return _describe(s, _unique(find_model(s, ref) for ref in refs))


def plan_removal(store: Store, refs: Sequence[str | int], *, with_children: bool = False) -> Removal:
    """What :func:`remove_models` would remove, changing nothing (for a confirmation prompt)."""
    with _transaction(store, write=False) as s:
        return _plan(s, refs, with_children=with_children)


def remove_models(
    store: Store, refs: Sequence[str | int], *, with_children: bool = False, expected: Removal | None = None
) -> Removal:
    """Remove models with their evaluations and per-sample rows, in one transaction.

    Args:
        refs: the models, by name or id.
        with_children: also remove every model derived from them (``parent_id``), recursively; without it a model
            that is another model's parent is refused, naming the children.
        expected: the plan the user confirmed (:func:`plan_removal`); when the store has changed since (other
            models, evaluations or rows would go), nothing is removed.

    Returns:
        What was removed, counted inside the transaction.

    Raises:
        UnknownModelError, HasChildrenError, ValueError (the store changed since ``expected``), StoreError.
    """
    with _transaction(store, write=True) as s:
        plan = _plan(s, refs, with_children=with_children)
        if expected is not None and plan != expected:
            raise ValueError(
                "the store changed while the removal waited for confirmation (other models, evaluations or rows "
                "would go now); nothing was removed: run the command again"
            )
        ids = list(plan.ids)
        evaluation_ids = select(Evaluation.id).where(Evaluation.model_id.in_(ids)).scalar_subquery()
        no_sync = {"synchronize_session": False}
        # Dependents first, explicitly: the result does not rest on the database's ON DELETE CASCADE (SQLite
        # enforces foreign keys only where the connection turned them on).
        samples = s.execute(
            delete(SampleResult).where(SampleResult.evaluation_id.in_(evaluation_ids)), execution_options=no_sync
        ).rowcount
        s.execute(
            delete(EvaluationChunk).where(EvaluationChunk.evaluation_id.in_(evaluation_ids)), execution_options=no_sync
        )
        evaluations = s.execute(
            delete(Evaluation).where(Evaluation.model_id.in_(ids)), execution_options=no_sync
        ).rowcount
        models = s.execute(delete(Model).where(Model.id.in_(ids)), execution_options=no_sync).rowcount
        if (models, evaluations, samples) != (len(ids), plan.evaluations, plan.samples):
            # A concurrent writer changed the counts (on PostgreSQL, an evaluation storing a chunk of this
            # model meanwhile); the exception rolls the transaction back.
            raise StoreError(
                f"removing {len(ids)} models would have deleted {models} models, {evaluations} evaluations and "
                f"{samples} per-sample rows, not the {plan.evaluations} evaluations and {plan.samples} rows counted; "
                "nothing was removed: run the command again"
            )
        return plan


def rename_model(store: Store, ref: str | int, new_name: str) -> tuple[StoredModel, str]:
    """Give a model a new name; returns the model as it was and the new name.

    Raises:
        NameTakenError: another model holds ``new_name``.
        UnknownModelError, ValueError (not a usable name), StoreError.
    """
    check_name(new_name)
    try:
        with _transaction(store, write=True) as s:
            row = find_model(s, ref)
            (before,) = _describe(s, [row])
            holder = s.scalars(select(Model).where(Model.name == new_name)).one_or_none()
            if holder is not None and holder.id != row.id:
                raise _taken(new_name, holder)
            row.name = new_name
    except IntegrityError:
        # Another process took the name between our check and our commit.
        raise NameTakenError(f"the name {new_name!r} was just taken by another model; choose another name") from None
    return before, new_name


def set_ranked(store: Store, refs: Sequence[str | int], ranked: bool) -> list[StoredModel]:
    """Rank models in the leaderboard's ranked tables (``ranked=True``) or keep them off (sanity runs).

    Returns:
        The models as they were before (their ``ranked`` is the previous value).
    """
    with _transaction(store, write=True) as s:
        rows = _unique(find_model(s, ref) for ref in refs)
        before = _describe(s, rows)
        s.execute(
            update(Model).where(Model.id.in_([r.id for r in rows])).values(ranked=ranked),
            execution_options={"synchronize_session": False},
        )
        return before


# ------------------------------------------------------------------------------------------------- helpers


@contextmanager
def _transaction(store: Store, *, write: bool) -> Iterator[Session]:
    """A session in one transaction; a database failure becomes one StoreError line saying nothing changed."""
    if write and store.read_only:
        raise StoreError(f"the store {shown_url(store.url)} is open read-only; it cannot be changed")
    try:
        with store.session() as s:
            if write and s.get_bind().dialect.name == "sqlite":
                # Take SQLite's write lock before the first read. A read first would pin a snapshot, and an
                # evaluation committing chunks meanwhile would make our first write fail at once with "database
                # is locked" instead of waiting on the busy timeout. A write that changes no row takes the lock.
                s.execute(update(Model).where(Model.id.is_(None)).values(ranked=Model.ranked))
            yield s
    except DBAPIError as err:
        if isinstance(err, IntegrityError):
            raise
        reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err).splitlines()[0]
        raise StoreError(
            f"could not change the store {shown_url(store.url)}: {reason}; nothing was changed (one transaction)"
        ) from None


def _taken(name: str, holder: Model) -> NameTakenError:
    return NameTakenError(
        f"the name {name!r} is already model #{holder.id} ({holder.method}, {holder.arch}, {holder.dataset}); "
        "choose another name, or rename or remove that model first"
    )


def _unique(rows) -> list[Model]:
    seen: dict[int, Model] = {}
    for row in rows:
        seen.setdefault(row.id, row)
    return list(seen.values())


def _plan(s: Session, refs: Sequence[str | int], *, with_children: bool) -> Removal:
    if not refs:
        raise ValueError("name at least one model to remove (a name or an id; bench db list shows them)")
    named = _unique(find_model(s, ref) for ref in refs)
    chosen = {m.id for m in named}
    descendants: list[Model] = []
    frontier = set(chosen)
    while frontier:
        children = s.scalars(
            select(Model).where(Model.parent_id.in_(frontier), Model.id.not_in(chosen)).order_by(Model.id)
        ).all()
        if children and not with_children:
            _refuse_parents(named, children)
        descendants += children
        frontier = {c.id for c in children}
        chosen |= frontier
    return Removal(tuple(_describe(s, [*named, *descendants])))


def _refuse_parents(named: list[Model], children: list[Model]) -> None:
    by_parent: dict[int, list[Model]] = {}
    for child in children:
        by_parent.setdefault(child.parent_id, []).append(child)
    parts = []
    for parent in named:
        kids = by_parent.get(parent.id)
        if kids:
            more = f" and {len(kids) - 5} more" if len(kids) > 5 else ""
            shown = ", ".join(f"#{k.id} {k.name!r}" for k in kids[:5]) + more
            parts.append(f"model #{parent.id} {parent.name!r} is the parent of {shown}")
    raise HasChildrenError(
        f"{'; '.join(parts)}; nothing was removed: add --with-children to remove them too, or remove them first"
    )


def _describe(s: Session, rows: Sequence[Model], *, every_model: bool = False) -> list[StoredModel]:
    """The rows as :class:`StoredModel`, with their evaluation, unfinished-evaluation and per-sample row counts
    (``every_model``: ``rows`` are all the store's models, so the counts need no filter on their ids)."""
    ids = [r.id for r in rows]
    if not ids:
        return []
    mine = Evaluation.model_id.in_(ids) if not every_model else Evaluation.model_id.is_not(None)

    def per_model(query) -> dict[int, int]:
        return dict(s.execute(query.where(mine).group_by(Evaluation.model_id)).all())

    evaluations = per_model(select(Evaluation.model_id, func.count()))
    unfinished = per_model(select(Evaluation.model_id, func.count()).where(Evaluation.status != "complete"))
    samples = per_model(
        select(Evaluation.model_id, func.count())
        .select_from(SampleResult)
        .join(Evaluation, SampleResult.evaluation_id == Evaluation.id)
    )
    return [
        StoredModel(
            id=r.id,
            name=r.name,
            method=r.method,
            arch=r.arch,
            dataset=r.dataset,
            measured_sparsity=r.measured_sparsity,
            ranked=r.ranked,
            parent_id=r.parent_id,
            checkpoint_path=r.checkpoint_path,
            evaluations=evaluations.get(r.id, 0),
            unfinished=unfinished.get(r.id, 0),
            samples=samples.get(r.id, 0),
        )
        for r in rows
    ]
