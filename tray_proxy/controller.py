"""The app's state machine: Off -> Enabling -> On -> Degraded / Error -> Off.

`ProxyController` owns the relay (through a `RelayFactory`, normally an `EngineThread` with its
own loop) and the redirect (a `RedirectService`, normally `firewall.client.RedirectController`),
both injected. While the redirect is on, a `redirect.ManagedRedirect` drives that service, the
same one `tray-proxy run` uses: the same settings check and ruleset, upstream addresses resolved
again every minute, a helper that died started again. It runs on the app's asyncio loop
(qasync in the GUI). Every state transition is a `StateChanged` event; every change of what the
user sees is a `StatusUpdated` with a frozen `Status` snapshot; things worth a desktop
notification are `Notice` events. Observers (the UI bridge, the control socket) only read
these; they never compute state of their own.

Engine events arrive on the relay's thread. They are queued and handed to this loop with one
`call_soon_threadsafe` per burst, not one per event, because each callback costs more on
qasync than on plain asyncio (shared/BENCHMARKS.md).

Must not import PySide6 or qasync (it is tested without Qt and could drive a headless daemon).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import platform
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from tray_proxy import __version__
from tray_proxy.config import Config, ConfigError
from tray_proxy.credentials import CredentialStoreError
from tray_proxy.errors import UserError
from tray_proxy.firewall.client import RedirectError, RedirectStatus
from tray_proxy.firewall.ruleset import IPAddress, RuleSpec, SpecError
from tray_proxy.monitor.health import HealthSnapshot
from tray_proxy.monitor.rows import RowChanges
from tray_proxy.redirect import RESOLVE_INTERVAL_SECONDS, ManagedRedirect, check_redirect_settings
from tray_proxy.relay.credentials import Credentials, CredentialSource
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    EngineStopped,
    Event,
    ListenerError,
    Observer,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult, probe_upstream
from tray_proxy.relay.records import Address, CloseReason
from tray_proxy.relay.settings import UpstreamProxy

log = logging.getLogger(__name__)

__all__ = [
    "ConfigStore",
    "ConnectionsChanged",
    "ErrorEntry",
    "Notice",
    "NoticeKind",
    "ProxyController",
    "RedirectService",
    "RelayFactory",
    "RelayHandle",
    "State",
    "StateChanged",
    "Status",
    "StatusUpdated",
    "UpstreamInfo",
]

# A proxy that failed this many connections in a row (with no success between) is "down".
DOWN_AFTER_FAILURES = 3
LAST_ERRORS = 5
NOTICE_INTERVAL = 60.0  # seconds between two notices of the same kind
WATCH_INTERVAL = 1.0  # how often the helper is checked while the redirect is on
RELAY_START_TIMEOUT = 30.0
REDIRECT_OFF_TIMEOUT = 15.0
RELAY_STOP_MARGIN = 5.0  # on top of the configured drain timeout
# Where Test connection (and the credentials dialog's Test) asks the proxy to connect.
PROBE_TARGET = ("pypi.org", 443)
PROBE_TIMEOUT = 10.0

_DOWN_REASONS = frozenset(
    {
        CloseReason.UPSTREAM_UNREACHABLE,
        CloseReason.UPSTREAM_TIMEOUT,
        CloseReason.UPSTREAM_PROTOCOL_ERROR,
    }
)
_CLOSE_ERRORS = frozenset({CloseReason.NO_UPSTREAM, CloseReason.INTERNAL_ERROR})


class State(enum.Enum):
    OFF = "off"
    ENABLING = "enabling"
    ON = "on"
    DEGRADED = "degraded"
    ERROR = "error"
    DISABLING = "disabling"

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def redirecting(self) -> bool:
        """Is traffic being redirected to the relay in this state?"""
        return self in (State.ON, State.DEGRADED)


_LABELS = {
    State.OFF: "Off",
    State.ENABLING: "Switching on",
    State.ON: "On",
    State.DEGRADED: "Degraded",
    State.ERROR: "Error",
    State.DISABLING: "Switching off",
}

# Which transitions exist. Anything else is a bug in this module, not a user error.
ALLOWED: Mapping[State, frozenset[State]] = {
    State.OFF: frozenset({State.ENABLING}),
    State.ENABLING: frozenset({State.ON, State.ERROR, State.DISABLING}),
    State.ON: frozenset({State.DEGRADED, State.ERROR, State.DISABLING, State.ENABLING}),
    State.DEGRADED: frozenset({State.ON, State.ERROR, State.DISABLING, State.ENABLING}),
    State.ERROR: frozenset({State.ENABLING, State.DISABLING}),
    State.DISABLING: frozenset({State.OFF}),
}


class NoticeKind(enum.Enum):
    CREDENTIALS_REJECTED = "credentials-rejected"
    UPSTREAM_DOWN = "upstream-down"
    UPSTREAM_BACK = "upstream-back"
    HELPER_REFUSED = "helper-refused"
    HELPER_STOPPED = "helper-stopped"
    TEST_RESULT = "test-result"
    KEYRING_UNAVAILABLE = "keyring-unavailable"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class UpstreamInfo:
    name: str
    url: str
    active: bool
    latency: float | None  # latest handshake latency in seconds, from the engine
    failing: bool


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    at: float  # time.time() of the latest occurrence
    text: str
    count: int = 1  # the same text in a row is one entry, so one flapping cause fills no list

    @property
    def display(self) -> str:
        return self.text if self.count == 1 else f"{self.text} ({self.count} times)"


@dataclass(frozen=True, slots=True)
class Status:
    """What the user sees, as one immutable snapshot."""

    state: State = State.OFF
    message: str = "The redirect is off."
    upstream: str | None = None
    upstreams: tuple[UpstreamInfo, ...] = ()
    active_connections: int = 0
    total_connections: int = 0
    last_errors: tuple[ErrorEntry, ...] = ()
    relay_addresses: tuple[Address, ...] = ()
    # Per-upstream latency and failures, traffic rates, failures of the last hour in words.
    health: HealthSnapshot = field(default_factory=HealthSnapshot)

    @property
    def last_error(self) -> str | None:
        return self.last_errors[-1].text if self.last_errors else None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the control socket and `tray-proxy status --json`)."""
        return {
            "state": self.state.value,
            "message": self.message,
            "upstream": self.upstream,
            "upstreams": [
                {
                    "name": u.name,
                    "url": u.url,
                    "active": u.active,
                    "latency_ms": None if u.latency is None else round(u.latency * 1000, 1),
                    "failing": u.failing,
                }
                for u in self.upstreams
            ],
            "active_connections": self.active_connections,
            "total_connections": self.total_connections,
            "last_errors": [
                {"at": e.at, "text": e.text, "count": e.count} for e in self.last_errors
            ],
            "relay_addresses": [list(a) for a in self.relay_addresses],
        }


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: State
    new: State
    message: str


