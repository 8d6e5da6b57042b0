"""Pure functions over stored per-sample records: accuracies, intervals, statistics.

:mod:`~bench.analysis.records` loads one evaluation into arrays; :mod:`~bench.analysis.thin_ice` (samples on
thin ice), :mod:`~bench.analysis.paired` (McNemar), :mod:`~bench.analysis.curves` (security curves, per-stage
breakdown) and :mod:`~bench.analysis.reported` (authors' claims, other benchmarks' re-evaluations, re-evaluation
drops) compute on them; :mod:`~bench.analysis.export` writes tables as formula-safe CSV.
Accuracies are fractions in [0, 1]; percentages and drops (percentage points) are named as such.
"""

from importlib import import_module
from typing import Any

# Where each public name lives. They are imported on first use (PEP 562), so that importing one light submodule,
# e.g. bench.analysis.format from the CLI, does not load the store, numpy and scipy through this package.
_HOMES = {
    "attack_breakdown": "curves",
    "security_curve": "curves",
    "McNemar": "paired",
    "mcnemar": "paired",
    "EvaluationRecords": "records",
    "IncomparableError": "records",
    "latest_evaluation": "records",
    "load_records": "records",
    "Reported": "reported",
    "ReportedNumbers": "reported",
    "load_reported_table": "reported",
    "reevaluation_drop": "reported",
    "reported_for": "reported",
    "reported_numbers": "reported",
    "ThinIce": "thin_ice",
    "ThinIceError": "thin_ice",
    "thin_ice": "thin_ice",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = _HOMES[name]
    module = import_module(f"{__name__}.{home}")
    # All of the home's names at once: importing the submodule thin_ice has just bound the package's "thin_ice" to
    # the module, and the function must win, as it did when this package imported it eagerly.
    globals().update({n: getattr(module, n) for n, h in _HOMES.items() if h == home})
    return globals()[name]


__all__ = [
    "EvaluationRecords",
    "IncomparableError",
    "McNemar",
    "Reported",
    "ReportedNumbers",
    "ThinIce",
    "ThinIceError",
    "attack_breakdown",
    "latest_evaluation",
    "load_records",
    "load_reported_table",
    "mcnemar",
    "reevaluation_drop",
    "reported_for",
    "reported_numbers",
    "security_curve",
    "thin_ice",
]
