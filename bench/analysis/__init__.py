"""Pure functions over stored per-sample records: accuracies, intervals, statistics.

:mod:`~bench.analysis.records` loads one evaluation into arrays; :mod:`~bench.analysis.thin_ice` (samples on
thin ice), :mod:`~bench.analysis.paired` (McNemar), :mod:`~bench.analysis.curves` (security curves, per-stage
breakdown) and :mod:`~bench.analysis.reported` (authors' claims, other benchmarks' re-evaluations, re-evaluation
drops) compute on them; :mod:`~bench.analysis.export` writes tables as formula-safe CSV.
Accuracies are fractions in [0, 1]; percentages and drops (percentage points) are named as such.
"""

from bench.analysis.curves import attack_breakdown, security_curve
from bench.analysis.paired import McNemar, mcnemar
from bench.analysis.records import EvaluationRecords, IncomparableError, latest_evaluation, load_records
from bench.analysis.reported import (
    Reported,
    ReportedNumbers,
    load_reported_table,
    reevaluation_drop,
    reported_for,
    reported_numbers,
)
from bench.analysis.thin_ice import ThinIce, ThinIceError, thin_ice

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