@dataclass(frozen=True, slots=True)
class StatusUpdated:
    status: Status


@dataclass(frozen=True, slots=True)
class Notice:
    kind: NoticeKind
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class ConnectionsChanged:
    """Connection rows that opened, changed or closed (the dashboard's live tables)."""

    changes: RowChanges


ControllerEvent = StateChanged | StatusUpdated | Notice | ConnectionsChanged
ControllerObserver = Callable[[ControllerEvent], None]


# --------------------------------------------------------------------------- services


class RelayHandle(Protocol):
    """A running relay. `stop` blocks (it is called from a worker thread)."""

    @property
    def addresses(self) -> tuple[Address, ...]: ...

    def stop(self, timeout: float) -> None: ...

    def retry_credentials(self, upstream: str) -> None:
        """Forget that `upstream` rejected the credentials (they were just changed)."""
        ...


class RelayFactory(Protocol):
    """Starts a relay for `config` whose events go to `observer`; blocks; raises on failure."""

    def __call__(self, config: Config, observer: Observer) -> RelayHandle: ...


class RedirectService(Protocol):
    """What the controller needs of `firewall.client.RedirectController`."""

    @property
    def running(self) -> bool: ...

    async def start(self) -> None: ...

    async def apply(self, spec: RuleSpec) -> None: ...

    async def status(self) -> RedirectStatus: ...

    async def remove(self) -> bool: ...

    async def stop(self) -> int | None: ...


