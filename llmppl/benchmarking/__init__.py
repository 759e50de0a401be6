"""Benchmarks: latency and cost harnesses (``llmppl bench``)."""
