"""The app's state machine: Off -> Enabling -> On -> Degraded / Error -> Off.

`ProxyController` owns the relay (through a `RelayFactory`, normally an `EngineThread` with its
own loop) and the redirect (a `RedirectService`, normally `firewall.client.RedirectController`),
both injected, and switches them on and off through the one `Lifecycle` (lifecycle.py) that
the tray app and headless `tray-proxy run` share. It runs on the app's asyncio loop (qasync in
the GUI, a plain loop headless). Every state transition is a `StateChanged` event; every change
of what the user sees is a `StatusUpdated` with a frozen `Status` snapshot; things worth a
desktop notification are `Notice` events. Observers (the UI bridge, the control socket) only
read these; they never compute state of their own.

Engine events arrive on the relay's thread and reach this loop in bursts (inbox.py).

Must not import PySide6 or qasync (it is tested without Qt and drives the headless run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from tray_proxy.config import Config, ConfigError
from tray_proxy.config_edits import with_active_upstream, with_upstream
from tray_proxy.controller.diagnostics import diagnostics_report, probe_advice
from tray_proxy.controller.inbox import HANDOVER_DELAY, EngineInbox
from tray_proxy.controller.lifecycle import Lifecycle, LifecycleSteps, is_known, user_message
from tray_proxy.controller.managed_redirect import RESOLVE_INTERVAL_SECONDS
from tray_proxy.controller.routing_watch import RoutingWatch, WatchSettings
from tray_proxy.controller.services import (
    ConfigStore,
    CredentialRefresher,
    HistoryOutput,
    Probe,
    RedirectService,
    RelayFactory,
    RelayHandle,
    Resolver,
)
from tray_proxy.controller.status import (
    ALLOWED,
    ConnectionsChanged,
    ControllerEvent,
    ControllerObserver,
    ErrorEntry,
    Notice,
    NoticeKind,
    State,
    StateChanged,
    Status,
    StatusUpdated,
    UpstreamInfo,
)
from tray_proxy.errors import UserError
from tray_proxy.firewall.client import RedirectError
from tray_proxy.keyring_store import CredentialStoreError
from tray_proxy.monitor.attribution import Attributor
from tray_proxy.monitor.health import HealthSnapshot, ProbeRecord, UpstreamState
from tray_proxy.monitor.monitor import HEADLESS_COALESCE, Monitor
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo
from tray_proxy.offnet import OffnetChange, OffnetPolicy, Reachability
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    CredentialsAccepted,
    EngineStopped,
    Event,
    ListenerError,
    Observer,
    RoutingError,
    TunnelEstablished,
    UpstreamFailed,
    UpstreamHealthChanged,
)
from tray_proxy.relay.probe import ProbeResult, probe_upstream
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import CredentialSource
from tray_proxy.relay.settings import RelaySettings, UpstreamProxy
from tray_proxy.setup_flow import describe_probe
from tray_proxy.tasks import spawn

log = logging.getLogger(__name__)

__all__ = [
    "DOWN_AFTER_FAILURES",
    "LAST_ERRORS",
    "NOTICE_INTERVAL",
    "WATCH_INTERVAL",
    "NoticeLimiter",
    "ProxyController",
]

# A proxy that failed this many connections in a row (with no success between) is "down".
DOWN_AFTER_FAILURES: Final = 3
LAST_ERRORS: Final = 5
NOTICE_INTERVAL: Final = 60.0  # seconds between two notices of the same kind
WATCH_INTERVAL: Final = 1.0  # how often the helper is checked while the redirect is on
TRAFFIC_INTERVAL: Final = 1.0  # how often the relay's byte counters are read while it runs
STATUS_INTERVAL: Final = 0.1  # engine events update the status at most this often
# Reading every proxy's password again (the keyring has its own per-call timeouts too).
CREDENTIALS_READ_TIMEOUT: Final = 30.0

_DOWN_REASONS = frozenset(
    {
        CloseReason.UPSTREAM_UNREACHABLE,
        CloseReason.UPSTREAM_TIMEOUT,
        CloseReason.UPSTREAM_PROTOCOL_ERROR,
    }
)
_CLOSE_ERRORS = frozenset({CloseReason.NO_UPSTREAM, CloseReason.INTERNAL_ERROR})


class NoticeLimiter:
    """At most one notice per kind per `interval` seconds: a flapping proxy must not spam."""

    def __init__(
        self, interval: float = NOTICE_INTERVAL, clock: Callable[[], float] | None = None
    ) -> None:
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


@dataclass
class _Health:
    """What the state machine itself needs: connections since this switch-on (Status's
    counts), each proxy's latest handshake and its failures in a row (Degraded after
    DOWN_AFTER_FAILURES), the last errors. The dashboard's statistics (percentiles, rates,
    failures in words, since the app started) are the monitor's reducer: Status.health."""

    active: int = 0
    total: int = 0
    latency: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    errors: collections.deque[ErrorEntry] = field(
        default_factory=lambda: collections.deque(maxlen=LAST_ERRORS)
    )


