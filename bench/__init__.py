"""Benchmarks of the rewrite (see bench/run.py and bench/README_SECTION.md)."""
