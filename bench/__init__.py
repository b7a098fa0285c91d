"""Benchmarks: every figure is reported as a ratio to a ceiling measured in the same run."""
