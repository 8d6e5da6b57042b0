"""The run spec: a frozen description of one evaluation, whose stable hash keys the stored results.

Following HELM's ``RunSpec`` and lm-evaluation-harness' ``hash_args``: two runs with the same spec on the
same checkpoint are the same evaluation ("already done" = its stored per-sample rows are complete).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.data import get_dataset_info, parse_eps
from bench.paths import stable_hash

PROTOCOL_NAME = "apbench-1"
NORMS = ("Linf", "L2")
AA_VERSIONS = ("plus", "standard")
# The L2 budget an evaluation takes when none is given (every dataset's L∞ default is its DatasetInfo.default_eps).
DEFAULT_L2_EPS = "0.5"
# Where FMN starts besides the clean input: "none" (plain FMN only, the protocol before best-known distances) or
# "autoattack" (a second FMN run from AutoAttack's adversarial example wherever AutoAttack broke the sample).
FMN_INITS = ("none", "autoattack")
# The value of a field that specs written before the field existed had implicitly; such a field is left out of
# to_dict() at that value, so every spec stored before it keeps its hash (and its protocol hash).
_LEGACY_DEFAULTS = {"fmn_init": "none"}

# AutoAttack stages in the order pyautoattack runs them (protocol section 3).
AA_ATTACKS = {
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
}


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines an evaluation's per-sample results.

    Built from one budget: ``RunSpec(dataset="digits", n_samples=360, norm="Linf", eps="0.2")`` derives
    ``eps_value`` from ``eps``; an ``eps_value`` given beside it must be that value (a stored spec read back with
    :meth:`from_dict` has both). :meth:`for_dataset` fills in the defaults ``bench evaluate`` uses.

    Attributes:
        dataset: registered dataset name.
        n_samples: the first N samples of the canonical test split are evaluated.
        norm: threat model, ``"Linf"`` or ``"L2"``.
        eps: the perturbation budget as written (``"8/255"``, ``"0.2"``): the text is part of the hash, so
            ``"8/255"`` and ``"0.03137254901960784"`` are different keys.
        eps_value: ``eps`` as a float (:func:`bench.data.parse_eps`), derived when not given.
        version: AutoAttack version, ``"plus"`` (default) or ``"standard"``.
        fmn_steps: FMN iterations.
        batch_size: samples per chunk; chunks are the unit of attack batching and of resumption, so
            results depend on it (AutoAttack is not bitwise batch-invariant).
        seed: the seed given to every attack.
        device: torch device string.
        fmn_init: ``"autoattack"`` (default): FMN also starts from AutoAttack's adversarial example wherever
            AutoAttack broke the sample, and the best-known minimal distance is stored per sample;
            ``"none"``: plain FMN only, the protocol of every evaluation stored before this field existed
            (such a stored spec has no ``fmn_init`` key: read it with :meth:`from_dict`).
    """

    dataset: str
    n_samples: int
    norm: str
    eps: str
    eps_value: float | None = None
    version: str = "plus"
    fmn_steps: int = 100
    batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    protocol: str = field(default=PROTOCOL_NAME)
    fmn_init: str = "autoattack"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        if self.version not in AA_VERSIONS:
            raise ValueError(f"unknown AutoAttack version {self.version!r}; use one of {', '.join(AA_VERSIONS)}")
        for name in ("n_samples", "fmn_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.eps_value is not None and not (math.isfinite(self.eps_value) and self.eps_value > 0):
            raise ValueError(f"eps must be a finite positive number, got {self.eps!r}")
        value = parse_eps(self.eps)
        if self.eps_value is not None and self.eps_value != value:
            raise ValueError(
                f"eps {self.eps!r} is {value!r}, but eps_value {self.eps_value!r} was given with it; give eps alone "
                "(eps_value is derived from it)"
            )
        # The parsed float, also where an equal int was given: the hash must not depend on how it was spelled.
        object.__setattr__(self, "eps_value", value)
        if self.fmn_init not in FMN_INITS:
            raise ValueError(f"unknown FMN start {self.fmn_init!r}; use one of {', '.join(FMN_INITS)}")

    @classmethod
    def for_dataset(
        cls,
        dataset: str,
        *,
        n_samples: int | None = None,
        eps: str | float | None = None,
        norm: str = "Linf",
        version: str = "plus",
        fmn_steps: int = 100,
        batch_size: int | None = None,
        seed: int = 0,
        device: str = "cpu",
    ) -> RunSpec:
        """The spec ``bench evaluate`` builds from the same options: an option left ``None`` takes the dataset's
        protocol value, so the same settings give the same key from Python and from the shell.

        Args:
            dataset: a registered dataset (``bench datasets``).
            n_samples: the first N test samples [default: the dataset's protocol N, else its whole test split].
            eps: the budget as written, ``"8/255"`` or ``"0.3"`` [default: the dataset's under L∞, 0.5 under L2].
                A float is written with ``repr`` (``0.3`` is ``"0.3"``, as ``--eps 0.3`` gives); write a fraction
                as text (``"8/255"``) to share the key of evaluations run with ``--eps 8/255``.
            norm, version, fmn_steps, seed, device: as the fields.
            batch_size: samples per chunk [default: the dataset's ``default_batch_size``].

        Raises:
            UnknownNameError: an unregistered dataset.
            ValueError: ``n_samples`` outside 1 .. the test split's size, an unreadable budget, an L∞ budget above
                1, or an invalid field; the message names the fix.
        """
        info = get_dataset_info(dataset)
        if n_samples is not None and not 1 <= n_samples <= info.test_size:
            raise ValueError(
                f"n_samples must be between 1 and {info.test_size} (the {dataset} test split); got {n_samples}"
            )
        if eps is None:
            eps = info.default_eps if norm == "Linf" else DEFAULT_L2_EPS
        elif isinstance(eps, (int, float)) and not isinstance(eps, bool):
            eps = repr(eps)
        if norm == "Linf" and parse_eps(eps) > 1:
            raise ValueError(
                f"eps must be in (0, 1] under Linf (inputs lie in [0, 1], so a larger budget allows any image); "
                f"got {eps}: give the budget in [0, 1] units, e.g. 8/255"
            )
        return cls(
            dataset=dataset,
            n_samples=n_samples if n_samples is not None else info.default_n or info.test_size,
            norm=norm,
            eps=eps,
            version=version,
            fmn_steps=fmn_steps,
            batch_size=batch_size if batch_size is not None else info.default_batch_size,
            seed=seed,
            device=device,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        """The spec a stored ``spec`` dict describes; a key it lacks takes the value it had before it existed."""
        return cls(**{**_LEGACY_DEFAULTS, **d})

    @property
    def attacks(self) -> tuple[str, ...]:
        return AA_ATTACKS[self.version]

    def to_dict(self) -> dict[str, Any]:
        """Every field, except a field added later that holds its legacy value (so old specs keep their hash)."""
        d = asdict(self)
        for key, legacy in _LEGACY_DEFAULTS.items():
            if d[key] == legacy:
                del d[key]
        return d

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`to_dict`: the key of stored results."""
        return stable_hash(self.to_dict())

    @property
    def protocol_hash(self) -> str:
        """Hash of the fields that make two evaluations comparable sample by sample (not device, batch)."""
        d = self.to_dict()
        for key in ("device", "batch_size"):
            d.pop(key)
        return stable_hash(d)

    def chunks(self) -> list[range]:
        """Sample-id ranges attacked together and committed together."""
        return [range(s, min(s + self.batch_size, self.n_samples)) for s in range(0, self.n_samples, self.batch_size)]