class CredentialRefresher(Protocol):
    """Re-reads the relay's passwords (`credentials.KeyringCredentialSource`); raises
    CredentialStoreError when the keyring cannot be used."""

    async def refresh(self, names: Iterable[str]) -> None: ...


class ConfigStore(Protocol):
    """Reads and writes the settings file (tray_proxy.config underneath)."""

    def load(self) -> Config: ...

    def save(self, config: Config) -> None: ...


Resolver = Callable[[Iterable[tuple[str, int]]], Awaitable[tuple[tuple[IPAddress, int], ...]]]
Probe = Callable[[UpstreamProxy, Credentials | None], Awaitable[ProbeResult]]


async def connect_probe(upstream: UpstreamProxy, credentials: Credentials | None) -> ProbeResult:
    """A real CONNECT (or SOCKS5) through the proxy to PROBE_TARGET, with the login."""
    return await probe_upstream(upstream, credentials, PROBE_TARGET, PROBE_TIMEOUT)


class NoticeLimiter:
    """At most one notice per kind per `interval` seconds: a flapping proxy must not spam."""

    def __init__(self, interval: float = NOTICE_INTERVAL, clock: Callable[[], float] | None = None):
        self._interval = interval
        self._clock = clock or time.monotonic
        self._last: dict[NoticeKind, float] = {}

    def allow(self, kind: NoticeKind) -> bool:
        if kind is NoticeKind.TEST_RESULT:  # the user asked for it
            return True
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            return False
        self._last[kind] = now
        return True


def _user_message(exc: BaseException) -> str:
    # A UserError (config, redirect, relay start, keyring) carries user-facing text; so does
    # the ruleset's SpecError, which cannot subclass it (the root helper is standalone).
    if isinstance(exc, UserError | SpecError):
        return str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "A step took too long and was abandoned. Try again; see the log for details."
    return f"Unexpected {type(exc).__name__}: {exc}. See the log for details."


