"""The evaluator's parts; its entry points are :mod:`bench.evaluate`'s.

* :mod:`~bench.evaluation.chunk`: attacking one chunk of samples (clean pass, AutoAttack, FMN, FMN from
  AutoAttack's examples) into per-sample records;
* :mod:`~bench.evaluation.commits`: the store side while an evaluation runs: opening it, committing chunks
  idempotently, which chunks are missing;
* :mod:`~bench.evaluation.finalize`: aggregating the stored rows once every chunk is in, and the summary;
* :mod:`~bench.evaluation.lock`: one running evaluation per (model, run spec) at a time;
* :mod:`~bench.evaluation.workers`: CPU worker processes attacking chunks in parallel;
* :mod:`~bench.evaluation.flags`: the flags an evaluation can raise, and which make it unreliable.
"""
