"""Tests of bench.models."""
