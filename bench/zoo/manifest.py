"""The submission manifest: one YAML file per checkpoint, ``submissions/<method>/<model_id>.yaml``.

People write these files by hand and send them by pull request, so this is the trust boundary where pydantic
belongs (pydantic at the edge, plain dataclasses inside): every field is typed, unknown fields are refused, and
:func:`manifest_json_schema` publishes the schema (``submissions/schema.json``, ``bench submit schema``).

What the schema alone cannot say is checked in :mod:`bench.zoo.validate`: the model id against the fields, the
registries (methods, architectures, datasets, checkpoint formats), the seeded-entry rules, the file's place.

Text fields are plain text. HTML in them is not an error and is never interpreted: it is stored verbatim and
escaped wherever it is shown (the site's Jinja2 autoescape, :mod:`bench.zoo.robustbench` for RobustBench's
HTML-bearing JSON).

Download URLs are ``https://`` to a public host. Loopback hosts (``127.0.0.1``, ``::1``, ``localhost``), and
plain ``http://`` to them, are accepted only when the environment sets ``APBENCH_ALLOW_LOOPBACK=1`` (the test
suite's checkpoint server does); private, link-local, multicast, unspecified and reserved addresses are never
accepted. :mod:`bench.zoo.downloader` checks the addresses a host name resolves to, and every redirect, the same way.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import unicodedata
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION = 1
SCHEMA_ID = f"urn:apbench:submission-manifest:{SCHEMA_VERSION}"

# <ShortName>_<Author><Year><Word>_<Arch>_<Dataset>_<US|S>_<sparsity>[_<tag>] (protocol section 7, the APB's keys).
_MODEL_ID_PARTS = (
    r"^(?P<short>[A-Za-z][A-Za-z0-9]*)_(?P<paper>[A-Z][A-Za-z-]*[0-9]{4}[A-Z][A-Za-z0-9]*)_(?P<arch>[A-Za-z0-9]+)"
    r"_(?P<dataset>[A-Z0-9]+)_(?P<structure>US|S)_(?P<sparsity>0|[1-9][0-9]?(?:p[0-9]+)?)(?:_(?P<tag>[A-Za-z0-9]+))?$"
)
MODEL_ID_RE = re.compile(_MODEL_ID_PARTS)
# The same pattern without group names, which JSON Schema's (ECMA-262) regular expressions do not spell this way.
MODEL_ID_PATTERN = re.sub(r"\(\?P<\w+>", "(", _MODEL_ID_PARTS)
MODEL_ID_MAX_LENGTH = 150
METHOD_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
AP_KEY_PATTERN = r"^[A-Za-z][A-Za-z0-9]*_[A-Z][A-Za-z-]*[0-9]{4}[A-Z][A-Za-z0-9]*$"
ROBUSTBENCH_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,99}"
DENSE_PARENT_PATTERN = rf"^(?:robustbench:{ROBUSTBENCH_NAME_PATTERN}|[A-Za-z][A-Za-z0-9_-]{{0,149}})$"
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Keys people choose (taxonomy.training, unknown): printable ASCII only, so they cannot carry terminal escapes or
# line breaks into a log ('/' for training types such as 1S/IT).
FREE_KEY_PATTERN = r"^[A-Za-z0-9_./ -]{1,64}$"
URL_SCHEMA_PATTERN = "^https?://"  # published in the JSON Schema; the validators below say more
ALLOW_LOOPBACK_ENV = "APBENCH_ALLOW_LOOPBACK"
DENSE = "dense"  # the method key of an unpruned parent

# The short architecture names of the ids (the APB's R18/V16); other architectures use their name without
# separators (see :func:`arch_token`).
ARCH_TOKENS = {
    "resnet18": "R18",
    "resnet34": "R34",
    "resnet56": "R56",
    "vgg16_bn": "V16",
    "vgg16_bn_hydra": "V16",
    "vgg16_mad": "V16",
    "vgg16_pwoa": "V16",
    "wrn28_4": "WRN28x4",
    "wrn28_10": "WRN28x10",
    "wrn34_10": "WRN34x10",
    "mobilenetv2": "MBV2",
    "small_cnn": "SmallCNN",
}

# Fields a seeded entry may leave null, each only with a reason under ``unknown``; a new submission gives them all.
KNOWABLE_FIELDS = (
    "paper.url",
    "paper.venue",
    "paper.year",
    "paper.bibtex",
    "model.granularity",
    "model.claimed_sparsity",
    "model.additional_data",
    "checkpoint.url",
    "checkpoint.sha256",
    "checkpoint.size",
    "reported.clean",
    "reported.robust",
    "reported.attack",
    "dense_parent",
    "license",
)

_CONTROL_CATEGORIES = {"Cc", "Cf", "Co", "Cs"}


def printable(text: object) -> str:
    """``text`` on one line with nothing a terminal or a CI log interprets: line breaks, escape sequences and
    invisible formatting characters are written as Python escapes (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def arch_token(arch: str) -> str:
    """The architecture's part of a model id: ``R18`` for ``resnet18``; otherwise its name without separators."""
    return ARCH_TOKENS.get(arch) or re.sub(r"[^A-Za-z0-9]", "", arch)


def dataset_token(dataset: str) -> str:
    """The dataset's part of a model id: ``CIFAR10`` for ``cifar10``."""
    return re.sub(r"[^A-Za-z0-9]", "", dataset).upper()


def sparsity_token(sparsity: float) -> str:
    """The sparsity's part of a model id, in percent: ``90`` for 0.9, ``99p5`` for 0.995, ``0`` for a dense model."""
    percent = round(sparsity * 100, 6)
    text = f"{percent:.6f}".rstrip("0").rstrip(".")
    return text.replace(".", "p")


def parse_sparsity_token(token: str) -> float:
    return float(token.replace("p", ".")) / 100


def _plain_text(multiline: bool):
    def check(value: str) -> str:
        bad = [
            ch for ch in value if unicodedata.category(ch) in _CONTROL_CATEGORIES and not (multiline and ch in "\n\t")
        ]
        if bad:
            shown = ", ".join(sorted({f"U+{ord(ch):04X}" for ch in bad}))
            raise ValueError(
                f"contains control or invisible formatting characters ({shown}); use plain text"
                + ("" if multiline else " on one line")
            )
        return value

    return AfterValidator(check)


Line = Annotated[str, StringConstraints(min_length=1, max_length=500), _plain_text(multiline=False)]
Paragraph = Annotated[str, StringConstraints(min_length=1, max_length=5000), _plain_text(multiline=True)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def loopback_allowed() -> bool:
    """Whether ``$APBENCH_ALLOW_LOOPBACK`` is ``1``: tests serve checkpoints from 127.0.0.1."""
    return os.environ.get(ALLOW_LOOPBACK_ENV, "") == "1"


def refused_address(address: str, *, allow_loopback: bool | None = None) -> str | None:
    """Why the benchmark must not connect to the IP ``address`` (e.g. ``"a private address"``), or None.

    Only public unicast addresses are accepted, and loopback ones when :func:`loopback_allowed` (or
    ``allow_loopback``) says so. An IPv4 address mapped into IPv6 (``::ffff:10.0.0.1``) is judged as IPv4.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        allowed = loopback_allowed() if allow_loopback is None else allow_loopback
        return None if allowed else f"a loopback address (allowed only with {ALLOW_LOOPBACK_ENV}=1, in tests)"
    for kind, flag in (
        ("an unspecified", ip.is_unspecified),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),
        ("a reserved", ip.is_reserved),
    ):
        if flag:
            return f"{kind} address"
    return None if ip.is_global else "not a public address"


def literal_address(host: str) -> str | None:
    """The IP address ``host`` spells, in the resolver's reading (``127.1`` and ``0x7f000001`` are 127.0.0.1)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_loopback_name(host: str) -> bool:
    """``localhost`` and its subdomains (RFC 6761), which resolvers answer with a loopback address."""
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


def check_download_url(value: str) -> str:
    """An ``https://`` URL to a public host; see the module docstring for loopback (tests only).

    This is what the text says; :mod:`bench.zoo.downloader` also checks what the host name resolves to.
    """
    scheme = value.split(":", 1)[0] if ":" in value else ""
    if scheme not in ("https", "http") or not value.startswith(f"{scheme}://"):
        raise ValueError(
            f"must be an https:// URL (http:// only for 127.0.0.1/localhost with {ALLOW_LOOPBACK_ENV}=1, in tests), "
            f"got scheme {scheme or 'none'!r}"
        )
    host = (_url_parts(value).hostname or "").lower()
    address = literal_address(host)
    loopback = is_loopback_name(host) or (address is not None and ipaddress.ip_address(address).is_loopback)
    if loopback and not loopback_allowed():
        raise ValueError(
            f"points at this machine ({host}); loopback hosts are accepted only with {ALLOW_LOOPBACK_ENV}=1, in tests"
        )
    if address is not None:
        reason = refused_address(address)
        if reason is not None:
            raise ValueError(f"points at {address}, {reason}; give a public https:// download link")
    if scheme == "http" and not loopback:
        raise ValueError(
            f"must be an https:// URL (http:// only for 127.0.0.1/localhost with {ALLOW_LOOPBACK_ENV}=1, in tests), "
            "got scheme 'http'"
        )
    return value


def check_link_url(value: str) -> str:
    """A web link (http or https) for people to follow; never fetched by the benchmark."""
    scheme = value.split(":", 1)[0] if ":" in value else ""
    if scheme not in ("http", "https") or not value.startswith(f"{scheme}://"):
        raise ValueError(f"must be an http:// or https:// link, got scheme {scheme or 'none'!r}")
    _url_parts(value)
    return value


def _url_parts(value: str):
    if any(ch.isspace() or unicodedata.category(ch) in _CONTROL_CATEGORIES for ch in value):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(value)
    if not parts.netloc or not parts.hostname:
        raise ValueError("must be an absolute URL with a host, e.g. https://example.org/model.pt")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user name or password (user:password@host)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as err:
        raise ValueError(f"has an invalid port: {err}") from None
    return parts


DownloadUrl = Annotated[
    str,
    StringConstraints(max_length=2000),
    AfterValidator(check_download_url),
    Field(json_schema_extra={"pattern": URL_SCHEMA_PATTERN}),
]
LinkUrl = Annotated[
    str,
    StringConstraints(max_length=2000),
    AfterValidator(check_link_url),
    Field(json_schema_extra={"pattern": URL_SCHEMA_PATTERN}),
]
FreeKey = Annotated[str, StringConstraints(pattern=FREE_KEY_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Paper(_Strict):
    """The paper that describes the method (and, usually, the checkpoint)."""

    title: Line
    authors: list[Line] = Field(min_length=1, max_length=100, description="Author names, in the paper's order.")
    venue: Line | None = Field(description="Where it was published, e.g. 'NeurIPS' or 'arXiv'.")
    year: int | None = Field(ge=1950, le=2100)
    url: LinkUrl | None = Field(description="Link to the paper (arXiv, proceedings).")
    bibtex: Paragraph | None = Field(description="The BibTeX entry, verbatim.")


class Taxonomy(_Strict):
    """The method's place in the taxonomy of Piras et al. 2024 (the APB); needed for external methods."""

    pipeline: Literal["A", "B", "D"] = Field(description="A: prune after training, B: before, D: during.")
    training: dict[FreeKey, Line] = Field(
        max_length=10,
        json_schema_extra={"additionalProperties": False},
        description="Training types of the pipeline's steps, e.g. {pretraining: AT-TRADES, finetuning: AT-TRADES, "
        "1S/IT: 1S}.",
    )
    structure: Literal["US", "S"]
    scope: Literal["local", "global"]
    criterion: Literal["LWM", "SOLWM", "RELWM", "SPALWM", "LIS", "HGM", "BCS"]


class ExternalMethod(_Strict):
    """A pruning method this project has no adapter for (its checkpoints can still be evaluated)."""

    display_name: Line
    ap_key: Annotated[str, StringConstraints(pattern=AP_KEY_PATTERN, max_length=100)] = Field(
        description="<ShortName>_<Author><Year><Word>, the start of the model id (e.g. HARP_Zhao2023Holistic)."
    )
    taxonomy: Taxonomy


class ModelInfo(_Strict):
    """What the network is and what was claimed about its sparsity."""

    arch: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = Field(
        description="A registered architecture (bench models)."
    )
    dataset: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = Field(
        description="A registered dataset (bench datasets)."
    )
    threat_model: Literal["Linf", "L2"] = Field(description="The threat model the model was trained for.")
    eps: Annotated[str, StringConstraints(pattern=r"^[0-9eE.+-]+(/[0-9eE.+-]+)?$", max_length=40)] = Field(
        description="Its budget as written, e.g. '8/255'."
    )
    structure: Literal["US", "S"] = Field(description="US: weights pruned, S: filters/channels/layers pruned.")
    granularity: Literal["weights", "filters", "channels", "layers"] | None = Field(
        description="What was removed: weights (US), or filters, channels or layers (S)."
    )
    sparsity: Fraction = Field(description="The nominal sparsity of the model id (the method's target), 0 for dense.")
    claimed_sparsity: Fraction | None = Field(
        description="Claimed fraction of exactly-zero Conv2d/Linear weights (biases and BatchNorm excluded), "
        "the benchmark's sparsity; validation measures it."
    )
    additional_data: bool | None = Field(description="Whether training used data beyond the dataset's train split.")
    number_forward_passes: int = Field(default=1, ge=1, le=1000, description="Forward passes per prediction.")


class Checkpoint(_Strict):
    """Where the weights are and how to read them."""

    url: DownloadUrl | None = Field(description="Direct download link (https).")
    sha256: Annotated[str, StringConstraints(pattern=SHA256_PATTERN)] | None = Field(
        description="sha256 of the file, 64 lower-case hexadecimal characters (sha256sum FILE)."
    )
    size: int | None = Field(gt=0, description="Size of the file in bytes.")
    format: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,39}$")] = Field(
        description="Native format, one of the converters (bench formats)."
    )
    file_name: Annotated[str, StringConstraints(pattern=FILE_NAME_PATTERN)] = Field(
        description="A plain file name whose extension says how the file is read (.pt, .pth, .pth.tar, .t7, "
        ".safetensors, ...)."
    )
    k: float | None = Field(default=None, gt=0.0, le=1.0, description="HYDRA's kept fraction, for hydra-subnet.")


class Report(_Strict):
    """Accuracies published for this checkpoint, as fractions in [0, 1], with the attack behind them."""

    clean: Fraction | None
    robust: Fraction | None
    attack: Line | None = Field(description="The attack (and its budget) behind the robust accuracy.")
    eps: Annotated[str, StringConstraints(pattern=r"^[0-9eE.+-]+(/[0-9eE.+-]+)?$", max_length=40)] | None = Field(
        default=None, description="The eps of the robust accuracy when it is not the model's."
    )
    n_samples: int | None = Field(default=None, ge=1, description="Test samples behind the numbers.")
    source: Line = Field(description="Where the numbers are printed (paper table, README, leaderboard).")
    kind: Literal["claim", "reevaluation"] = Field(
        default="claim",
        description="'claim': the authors' own published numbers (the re-evaluation drop is measured against "
        "these); 'reevaluation': another benchmark's measurement of this checkpoint (e.g. the APB leaderboard, "
        "RobustBench), shown beside ours but never used as the claim.",
    )


class Manifest(_Strict):
    """A checkpoint submitted to the benchmark (``submissions/<method>/<model_id>.yaml``)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title="apbench submission manifest",
        json_schema_extra={"$id": SCHEMA_ID, "$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    schema_version: Literal[SCHEMA_VERSION] = Field(description="Version of this schema.")
    model_id: Annotated[str, StringConstraints(pattern=MODEL_ID_PATTERN, max_length=MODEL_ID_MAX_LENGTH)] = Field(
        description="<ShortName>_<Author><Year><Word>_<Arch>_<Dataset>_<US|S>_<sparsity>[_<tag>], equal to the file "
        "name without .yaml."
    )
    method: Annotated[str, StringConstraints(pattern=METHOD_KEY_PATTERN)] = Field(
        description="A registered method (bench methods), 'dense' for an unpruned parent, or a new key described "
        "by external_method; also the folder the file sits in."
    )
    external_method: ExternalMethod | None = Field(
        default=None, description="Only for methods without an adapter here: name, key and taxonomy."
    )
    paper: Paper
    model: ModelInfo
    checkpoint: Checkpoint
    reported: Report = Field(description="The numbers published for this checkpoint.")
    other_reports: list[Report] = Field(default_factory=list, max_length=20, description="Further published numbers.")
    dense_parent: Annotated[str, StringConstraints(pattern=DENSE_PARENT_PATTERN)] | None = Field(
        description="The dense model it was pruned from: another manifest's model_id, or robustbench:<ModelName>."
    )
    license: Line | None = Field(description="The checkpoint's license (SPDX id where there is one).")
    verified: bool = Field(
        default=True,
        description="false only for seeded entries whose sha256 is not known yet (recorded on first download).",
    )
    source: Paragraph = Field(description="Who submits it, and where the URL and the numbers come from.")
    unknown: dict[FreeKey, Line] = Field(
        default_factory=dict,
        json_schema_extra={"additionalProperties": False},
        description="For seeded entries: why each null field is not known (field path -> reason).",
    )
    notes: Paragraph | None = None


def manifest_json_schema() -> dict[str, Any]:
    """The published JSON Schema of :class:`Manifest` (``submissions/schema.json``)."""
    schema = Manifest.model_json_schema()
    return {"$schema": schema.pop("$schema"), "$id": schema.pop("$id"), **schema}
