"""Which model ``bench evaluate`` evaluates: a checkpoint file, the built-in track, or zoo entries.

:func:`pick_source` reads the options once and returns one source; every combination of options that does not
make sense is refused there, before anything is trained, downloaded or stored. Each source's ``resolve`` returns
what to evaluate: a loaded model (:class:`Resolved`) for a file or the track, the entries for the zoo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cli.config import EvaluateConfig, check_n_samples
from bench.cli.options import seed_list


@dataclass(frozen=True)
class Resolved:
    """A model ready to store and evaluate.

    Attributes:
        model: the network (inputs in [0, 1], normalisation as its first layer).
        checkpoint: the file it was loaded from, which the store keys it on.
        arch, dataset: its architecture and dataset.
        register: ``name``, ``source`` and ``provenance`` for :func:`bench.store.registration.register_model`.
        chosen_name: the name was typed (``--name``), so another model holding it is an error.
    """

    model: Any
    checkpoint: Path
    arch: str
    dataset: str
    register: dict[str, Any] = field(default_factory=dict)
    chosen_name: bool = False


@dataclass(frozen=True)
class CheckpointSource:
    """``--checkpoint FILE --arch A --dataset D`` [``--checkpoint-format F --k K --normalization N --name NAME``]."""

    path: str
    arch: str
    dataset: str
    fmt: str = "plain"
    k: float | None = None
    normalization: dict[str, list[float]] | None = None
    name: str | None = None

    def resolve(self, db: str | None, log: Callable[[str], None]) -> Resolved:
        """The file loaded weights-only into the architecture (converted from its authors' format if one is
        given): a missing or unreadable file fails here, before the test split is loaded."""
        from bench.checkpoints import load_checkpoint_model
        from bench.formats import converted_provenance, load_converted_model

        register: dict[str, Any] = {"name": self.name}
        if self.fmt != "plain" or self.k is not None:
            model = load_converted_model(
                self.path, self.fmt, self.arch, self.dataset, k=self.k, normalization=self.normalization
            )
            register["provenance"] = converted_provenance(
                self.fmt, self.dataset, self.k, normalization=self.normalization
            )
        else:
            model = load_checkpoint_model(self.path, self.arch, self.dataset, normalization=self.normalization)
            if self.normalization is not None:
                register["provenance"] = {"normalization": self.normalization}
        return Resolved(model, Path(self.path), self.arch, self.dataset, register, chosen_name=self.name is not None)


@dataclass(frozen=True)
class TrackSource:
    """The built-in track's dense model (``--track``), and with ``--method M --sparsity S [--seeds ...]`` its pruned
    children, one per seed."""

    track: Any  # bench.track.Track
    name: str | None = None
    method: str | None = None
    sparsity: float | None = None
    seeds: tuple[int, ...] = (0,)

    @property
    def arch(self) -> str:
        return self.track.arch

    @property
    def dataset(self) -> str:
        return self.track.dataset

    def resolve(self, db: str | None, log: Callable[[str], None]) -> Resolved:
        """The dense model, trained once and cached (a ``--name`` another model holds is refused before that)."""
        from bench.checkpoints import load_checkpoint_model
        from bench.store import Store
        from bench.track import dense_checkpoint

        tr = self.track
        if self.name is not None:
            store = Store(db)
            try:
                check_chosen_name(store, self.name, recipe_key=tr.key)
            finally:
                store.dispose()
        checkpoint, record = dense_checkpoint(tr, log=log)
        model = load_checkpoint_model(checkpoint, tr.arch, tr.dataset)
        register = {"name": self.name or f"{tr.name}-dense", "source": f"track:{tr.name}", "provenance": record}
        return Resolved(model, Path(checkpoint), tr.arch, tr.dataset, register, chosen_name=self.name is not None)

    def pruned(self, store, dense_row, dense: Resolved, *, data_dir, log) -> Iterator[tuple[int, Any, Any]]:
        """``(seed, stored row, model)`` of each pruned child, pruned (or found in the cache) as it is asked for."""
        from bench.checkpoints import load_checkpoint_model
        from methods.pipeline import prune_checkpoint

        eps = self.track.training.eps
        for seed in self.seeds:
            log("")
            result = prune_checkpoint(
                store,
                self.method,
                self.sparsity,
                dense_path=dense.checkpoint,
                dense_row=dense_row,
                eps=eps,
                default_eps=eps,
                seed=seed,
                track=True,
                data_dir=data_dir,
                log=log,
            )
            yield seed, result.row, load_checkpoint_model(result.path, dense.arch, dense.dataset)


@dataclass(frozen=True)
class ZooSource:
    """``--model-id ID`` (one entry), ``--zoo`` (every entry the filters match), or ``--method/--sparsity`` with a
    ``--dataset`` other than the track's (the one entry they pick)."""

    model_id: str | None = None
    every: bool = False
    method: str | None = None
    sparsity: float | None = None
    dataset: str | None = None
    arch: str | None = None
    submissions: str | None = None
    max_size: int | None = None

    def resolve(self) -> list:
        """The zoo entries to evaluate (:class:`bench.zoo.zoo.ZooEntry`)."""
        from bench.zoo.zoo import load_zoo

        z = load_zoo(self.submissions)
        if self.model_id is not None:
            return [z.get(self.model_id)]
        filters = {"method": self.method, "sparsity": self.sparsity, "dataset": self.dataset, "arch": self.arch}
        if not self.every:
            return [z.resolve(**filters)]
        entries = z.find(**filters)
        if not entries:
            raise ValueError(f"no zoo entries match the filters in {z.root} (bench zoo list)")
        return entries