class ProxyController:
    """One redirect + relay, switched on and off by the user. Runs on the app loop."""

    def __init__(
        self,
        config_store: ConfigStore,
        relay_factory: RelayFactory,
        redirect: RedirectService | None,
        *,
        resolver: Resolver | None = None,
        probe: Probe | None = None,
        notice_limiter: NoticeLimiter | None = None,
        watch_interval: float = WATCH_INTERVAL,
        resolve_interval: float = RESOLVE_INTERVAL_SECONDS,
        credentials: CredentialRefresher | None = None,
        credential_source: CredentialSource | None = None,
        steps: LifecycleSteps | None = None,
        history: HistoryOutput | None = None,
        attribution: bool = False,
        traffic_interval: float = TRAFFIC_INTERVAL,
        monitor: bool = True,
        headless: bool = False,
        probes: bool = False,
        offnet_timings: OffnetPolicy | None = None,
        watch_network: bool = True,
        probe_interval: float | None = None,
    ) -> None:
        from tray_proxy.firewall.client import resolve_upstreams

        self._store = config_store
        self._probe: Probe | None = probe  # None: the real probe to [probe] target
        self._limiter = notice_limiter or NoticeLimiter()
        # The one switch-on / teardown order, shared with headless `tray-proxy run`.
        self._life = Lifecycle(
            relay_factory,
            redirect,
            resolver=resolver or resolve_upstreams,
            on_redirect_failure=self._on_redirect_failure,
            on_relay_stopped=self._relay_stopped,
            watch_interval=watch_interval,
            resolve_interval=resolve_interval,
            steps=steps,
        )
        self._credentials = credentials
        # `tray-proxy run` has no window: its advice names commands, not the app's controls.
        self._headless = headless
        # What the relay itself uses to find a password (Test connection uses the same).
        self._credential_source = credential_source
        self._credentials_read: asyncio.Task[str | None] | None = None
        self._observers: list[ControllerObserver] = []
        self._state = State.OFF
        self._message = "The redirect is off."
        self._config: Config | None = None
        self._generation = 0
        self._health = _Health()
        self._inbox: EngineInbox | None = None
        self._op: asyncio.Task[None] | None = None
        self._op_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        # The dashboard's data: rows, health and history (monitor/monitor.py). Made on the
        # loop at the first switch-on, because the process attributor needs the loop.
        self._history = history
        self._attribution = attribution
        # Off for a headless run without history: nobody reads rows or statistics there.
        self._monitoring = monitor or history is not None
        self._monitor: Monitor | None = None
        self._snapshot = HealthSnapshot()
        self._traffic_interval = traffic_interval
        self._ticker: asyncio.Task[None] | None = None
        self._history_problem: str | None = None
        self._status_due: asyncio.TimerHandle | None = None
        self._start_problem: str | None = None
        # Routing health while on (routing_watch.py): the app and `tray-proxy run` probe;
        # tests of the state machine leave it out (their proxies do not exist).
        self._probes = probes
        self._offnet_timings = offnet_timings
        self._watch_network = watch_network
        self._probe_interval = probe_interval  # None: the settings' (routing_watch.py)
        self._watch: RoutingWatch | None = None
        self._down: set[str] = set()  # upstreams the relay's health says are down
        self._all_down_degraded = False  # Degraded because every upstream is down
        self._running_relay: RelaySettings | None = None  # [relay] of the running relay
        try:
            self._config = config_store.load()
        except ConfigError as exc:
            # Said at once, not at the first switch-on (issue 14 bug 5): the tray icon and
            # its tooltip, the window and `tray-proxy status` all show this state.
            text = (
                f"The settings file cannot be used: {exc}. Correct it (docs/config.md "
                "explains each setting), then choose Switch on."
            )
            self._error(text)
            self._state = State.ERROR
            self._message = text
            self._start_problem = text

    # -- observing ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def config(self) -> Config | None:
        """The settings as last loaded or saved (None when the file is broken)."""
        return self._config

    @property
    def _relay(self) -> RelayHandle | None:
        return self._life.relay

    @_relay.setter
    def _relay(self, relay: RelayHandle | None) -> None:
        self._life.relay = relay

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

    def report_start_problems(self) -> None:
        """Say what was wrong when the controller was made (a settings file that cannot be
        read) as a Notice, once its observers listen: the app shows it as a desktop
        notification, or in the window without a tray."""
        problem, self._start_problem = self._start_problem, None
        if problem is not None:
            self._notice(NoticeKind.SETTINGS_INVALID, "Settings file not usable", problem)

    def status(self) -> Status:
        config = self._config
        active = config.active_upstream() if config is not None else None
        upstreams = tuple(
            UpstreamInfo(
                name=u.name,
                url=u.url,
                active=active is not None and u.name == active.name,
                latency=self._health.latency.get(u.name),
                failing=self._health.failures.get(u.name, 0) >= DOWN_AFTER_FAILURES
                or u.name in self._down,
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
            captured=self._life.captured,
            routing=self._routing_words(),
            health=self._snapshot,
        )

    def _routing_words(self) -> str | None:
        watch = self._watch
        if watch is None or not self._state.redirecting or not watch.words:
            return None
        return watch.words

    def _changed(self) -> None:
        due, self._status_due = self._status_due, None
        if due is not None:
            due.cancel()
        self._publish(StatusUpdated(self.status()))

    def _changed_soon(self) -> None:
        """A status for what engine events changed, at most every STATUS_INTERVAL: at a
        thousand connections a second, one per burst cost the loop more than the events."""
        if self._status_due is None:
            loop = asyncio.get_running_loop()
            self._status_due = loop.call_later(STATUS_INTERVAL, self._changed)

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
        task = spawn(coro, name=f"tray-proxy {name}")
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
        await self._stop_watch()
        try:
            # A restart hands the running helper to a new manager (the relay's port may
            # change); the old one must not re-apply its spec meanwhile.
            await self._life.detach_redirect()
            if restart:
                await self._life.stop_relay(self._drain_timeout())
            config = self._store.load()
            self._config = config
            # Counts start again with the new relay; what is known about each proxy stays.
            old = self._health
            self._health = _Health(errors=old.errors, latency=old.latency, failures=old.failures)
            # What the relay runs with: a reload compares with this (not with the last
            # reload's settings) to say what needs a switch off and on.
            self._running_relay = config.relay
            upstream = await self._life.switch_on(
                config, self._new_observer(), before_relay=self._credentials_for_switch_on
            )
        except asyncio.CancelledError:
            await self._life.teardown(self._drain_timeout())
            raise
        except Exception as exc:
            text = user_message(exc)
            log.warning("switching on failed: %s", text, exc_info=not is_known(exc))
            self._error(text)
            await self._life.teardown(self._drain_timeout())
            if isinstance(exc, RedirectError):
                self._notice(NoticeKind.HELPER_REFUSED, "Redirect not switched on", text)
            self._transition(State.ERROR, text)
            return
        ports = ", ".join(str(p) for p in config.relay.redirect_ports)
        if self._life.manages_redirect:
            text = f"Redirecting TCP {ports} through proxy {upstream.name}."
        else:
            text = (
                f"Relaying through proxy {upstream.name}; the redirect of TCP {ports} is "
                "managed outside tray-proxy (--no-redirect)."
            )
        self._start_watch(config)
        self._transition(State.ON, text)

    def _new_observer(self) -> Observer:
        """The observer for a new relay: its events go to this loop, tagged with its
        generation (a stopped relay's late events are ignored)."""
        self._generation += 1
        generation = self._generation
        loop = asyncio.get_running_loop()
        if self._inbox is None:
            self._inbox = EngineInbox(loop, self._on_engine_events, delay=HANDOVER_DELAY)
        inbox = self._inbox
        if self._monitoring:
            self._monitor_on(loop)
            if self._ticker is None or self._ticker.done():
                self._ticker = self.spawn(self._tick(), "traffic")

        def observer(event: Event) -> None:
            inbox.post(generation, event)

        return observer

    def _drain_timeout(self) -> float:
        return self._config.relay.drain_timeout if self._config is not None else 5.0

    def _relay_stopped(self) -> None:
        self._generation += 1  # late events of the old engine are ignored
        self._health.active = 0

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
        await self._stop_watch()
        await self._life.teardown(self._drain_timeout())

    # -- routing health and reload ---------------------------------------------------------

    def _start_watch(self, config: Config) -> None:
        relay = self._relay
        self._down.clear()
        self._all_down_degraded = False
        if not self._probes or relay is None:
            return
        watch = RoutingWatch(
            relay,
            self._watch_settings(config),
            self._offnet_changed,
            watch_network=self._watch_network,
            on_probe=self._health_probed,
        )
        watch.start()
        self._watch = watch

    def _watch_settings(self, config: Config) -> WatchSettings:
        return WatchSettings.of(config, self._offnet_timings, self._probe_interval)

    async def _stop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            await watch.stop()

    def _health_probed(self, upstream: UpstreamProxy, result: ProbeResult, works: bool) -> None:
        """A periodic health probe: its outcome on the upstream's card (Upstreams tab)."""
        monitor = self._monitor
        if monitor is None:
            return
        known = {h.name: h.state for h in self._snapshot.upstreams}
        if works and known.get(upstream.name) is UpstreamState.AUTH_FAILED:
            return  # answering is not accepting the stored login: keep that state shown
        if works:
            answered = result.answered_s or 0.0
            words = f"health probe: the proxy answered in {answered * 1000:.0f} ms"
        else:
            words = f"health probe: {result.words}"
        monitor.probe(
            ProbeRecord(
                upstream.name,
                time.time(),
                works,
                result.answered_s if works else None,
                words,
                outcome="" if works else result.outcome.value,
            )
        )
        self._snapshot = monitor.health(time.time())
        self._changed_soon()

    def _offnet_changed(self, change: OffnetChange) -> None:
        if change.state is Reachability.DIRECT_UNREACHABLE:
            text = (
                "No proxy is reachable from this network, so new connections go direct "
                f"(direct: proxy unreachable). {change.reason}".strip()
            )
            self._error(text)
            self._notice(NoticeKind.OFF_NETWORK, "Proxy unreachable: going direct", text)
        else:
            self._notice(
                NoticeKind.ON_NETWORK,
                "Proxy reachable again",
                "A proxy is reachable again: new connections go through it.",
            )
        self._changed()

    def _health_changed(self, event: UpstreamHealthChanged) -> None:
        """The relay's breaker for `event.upstream` opened or closed (probes or traffic)."""
        if event.up:
            self._down.discard(event.upstream)
            self._health.failures[event.upstream] = 0
            if not self._failover():
                return  # one upstream: TunnelEstablished says it works again
            text = f"Proxy {event.upstream} is back: new connections use it again."
            self._notice(NoticeKind.UPSTREAM_BACK, "Proxy back", text)
            if self._state is State.DEGRADED and self._all_down_degraded:
                self._all_down_degraded = False
                self._transition(State.ON, text)
            return
        self._down.add(event.upstream)
        if not self._failover() or (self._watch is not None and self._watch.words):
            # One upstream: UpstreamFailed already said it is not answering. Off the
            # corporate network: one notice says it all.
            return
        text = f"Proxy {event.upstream} is down ({event.reason}); {self._using_instead()}."
        self._error(text)
        self._notice(NoticeKind.UPSTREAM_DOWN, "Proxy down", text)
        config = self._config
        every = config is not None and all(u.name in self._down for u in config.upstreams)
        if every and self._state is State.ON:
            self._all_down_degraded = True
            self._transition(State.DEGRADED, text)

    def _using_instead(self) -> str:
        config = self._config
        if config is None:
            return "new connections go to the next way"
        spare = [u.name for u in config.upstreams if u.name not in self._down]
        if spare:
            return f"using {spare[0]}"
        if config.routing.when_unreachable == "direct":
            return "no proxy is left, so new connections go direct"
        return "no proxy is left, so new connections fail until one comes back"

    async def reload(self) -> dict[str, object]:
        """Read the settings file again and apply what can change while on, without
        dropping open tunnels (issue 15 section 6): routing rules, default and PAC,
        upstreams (added, removed, priorities, addresses), probe settings; the redirect is
        applied again when the upstreams' addresses changed. What needs a switch off and on
        (the relay's port, listen addresses, redirect ports and other [relay] settings) is
        named in the answer's `restart`. Raises UserError for a settings file that cannot be
        read (the running settings stay)."""
        loop = asyncio.get_running_loop()
        async with self._lock():
            try:
                config = await loop.run_in_executor(None, self._store.load)
            except ConfigError as exc:
                text = f"The settings were not reloaded: {exc}. The running settings stay."
                self._error(text)
                self._changed()
                raise UserError(text) from None
            old, self._config = self._config, config
            relay = self._relay
            running = self._running_relay if relay is not None else None
            restart = _needs_restart(running, config.relay) if running is not None else []
            applied: list[str] = []
            if relay is not None and self._state.redirecting:
                relay.reload_routing(config)
                applied.append("routing")
                watch = self._watch
                if watch is not None:
                    watch.reload(self._watch_settings(config))
                elif self._probes:
                    self._start_watch(config)
                if old is not None and old.upstreams != config.upstreams:
                    try:
                        if await self._life.update_redirect(config):
                            applied.append("redirect")
                    except Exception as exc:
                        text = f"The redirect was not updated: {user_message(exc)}"
                        log.warning("%s", text, exc_info=not is_known(exc))
                        self._error(text)
            self._down &= {u.name for u in config.upstreams}
        if old is not None and old.upstreams != config.upstreams:
            await self.refresh_credentials()
        message = "The settings were reloaded"
        if applied:
            message += ": new connections follow them; open connections stay"
        message += "."
        if restart and self._state.redirecting:
            message += f" Changed, and used after a switch off and on: {', '.join(restart)}."
        log.info("%s", message)
        self._changed()
        return {"applied": applied, "restart": restart, "message": message}

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
        await self._close_monitor()

    # -- while on -------------------------------------------------------------------------

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
        monitor = self._monitor
        if monitor is not None:
            # Every relay's events, also a stopped one's late ones: its rows must close.
            try:
                changes = monitor.feed([event for _generation, event in batch])
            except Exception:  # the dashboard's data must not break the state machine
                log.exception("the connection monitor failed on a batch of events")
            else:
                if changes:
                    self._publish(ConnectionsChanged(changes))
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
            elif isinstance(event, UpstreamHealthChanged):
                self._health_changed(event)
            elif isinstance(event, CredentialsAccepted):
                self._credentials_accepted(event)
            elif isinstance(event, ListenerError):
                self._error(f"The relay cannot accept connections: {event.detail}")
            elif isinstance(event, RoutingError):
                self._routing_failed(event)
            elif isinstance(event, EngineStopped) and not self._life.stopping_relay:
                text = "The relay stopped unexpectedly, so the redirect was switched off."
                self._error(text)
                self.spawn(self._fail(text), "relay stopped")
        self._changed_soon()

    def _failover(self) -> bool:
        """Several upstreams: one failing is news (UpstreamHealthChanged), not Degraded."""
        config = self._config
        return config is not None and len(config.upstreams) > 1

    def _upstream_ok(self, event: TunnelEstablished) -> None:
        if event.upstream is None:
            return
        self._health.latency[event.upstream] = event.handshake_latency
        self._health.failures[event.upstream] = 0
        if self._state is State.DEGRADED and not self._failover():
            text = f"Proxy {event.upstream} works again."
            self._notice(NoticeKind.UPSTREAM_BACK, "Proxy back", text)
            self._transition(State.ON, text)

    def _routing_failed(self, event: RoutingError) -> None:
        """The PAC script cannot be used (the relay says so once per new failure): new
        connections follow the [[rule]]s and the default until it works again."""
        text = (
            f"The PAC script cannot be used: {event.detail}. Until it works again, new "
            "connections follow the rules and the default of the settings file."
        )
        self._error(text)
        self._notice(NoticeKind.ROUTING_FAILED, "PAC script failed", text)

    def _credentials_accepted(self, event: CredentialsAccepted) -> None:
        """The proxy took credentials it had rejected: the upstream works again."""
        self._health.failures[event.upstream] = 0
        text = f"Proxy {event.upstream} works again: it accepted the login."
        self._notice(NoticeKind.UPSTREAM_BACK, "Proxy back", text)
        if self._state is State.DEGRADED:
            self._transition(State.ON, text)

    def _upstream_failed(self, event: UpstreamFailed) -> None:
        self._error(f"{event.upstream}: {event.detail}")
        if event.reason is CloseReason.UPSTREAM_AUTH_FAILED:
            fix = (
                f"Set the right password with `tray-proxy credentials set {event.upstream}`."
                if self._headless
                else "Open Credentials to fix them."
            )
            text = f"Proxy {event.upstream} rejected the credentials ({event.detail}). {fix}"
            self._notice(NoticeKind.CREDENTIALS_REJECTED, "Proxy credentials rejected", text)
            if self._state is State.ON:
                self._transition(State.DEGRADED, text)
            return
        if event.reason not in _DOWN_REASONS:
            return  # e.g. the proxy refused one destination: the proxy itself is fine
        count = self._health.failures.get(event.upstream, 0) + 1
        self._health.failures[event.upstream] = count
        if self._failover():
            return  # the relay's health says when it is down (UpstreamHealthChanged)
        if count >= DOWN_AFTER_FAILURES and self._state is State.ON:
            text = f"Proxy {event.upstream} is not answering: {event.detail}"
            self._notice(NoticeKind.UPSTREAM_DOWN, "Proxy down", text)
            self._transition(State.DEGRADED, text)

    # -- other actions --------------------------------------------------------------------

    async def select_upstream(self, name: str) -> Status:
        """Make `name` the active upstream (saved); restarts the relay when it runs."""
        async with self._lock():
            try:
                config = with_active_upstream(self._store.load(), name)
                self._store.save(config)
            except Exception as exc:
                text = user_message(exc)
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
        return await self.test_upstream(None)

    async def test_upstream(self, name: str | None) -> str:
        """Test connection for the upstream `name` (None: the active one), the dashboard's
        "Test now": the result goes to the upstream's health and is a Notice."""
        await self._credentials_once()
        config = self._config
        if name is None:
            upstream = config.active_upstream() if config is not None else None
        else:
            known = config.upstreams if config is not None else ()
            upstream = next((u for u in known if u.name == name), None)
        if upstream is None:
            text = (
                "No upstream proxy is set up, so there is nothing to test."
                if name is None
                else f"There is no upstream named {name!r} in the settings."
            )
        else:
            source = self._credential_source
            credentials = source.get(upstream.name, upstream.username) if source else None
            probe = config.probe if config is not None else None
            target = probe.target if probe is not None else ("www.microsoft.com", 443)
            timeout = probe.timeout if probe is not None else 10.0
            if self._probe is not None:
                result = await self._probe(upstream, credentials)
            else:
                result = await probe_upstream(upstream, credentials, target, timeout)
            where = f"{upstream.host}:{upstream.port}"
            if ":" in upstream.host:
                where = f"[{upstream.host}]:{upstream.port}"
            host, port = target
            target_text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            said = describe_probe(result, where, target_text)
            if result.ok:
                text = f"Proxy {upstream.name} works. {said}"
            else:
                text = f"Proxy {upstream.name} failed the test. {said} {probe_advice(result)}"
                self._error(text)
            monitor = self._monitor_on(asyncio.get_running_loop())
            monitor.probe(
                ProbeRecord(
                    upstream.name,
                    time.time(),
                    result.ok,
                    result.latency_s,
                    result.words,
                    # What failed decides the state: a refused password or a forbidden
                    # target is not a proxy that is down.
                    outcome=result.outcome.value,
                )
            )
            self._snapshot = monitor.health(time.time())
        self._notice(NoticeKind.TEST_RESULT, "Test connection", text)
        self._changed()
        return text

    # -- the dashboard's data -------------------------------------------------------------

    def open_rows(self) -> list[ConnectionRow]:
        """The connections open now, as rows (seeds the dashboard's Active table)."""
        return self._monitor.open_rows() if self._monitor is not None else []

    async def close_connections(self, ids: Iterable[int]) -> int:
        """Close these connections (the user asked to); returns how many were open."""
        relay = self._relay
        wanted = tuple(ids)
        if relay is None or not wanted:
            return 0
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, relay.close_connections, wanted)
        except Exception as exc:
            text = f"The connections could not be closed: {user_message(exc)}"
            log.warning("%s", text, exc_info=not is_known(exc))
            self._error(text)
            self._changed()
            return 0

    def request_close_connections(self, ids: Iterable[int]) -> None:
        self.spawn(self.close_connections(tuple(ids)), "close connections")

    def request_test_upstream(self, name: str) -> None:
        self.spawn(self.test_upstream(name), "test upstream")

    def _monitor_on(self, loop: asyncio.AbstractEventLoop) -> Monitor:
        monitor = self._monitor
        if monitor is None:
            # Headless `run`: the relay shares this loop and nobody watches rows one by one,
            # so events and answers are reduced in batches, off each connection's moments.
            coalesce = HEADLESS_COALESCE if self._headless else 0.0
            attributor: Attributor | None = None
            if self._attribution:
                attributor = Attributor(loop, self._on_processes, answer_interval=coalesce)
            monitor = self._monitor = Monitor(
                self._upstreams_by_name, self._history, attributor, coalesce=coalesce
            )
        return monitor

    def _upstreams_by_name(self) -> dict[str, UpstreamProxy]:
        config = self._config
        return {u.name: u for u in config.upstreams} if config is not None else {}

    def _on_processes(self, results: list[tuple[int, ProcessInfo | None]]) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        try:
            changes = monitor.process_found(results)
        except Exception:
            log.exception("the connection monitor failed on process attribution")
            return
        if changes:
            self._publish(ConnectionsChanged(changes))

    async def _tick(self) -> None:
        """About once a second while a relay runs: its byte counters into the rows and the
        traffic rates, a fresh health snapshot, and the history writer's health."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._traffic_interval)
            relay, monitor = self._relay, self._monitor
            if relay is None or monitor is None:
                return  # started again with the next relay
            try:
                counters, up, down = await loop.run_in_executor(None, relay.traffic)
            except Exception as exc:  # the relay is stopping; the next tick will tell
                log.debug("reading the relay's traffic failed: %s", exc)
                continue
            now = time.time()
            try:
                changes = monitor.traffic(now, counters, up, down)
                self._snapshot = monitor.health(now)
            except Exception:
                log.exception("the connection monitor failed on traffic counters")
                continue
            if changes:
                self._publish(ConnectionsChanged(changes))
            self._check_history()
            self._changed()

    def _check_history(self) -> None:
        problem = self._history.error if self._history is not None else None
        if problem == self._history_problem:
            return
        self._history_problem = problem
        if problem is None:
            return
        self._error(problem)
        self._notice(NoticeKind.HISTORY_FAILED, "Connection history not written", problem)

    async def _close_monitor(self) -> None:
        """After the relay stopped: its last events, then held rows to the history, which
        writes what it has (in a worker thread: it may wait for the disk)."""
        if self._inbox is not None:
            self._inbox.flush()
        monitor, self._monitor = self._monitor, None
        history, self._history = self._history, None
        if monitor is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, monitor.close)
            except Exception:
                log.exception("closing the connection monitor failed")
        elif history is not None:
            await asyncio.get_running_loop().run_in_executor(None, history.close)

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

    async def _credentials_for_switch_on(self) -> None:
        """Every switch-on reads the passwords again (issue 14 bug 1: one changed with
        `tray-proxy credentials set` while the redirect was off), or waits for the start-up
        read still running. A keyring that fails now while the active proxy still has its
        password (read earlier, or from $CREDENTIALS_DIRECTORY) is only logged: a headless
        service often has no keyring at all."""
        read = self._credentials_read
        if read is None or read.done():
            if self._credentials is None:
                return
            read = self._credentials_read = self.spawn(
                self.refresh_credentials(report=self._active_password_missing),
                "read keyring",
            )
        with contextlib.suppress(Exception):
            await asyncio.shield(read)

    def _active_password_missing(self) -> bool:
        config, source = self._config, self._credential_source
        active = config.active_upstream() if config is not None else None
        if active is None or active.username is None or source is None:
            return False
        return source.get(active.name, active.username) is None

    async def refresh_credentials(
        self, *, report: Callable[[], bool] | None = None, also: Iterable[str] = ()
    ) -> str | None:
        """Re-read every upstream's password (and those of `also`) from the keyring, in the
        keyring's worker thread, within CREDENTIALS_READ_TIMEOUT. A failure is returned as
        text, and is an error entry and a notice unless `report` says it need not be."""
        if self._credentials is None:
            return None
        config = self._config
        known = config.upstreams if config is not None else ()
        names = list(dict.fromkeys([*(u.name for u in known), *also]))
        try:
            await asyncio.wait_for(self._credentials.refresh(names), CREDENTIALS_READ_TIMEOUT)
        except (CredentialStoreError, asyncio.TimeoutError) as exc:
            why = (
                str(exc)
                if isinstance(exc, CredentialStoreError)
                else f"it did not answer within {CREDENTIALS_READ_TIMEOUT:g} s"
            )
            then = (
                "Then switch off and on again (`tray-proxy disable`, `tray-proxy enable`)."
                if self._headless
                else "Then open Credentials to try again."
            )
            text = f"The proxy passwords could not be read from the keyring: {why}. {then}"
            if report is not None and not report():
                log.info("%s", text)
                return text
            self._error(text)
            self._notice(NoticeKind.KEYRING_UNAVAILABLE, "Keyring not available", text)
            self._changed()
            return text
        return None

    async def credentials_changed(self, name: str) -> dict[str, object]:
        """`tray-proxy credentials set NAME` stored a new password (the control socket's
        `credentials-changed NAME`; only the name travels, never a secret): read it from
        the keyring and let the relay try it at once, even when it is the same password
        as before (ARCHITECTURE, "Credentials": one failed login per password entered).
        Raises UserError when the keyring cannot be read."""
        config = self._config
        known = config is not None and any(u.name == name for u in config.upstreams)
        problem = await self.refresh_credentials(also=() if known else (name,))
        if problem is not None:
            raise UserError(problem)
        relay = self._relay
        if relay is not None:
            relay.retry_credentials(name)
        active = config.active_upstream() if config is not None else None
        in_use = relay is not None and active is not None and active.name == name
        log.info("the password of %s was changed outside the app; read again", name)
        return {"upstream": name, "in_use": in_use}

    async def save_upstream(self, upstream: UpstreamProxy) -> str | None:
        """Write `upstream` into the settings (replacing the one of that name), re-read the
        passwords, and let the running relay use them without dropping open tunnels (issue
        15 section 6): the relay reloads its upstreams and routing, the redirect excludes a
        changed address, and the proxy's rejected-credentials mark is cleared. Raises
        ConfigError when the file cannot be written; returns the keyring warning, if any."""
        loop = asyncio.get_running_loop()
        async with self._lock():
            config, old = with_upstream(
                await loop.run_in_executor(None, self._store.load), upstream
            )
            await loop.run_in_executor(None, self._store.save, config)
            previous, self._config = self._config, config
            self._changed()
        warning = await self.refresh_credentials()
        relay = self._relay
        if relay is not None and self._state.redirecting and not self._closed:
            async with self._lock():
                relay.reload_routing(config)
                if self._watch is not None:
                    self._watch.reload(self._watch_settings(config))
                changed = old is not None and old != upstream
                if changed or previous is None or previous.upstreams != config.upstreams:
                    try:
                        await self._life.update_redirect(config)
                    except Exception as exc:
                        text = f"The redirect was not updated: {user_message(exc)}"
                        log.warning("%s", text, exc_info=not is_known(exc))
                        self._error(text)
                        self._changed()
        if relay is not None:
            relay.retry_credentials(upstream.name)
        return warning

    def diagnostics(self, extra: Mapping[str, str] | None = None) -> str:
        """A plain-text report for bug reports. Holds no password: none is known here."""
        return diagnostics_report(self.status(), self._config, self._life.helper_running, extra)


def _needs_restart(old: RelaySettings, new: RelaySettings) -> list[str]:
    """The [relay] settings that changed and take effect only at the next switch-on."""
    changed = []
    if old.port != new.port:
        changed.append("the relay's port")
    if old.listen != new.listen:
        changed.append("the listen addresses")
    if old.redirect_ports != new.redirect_ports:
        changed.append("the redirected ports")
    named = {"port", "listen", "redirect_ports", "upstream"}
    others = [
        name
        for name in RelaySettings.__dataclass_fields__
        if name not in named and getattr(old, name) != getattr(new, name)
    ]
    changed.extend(f"relay.{name}" for name in others)
    return changed
