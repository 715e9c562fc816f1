"""Small in-memory fakes of what the controller needs of the world (the relay, the
root helper, the settings file, name resolution), shared by the controller's tests. Each
records its calls in one `Log`, so tests can check their order.

No Qt. Every test runs its own asyncio loop with a deadline (`run`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from tray_proxy.config import Config
from tray_proxy.controller import ControllerEvent, Notice, ProxyController, State, StateChanged
from tray_proxy.controller.services import Traffic
from tray_proxy.firewall.client import HelperExitedError, RedirectStatus
from tray_proxy.firewall.ruleset import RuleSpec
from tray_proxy.relay.events import Observer
from tray_proxy.relay.records import Address
from tray_proxy.relay.secrets import Credentials
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

T = TypeVar("T")
DEADLINE = 10.0

CORP = UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp.example", 8080, "alice")
BACKUP = UpstreamProxy("backup", UpstreamKind.SOCKS5, "127.0.0.1", 1080)


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, DEADLINE)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Log:
    """One list of calls shared by the fakes, so tests can check their order."""

    def __init__(self) -> None:
        self.calls: list[str] = []


class FakeStore:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.saved: list[Config] = []

    def load(self) -> Config:
        return self.config

    def save(self, config: Config) -> None:
        self.saved.append(config)
        self.config = config


class FakeRelay:
    def __init__(self, log: Log, observer: Observer, port: int) -> None:
        self.log = log
        self.observer = observer
        self.addresses: tuple[Address, ...] = (("127.0.0.1", port),)
        self.stopped = False
        self.drain_bound: float | None = None

        self.closed_ids: list[tuple[int, ...]] = []
        # What traffic() answers: open connections' counters, total up, total down.
        self.counters: Traffic = ({}, 0, 0)
        self.reloaded: list[Config] = []
        self.probes: list[tuple[str, bool, float | None, str]] = []

    def stop(self, timeout: float) -> None:
        self.log.calls.append("relay.stop")
        self.stopped = True
        self.drain_bound = timeout

    def retry_credentials(self, upstream: str) -> None:
        self.log.calls.append(f"relay.retry {upstream}")

    def update_credentials(self, upstream: str, credentials: Credentials | None) -> None:
        self.log.calls.append(f"relay.update {upstream}")

    def set_extra_listen(self, addresses: Sequence[str]) -> tuple[Address, ...]:
        self.log.calls.append(f"relay.listen {','.join(addresses)}")
        return tuple((a, self.addresses[0][1]) for a in addresses)

    def close_connections(self, ids: Iterable[int]) -> int:
        wanted = tuple(ids)
        self.closed_ids.append(wanted)
        return sum(1 for i in wanted if i in self.counters[0])

    def traffic(self) -> Traffic:
        return self.counters

    def reload_routing(self, config: Config) -> None:
        self.log.calls.append("relay.reload_routing")
        self.reloaded.append(config)

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None:
        self.probes.append((upstream, ok, latency, words))

    def upstream_health(self) -> dict[str, tuple[bool, float | None]]:
        return {}


class FakeRelayFactory:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.relays: list[FakeRelay] = []
        self.configs: list[Config] = []

    def __call__(self, config: Config, observer: Observer) -> FakeRelay:
        self.log.calls.append("relay.start")
        self.configs.append(config)
        relay = FakeRelay(self.log, observer, 12080 + len(self.relays))
        self.relays.append(relay)
        return relay


class FakeRedirect:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.running = False
        self.specs: list[RuleSpec] = []
        self.fail_start: Exception | None = None
        self.fail_remove: Exception | None = None
        self.start_gate: asyncio.Event | None = None

    async def start(self) -> None:
        self.log.calls.append("redirect.start")
        if self.start_gate is not None:
            await self.start_gate.wait()  # e.g. the polkit dialog is open
        if self.fail_start is not None:
            raise self.fail_start
        self.running = True

    async def apply(self, spec: RuleSpec) -> None:
        self.log.calls.append("redirect.apply")
        self.specs.append(spec)

    async def status(self) -> RedirectStatus:
        if not self.running:  # as the real client: a dead helper's status explains its exit
            raise HelperExitedError("The redirect helper stopped with exit code -9")
        return RedirectStatus(active=bool(self.specs), spec=None, table_present=True)

    async def remove(self) -> bool:
        self.log.calls.append("redirect.remove")
        if self.fail_remove is not None:
            raise self.fail_remove
        return True

    async def stop(self) -> int | None:
        self.log.calls.append("redirect.stop")
        self.running = False
        return 0


async def fake_resolve(pairs: Iterable[tuple[str, int]]) -> tuple[Any, ...]:
    return tuple((ipaddress.ip_address("192.0.2.10"), port) for _host, port in pairs)


class Rig:
    def __init__(self, upstreams: tuple[UpstreamProxy, ...] = (CORP, BACKUP), **kw: Any) -> None:
        self.log = Log()
        self.store = FakeStore(Config(RelaySettings(), upstreams))
        self.relays = FakeRelayFactory(self.log)
        self.redirect = FakeRedirect(self.log)
        self.events: list[ControllerEvent] = []
        kw.setdefault("resolver", fake_resolve)
        self.controller = ProxyController(self.store, self.relays, self.redirect, **kw)
        self.controller.subscribe(self.events.append)

    def transitions(self) -> list[tuple[State, State]]:
        return [(e.old, e.new) for e in self.events if isinstance(e, StateChanged)]

    def notices(self) -> list[Notice]:
        return [e for e in self.events if isinstance(e, Notice)]

    def from_engine(self, *events: Any) -> None:
        """Publish like the engine does: from another thread."""
        observer = self.relays.relays[-1].observer
        thread = threading.Thread(target=lambda: [observer(e) for e in events])
        thread.start()
        thread.join(5)