Source = CheckpointSource | TrackSource | ZooSource


def pick_source(o: dict[str, Any], config: EvaluateConfig) -> Source:
    """The source ``bench evaluate``'s options ``o`` name, every combination checked (the typed names against
    the registries too) before anything is loaded."""
    from bench.models import ARCHS

    checkpoint, method, dataset, arch, name = o["checkpoint"], o["method"], o["dataset"], o["arch"], o["name"]
    converted = o["ckpt_format"] != "plain" or o["k"] is not None
    if o["model_id"] is not None or o["zoo_all"] or _picks_zoo_entry(checkpoint, method, dataset, o["track"]):
        if checkpoint is not None or converted or {name, o["normalization"]} != {None}:
            raise ValueError(
                "a zoo entry brings its own checkpoint, format, normalisation and name; "
                "drop --checkpoint/--checkpoint-format/--k/--normalization/--name"
            )
        if o["model_id"] is not None and (o["zoo_all"] or method or o["sparsity"] is not None or dataset or arch):
            raise ValueError(
                "--model-id names one zoo entry; --zoo and --method/--sparsity/--dataset/--arch select by filter"
            )
        # Before any download: against the --dataset filter's split, else the largest (each entry's again later).
        check_n_samples(config.n_samples, dataset)
        return ZooSource(
            model_id=o["model_id"],
            every=o["zoo_all"],
            method=method,
            sparsity=o["sparsity"],
            dataset=dataset,
            arch=arch,
            submissions=o["submissions"],
            max_size=o["max_size"],
        )
    track = None
    if checkpoint is None:
        from bench.track import TRACKS

        if o["track"] not in TRACKS:
            raise ValueError(f"unknown track {o['track']!r}; known: {', '.join(TRACKS)}")
        track = TRACKS[o["track"]]
        if o["normalization"] is not None:
            raise ValueError("--normalization describes a --checkpoint file; the track's models use the dataset's")
        if converted:
            raise ValueError("--checkpoint-format and --k describe a --checkpoint file; give one")
        if arch not in (None, track.arch) or dataset not in (None, track.dataset):
            raise ValueError(
                "--arch/--dataset need --checkpoint (or --method M --sparsity S to pick a zoo entry, or --model-id); "
                f"without one the built-in {track.name} track ({track.arch} on {track.dataset}) is evaluated"
            )
        arch, dataset = track.arch, track.dataset
    elif arch is None or dataset is None:
        raise ValueError("--checkpoint needs --arch and --dataset (bench models, bench datasets)")
    ARCHS.get(arch)
    normalization = None
    if o["normalization"] is not None:
        from bench.models.normalize import parse_normalization

        normalization = parse_normalization(o["normalization"], dataset)
    config.check(dataset)
    if method is not None:
        if checkpoint is not None:
            raise ValueError(
                "--method builds the pruned model on the built-in track; to prune your own dense "
                "checkpoint use `bench prune --method M --sparsity S --dense CKPT --arch A --dataset D` "
                "and evaluate the checkpoint it writes"
            )
        if o["sparsity"] is None:
            raise ValueError(f"--method {method} needs --sparsity (e.g. --sparsity 0.9)")
        from methods.base import get_method

        get_method(method).check_sparsity(o["sparsity"])
        seeds = tuple(seed_list(o["prune_seed"], o["prune_seeds"], "--prune-seed"))
        return TrackSource(track, name=name, method=method, sparsity=o["sparsity"], seeds=seeds)
    if o["sparsity"] is not None:
        raise ValueError("--sparsity needs --method (bench methods lists them)")
    if o["prune_seed"] is not None or o["prune_seeds"] is not None:
        raise ValueError("--prune-seed/--seeds pick the pruning runs of --method M --sparsity S; give those too")
    if track is not None:
        return TrackSource(track, name=name)
    return CheckpointSource(checkpoint, arch, dataset, o["ckpt_format"], o["k"], normalization, name)


