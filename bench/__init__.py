"""Benchmarks and reports (not part of the installed package): `python -m bench.run`."""