class _EngineInbox:
    """Carries engine events from the relay thread to the controller's loop, in bursts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, drain: Callable[[list[Any]], None]):
        self._loop = loop
        self._drain = drain
        self._queue: collections.deque[tuple[int, Event]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, generation: int, event: Event) -> None:
        """Called on the relay thread: must be quick and never block on the UI."""
        self._queue.append((generation, event))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the app loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            self._scheduled = False
        batch: list[tuple[int, Event]] = []
        while self._queue:
            batch.append(self._queue.popleft())
        if batch:
            self._drain(batch)


@dataclass
class _Health:
    active: int = 0
    total: int = 0
    latency: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    errors: collections.deque[ErrorEntry] = field(
        default_factory=lambda: collections.deque(maxlen=LAST_ERRORS)
    )


# --------------------------------------------------------------------------- controller


class ProxyController:
    """One redirect + relay, switched on and off by the user. Runs on the app loop."""

    def __init__(
        self,
        config_store: ConfigStore,
        relay_factory: RelayFactory,
        redirect: RedirectService,
        *,
        resolver: Resolver | None = None,
        probe: Probe | None = None,
        notice_limiter: NoticeLimiter | None = None,
        watch_interval: float = WATCH_INTERVAL,
        resolve_interval: float = RESOLVE_INTERVAL_SECONDS,
        credentials: CredentialRefresher | None = None,
        credential_source: CredentialSource | None = None,
    ) -> None:
        from tray_proxy.firewall.client import resolve_upstreams

        self._store = config_store
        self._relay_factory = relay_factory
        self._redirect = redirect
        self._resolve: Resolver = resolver or resolve_upstreams
        self._probe: Probe = probe or connect_probe
        self._limiter = notice_limiter or NoticeLimiter()
        self._watch_interval = watch_interval
        self._resolve_interval = resolve_interval
        self._credentials = credentials
        # What the relay itself uses to find a password (Test connection uses the same).
        self._credential_source = credential_source
        self._credentials_read: asyncio.Task[str | None] | None = None
        self._observers: list[ControllerObserver] = []
        self._state = State.OFF
        self._message = "The redirect is off."
        self._config: Config | None = None
        self._relay: RelayHandle | None = None
        self._generation = 0
        self._health = _Health()
        self._inbox: _EngineInbox | None = None
        self._op: asyncio.Task[None] | None = None
        self._op_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._managed: ManagedRedirect | None = None
        self._stopping_relay = False
        self._closed = False
        with contextlib.suppress(ConfigError):
            self._config = config_store.load()

    # -- observing ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def config(self) -> Config | None:
        """The settings as last loaded or saved (None when the file is broken)."""
        return self._config

    def subscribe(self, observer: ControllerObserver) -> Callable[[], None]:
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def _publish(self, event: ControllerEvent) -> None:
        for observer in tuple(self._observers):
            try:
                observer(event)
            except Exception:  # a view's bug must not break switching the redirect
                log.exception("controller observer %r failed on %s", observer, event)

    def status(self) -> Status:
        config = self._config
        active = config.active_upstream() if config is not None else None
        upstreams = tuple(
            UpstreamInfo(
                name=u.name,
                url=u.url,
                active=active is not None and u.name == active.name,
                latency=self._health.latency.get(u.name),
                failing=self._health.failures.get(u.name, 0) >= DOWN_AFTER_FAILURES,
            )
            for u in (config.upstreams if config is not None else ())
        )
        return Status(
            state=self._state,
            message=self._message,
            upstream=active.name if active is not None else None,
            upstreams=upstreams,
            active_connections=self._health.active,
            total_connections=self._health.total,
            last_errors=tuple(self._health.errors),
            relay_addresses=self._relay.addresses if self._relay is not None else (),
        )

    def _changed(self) -> None:
        self._publish(StatusUpdated(self.status()))

    def _transition(self, new: State, message: str) -> None:
        old = self._state
        if new not in ALLOWED[old]:
            raise AssertionError(f"transition {old.value} -> {new.value} is not allowed")
        self._state = new
        self._message = message
        log.info("state %s -> %s: %s", old.value, new.value, message)
        self._publish(StateChanged(old, new, message))
        self._changed()

    def _notice(self, kind: NoticeKind, title: str, text: str) -> None:
        if self._limiter.allow(kind):
            self._publish(Notice(kind, title, text))

    def _error(self, text: str) -> None:
        errors = self._health.errors
        if errors and errors[-1].text == text:
            errors[-1] = ErrorEntry(time.time(), text, errors[-1].count + 1)
        else:
            errors.append(ErrorEntry(time.time(), text))

    # -- tasks ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` on the loop, keeping a reference; failures are logged, not lost."""
        task = asyncio.get_running_loop().create_task(coro, name=f"tray-proxy {name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def request_enable(self) -> None:
        self.spawn(self.enable(), "enable")

    def request_disable(self) -> None:
        self.spawn(self.disable(), "disable")

    def request_toggle(self) -> None:
        if self._state in (State.OFF, State.ERROR):
            self.request_enable()
        else:
            self.request_disable()

    def request_upstream(self, name: str) -> None:
        self.spawn(self.select_upstream(name), "select upstream")

    def request_test(self) -> None:
        self.spawn(self.test_connection(), "test connection")

    def _lock(self) -> asyncio.Lock:
        if self._op_lock is None:  # created lazily: it must belong to the running loop
            self._op_lock = asyncio.Lock()
        return self._op_lock

    # -- switching on ---------------------------------------------------------------------

    async def enable(self) -> Status:
        """Switch the redirect on; returns the resulting status (On, or Error and why)."""
        if not self._closed and (self._op is None or self._op.done()):
            if self._state not in (State.OFF, State.ERROR):
                return self.status()
            self._op = self.spawn(self._locked_switch_on(), "enable")
        await self._wait_op()
        return self.status()

    async def _wait_op(self) -> None:
        op = self._op
        if op is not None and op is not asyncio.current_task():
            # A second "enable" (tray click, control socket) waits for the running attempt.
            try:
                await asyncio.shield(op)
            except asyncio.CancelledError:
                if not op.done():
                    raise  # we were cancelled ourselves, not the attempt
            # A cancelled attempt is followed by the disable that cancelled it: report the
            # state after that, not the half-way one.
            async with self._lock():
                pass

    async def _locked_switch_on(self, name: str | None = None) -> None:
        async with self._lock():
            if name is None:
                if self._state in (State.OFF, State.ERROR):
                    await self._switch_on("Switching the redirect on…", restart=False)
            elif self._state.redirecting:
                await self._switch_on(f"Switching to proxy {name}…", restart=True)

    async def _switch_on(self, message: str, *, restart: bool) -> None:
        self._transition(State.ENABLING, message)
        try:
            # A restart hands the running helper to a new manager (the relay's port may
            # change); the old one must not re-apply its spec meanwhile.
            await self._detach_redirect()
            if restart:
                await self._stop_relay()
            config = self._store.load()
            self._config = config
            upstream = config.active_upstream()
            if upstream is None:
                where = f" in {config.path}" if config.path is not None else ""
                raise UserError(
                    f"No upstream proxy is set up. Add one{where} ([[upstream]] with a name "
                    "and url, see docs/config.md), then switch on again."
                )
            # Before anything starts: settings that would make the redirect loop.
            check_redirect_settings(config)
            # Counts start again with the new relay; what is known about each proxy stays.
            old = self._health
            self._health = _Health(errors=old.errors, latency=old.latency, failures=old.failures)
            await self._credentials_once()
            await self._start_relay(config)
            assert self._relay is not None
            # The same path as `tray-proxy run`: the active proxy must resolve, a spare that
            # does not only warns; apply() replaces a running helper's table in one transaction.
            self._managed = ManagedRedirect(
                config,
                self._relay.addresses[0][1],
                self._redirect,
                resolve=self._resolve,
                on_failure=self._on_redirect_failure,
                resolve_interval=self._resolve_interval,
                helper_check=self._watch_interval,
            )
            await self._managed.start()
        except asyncio.CancelledError:
            await self._teardown()
            raise
        except Exception as exc:
            text = _user_message(exc)
            log.warning("switching on failed: %s", text, exc_info=not _is_known(exc))
            self._error(text)
            await self._teardown()
            if isinstance(exc, RedirectError):
                self._notice(NoticeKind.HELPER_REFUSED, "Redirect not switched on", text)
            self._transition(State.ERROR, text)
            return
        ports = ", ".join(str(p) for p in config.relay.redirect_ports)
        self._transition(State.ON, f"Redirecting TCP {ports} through proxy {upstream.name}.")

    async def _start_relay(self, config: Config) -> None:
        self._generation += 1
        generation = self._generation
        loop = asyncio.get_running_loop()
        if self._inbox is None:
            self._inbox = _EngineInbox(loop, self._on_engine_events)
        inbox = self._inbox

        def observer(event: Event) -> None:
            inbox.post(generation, event)

        future = loop.run_in_executor(None, self._relay_factory, config, observer)
        try:
            self._relay = await asyncio.wait_for(asyncio.shield(future), RELAY_START_TIMEOUT)
        except asyncio.CancelledError:
            # The worker thread still starts the relay: stop what it started.
            with contextlib.suppress(Exception):
                relay = await future
                await loop.run_in_executor(None, relay.stop, RELAY_STOP_MARGIN)
            raise

    # -- switching off --------------------------------------------------------------------

    async def disable(self) -> Status:
        """Switch the redirect off (redirect first, then the relay drains)."""
        op = self._op
        if op is not None and not op.done() and op is not asyncio.current_task():
            op.cancel()  # e.g. the user gave up waiting for the password dialog
            with contextlib.suppress(asyncio.CancelledError):
                await op
        async with self._lock():
            if self._state in (State.OFF, State.DISABLING):
                return self.status()
            self._transition(State.DISABLING, "Switching the redirect off…")
            await self._teardown()
            self._transition(State.OFF, "The redirect is off.")
        return self.status()

    async def _teardown(self) -> None:
        """Redirect off first, so no new connection goes to a relay that is going away; then
        the relay drains (bounded by its drain_timeout); then the helper ends and deletes its
        table. The helper outlives the drain because deleting the table takes the address
        translation away from connections still open through the relay (they would be reset
        or hang)."""
        await self._detach_redirect()
        switched_off = True
        try:
            if self._redirect.running:
                await asyncio.wait_for(self._redirect.remove(), REDIRECT_OFF_TIMEOUT)
        except Exception as exc:
            switched_off = False
            log.warning("removing the redirect failed: %s", _user_message(exc))
        if not switched_off:
            # New connections would still go to a relay that is about to stop: end the helper
            # first (it deletes its table when its input closes), as before the drain existed.
            await self._stop_helper()
            await self._stop_relay()
        else:
            await self._stop_relay()
            await self._stop_helper()

    async def _stop_helper(self) -> None:
        try:
            await asyncio.wait_for(self._redirect.stop(), REDIRECT_OFF_TIMEOUT)
        except Exception as exc:
            log.warning("stopping the redirect helper failed: %s", _user_message(exc))

    async def _stop_relay(self) -> None:
        relay = self._relay
        if relay is None:
            return
        drain = self._config.relay.drain_timeout if self._config is not None else 5.0
        self._stopping_relay = True
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, relay.stop, drain + RELAY_STOP_MARGIN
            )
        except Exception:
            log.exception("stopping the relay failed")
        finally:
            self._stopping_relay = False
            self._relay = None
            self._generation += 1  # late events of the old engine are ignored
            self._health.active = 0

    async def shutdown(self) -> None:
        """The quit path: cancel what runs, redirect off, relay drained. Idempotent."""
        if self._closed:
            return
        self._closed = True
        op = self._op
        if op is not None and not op.done():
            op.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await op
        async with self._lock():
            if self._state is not State.OFF:
                self._transition(State.DISABLING, "Quitting: switching the redirect off…")
                await self._teardown()
                self._transition(State.OFF, "The redirect is off.")
            else:
                await self._teardown()  # a helper left running by a failed attempt
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*self._tasks - {asyncio.current_task()}, return_exceptions=True)

    # -- while on -------------------------------------------------------------------------

    async def _detach_redirect(self) -> None:
        # Teardown removes and stops the helper itself, in the order the drain needs.
        managed, self._managed = self._managed, None
        if managed is not None:
            await managed.detach()

    def _on_redirect_failure(self, exc: RedirectError) -> None:
        """The ManagedRedirect gave up: the helper kept dying, or re-applying failed."""
        text = f"{exc} The redirect was switched off; switch it on again."
        self._error(text)
        self._notice(NoticeKind.HELPER_STOPPED, "Redirect stopped", text)
        self.spawn(self._fail(text), "redirect failed")

    async def _fail(self, text: str) -> None:
        async with self._lock():
            if not self._state.redirecting:
                return
            await self._teardown()
            self._transition(State.ERROR, text)

    def _on_engine_events(self, batch: list[tuple[int, Event]]) -> None:
        health = self._health
        for generation, event in batch:
            if generation != self._generation:
                continue
            if isinstance(event, ConnectionOpened):
                health.active += 1
                health.total += 1
            elif isinstance(event, ConnectionClosed):
                health.active = max(0, health.active - 1)
                if event.reason in _CLOSE_ERRORS:
                    self._error(event.detail)
            elif isinstance(event, TunnelEstablished):
                self._upstream_ok(event)
            elif isinstance(event, UpstreamFailed):
                self._upstream_failed(event)
            elif isinstance(event, ListenerError):
                self._error(f"The relay cannot accept connections: {event.detail}")
            elif isinstance(event, EngineStopped) and not self._stopping_relay:
                text = "The relay stopped unexpectedly, so the redirect was switched off."
                self._error(text)
                self.spawn(self._fail(text), "relay stopped")
        self._changed()

    def _upstream_ok(self, event: TunnelEstablished) -> None:
        if event.upstream is None:
            return
        self._health.latency[event.upstream] = event.handshake_latency
        self._health.failures[event.upstream] = 0
        if self._state is State.DEGRADED:
            text = f"Proxy {event.upstream} works again."
            self._notice(NoticeKind.UPSTREAM_BACK, "Proxy back", text)
            self._transition(State.ON, text)

    def _upstream_failed(self, event: UpstreamFailed) -> None:
        self._error(f"{event.upstream}: {event.detail}")
        if event.reason is CloseReason.UPSTREAM_AUTH_FAILED:
            text = (
                f"Proxy {event.upstream} rejected the credentials ({event.detail}). "
                "Open Credentials to fix them."
            )
            self._notice(NoticeKind.CREDENTIALS_REJECTED, "Proxy credentials rejected", text)
            if self._state is State.ON:
                self._transition(State.DEGRADED, text)
            return
        if event.reason not in _DOWN_REASONS:
            return  # e.g. the proxy refused one destination: the proxy itself is fine
        count = self._health.failures.get(event.upstream, 0) + 1
        self._health.failures[event.upstream] = count
        if count >= DOWN_AFTER_FAILURES and self._state is State.ON:
            text = f"Proxy {event.upstream} is not answering: {event.detail}"
            self._notice(NoticeKind.UPSTREAM_DOWN, "Proxy down", text)
            self._transition(State.DEGRADED, text)

    # -- other actions --------------------------------------------------------------------

    async def select_upstream(self, name: str) -> Status:
        """Make `name` the active upstream (saved); restarts the relay when it runs."""
        async with self._lock():
            try:
                config = self._store.load()
                if name not in {u.name for u in config.upstreams}:
                    raise UserError(f"There is no upstream named {name!r} in the settings.")
                config = replace(config, relay=replace(config.relay, upstream=name))
                self._store.save(config)
            except Exception as exc:
                text = _user_message(exc)
                self._error(text)
                self._changed()
                return self.status()
            self._config = config
            self._changed()
            restart = self._state.redirecting
        if restart and not self._closed:
            # Only the relay restarts: the redirect (which excludes every upstream's address)
            # stays in place and apply() replaces it atomically.
            self._op = self.spawn(self._locked_switch_on(name), "switch upstream")
            await self._wait_op()
        return self.status()

    async def test_connection(self) -> str:
        """Open a real tunnel through the active proxy with the stored login (as the
        credentials dialog's Test does); the result, in words, is a Notice."""
        await self._credentials_once()
        config = self._config
        upstream = config.active_upstream() if config is not None else None
        if upstream is None:
            text = "No upstream proxy is set up, so there is nothing to test."
        else:
            source = self._credential_source
            credentials = source.get(upstream.name, upstream.username) if source else None
            result = await self._probe(upstream, credentials)
            proxy = f"Proxy {upstream.name} ({upstream.host}:{upstream.port})"
            target = f"{PROBE_TARGET[0]}:{PROBE_TARGET[1]}"
            if result.ok:
                text = f"{proxy} works: a tunnel to {target} opened ({result.words})."
            else:
                text = f"{proxy} failed the test: {result.words}. {_probe_advice(result)}"
                self._error(text)
        self._notice(NoticeKind.TEST_RESULT, "Test connection", text)
        self._changed()
        return text

    # -- credentials ----------------------------------------------------------------------

    def request_refresh_credentials(self) -> None:
        """Read the keyring at start-up, in the background (the relay waits for it)."""
        if self._credentials is not None and self._credentials_read is None:
            self._credentials_read = self.spawn(self.refresh_credentials(), "read keyring")

    async def _credentials_once(self) -> None:
        read = self._credentials_read
        if read is None and self._credentials is not None:
            read = self._credentials_read = self.spawn(self.refresh_credentials(), "read keyring")
        if read is not None and not read.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(read)

    async def refresh_credentials(self) -> str | None:
        """Re-read every upstream's password from the keyring (it runs in the keyring's
        worker thread). A failure is an error entry and a notice, returned as text."""
        if self._credentials is None:
            return None
        config = self._config
        names = [u.name for u in config.upstreams] if config is not None else []
        try:
            await self._credentials.refresh(names)
        except CredentialStoreError as exc:
            text = (
                f"The proxy passwords could not be read from the keyring: {exc}. Then open "
                "Credentials to try again."
            )
            self._error(text)
            self._notice(NoticeKind.KEYRING_UNAVAILABLE, "Keyring not available", text)
            self._changed()
            return text
        return None

    async def save_upstream(self, upstream: UpstreamProxy) -> str | None:
        """Write `upstream` into the settings (replacing the one of that name), re-read the
        passwords, and let the running relay use them: a changed active proxy restarts the
        relay; otherwise the proxy's rejected-credentials mark is cleared. Raises ConfigError
        when the file cannot be written; returns the keyring warning, if any."""
        loop = asyncio.get_running_loop()
        async with self._lock():
            config = await loop.run_in_executor(None, self._store.load)
            old = next((u for u in config.upstreams if u.name == upstream.name), None)
            upstreams = tuple(upstream if u.name == upstream.name else u for u in config.upstreams)
            if old is None:
                upstreams += (upstream,)
            config = replace(config, upstreams=upstreams)
            await loop.run_in_executor(None, self._store.save, config)
            self._config = config
            self._changed()
        warning = await self.refresh_credentials()
        active = config.active_upstream()
        changed = old is not None and old != upstream
        if (
            changed
            and self._state.redirecting
            and active is not None
            and active.name == upstream.name
            and not self._closed
        ):
            # The relay (and the redirect's exclusions) must use the new address.
            self._op = self.spawn(self._locked_switch_on(upstream.name), "apply proxy settings")
        elif self._relay is not None:
            self._relay.retry_credentials(upstream.name)
        return warning

    def diagnostics(self, extra: Mapping[str, str] | None = None) -> str:
        """A plain-text report for bug reports. Holds no password: none is known here."""
        s = self.status()
        lines = [
            f"tray-proxy {__version__}",
            f"python {platform.python_version()} on {platform.platform()}",
            *(f"{k} {v}" for k, v in (extra or {}).items()),
            f"state: {s.state.value} ({s.message})",
            f"config: {self._config.path if self._config is not None else 'not loaded'}",
            f"relay: {', '.join(f'{h}:{p}' for h, p in s.relay_addresses) or 'not running'}",
            f"redirect helper running: {'yes' if self._redirect.running else 'no'}",
            f"connections: {s.active_connections} open, {s.total_connections} since switched on",
            "upstreams:",
        ]
        config = self._config
        by_name = {u.name: u for u in config.upstreams} if config is not None else {}
        for u in s.upstreams:
            latency = "-" if u.latency is None else f"{u.latency * 1000:.0f} ms"
            login = "login set" if by_name[u.name].username else "no login"
            mark = "*" if u.active else " "
            lines.append(
                f" {mark} {u.name} {u.url} {login}, handshake {latency}"
                f"{', failing' if u.failing else ''}"
            )
        if not s.upstreams:
            lines.append("   (none)")
        lines.append("last errors:")
        for e in s.last_errors:
            lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(e.at))} {e.display}")
        if not s.last_errors:
            lines.append("  (none)")
        return "\n".join(lines) + "\n"


