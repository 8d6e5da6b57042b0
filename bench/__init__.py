"""apbench: a standardized, per-sample robustness benchmark for adversarially pruned networks."""

__version__ = "0.1.0"
