"""Tests of bench.evaluation."""