def _probe_advice(result: ProbeResult) -> str:
    if result.outcome is ProbeOutcome.AUTH_FAILED:
        return "Open Credentials to fix the login."
    answered = result.outcome is ProbeOutcome.FORBIDDEN or (
        result.outcome is ProbeOutcome.UNREACHABLE and result.status is not None
    )
    if answered:  # the proxy works; it refused or could not reach the test site
        return "Ask the proxy's administrators, or see the log."
    return "Check the address and your network."


def _is_known(exc: BaseException) -> bool:
    """Is this a failure the user can act on (no traceback in the log needed)?"""
    return isinstance(exc, UserError | SpecError)


# --------------------------------------------------------------------------- the real relay


class EngineRelay:
    """A RelayEngine on its own EngineThread (uvloop when installed), as a RelayHandle."""

    def __init__(self, thread: Any) -> None:
        self._thread = thread

    @property
    def addresses(self) -> tuple[Address, ...]:
        addresses: tuple[Address, ...] = self._thread.engine.addresses
        return addresses

    def stop(self, timeout: float) -> None:
        self._thread.stop(timeout)

    def retry_credentials(self, upstream: str) -> None:
        # The engine's auth state belongs to the relay's loop thread.
        thread = self._thread
        thread.loop.call_soon_threadsafe(thread.engine.retry_credentials, upstream)


def engine_relay_factory(credentials: Any = None) -> RelayFactory:
    """The RelayFactory the app uses: a new engine and thread per switch-on."""
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
