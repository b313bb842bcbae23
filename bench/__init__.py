"""Benchmarks that print ratios measured in one run (see `python -m bench --help`)."""
