"""The real relay as a `RelayHandle`: a RelayEngine on its own EngineThread (uvloop when
installed), one new engine and thread per switch-on.

The engine's state belongs to its loop's thread; every call from the controller's thread
hops onto that loop (`call_soon_threadsafe`, `run_coroutine_threadsafe`).

Must not import PySide6 or qasync. Imports the engine only when a relay is started.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from tray_proxy.config import Config
from tray_proxy.controller.services import RelayFactory, RelayHandle, Traffic
from tray_proxy.relay.credentials import CredentialSource
from tray_proxy.relay.events import Observer
from tray_proxy.relay.records import Address

if TYPE_CHECKING:
    from tray_proxy.relay.runner import EngineThread

__all__ = ["EngineRelay", "engine_relay_factory"]

# How long a question to the relay's loop may wait (a loop this busy has other problems).
CALL_TIMEOUT: Final = 5.0


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


def engine_relay_factory(credentials: CredentialSource | None = None) -> RelayFactory:
    """The RelayFactory the app and `tray-proxy run` use."""
    from tray_proxy.relay.engine import RelayEngine
    from tray_proxy.relay.events import EventBus
    from tray_proxy.relay.runner import EngineThread

    def start(config: Config, observer: Observer) -> RelayHandle:
        bus = EventBus()
        bus.subscribe(observer)
        engine = RelayEngine(config.relay, config.upstreams, credentials, bus)
        thread = EngineThread(engine)
        thread.start()
        return EngineRelay(thread)

    return start
