"""Test-tree configuration: registers the real-proxy lab fixtures (tests/lab/fixtures.py), and
gives the whole run its own XDG state and runtime directories.

Must not import tray_proxy.ui or PySide6 (UI fixtures belong in tests/ui/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.lab.fixtures"]


@pytest.fixture(scope="session", autouse=True)
def _private_xdg_dirs() -> Iterator[None]:
    """The connection history (XDG_STATE_HOME) and the control socket (XDG_RUNTIME_DIR) of
    every app, `tray-proxy run` and `tray-proxy log` a test starts go to a directory of this
    run, removed at its end, never to the user's own (~/.local/state, /tmp/tray-proxy-UID).
    Tests that need other places set their own."""
    top = tempfile.mkdtemp(prefix="tray-proxy-tests-")
    saved = {k: os.environ.get(k) for k in ("XDG_STATE_HOME", "XDG_RUNTIME_DIR")}
    for var, sub in (("XDG_STATE_HOME", "state"), ("XDG_RUNTIME_DIR", "runtime")):
        path = os.path.join(top, sub)
        os.mkdir(path, 0o700)
        os.environ[var] = path
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        shutil.rmtree(top, ignore_errors=True)
