"""Tests of bench.zoo."""
