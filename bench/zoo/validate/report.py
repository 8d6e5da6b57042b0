"""What validation finds and how it is tuned: :class:`Problem`, :class:`FileReport`, :class:`ValidationOptions`.

The limits a submission is held to live here too, so that reading, the rules and the online checks share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.zoo.fetch import DEFAULT_MAX_SIZE
from bench.zoo.manifest import Manifest, printable

SPARSITY_TOLERANCE = 0.005  # 0.5 percentage points of the canonical sparsity
CLEAN_SAMPLES = 500
CLEAN_CONFIDENCE = 0.999
CLEAN_SLACK = 0.01  # one percentage point on either side of the interval
MAX_MANIFEST_BYTES = 64 * 1024
# Required of a new submission; the other knowable fields may be null with a reason under `unknown`.
REQUIRED_FOR_NEW = (
    "paper.url",
    "paper.venue",
    "paper.year",
    "model.claimed_sparsity",
    "checkpoint.url",
    "checkpoint.sha256",
    "checkpoint.size",
    "reported.clean",
    "reported.robust",
    "reported.attack",
    "license",
)

# How to fix a schema error, by field (the first matching prefix wins).
FIX_HINTS = {
    "model_id": "name it <ShortName>_<Author><Year><Word>_<Arch>_<Dataset>_<US|S>_<sparsity>, "
    "e.g. HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90",
    "method": "use a method key from `bench methods`, 'dense', or a new lower-case key with external_method",
    "checkpoint.url": "give a direct https:// download link to the file",
    "checkpoint.sha256": "run `sha256sum FILE` on the exact uploaded file and paste the 64 lower-case hex characters",
    "checkpoint.size": "give the file's size in bytes (`stat -c %s FILE`)",
    "checkpoint.file_name": "a plain file name such as model_best.pth.tar (letters, digits, '.', '_', '-')",
    "checkpoint.format": "one of `bench formats`",
    "paper.url": "a link such as https://arxiv.org/abs/2002.10509",
    "model.eps": "write it as a number or fraction, e.g. '8/255' (quoted)",
    "reported": "give accuracies as fractions in [0, 1], e.g. 0.4334 for 43.34 %",
    "model.sparsity": "a fraction in [0, 1), e.g. 0.9",
    "model.claimed_sparsity": "a fraction in [0, 1]: exactly-zero Conv2d/Linear weights over all of them",
}


@dataclass(frozen=True)
class Problem:
    """One finding. ``level`` is ``error`` (the submission is refused), ``warning`` or ``note``."""

    level: str
    field: str
    message: str
    fix: str = ""

    def render(self) -> str:
        fix = f" Fix: {printable(self.fix)}" if self.fix else ""
        return f"{self.level:<7} {printable(self.field)}: {printable(self.message)}{fix}"


def error(field_: str, message: str, fix: str = "") -> Problem:
    """A finding that refuses the submission."""
    return Problem("error", field_, message, fix)


def warning(field_: str, message: str, fix: str = "") -> Problem:
    """A finding shown to the submitter that does not refuse the submission."""
    return Problem("warning", field_, message, fix)


def note(field_: str, message: str) -> Problem:
    """Information for the submitter and the reviewers (no fix needed)."""
    return Problem("note", field_, message)


@dataclass
class FileReport:
    """Everything ``bench submit validate`` found about one manifest file."""

    path: Path
    manifest: Manifest | None = None
    problems: list[Problem] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    @property
    def model_id(self) -> str | None:
        return self.manifest.model_id if self.manifest else None

    def error(self, field_: str, message: str, fix: str = "") -> None:
        self.problems.append(error(field_, message, fix))

    def warn(self, field_: str, message: str, fix: str = "") -> None:
        self.problems.append(warning(field_, message, fix))

    def note(self, field_: str, message: str) -> None:
        self.problems.append(note(field_, message))


@dataclass(frozen=True)
class ValidationOptions:
    """Knobs of the online checks.

    Attributes:
        offline: skip everything that needs the network (fetch, load, sparsity, accuracy).
        max_size: download cap in bytes.
        sparsity_tolerance: allowed |measured − claimed| of the canonical sparsity.
        clean_samples: test samples for the clean-accuracy check.
        data_dir: where dataset archives are (never downloaded by validation).
        device: torch device for the accuracy check.
        cache_root: the zoo cache folder (default ``$BENCH_CACHE_DIR/zoo``).
    """

    offline: bool = False
    max_size: int = DEFAULT_MAX_SIZE
    sparsity_tolerance: float = SPARSITY_TOLERANCE
    clean_samples: int = CLEAN_SAMPLES
    data_dir: str | None = None
    device: str = "cpu"
    cache_root: Path | None = None
