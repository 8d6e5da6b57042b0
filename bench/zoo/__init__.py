"""The model zoo: submission manifests, their validation, checkpoint fetching, and RobustBench interoperability.

``submissions/<method>/<model_id>.yaml`` (:mod:`bench.zoo.manifest`) describes one public checkpoint;
:mod:`bench.zoo.validate` checks it (``bench submit validate``), :mod:`bench.zoo.fetch` downloads it into the
cache (size-capped, resumable, sha256-verified), :mod:`bench.zoo.zoo` loads them all and resolves ids for
``bench evaluate --model-id`` / ``--zoo``, :mod:`bench.zoo.runs` evaluates the entries one after the other, and
:mod:`bench.zoo.robustbench` exports to and imports from RobustBench.
"""
