"""Tests of bench.executors."""
