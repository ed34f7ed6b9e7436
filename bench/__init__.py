"""Benchmarks: ``python bench/fanout.py`` (see its docstring). Not part of the test suite."""
