"""Reasoning evaluation (``llmppl eval``)."""
