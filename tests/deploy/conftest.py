"""Serving fixtures (see tests/serving_fixtures.py) for the deployment tests."""
from tests.serving_fixtures import *  # noqa: F401,F403
