"""Adversarial-pruning method adapters and the training pieces they share.

Each adapter module registers its method with ``@register_method`` when it is imported; importing them all
here (as timm's ``timm/models/__init__.py`` imports every model module) means that any import from ``methods``
fills the registry. A new adapter is one file plus one line below.
"""

from methods import admm, atmc, hydra, mad, pwoa, structured

__all__ = ["admm", "atmc", "hydra", "mad", "pwoa", "structured"]
