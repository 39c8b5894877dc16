"""Benchmarks behind `tierstore bench ...`: each returns a JSON-able dict and prints a table."""
