"""Fixtures of the reliability suite (helpers: faultlib.py)."""
from __future__ import annotations

import pytest

from faultlib import Commands


@pytest.fixture(scope="session")
def commands():
    """Runs ``blockkd`` commands in processes of their own (fork servers shared by the whole suite)."""
    runner = Commands()
    yield runner
    runner.close()
