"""Benchmarks of the aggregation rules (run them with ``fedlora bench ...``)."""
