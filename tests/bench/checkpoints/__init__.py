"""Tests of bench.checkpoints."""