def _picks_zoo_entry(checkpoint, method, dataset, track) -> bool:
    """``--method M --dataset D`` without ``--checkpoint``, on a dataset that is not the built-in track's."""
    if checkpoint is not None or method is None or dataset is None:
        return False
    from bench.track import TRACKS

    return track not in TRACKS or dataset != TRACKS[track].dataset


def register(store, resolved: Resolved, log: Callable[[str], None]):
    """Store the model (once: the same bytes behind the same normalisation are the same row) and return its row."""
    from bench.store.registration import register_model

    kw = dict(resolved.register)
    # The normalisation register_model will key the model on (a converted author model brings its own).
    normalization = (kw.get("provenance") or {}).get("normalization")
    name = kw.get("name")
    kw["name"] = _store_name(
        store,
        resolved.checkpoint,
        name,
        chosen=resolved.chosen_name,
        dataset=resolved.dataset,
        normalization=normalization,
    )
    row = register_model(store, resolved.checkpoint, resolved.model, arch=resolved.arch, dataset=resolved.dataset, **kw)
    if resolved.chosen_name and row.name != name:
        log(f"note: this checkpoint is already stored as model {row.name!r}; --name {name!r} not applied")
    return row


def check_chosen_name(
    store, name: str, *, sha: str | None = None, normalization: str = "dataset", recipe_key: str | None = None
) -> None:
    """Refuse a --name another model holds (the same sha256 and normalisation, or the same track recipe, is the
    same model)."""
    from methods.pipeline import is_same_model, name_holder, taken_name_error

    with store.session() as s:
        holder = name_holder(s, name)
        if holder is None or (sha is not None and is_same_model(holder, sha, normalization)):
            return
        if recipe_key is not None and (holder.provenance or {}).get("recipe_key") == recipe_key:
            return
        raise taken_name_error("--name", name, holder)


def _store_name(store, checkpoint, name: str | None, *, chosen: bool, dataset: str, normalization=None) -> str | None:
    """The name to register ``checkpoint`` under: a chosen --name if no other model holds it (else refused), a
    derived one (``digits-dense``) or, when another model holds that, the same with the checkpoint's hash appended.
    """
    from bench.checkpoints import sha256_file
    from bench.models.normalize import normalization_key
    from methods.pipeline import available_name

    if name is None:
        return None
    sha = sha256_file(checkpoint)
    key = normalization_key(dataset, normalization)
    if chosen:
        check_chosen_name(store, name, sha=sha, normalization=key)
        return name
    with store.session() as s:
        return available_name(s, [name], sha, key)
