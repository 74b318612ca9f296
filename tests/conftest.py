"""Shared pytest fixtures (kept minimal)."""

from pathlib import Path

import pytest


@pytest.fixture
def REPO_ROOT() -> Path:
    """The checkout's root: where jobs/ lives and where `python -m fedpipe_dist` must run."""
    return Path(__file__).resolve().parents[1]
