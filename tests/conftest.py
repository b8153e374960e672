import os

import pytest
from hypothesis import settings

from retain import _native

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every fresh kernel output starts as NaN, so an element a kernel forgets to write fails."""
    monkeypatch.setattr(_native, "poison_outputs", True)
    yield
