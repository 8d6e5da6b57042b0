"""What every ``bench`` command shares: the store and output options, error handling, and the terminal table.

Light to import (click and :mod:`bench.analysis.format` only): ``bench --help`` loads every command module, and
none of them may pull in torch, pandas or the store before a command runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import click

from bench.analysis.format import interval, percent
from bench.registry import UnknownNameError
from bench.zoo.limits import DEFAULT_MAX_SIZE


def friendly_errors(fn: Callable) -> Callable:
    """Turn expected failures (bad names, files, values) into one-line ``Error:`` messages, exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UnknownNameError, ValueError, FileNotFoundError, RuntimeError) as err:
            raise click.ClickException(str(err)) from err

    return wrapper


class AliasedOption(click.Option):
    """An option that also answers to older spellings (``hidden_aliases``), which ``--help`` and errors leave out.

    ``bench evaluate --format`` became ``--checkpoint-format`` (``--format`` is every other command's output
    format); scripts written against the old spelling keep working.
    """

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)
        unknown = set(self.hidden_aliases) - set(self.opts)
        if unknown:
            raise ValueError(f"hidden aliases {sorted(unknown)} are not names of option {self.name!r}")

    def _shown(self, fn: Callable, *args):
        everything = self.opts
        self.opts = [opt for opt in everything if opt not in self.hidden_aliases]
        try:
            return fn(*args)
        finally:
            self.opts = everything

    def get_help_record(self, ctx):
        return self._shown(super().get_help_record, ctx)

    def get_error_hint(self, ctx):
        return self._shown(super().get_error_hint, ctx)


def db_option(fn: Callable) -> Callable:
    """``--db URL``: the results store."""
    return click.option(
        "--db",
        "db",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL or SQLite path of the results store [default: $BENCH_DB or sqlite:///results.db].",
    )(fn)


def output_format_option(*choices: str, help: str | None = None) -> Callable:
    """``--format``: how a listing is printed, a table for reading by default."""
    text = help or (
        "Output: a table to read, or "
        + " / ".join(c for c in choices if c != "table")
        + " for other programs (accuracies as fractions)."
    )
    return click.option(
        "--format", "fmt", type=click.Choice(list(choices)), default="table", show_default=True, help=text
    )


def data_dir_option(fn: Callable) -> Callable:
    """``--data-dir DIR``: the dataset archives."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder with dataset archives [default: $BENCH_DATA_DIR or ~/.cache/apbench/data].",
    )(fn)


def submissions_option(fn: Callable) -> Callable:
    """``--submissions DIR``: the zoo's manifests."""
    return click.option(
        "--submissions",
        "submissions",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder of <method>/<model_id>.yaml manifests [default: $BENCH_SUBMISSIONS_DIR or the repository's "
        "submissions/].",
    )(fn)


def max_size_option(fn: Callable) -> Callable:
    """``--max-size BYTES``: the largest zoo checkpoint download accepted."""
    return click.option(
        "--max-size",
        type=click.IntRange(min=1),
        default=DEFAULT_MAX_SIZE,
        show_default=True,
        help="Largest checkpoint download accepted, in bytes.",
    )(fn)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange that also refuses nan, which passes every comparison with the bounds."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{number} is not in the range {self._describe_range()}.", param, ctx)
        return number


SPARSITY = FiniteFloatRange(0.0, 1.0, min_open=True, max_open=True)


def check_eps(eps: str | None, norm: str) -> None:
    """Refuse an --eps that is not a finite positive number, or above 1 under L∞ (inputs lie in [0, 1])."""
    if eps is None:
        return
    from bench.data import parse_eps

    try:
        value = parse_eps(eps)
    except ValueError as err:
        raise ValueError(f"--eps: {err}") from None
    if norm == "Linf" and value > 1:
        raise ValueError(
            f"--eps must be in (0, 1] under Linf (inputs lie in [0, 1], so a larger budget allows any image); "
            f"got {eps}: give the budget in [0, 1] units, e.g. 8/255"
        )


def seed_list(seed: int | None, seeds: str | None, seed_option: str) -> list[int]:
    """The pruning seeds: ``--seeds`` (a list with ranges), else the single-seed option, else seed 0."""
    from bench.analysis.replicates import parse_seeds

    if seeds is None:
        return [0 if seed is None else seed]
    if seed is not None:
        raise ValueError(f"give {seed_option} N for one seed or --seeds LIST for several, not both")
    return parse_seeds(seeds)


def fmt_table(rows: list[dict[str, str]]) -> str:
    """Left-aligned columns, two spaces apart, headed by the keys of the first row."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys).rstrip()]
    lines += ["  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys).rstrip() for r in rows]
    return "\n".join(lines)


def accuracy_with_interval(value: float, low: float, high: float) -> str:
    """An accuracy in percent beside its interval, as the analyses print them."""
    return f"{percent(value, width=8)} {interval(low, high, unit='')}"


# How the analyses name the per-sample distance they read (``--distance``).
DISTANCE_NAMES = {"best": "best-known distance", "fmn": "plain FMN distance"}


def method_display_name(key: str) -> str:
    """A method's name as its paper writes it (HYDRA), or the key of one not registered here."""
    if key == "dense":
        return "dense"
    from methods.base import get_method

    try:
        return get_method(key).card.display_name
    except Exception:  # a method name from a submission that is not registered here
        return key


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def no_match(registry, pattern: str) -> None:
    """Refuse a listing pattern that matches nothing: a plain name gets the registry's did-you-mean."""
    if not any(ch in pattern for ch in "*?["):
        registry.get(pattern)  # raises UnknownNameError with the suggestion
    raise ValueError(
        f"no {registry.kind} matches {pattern!r}; known: {', '.join(registry.list())} ({registry.list_command})"
    )
