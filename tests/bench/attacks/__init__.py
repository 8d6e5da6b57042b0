"""Tests of bench.attacks."""
