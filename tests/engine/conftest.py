"""Serving fixtures (see tests/serving_fixtures.py)."""
from tests.serving_fixtures import *  # noqa: F401,F403
