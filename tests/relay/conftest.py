"""Fixtures for the engine tests: run a test coroutine on asyncio, uvloop or qasync.

Engine tests are plain functions that take the `run` fixture and call `run(coro_fn)`. By
default they run on asyncio and uvloop; a test opts into qasync with
`@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

# Before anything imports Qt: the tests never open a window.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from tests.relay.stubs import LOOPS

# Every test coroutine is bounded, below pytest-timeout so the failure names the coroutine.
COROUTINE_TIMEOUT = 90.0

Runner = Callable[[Callable[[], Awaitable[Any]]], Any]


def _loop_factory(
    kind: str, request: pytest.FixtureRequest
) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "asyncio":
        return asyncio.new_event_loop
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if kind == "qasync":
        import qasync

        app = request.getfixturevalue("qapp")
        return lambda: qasync.QEventLoop(app)
    raise AssertionError(f"unknown loop kind {kind!r}")


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Runner:
    """Run `coro_fn()` to completion on a fresh loop of the parametrized kind."""
    factory = _loop_factory(request.param, request)

    def runner(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(coro_fn(), COROUTINE_TIMEOUT)

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@pytest.fixture
def loop_kind(run: Runner, request: pytest.FixtureRequest) -> str:
    """The name of the loop `run` uses (for tests that size their work by loop)."""
    return str(request.node.callspec.params["run"])


@pytest.fixture(autouse=True)
def no_kerberos_ticket(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    """Engine tests never see the developer's Kerberos tickets: with gssapi installed, a live
    ticket would make Negotiate pick Kerberos where a test expects NTLM. The real Kerberos
    path is tests/integration/test_kerberos_lab.py, against a real KDC."""
    from tray_proxy.relay.spnego_auth import forget_ticket_check

    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path}/no-ticket-cache")
    forget_ticket_check()
    yield
    forget_ticket_check()
