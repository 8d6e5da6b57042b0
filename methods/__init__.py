"""Adversarial-pruning method adapters and the training pieces they share."""
