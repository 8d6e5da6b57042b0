"""apbench from Python: evaluate a model (in memory or a checkpoint file) with the benchmark's protocol, prune one,
read the stored results. The same code path as the ``bench`` command line; see :mod:`bench.api`.

    import apbench
    result = apbench.evaluate(model, dataset="digits", n_samples=40)
    print(result)
    result.samples.head()
"""

from bench.api import EvaluationResult, Pruned, evaluate, load_results, prune, state_dict_sha256
from bench.spec import RunSpec

__all__ = ["EvaluationResult", "Pruned", "RunSpec", "evaluate", "load_results", "prune", "state_dict_sha256"]
