"""The real relay as a `RelayHandle`, one new engine per switch-on, in one of two places:

- `engine_relay_factory`: on its own EngineThread (uvloop when installed), for the tray app,
  whose qasync loop costs about twice the CPU per event (shared/BENCHMARKS.md);
- `loop_relay_factory`: on the controller's own loop, for headless `tray-proxy run`, whose
  loop is already uvloop: one thread, so the relay never waits for the GIL while the
  controller handles its events (a second busy thread cost the relay a third of its
  connections per second in the bench).

The engine's state belongs to its loop's thread; every call from another thread hops onto
that loop (`call_soon_threadsafe`, `run_coroutine_threadsafe`). RelayHandle's blocking
methods are called from worker threads (the controller's executor), never from the loop.

Must not import PySide6 or qasync. Imports the engine only when a relay is started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from tray_proxy.config import Config
from tray_proxy.controller.services import RelayFactory, RelayHandle, Traffic
from tray_proxy.relay.events import Observer
from tray_proxy.relay.records import Address
from tray_proxy.relay.secrets import Credentials, CredentialSource

if TYPE_CHECKING:
    from tray_proxy.relay.engine import RelayEngine
    from tray_proxy.relay.runner import EngineThread
    from tray_proxy.routing.router import Router

T = TypeVar("T")

__all__ = ["EngineRelay", "LoopRelay", "engine_relay_factory", "loop_relay_factory"]

# How long a question to the relay's loop may wait (a loop this busy has other problems).
CALL_TIMEOUT: Final = 5.0
START_TIMEOUT: Final = 30.0


class EngineRelay:
    """A RelayEngine on its own EngineThread, as a RelayHandle."""

    def __init__(self, thread: EngineThread) -> None:
        self._thread = thread

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._thread.engine.addresses

    def stop(self, timeout: float) -> None:
        self._thread.stop(timeout)

    def retry_credentials(self, upstream: str) -> None:
        thread = self._thread
        thread.loop.call_soon_threadsafe(thread.engine.retry_credentials, upstream)

    def update_credentials(self, upstream: str, credentials: Credentials | None) -> None:
        thread = self._thread
        thread.loop.call_soon_threadsafe(thread.engine.set_credentials, upstream, credentials)

    def set_extra_listen(self, addresses: Sequence[str]) -> tuple[Address, ...]:
        wanted = tuple(addresses)
        engine = self._thread.engine

        async def listen() -> tuple[Address, ...]:
            return engine.set_extra_listen(wanted)

        return self._thread.call(listen(), CALL_TIMEOUT)

    def close_connections(self, ids: Iterable[int]) -> int:
        wanted = tuple(ids)
        engine = self._thread.engine

        async def close() -> int:
            return engine.close_connections(wanted)

        return self._thread.call(close(), CALL_TIMEOUT)

    def traffic(self) -> Traffic:
        engine = self._thread.engine

        async def read() -> Traffic:
            return engine.traffic()

        return self._thread.call(read(), CALL_TIMEOUT)

    def reload_routing(self, config: Config) -> None:
        """New upstreams, rules and PAC for new connections; open tunnels stay (issue 15
        section 6). Returns without waiting."""
        thread = self._thread
        thread.loop.call_soon_threadsafe(
            thread.engine.reload_routing, config.routing, config.upstreams, config.relay.upstream
        )

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None:
        """An active probe's outcome feeds the upstream's health. Returns without waiting."""
        thread = self._thread
        thread.loop.call_soon_threadsafe(thread.engine.report_probe, upstream, ok, latency, words)

    def upstream_health(self) -> dict[str, tuple[bool, float | None]]:
        engine = self._thread.engine

        async def read() -> dict[str, tuple[bool, float | None]]:
            return engine.upstream_health()

        return self._thread.call(read(), CALL_TIMEOUT)


def _router_of(config: Config) -> Router:
    from tray_proxy.relay.engine import make_router

    return make_router(config.routing, config.upstreams, config.relay.upstream)


def engine_relay_factory(credentials: CredentialSource | None = None) -> RelayFactory:
    """The RelayFactory the app and `tray-proxy run` use."""
    from tray_proxy.relay.engine import RelayEngine
    from tray_proxy.relay.events import EventBus
    from tray_proxy.relay.runner import EngineThread

    def start(config: Config, observer: Observer) -> RelayHandle:
        bus = EventBus()
        bus.subscribe(observer)
        engine = RelayEngine(
            config.relay, config.upstreams, credentials, bus, router=_router_of(config)
        )
        thread = EngineThread(engine)
        thread.start()
        return EngineRelay(thread)

    return start


class LoopRelay:
    """A RelayEngine on `loop` (the controller's), as a RelayHandle for worker threads."""

    def __init__(self, engine: RelayEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._engine.addresses

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self, timeout: float) -> None:
        self._call(self._engine.stop(), timeout)

    def retry_credentials(self, upstream: str) -> None:
        self._loop.call_soon_threadsafe(self._engine.retry_credentials, upstream)

    def update_credentials(self, upstream: str, credentials: Credentials | None) -> None:
        self._loop.call_soon_threadsafe(self._engine.set_credentials, upstream, credentials)

    def set_extra_listen(self, addresses: Sequence[str]) -> tuple[Address, ...]:
        wanted = tuple(addresses)
        engine = self._engine

        async def listen() -> tuple[Address, ...]:
            return engine.set_extra_listen(wanted)

        return self._call(listen(), CALL_TIMEOUT)

    def close_connections(self, ids: Iterable[int]) -> int:
        wanted = tuple(ids)
        engine = self._engine

        async def close() -> int:
            return engine.close_connections(wanted)

        return self._call(close(), CALL_TIMEOUT)

    def traffic(self) -> Traffic:
        engine = self._engine

        async def read() -> Traffic:
            return engine.traffic()

        return self._call(read(), CALL_TIMEOUT)

    def reload_routing(self, config: Config) -> None:
        self._loop.call_soon_threadsafe(
            self._engine.reload_routing, config.routing, config.upstreams, config.relay.upstream
        )

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None:
        self._loop.call_soon_threadsafe(self._engine.report_probe, upstream, ok, latency, words)

    def upstream_health(self) -> dict[str, tuple[bool, float | None]]:
        engine = self._engine

        async def read() -> dict[str, tuple[bool, float | None]]:
            return engine.upstream_health()

        return self._call(read(), CALL_TIMEOUT)


def loop_relay_factory(
    loop: asyncio.AbstractEventLoop, credentials: CredentialSource | None = None
) -> RelayFactory:
    """A RelayFactory whose engines run on `loop`; it is called from a worker thread (the
    controller starts relays in its executor), so the engine is made and started on `loop`."""
    from tray_proxy.relay.engine import RelayEngine
    from tray_proxy.relay.events import EventBus

    def start(config: Config, observer: Observer) -> RelayHandle:
        async def make() -> RelayEngine:
            bus = EventBus()
            bus.subscribe(observer)
            engine = RelayEngine(
                config.relay, config.upstreams, credentials, bus, router=_router_of(config)
            )
            await engine.start()
            return engine

        future = asyncio.run_coroutine_threadsafe(make(), loop)
        try:
            engine = future.result(START_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise
        return LoopRelay(engine, loop)

    return start
