"""Adversarial attacks as pure functions: ``attack(model, inputs, labels, targeted=False, **hp)`` returns
adversarial inputs (the adv-lib contract). Inputs are in [0, 1] and models return logits.

* :func:`fmn`: Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021), ℓ∞ and ℓ2;
  :func:`minimum_norm` wraps it into per-sample distances and success flags (:class:`FMNResult`).
"""

from bench.attacks.fmn import FMNResult, NotAdversarialError, fmn, minimum_norm

__all__ = ["FMNResult", "NotAdversarialError", "fmn", "minimum_norm"]
