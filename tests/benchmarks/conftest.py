"""Fixtures for the benchmark smoke tests come from tests/conftest.py (served_checkpoint)."""
