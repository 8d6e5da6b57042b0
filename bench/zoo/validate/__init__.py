"""``bench submit validate``: every check a submission must pass, each failure naming file, field, reason and fix.

Offline (no network): the file's place and name, the YAML (safe, no aliases, no duplicate keys), the schema
(:mod:`.reading`); the model id against the fields, the registries (methods, architectures, datasets, checkpoint
formats), the dense parent, the size cap and the rules for seeded entries, one small function each
(:mod:`.rules`); unique ids and checkpoints across files (:mod:`.batch`). Online, in addition
(:mod:`.online`): the checkpoint is fetched (size-capped, resumable, sha256-checked), loaded through its
converter weights-only, its sparsity is measured against the claim (:data:`SPARSITY_TOLERANCE`), and its clean
accuracy on the first test samples is compared with the reported one when the dataset is on this machine
(:func:`clean_accuracy_interval`). What a check finds is a :class:`Problem` in a :class:`FileReport`
(:mod:`.report`).

A manifest's text reaches terminals and CI logs, where a line break can start a workflow command
(``::error ...``) and an escape sequence can rewrite the screen: every message that echoes a field's location, a
path or a value goes through :func:`bench.zoo.manifest.printable`.
"""

from bench.zoo.validate.batch import check_same_checkpoint, validate_paths
from bench.zoo.validate.online import check_online, clean_accuracy_interval, load_entry_model
from bench.zoo.validate.reading import check_location, manifest_paths, read_manifest, read_tree
from bench.zoo.validate.report import (
    CLEAN_CONFIDENCE,
    CLEAN_SAMPLES,
    CLEAN_SLACK,
    MAX_MANIFEST_BYTES,
    REQUIRED_FOR_NEW,
    SPARSITY_TOLERANCE,
    FileReport,
    Problem,
    ValidationOptions,
)
from bench.zoo.validate.rules import RULES, Context, Rule, check_semantics, rule

__all__ = [
    "CLEAN_CONFIDENCE",
    "CLEAN_SAMPLES",
    "CLEAN_SLACK",
    "MAX_MANIFEST_BYTES",
    "REQUIRED_FOR_NEW",
    "RULES",
    "SPARSITY_TOLERANCE",
    "Context",
    "FileReport",
    "Problem",
    "Rule",
    "ValidationOptions",
    "check_location",
    "check_online",
    "check_same_checkpoint",
    "check_semantics",
    "clean_accuracy_interval",
    "load_entry_model",
    "manifest_paths",
    "read_manifest",
    "read_tree",
    "rule",
    "validate_paths",
]
