"""Fixtures of the doctor tests. Must not import PySide6."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def needs_root() -> None:
    """Root-owned files, namespaces and other users need root; CI runs as root, so a
    missing root is a failure, never a skip."""
    if os.geteuid() != 0:
        pytest.fail("this doctor test needs root (tests/run-all.sh runs as root)")
