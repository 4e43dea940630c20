"""Benchmarks (`make bench`, `python -m tests.bench.run`): results go to BENCHMARKS.md."""
