"""Nära benchmarks: synthetic participants, measurement, and load runs."""
