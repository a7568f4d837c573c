"""Benchmarks: each prints a one-line summary and writes JSON under benchmarks/results/."""
