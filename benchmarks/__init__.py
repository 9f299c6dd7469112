"""Benchmarks and coverage checks for d2_reclass (tests import the coverage matrix from here)."""
