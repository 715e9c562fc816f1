"""The relay engine: accept redirected connections, find where they were going, tunnel them.

Must not import PySide6. This module owns all of the relay's I/O (accept, dial, pipe,
timeouts, close); protocol logic is in relay/protocol. It runs on whatever asyncio loop
calls `start()`: plain asyncio, uvloop or qasync.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import ipaddress
import logging
import os
import random
import resource
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from tray_proxy.errors import UserError
from tray_proxy.relay.aio import within
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    CredentialsAccepted,
    CredentialsRejected,
    EngineStopped,
    EventBus,
    ListenerError,
    RoutingError,
    TunnelEstablished,
    UpstreamFailed,
    UpstreamHealthChanged,
)
from tray_proxy.relay.failures import first_bytes_lost
from tray_proxy.relay.forward import ForwardLimits, Port80Memory, forward_http
from tray_proxy.relay.opening import ConnectRequests, Deadlines, EarlyDataTrust, Opening
from tray_proxy.relay.origdst import original_destination
from tray_proxy.relay.pipe import PipePool, ReadBatching, Tunnel, abort
from tray_proxy.relay.poller import Poller
from tray_proxy.relay.protocol.auth import basic_proxy_authorization
from tray_proxy.relay.protocol.errors import UsageError
from tray_proxy.relay.protocol.http_connect import format_authority
from tray_proxy.relay.protocol.opening_machine import (
    Command,
    Dial,
    Established,
    EvaluatePac,
    Failed,
    Forward,
    OpeningMachine,
    Phase,
    Report,
)
from tray_proxy.relay.protocol.peek import HostPeeker
from tray_proxy.relay.records import (
    Address,
    CloseReason,
    ConnectionRecord,
    ConnState,
    next_connection_id,
)
from tray_proxy.relay.secrets import Credentials, CredentialSource, StaticCredentialSource
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy
from tray_proxy.relay.spares import Spares
from tray_proxy.relay.upstream import (
    CredentialState,
    Dialer,
    UpstreamAuth,
    UpstreamError,
    open_tunnel,
)
from tray_proxy.routing.health import BreakerState, Health, HealthChange
from tray_proxy.routing.pac_worker import PacScript
from tray_proxy.routing.router import Decision, DecisionKind, Router, RoutingTable
from tray_proxy.routing.settings import DEFAULT_PAC, RoutingSettings
from tray_proxy.tasks import spawn

log = logging.getLogger("tray_proxy.relay")

_ACCEPT_BATCH = 128
_PEEK_RECV = 16384
_ACCEPT_BACKOFF = 0.5
# Seconds the fast path's route (and its credential lookup) is reused: a changed password
# is used within this time (docs/relay.md, "The route reused for 0.5 s").
_ROUTE_TTL = 0.5
_gc_frozen = False  # see RelayEngine.start
# accept() failures that mean "out of a resource for now": keep serving, retry later.
_ACCEPT_PRESSURE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How long the largest number of openings in progress at once sizes the spares.
_BURST_WINDOW = 1.0
# Spares kept for connections that come one at a time (dialed when a tunnel ends): a burst's
# own accepts dial more (up to spare_connections), and those expire once it is over.
_SPARES_BETWEEN_BURSTS = 2
# How often the PAC script's source is looked at (PacScript.refresh fetches only when due).
_PAC_TICK = 5.0
# How long start() waits for the first fetch of the PAC script (then it goes on without).
_PAC_FIRST_FETCH = 10.0
_STAT_KEYS = {reason: reason.value for reason in CloseReason}  # .value is a Python call
_CLOSED_BY_USER = "closed from the dashboard"
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_FAILURES = frozenset(
    {
        CloseReason.NO_UPSTREAM,
        CloseReason.LOOP,
        CloseReason.CONFIG_ERROR,
        CloseReason.UPSTREAM_UNREACHABLE,
        CloseReason.UPSTREAM_TIMEOUT,
        CloseReason.UPSTREAM_REFUSED,
        CloseReason.UPSTREAM_AUTH_FAILED,
        CloseReason.UPSTREAM_PROTOCOL_ERROR,
        CloseReason.INTERNAL_ERROR,
    }
)


def make_router(
    routing: RoutingSettings, upstreams: Sequence[UpstreamProxy], active: str | None
) -> Router:
    """The router for these settings: rules, the PAC script when the default is "pac"
    (fetched and refreshed by the engine that gets the router), health with jitter."""
    table = RoutingTable(routing, upstreams, active)
    pac = None
    if routing.default == DEFAULT_PAC and routing.pac_url:
        pac = PacScript(routing.pac_url)
    return Router(table, pac, Health(random=random.random))


class RelayStartError(UserError):
    """The relay could not start listening; the message says why and what to do."""


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each tunnel holds two sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class _Route:
    """The fast path's answer for the active upstream, and what it depends on."""

    __slots__ = ("expires", "settings", "auth", "auth_state", "route")

    def __init__(
        self,
        expires: float,
        settings: RelaySettings,
        auth: UpstreamAuth | None,
        auth_state: CredentialState | None,
        route: tuple[UpstreamProxy, tuple[int, Address], tuple[str, str] | None] | None,
    ) -> None:
        self.expires = expires
        self.settings = settings
        self.auth = auth
        self.auth_state = auth_state
        self.route = route


class RelayEngine:
    """A transparent relay. Use: `await start()`, then later `await stop()`."""

    def __init__(
        self,
        settings: RelaySettings,
        upstreams: Sequence[UpstreamProxy],
        credentials: CredentialSource | None = None,
        bus: EventBus | None = None,
        *,
        destination_of: Callable[[socket.socket], Address | None] | None = None,
        router: Router | None = None,
    ) -> None:
        """`destination_of` finds a connection's original destination (default:
        SO_ORIGINAL_DST); tests may swap it. `router` decides each connection's way (rules,
        PAC, failover, health: tray_proxy/routing); None: every connection goes through the
        active upstream, with no failover."""
        self.settings = settings
        self.upstreams = tuple(upstreams)
        self._router = router
        self._configured = frozenset(u.name for u in self.upstreams)
        # Upstreams that refused CONNECT :80: plain HTTP to them is forwarded (forward.py).
        self._port80 = Port80Memory()
        self._pac_words = ""  # the last PAC failure published (RoutingError), once per change
        self._texts: dict[int, tuple[Decision, str]] = {}  # Decision.text, by decision object
        self._pac_refresher: asyncio.Task[None] | None = None
        # The most fast-path openings in progress at once lately, and when (spares' sizing).
        self._burst = 0
        self._burst_at = 0.0
        self.credentials: CredentialSource = credentials or StaticCredentialSource()
        self.bus = bus or EventBus()
        self.stats: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[socket.socket] = []
        self._bound: dict[socket.socket, Address] = {}  # listener -> its address
        self._addresses: tuple[Address, ...] = ()
        self._records: dict[int, ConnectionRecord] = {}
        self._tunnels: dict[int, Tunnel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Connections on the Task path, by id, so the user can close them (close_connections);
        # the ids among them the user closed, so their cancellation says so.
        self._serving: dict[int, asyncio.Task[None]] = {}
        self._closing_by_user: set[int] = set()
        # Bytes of the connections that closed since start (traffic()).
        self._closed_up = 0
        self._closed_down = 0
        self._pool = PipePool()
        self._batching: ReadBatching | None = None
        self._deadlines: Deadlines | None = None
        self._poller: Poller | None = None
        self._spares: Spares | None = None  # connections to the proxy made ahead of need
        # The fast path's last route, reused for _ROUTE_TTL seconds (see _fast_route).
        self._route: _Route | None = None
        self._dialer = Dialer(settings.source_ports)
        self._own_ports = settings.source_ports
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._stopping = False
        self._destination_of = destination_of
        # upstream name -> its remembered scheme and credential verification (see _serve)
        self._auth: dict[str, UpstreamAuth] = {}
        # The fast path's CONNECT bytes, Proxy-Authorization included: this engine's own,
        # cleared when the credentials change and when it stops.
        self._requests = ConnectRequests()
        # Which proxies keep the bytes sent behind a CONNECT (relay.early_data "auto"); made
        # anew when the upstreams change.
        self._early = EarlyDataTrust(self.stats)
        # Credentials given by set_credentials(), over what `credentials` has (None: none).
        self._overrides: dict[str, Credentials | None] = {}
        # upstream name -> the timer of its next re-verification of rejected credentials
        self._reverify: dict[str, asyncio.TimerHandle] = {}
        # Listeners on container bridges' addresses (set_extra_listen), by address.
        self._extra: dict[str, socket.socket] = {}
        self._extra_wanted: tuple[str, ...] = ()

    # -- public ---------------------------------------------------------------------------

    @property
    def addresses(self) -> tuple[Address, ...]:
        """Where the relay listens (the real ports, also when settings.port is 0)."""
        return self._addresses

    @property
    def active_upstream(self) -> UpstreamProxy | None:
        """The upstream the fast path dials ahead of the routing decision: the router's
        first by default (then the others as failover), else [relay] upstream or the
        first one."""
        router = self._router
        if router is not None:
            failover = router.table.failover
            return router.upstream(failover[0]) if failover else None
        wanted = self.settings.upstream
        for upstream in self.upstreams:
            if wanted is None or upstream.name == wanted:
                return upstream
        return None

    def retry_credentials(self, upstream: str | None = None) -> None:
        """The user entered the password again, maybe the same one (None: for every
        upstream): a fresh credential version, whatever the proxy said of the last one, and
        one verification at once (issue 16 item 7). Call on the engine's loop."""
        for name, auth in list(self._auth.items()):
            if upstream is None or name == upstream:
                self._renew(name, auth)

    def set_credentials(self, upstream: str, credentials: Credentials | None) -> None:
        """From now on use `credentials` for `upstream` (None: it has no password), over what
        the CredentialSource says: the next connection uses them, after one verification
        (a wrong password costs one failed login). Call on the engine's loop."""
        self._overrides[upstream] = credentials
        auth = self._auth.get(upstream)
        if auth is not None:
            self._renew(upstream, auth)
        else:
            self._forget_secrets()

    def _renew(self, name: str, auth: UpstreamAuth) -> None:
        auth.renew()
        self._forget_secrets()
        timer = self._reverify.pop(name, None)
        if timer is not None:
            timer.cancel()
        upstream = self._upstream_named(name)
        if upstream is not None and not self._stopping and self._loop is not None:
            self._spawn(self._verify(upstream, auth, None), f"verify {name}")

    def _forget_secrets(self) -> None:
        """Drop what holds a Proxy-Authorization header: the fast path's kept CONNECT bytes
        and its route."""
        self._requests.clear()
        self._route = None

    def _upstream_named(self, name: str) -> UpstreamProxy | None:
        return next((u for u in self.upstreams if u.name == name), None)

    @property
    def router(self) -> Router | None:
        return self._router

    def set_routing(self, upstreams: Sequence[UpstreamProxy], router: Router | None) -> None:
        """Use new upstreams and routing (a reload: settings file changed, SIGHUP, the UI):
        new connections follow them at once; open tunnels and openings in progress are left
        alone. Health carries over when `router` is the running one, reloaded
        (`router.reload(RoutingTable(...))` before this call). Call on the engine's loop."""
        self.upstreams = tuple(upstreams)
        self._configured = frozenset(u.name for u in self.upstreams)
        self._router = router
        self._port80.forget()
        self._texts.clear()
        self._pac_words = ""
        self._forget_secrets()
        self._early = EarlyDataTrust(self.stats)

    def reload_routing(
        self, routing: RoutingSettings, upstreams: Sequence[UpstreamProxy], active: str | None
    ) -> None:
        """Reload from the settings (`[routing]`, `[[rule]]`, `[[upstream]]`, `[relay]
        upstream`) without dropping open tunnels: the running router keeps its upstreams'
        health; the PAC script is replaced (and fetched) only when its URL changed. Call on
        the engine's loop."""
        router = self._router
        if router is None:
            router = make_router(routing, upstreams, active)
        else:
            router.reload(RoutingTable(routing, upstreams, active))
            old = router.pac
            url = routing.pac_url if routing.default == DEFAULT_PAC else None
            if getattr(old, "location", None) != url:
                if isinstance(old, PacScript):
                    old.close()
                router.set_pac(PacScript(url) if url else None)
        self.set_routing(upstreams, router)
        if self._loop is not None and not self._stopping and router.pac is not None:
            self._start_pac_refresher()

    def upstream_health(self) -> dict[str, tuple[bool, float | None]]:
        """Each upstream's health as the router sees it: (usable now, average handshake
        latency in seconds or None). Empty without a router. Call on the engine's loop."""
        router = self._router
        if router is None:
            return {}
        health, now = router.health, time.monotonic()
        names = [*router.table.upstreams]
        return {
            n: (
                health.state(n) is BreakerState.CLOSED or health.available(n, now),
                health.latency(n),
            )
            for n in names
        }

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None:
        """The outcome of an active probe through `upstream` (the controller's probe loop):
        it feeds the upstream's health like a real handshake; a change (down, back up) is
        published as UpstreamHealthChanged. Call on the engine's loop."""
        self._report(Report(upstream, ok, latency, words))

    def _credentials_of(self, upstream: UpstreamProxy) -> Credentials | None:
        router = self._router
        if router is not None and upstream.name not in self._configured:
            # An ad-hoc upstream from the PAC script: the login of a configured upstream on
            # the same host, or none (docs/routing.md, "same host, same login").
            borrowed = router.credentials_name(upstream.name)
            configured = self._upstream_named(borrowed) if borrowed is not None else None
            if configured is None:
                return None
            upstream = configured
        overrides = self._overrides
        if overrides and upstream.name in overrides:
            return overrides[upstream.name]
        return self.credentials.get(upstream.name, upstream.username)

    def _auth_of(self, upstream: UpstreamProxy) -> UpstreamAuth:
        auth = self._auth.get(upstream.name)
        if auth is None:
            name = upstream.name

            def rejected(creds: Credentials) -> None:
                self._forget_secrets()
                after = self.settings.reverify_after
                if self._auth[name].announce():
                    log.warning(
                        "proxy %s rejected the credentials of %s: they are tried again in %gs "
                        "(one attempt), or at once when entered again (tray-proxy credentials "
                        "set %s)",
                        upstream,
                        creds.username,
                        after,
                        name,
                    )
                    self.bus.publish(CredentialsRejected(name, creds.username))
                else:
                    log.info(
                        "proxy %s still rejects the credentials of %s: next try in %gs",
                        upstream,
                        creds.username,
                        after,
                    )
                self._schedule_reverify(name)

            def accepted(creds: Credentials) -> None:
                log.info("proxy %s accepted the credentials of %s again", upstream, creds.username)
                self.bus.publish(CredentialsAccepted(name, creds.username))

            auth = self._auth[name] = UpstreamAuth(rejected, accepted)
        return auth

    def _schedule_reverify(self, name: str) -> None:
        """One re-verification of rejected credentials after the backoff (reverify_after)."""
        loop = self._loop
        if loop is None or self._stopping:
            return
        timer = self._reverify.pop(name, None)
        if timer is not None:
            timer.cancel()
        self._reverify[name] = loop.call_later(
            self.settings.reverify_after, self._reverify_now, name
        )

    def _reverify_now(self, name: str) -> None:
        self._reverify.pop(name, None)
        auth = self._auth.get(name)
        upstream = self._upstream_named(name)
        if self._stopping or auth is None or upstream is None:
            return
        version = auth.reverify()
        if version is not None:
            self._spawn(self._verify(upstream, auth, version), f"verify {name}")

    async def _verify(
        self, upstream: UpstreamProxy, auth: UpstreamAuth, version: int | None
    ) -> None:
        """One CONNECT with the current credentials to where the last credentialed tunnel
        went; its outcome settles them (UpstreamAuth) like any connection's. `version`: the
        rejected version a re-verification concerns (None: the user entered the password).

        Without a target (no tunnel yet) nothing is sent: the next connection verifies."""
        creds = self._credentials_of(upstream)
        target = auth.target
        if creds is None or target is None:
            return
        try:
            sock, _trailing = await open_tunnel(
                self._dialer,
                upstream,
                target,
                creds,
                auth,
                connect_timeout=self.settings.connect_timeout,
                handshake_timeout=self.settings.handshake_timeout,
                reserved=upstream.port in self.settings.redirect_ports,
            )
        except UpstreamError as exc:
            if version is not None and not exc.rejected and auth.back_off(version):
                # No answer on the credentials: the next period tries again, rather than
                # every connection now.
                log.info(
                    "re-checking the credentials for %s: %s; next try in %gs",
                    upstream,
                    exc.detail,
                    self.settings.reverify_after,
                )
                self._schedule_reverify(upstream.name)
            return
        sock.close()

    def traffic(self) -> tuple[dict[int, tuple[int, int]], int, int]:
        """The open connections' (bytes up, bytes down) by id, and the bytes up and down
        since start, closed connections included. Call on the engine's loop."""
        counters = {i: (r.bytes_up, r.bytes_down) for i, r in self._records.items()}
        up, down = self._closed_up, self._closed_down
        for conn_up, conn_down in counters.values():
            up += conn_up
            down += conn_down
        return counters, up, down

    def close_connections(self, ids: Iterable[int]) -> int:
        """Close the open connections with these ids (the user asked to, from the
        dashboard), whatever phase they are in; unknown or closed ids are ignored. Returns
        how many it closed. Call on the engine's loop.

        The client gets a reset, so the program sees a failed transfer rather than a
        complete one; the upstream side is closed. Each ends with CLOSED_BY_USER: a tunnel
        or a fast-path opening at once, a connection on the Task path once its task has
        unwound (within this loop iteration or the next).
        """
        tunnels = self._tunnels
        pending = self._deadlines.pending if self._deadlines is not None else {}
        closed = 0
        for conn_id in ids:
            tunnel = tunnels.get(conn_id)
            if tunnel is not None:
                if not tunnel.closed:
                    with contextlib.suppress(OSError):
                        tunnel.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    tunnel.close(CloseReason.CLOSED_BY_USER, _CLOSED_BY_USER)
                    closed += 1
                continue
            opening = pending.get(conn_id)
            if opening is not None:
                opening.abort(CloseReason.CLOSED_BY_USER, _CLOSED_BY_USER)
                closed += 1
                continue
            task = self._serving.get(conn_id)
            if task is not None and conn_id not in self._closing_by_user and not task.done():
                self._closing_by_user.add(conn_id)
                task.cancel()
                closed += 1
        return closed

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._batching = ReadBatching(self._loop)
        self._poller = Poller(self._loop)
        limits = [self.settings.connect_timeout, self.settings.handshake_timeout]
        if self.settings.peek_timeout > 0:
            limits.append(self.settings.peek_timeout)
        self._deadlines = Deadlines(self._loop, max(0.001, min(0.05, min(limits) / 4)))
        if self.settings.spare_connections > 0:
            self._spares = Spares(
                self._loop,
                self.settings.spare_connections,
                self.settings.spare_max_age,
                self.stats,
            )
        raise_nofile_limit()
        if self._router is not None and self._router.pac is not None:
            await self._refresh_pac(first=True)
            self._start_pac_refresher()
        port = self.settings.port
        try:
            for host in self.settings.listen:
                sock = self._listen(host, port)
                self._listeners.append(sock)
                if port == 0:  # all listeners share the port the first one got
                    port = sock.getsockname()[1]
        except BaseException:
            self._close_listeners()
            raise
        self._bound = {
            s: (str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._listeners
        }
        self._addresses = tuple(self._bound.values())
        for sock in self._listeners:
            self._watch_listener(sock)
        if self._extra_wanted:
            self.set_extra_listen(self._extra_wanted)
        self._schedule_sweep()
        # Everything allocated so far lives as long as the process: out of the collector's
        # full passes (docs/relay.md, "gc.freeze() once"). Once per process: frozen garbage
        # is never collected, so a later start (new settings) must not freeze again.
        global _gc_frozen
        if not _gc_frozen:
            _gc_frozen = True
            gc.freeze()
        log.info("relay listening on %s", ", ".join(format_authority(*a) for a in self._addresses))

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let open connections finish (bounded by the drain timeout), then
        end every connection still open at once, and return.

        Also when this coroutine is cancelled (a caller that stopped waiting): whatever is
        still open is reset before the cancellation goes on, so no client is left hanging.
        """
        if self._loop is None or self._stopping:
            return
        self._stopping = True
        self._close_listeners()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._spares is not None:
            self._spares.close()
        for timer in self._reverify.values():
            timer.cancel()
        self._reverify.clear()
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        try:
            if self._records and timeout > 0:
                self._idle.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout)
            self._end_openings()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._end_openings()
            # Past the drain every client still connected sees its connection end now: a
            # reset (SO_LINGER 0) drops what waits in the socket's send buffer, where a plain
            # close would leave a slow reader receiving it for minutes, its socket half-closed
            # (issue 14 bug 2). The proxy's side is reset as well: nothing half-open is left.
            for tunnel in list(self._tunnels.values()):
                tunnel.close(CloseReason.SHUTDOWN, "the relay stopped", reset=True)
            self._pool.close()
            if self._poller is not None:
                self._poller.close()
            # No secret outlives the engine in its caches, and no auth thread runs on.
            self._forget_secrets()
            self._overrides.clear()
            if self._router is not None and isinstance(self._router.pac, PacScript):
                self._router.pac.close()  # its child process
            threads = [t for t in (auth.close() for auth in self._auth.values()) if t]
            log.info("relay stopped")
            self.bus.publish(EngineStopped())
        if threads:
            # Idle ones end at once; one inside an NTLM/Kerberos step within its handshake.
            loop = self._loop
            for executor in threads:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        loop.run_in_executor(None, executor.shutdown),
                        self.settings.handshake_timeout,
                    )

    def _end_openings(self) -> None:
        """End the connections not yet tunnelled: fast-path openings at once (reset), those
        on the Task path by cancelling their tasks (each resets its client as it unwinds)."""
        if self._deadlines is not None:
            for opening in list(self._deadlines.pending.values()):
                opening.abort(CloseReason.SHUTDOWN, "the relay stopped")
            self._deadlines.close()
        for task in list(self._tasks):
            task.cancel()

    # -- accepting ------------------------------------------------------------------------

    def _listen(self, host: str, port: int) -> socket.socket:
        try:
            return self._bind_listener(host, port)
        except OSError as exc:
            where = format_authority(host, port)
            if exc.errno == errno.EADDRINUSE:
                raise RelayStartError(
                    f"cannot listen on {where}: the port is in use by another program; "
                    "stop it or choose another relay.port in the config"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise RelayStartError(
                    f"cannot listen on {where}: this machine has no such address "
                    "(is IPv6 disabled? remove it from relay.listen)"
                ) from None
            raise RelayStartError(f"cannot listen on {where}: {exc.strerror or exc}") from None

    @staticmethod
    def _bind_listener(host: str, port: int) -> socket.socket:
        """A listening non-blocking socket on host:port; raises OSError."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it: the relay passes on what the sender wrote at once,
            # as the upstream side does; the sender's own stack already applied Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The client side never leaves this host (loopback, or a container's bridge):
            # accepted sockets inherit Reno, which every user may pick (docs/relay.md, "Reno
            # on sockets that never leave this host"; sockets.keep_on_host for the upstream).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(4096)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _close_listeners(self) -> None:
        for sock in [*self._listeners, *self._extra.values()]:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        self._extra.clear()

    # -- extra listeners (container bridges) ---------------------------------------------

    def set_extra_listen(self, addresses: Sequence[str]) -> tuple[Address, ...]:
        """Listen also on each of `addresses` (a container bridge's own address, where the
        redirect sends the containers' connections: issue 16 item 4), on the relay's port;
        stop listening on extra addresses no longer given. Returns the extra addresses
        listened on now.

        An address that cannot be listened on is logged and published as a ListenerError:
        the engine goes on serving. Call on the engine's loop; from another thread the call
        is handed to the loop and returns at once (what it listens on then comes with
        `addresses`)."""
        wanted = tuple(addresses)
        loop = self._loop
        if loop is None:
            self._extra_wanted = wanted  # start() listens on them
            return ()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop:
            loop.call_soon_threadsafe(self.set_extra_listen, wanted)
            return ()
        if self._stopping:
            return ()
        port = self._addresses[0][1] if self._addresses else self.settings.port
        hosts: list[str] = []
        for text in wanted:
            try:
                host = str(ipaddress.ip_address(text))
            except ValueError:
                self._listener_error(f"cannot listen on {text!r} for containers: not an address")
                continue
            if host not in hosts:
                hosts.append(host)
        for host in [h for h in self._extra if h not in hosts]:
            sock = self._extra.pop(host)
            loop.remove_reader(sock.fileno())
            self._bound.pop(sock, None)
            sock.close()
            log.info("relay no longer listening on %s", format_authority(host, port))
        base = {a[0] for a in (self._bound[s] for s in self._listeners)}
        for host in hosts:
            if host in self._extra or host in base:
                continue
            try:
                sock = self._bind_listener(host, port)
            except OSError as exc:
                self._listener_error(
                    f"cannot listen on {format_authority(host, port)} for containers: "
                    f"{exc.strerror or exc}; connections from the containers behind it cannot "
                    "reach the relay"
                )
                continue
            self._extra[host] = sock
            self._bound[sock] = (host, port)
            self._watch_listener(sock)
            log.info("relay also listening on %s", format_authority(host, port))
        self._addresses = tuple(self._bound.values())
        return tuple(self._bound[s] for s in self._extra.values())

    def _listener_error(self, detail: str) -> None:
        log.warning("%s", detail)
        self.bus.publish(ListenerError(detail))

    def _on_acceptable(
        self,
        listener: socket.socket,
        local: Address,
        family: int,
        accept: Callable[[], tuple[int, tuple[Any, ...]]],
    ) -> None:
        """Accept what is pending. This is where every connection's latency starts: see
        _accept_one for what happens before its CONNECT leaves."""
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                self.stats["accept_errors"] += 1
                detail = f"accept failed: {exc.strerror or exc}; existing tunnels keep running"
                log.warning("%s", detail)
                self.bus.publish(ListenerError(detail))
                if exc.errno in _ACCEPT_PRESSURE:
                    # Out of descriptors or memory: pause this listener briefly instead of
                    # spinning on a readiness that accept() cannot serve.
                    loop = self._loop
                    assert loop is not None
                    loop.remove_reader(listener.fileno())
                    loop.call_later(_ACCEPT_BACKOFF, self._resume_accepting, listener)
                return
            try:
                conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)
                continue
            try:
                self._accept_one(conn, addr, local, family)
            except Exception:
                log.exception("internal error on a new connection")
                abort(conn)
            self.stats["accepted"] += 1

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._loop is not None and not self._stopping and listener.fileno() >= 0:
            self._watch_listener(listener)

    def _watch_listener(self, listener: socket.socket) -> None:
        assert self._loop is not None
        # What _on_acceptable needs comes as arguments: no lookups before the accept, and
        # listener._accept rather than accept() (docs/relay.md, "listener._accept").
        self._loop.add_reader(
            listener.fileno(),
            self._on_acceptable,
            listener,
            self._bound[listener],
            int(listener.family),
            listener._accept,  # type: ignore[attr-defined]
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """The only place the engine starts tasks (through tasks.spawn: referenced, a failure
        nobody retrieved logged), kept also in the engine's own set, which stop() cancels and
        awaits: the loop may run other work's tasks too (tray-proxy run's controller).

        The callback fast path (relay/opening.py) starts none; a Task-path connection pays
        about 0.9 µs more here than with a bare create_task (docs/relay.md)."""
        assert self._loop is not None
        task = spawn(coro, name=f"tray-proxy {name}", loop=self._loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_serve(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        peeker: HostPeeker | None,
        peeked: bytes,
        *,
        routed: bool = False,
        opened: tuple[socket.socket, bytes] | None = None,
        decision: Decision | None = None,
        machine: tuple[OpeningMachine, list[Command]] | None = None,
    ) -> None:
        """A connection goes on in a Task (_serve), found by its id while it lasts."""
        task = self._spawn(
            self._serve(
                record,
                conn,
                peeker,
                peeked,
                routed=routed,
                opened=opened,
                decision=decision,
                machine=machine,
            ),
            "conn",
        )
        self._serving[record.id] = task
        task.add_done_callback(functools.partial(self._served, record, conn))

    def _served(
        self, record: ConnectionRecord, conn: socket.socket, _task: asyncio.Task[None]
    ) -> None:
        self._serving.pop(record.id, None)
        by_user = record.id in self._closing_by_user
        if by_user:
            self._closing_by_user.discard(record.id)
        if record.id in self._records and record.id not in self._tunnels:
            # Cancelled before its first step: the coroutine never ran, nor its cleanup.
            if by_user:
                reason, detail = CloseReason.CLOSED_BY_USER, _CLOSED_BY_USER
            else:
                reason, detail = CloseReason.SHUTDOWN, "the relay stopped"
            self._finish(record, conn, reason, detail, reset=True)

    # -- one connection -------------------------------------------------------------------

    def _is_relay_address(self, dst: Address, local: Address) -> bool:
        if dst == local:
            return True
        ip, port = dst
        if port != local[1]:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return addr.is_loopback or any(ip == a[0] for a in self._addresses)

    def _accept_one(
        self, conn: socket.socket, client: tuple[Any, ...], local: Address, family: int
    ) -> None:
        """A new connection to the listener at `local` (`conn` still blocking): check
        where it was going, then open its tunnel, on the fast path (relay/opening.py) when
        it applies, else in a Task.

        On the fast path the CONNECT leaves before anything else is done (Opening.begin):
        the record, the event, the non-blocking mode of `conn` and the registrations come
        after it, while the proxy is already working on the request. Every step before it
        counts in every connection's latency.
        """
        if self._destination_of is None:
            dst = original_destination(conn, family)
        else:
            dst = self._destination_of(conn)
        # Only a connection to the relay's own port can have been made to the relay itself.
        redirected = dst is not None and (
            dst[1] != local[1] or not self._is_relay_address(dst, local)
        )
        own = self._own_ports
        if (
            redirected
            and own is not None
            and own[0] <= client[1] <= own[1]
            and self._dialer.dialed_from(client[1])
        ):
            # From a reserved source port the relay just dialed from: one of its own
            # connections (DIRECT, or to an upstream on 80/443) that the redirect sent back.
            # Serving it would loop. A port of the range the relay did not just use is a
            # program's: conntrack gives a client connection another source port, anywhere
            # in 1024-65535, when its 4-tuple would clash with another's after the redirect
            # (all of them land on the relay's one port); 2-3 % of the connections at 1,000 a
            # second over four addresses were reset as loops (bench/dashboard.py).
            self._own_caught(conn, client, dst, local)
            return
        opening = None
        if redirected:
            assert dst is not None
            fast = self._fast_route(dst)
            if fast is not None:
                assert self._poller is not None and self._deadlines is not None
                opening = Opening(
                    self._poller,
                    self,
                    self._deadlines,
                    self.settings,
                    dst,
                    conn,
                    *fast,
                    self._spares,
                    self._requests,
                    self._early,
                )
                opening.begin()
        conn.setblocking(False)
        # An IPv6 address comes with flow info and scope id: keep (host, port).
        record = ConnectionRecord(
            id=next_connection_id(),
            client=(client[0], client[1]),
            original_dst=dst,
        )
        self._records[record.id] = record
        if self.bus.observed:
            self.bus.publish(ConnectionOpened(record.id, record.client, dst, record.opened_at))
        if dst is None:
            self._finish(
                record,
                conn,
                CloseReason.NO_ORIGINAL_DST,
                "no redirect record for this connection (it was made to the relay port "
                "directly, not redirected by nftables)",
            )
            return
        if not redirected:
            self._finish(
                record,
                conn,
                CloseReason.NOT_REDIRECTED,
                "connection made to the relay port directly, not redirected",
            )
            return
        if opening is None:
            peeker = None
            if self.settings.peek_timeout > 0:
                peeker = HostPeeker(self.settings.peek_max_bytes)
            self._spawn_serve(record, conn, peeker, b"")
            return
        record.upstream = opening.upstream.name
        opening.start(record)
        deadlines = self._deadlines
        # More than one opening in progress: a burst (see _top_up_spares).
        if self._spares is not None and deadlines is not None and len(deadlines.pending) > 1:
            self._top_up_spares(opening.address)

    def _own_caught(
        self, conn: socket.socket, client: tuple[Any, ...], dst: Address | None, local: Address
    ) -> None:
        conn.setblocking(False)
        record = ConnectionRecord(
            id=next_connection_id(), client=(client[0], client[1]), original_dst=dst
        )
        self._records[record.id] = record
        if self.bus.observed:
            self.bus.publish(ConnectionOpened(record.id, record.client, dst, record.opened_at))
        first, last = self._own_ports or (0, 0)
        self._finish(
            record,
            conn,
            CloseReason.LOOP,
            f"the redirect caught one of the relay's own connections (source port "
            f"{client[1]}, in relay.source_ports {first}-{last}): the redirect must let "
            "that range through",
            reset=True,
        )

    def _fast_route(
        self, dst: Address
    ) -> tuple[UpstreamProxy, tuple[int, Address], tuple[str, str] | None] | None:
        """Upstream, its address and the Proxy-Authorization header, when the fast path
        applies (see relay/opening.py); else None.

        The answer is worked out at most every _ROUTE_TTL seconds, and again at once when
        the proxy's verdict on the credentials changes (a 407 makes them doubtful: the next
        connection goes to the Task path to re-check them); docs/relay.md says what the
        reuse saves."""
        if self._dialer.is_upstream_address(dst):
            return None  # a loop: the Task path refuses it
        return self._current_route().route

    def _current_route(self) -> _Route:
        now = time.monotonic()
        route = self._route
        if (
            route is None
            or route.expires <= now
            or route.settings is not self.settings
            or (route.auth is not None and route.auth.state is not route.auth_state)
        ):
            route = self._route = self._new_route(now)
        return route

    def _new_route(self, now: float) -> _Route:
        upstream = self.active_upstream
        expires = now + _ROUTE_TTL
        if (
            upstream is None
            or upstream.kind is not UpstreamKind.HTTP
            or upstream.port in self.settings.redirect_ports  # needs a reserved port
        ):
            return _Route(expires, self.settings, None, None, None)
        known = self._dialer.known_addresses(upstream.host, upstream.port)
        if not known:
            return _Route(expires, self.settings, None, None, None)
        creds = self._credentials_of(upstream)
        if creds is None:
            # A username without a password: the Task path says what is missing, without
            # first asking the proxy for a 407.
            route = None if upstream.username else (upstream, known[0], None)
            return _Route(expires, self.settings, None, None, route)
        auth = self._auth_of(upstream)
        state = auth.state
        pinned = None if upstream.auth.value == "auto" else upstream.auth.value
        # Only credentials the proxy took, with Basic: anything else (new, changed, refused,
        # another scheme) is the Task path's to verify, one connection at a time.
        if not auth.verified(creds) or not auth.sends_basic(pinned):
            return _Route(expires, self.settings, auth, state, None)
        try:
            header = basic_proxy_authorization(creds.username, creds.password.reveal())
        except UsageError:
            # The Task path words the configuration error.
            return _Route(expires, self.settings, auth, state, None)
        return _Route(expires, self.settings, auth, state, (upstream, known[0], header))

    # -- the fast path's hooks (relay/opening.py) -----------------------------------------

    def keeps(self, opening: Opening) -> bool:
        router = self._router
        dst = opening.dst
        if router is None:
            # One upstream: the fast path goes on unless plain HTTP to it is forwarded.
            return dst[1] != 80 or not self._port80.forwards(opening.upstream, 80)
        host = opening.host
        now = time.monotonic()
        if router.pac is not None and router.pac_pending(host, dst[0], dst[1], now):
            return False  # the coroutine path evaluates it off the loop
        url = None
        if dst[1] == 80 and router.pac is not None:
            peeker = opening.peeker
            url = _request_url(host, dst, peeker.buffered if peeker is not None else b"")
        decision = opening.decision = router.decide(host, dst[0], dst[1], url, now)
        ways = decision.upstreams
        if decision.kind is not DecisionKind.PROXY or not ways or ways[0] != opening.upstream.name:
            return False
        return not (dst[1] == 80 and self._port80.forwards(opening.upstream, 80))

    def routed(self, record: ConnectionRecord, decision: Decision | None) -> None:
        if decision is not None:
            # The common case inline (one call less per connection): a decision seen before.
            known = self._texts.get(id(decision))
            if known is not None and known[0] is decision and decision.decided_by != "pac":
                record.route = known[1]
                record.decided_by = decision.decided_by
            else:
                self._note_decision(record, decision)
        if self.bus.observed:
            self.bus.publish(
                ConnectionRouted(
                    record.id, record.host, record.upstream, record.route, record.decided_by
                )
            )

    def opened(
        self, record: ConnectionRecord, conn: socket.socket, upstream: socket.socket
    ) -> None:
        router = self._router
        if router is not None and record.upstream is not None:
            # Inline rather than _fast_success: every fast-path connection passes here.
            change = router.health.success(
                record.upstream, time.monotonic(), record.handshake_latency
            )
            if change is not None:
                self._health_changed(change)
        self._start_tunnel(record, conn, upstream)

    def failed(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        exc: UpstreamError,
        peeked: bytes,
        decision: Decision | None,
    ) -> None:
        if exc.rejected:
            self._rejected_on_fast_path(exc)
        if decision is None and self._router is None and record.upstream is not None:
            # One upstream, no failover: the machine still says whether to forward port 80.
            decision = Decision(DecisionKind.PROXY, (record.upstream,))
        if decision is None or decision.kind is not DecisionKind.PROXY:
            if self._router is not None and record.upstream is not None:
                self._report(Report(record.upstream, False, words=exc.detail))
            self._upstream_failed(record, conn, exc)
            return
        # The opening machine picks up where the fast path failed: failover to the next
        # upstream, or port-80 forwarding, or the failure in its words.
        now = time.monotonic()
        machine = OpeningMachine()
        machine.start(False)
        machine.decided(decision, now)
        commands = self._way_failed(record, machine, exc, now)
        if any(isinstance(c, Dial | Forward) for c in commands):
            self._spawn_serve(record, conn, None, peeked, routed=True, machine=(machine, commands))
            return
        self._carry_out_now(record, conn, commands)

    def _upstream_failed(
        self, record: ConnectionRecord, conn: socket.socket, exc: UpstreamError
    ) -> None:
        self.bus.publish(
            UpstreamFailed(record.upstream or "?", exc.reason, exc.detail, time.time(), record.id)
        )
        self._finish(record, conn, exc.reason, exc.detail, reset=True)

    def _rejected_on_fast_path(self, exc: UpstreamError) -> None:
        """The proxy refused verified Basic credentials: they are rejected now, as if a
        re-check had failed (it would only cost another failed login)."""
        upstream = self.active_upstream
        creds = self._credentials_of(upstream) if upstream is not None else None
        if upstream is None or creds is None:
            return
        self._auth_of(upstream).reject(creds)
        exc.detail = (
            f"proxy {upstream} rejected the credentials of {creds.username} (Basic); they are "
            f"not sent again until they change or the re-check in "
            f"{self.settings.reverify_after:g}s. Enter the right password for "
            f"{creds.username} (tray-proxy credentials set {upstream.name})"
        )

    def closed(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        reason: CloseReason,
        detail: str,
        reset: bool,
    ) -> None:
        self._finish(record, conn, reason, detail, reset=reset)

    def fall_back(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        peeker: HostPeeker | None,
        peeked: bytes,
        reauthenticate: bool,
        decision: Decision | None,
        announced: bool,
    ) -> None:
        upstream = self.active_upstream
        if reauthenticate and upstream is not None:
            creds = self._credentials_of(upstream)
            if creds is not None:
                self._auth_of(upstream).doubt(creds)
        self._spawn_serve(
            record,
            conn,
            peeker,
            peeked,
            routed=announced,
            decision=decision,
        )

    def finish_slowly(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        upstream: socket.socket,
        to_upstream: bytes,
        to_client: bytes,
    ) -> None:
        if self._router is not None:
            self._fast_success(record)
        self._spawn_serve(
            record, conn, None, to_upstream, routed=True, opened=(upstream, to_client)
        )

    def _fast_success(self, record: ConnectionRecord) -> None:
        name = record.upstream
        router = self._router
        if name is not None and router is not None:
            change = router.health.success(name, time.monotonic(), record.handshake_latency)
            if change is not None:
                self._health_changed(change)

    # -- routing: decisions, health, events ------------------------------------------------

    def _start_pac_refresher(self) -> None:
        if self._pac_refresher is None or self._pac_refresher.done():
            self._pac_refresher = self._spawn(self._keep_pac_fresh(), "pac refresh")

    async def _keep_pac_fresh(self) -> None:
        """Look at the PAC script's source every _PAC_TICK seconds (it fetches when due:
        docs/routing.md, "Refetch"), in a thread: a fetch is network I/O."""
        while not self._stopping and self._router is not None and self._router.pac is not None:
            await asyncio.sleep(_PAC_TICK)
            await self._refresh_pac(first=False)

    async def _refresh_pac(self, first: bool) -> None:
        loop = self._loop
        router = self._router
        pac = router.pac if router is not None else None
        if loop is None or not isinstance(pac, PacScript):
            return
        refresh = functools.partial(pac.refresh, time.monotonic(), force=first)
        try:
            status = await asyncio.wait_for(
                loop.run_in_executor(None, refresh), _PAC_FIRST_FETCH if first else None
            )
        except asyncio.TimeoutError:
            words = f"fetching {pac.location} took over {_PAC_FIRST_FETCH:g}s"
            self._routing_error(words, f"the PAC script could not be used ({words})")
            return
        if status is None:
            return
        if status.ok:
            if status.changed:
                log.info("PAC script %s in use (version %d)", pac.location, pac.generation)
            return
        self._routing_error(
            status.words,
            f"the PAC script {pac.location} could not be used ({status.words}); "
            + (
                "the last good version stays in use"
                if pac.generation
                else "the default route is used"
            ),
        )

    def _routing_error(self, words: str, detail: str) -> None:
        """Publish a PAC failure once: `words` are the failure's own (the same from a
        refresh and from the decisions it spoils), `detail` the event's sentence."""
        if words == self._pac_words:
            return
        self._pac_words = words
        log.warning("%s", detail)
        self.bus.publish(RoutingError(detail, time.time()))

    def _note_decision(self, record: ConnectionRecord, decision: Decision) -> None:
        """The decision goes to the record (history, dashboard); a PAC failure to an event."""
        texts = self._texts
        known = texts.get(id(decision))
        if known is None or known[0] is not decision:
            if len(texts) >= 4096:
                texts.clear()
            known = texts[id(decision)] = (decision, decision.text)
        record.route = known[1]
        record.decided_by = decision.decided_by
        if decision.kind is DecisionKind.PROXY and decision.upstreams:
            record.upstream = decision.upstreams[0]
        else:
            record.upstream = None
        failure = decision.pac_failure
        if failure:
            self._routing_error(
                failure, f"the PAC script could not decide ({failure}); the default route is used"
            )
        elif self._pac_words and decision.decided_by == "pac":
            self._pac_words = ""  # it answers again: the next failure is news

    def _report(self, report: Report) -> None:
        router = self._router
        if router is None:
            return
        now = time.monotonic()
        if report.ok:
            change = router.health.success(report.upstream, now, report.latency)
        else:
            change = router.health.failure(report.upstream, now, report.words)
        if change is not None:
            self._health_changed(change)

    def _health_changed(self, change: HealthChange) -> None:
        if change.up:
            log.info("upstream %s is back: new connections use it again", change.upstream)
        else:
            log.warning(
                "upstream %s is down (%s): new connections go to the next way",
                change.upstream,
                change.reason,
            )
        self.bus.publish(
            UpstreamHealthChanged(change.upstream, change.up, change.reason, time.time())
        )

    def _way_failed(
        self,
        record: ConnectionRecord,
        machine: OpeningMachine,
        exc: UpstreamError,
        now: float,
    ) -> list[Command]:
        """One way of the machine failed with `exc`: publish it, ask the machine what next."""
        dst = record.original_dst
        assert dst is not None
        name = machine.current
        forward = False
        if name is not None:
            upstream = self._upstream_for(name)
            forward = (
                dst[1] == 80
                and upstream is not None
                and self._port80.learn(upstream, dst[1], exc.status)
            )
            if forward:
                log.info(
                    "proxy %s refused CONNECT to port 80 (%s): plain HTTP to it is forwarded as "
                    "proxy requests from now on",
                    upstream,
                    exc.status,
                )
            else:
                self.bus.publish(
                    UpstreamFailed(name, exc.reason, exc.detail, time.time(), record.id)
                )
        return machine.failed(
            exc.reason,
            exc.detail,
            now,
            status=exc.status,
            rejected=exc.rejected,
            forward=forward,
        )

    def _carry_out_now(
        self, record: ConnectionRecord, conn: socket.socket, commands: Iterable[Command]
    ) -> None:
        """The commands that need no I/O: health reports and the failure."""
        for command in commands:
            if isinstance(command, Report):
                self._report(command)
            elif isinstance(command, Failed):
                self._finish(
                    record,
                    conn,
                    command.reason,
                    command.words,
                    reset=command.reason is not CloseReason.NO_UPSTREAM,
                )

    def _upstream_for(self, name: str) -> UpstreamProxy | None:
        router = self._router
        if router is not None:
            return router.upstream(name)
        return self._upstream_named(name)

    def _forwarding(self, decision: Decision, port: int) -> frozenset[str]:
        """The decision's upstreams known to refuse CONNECT to `port` (80 only)."""
        if port != 80 or decision.kind is not DecisionKind.PROXY:
            return frozenset()
        found = set()
        for name in decision.upstreams:
            upstream = self._upstream_for(name)
            if upstream is not None and self._port80.forwards(upstream, port):
                found.add(name)
        return frozenset(found)

    # -- the Task path --------------------------------------------------------------------

    async def _serve(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        peeker: HostPeeker | None,
        peeked: bytes,
        *,
        routed: bool = False,
        opened: tuple[socket.socket, bytes] | None = None,
        decision: Decision | None = None,
        machine: tuple[OpeningMachine, list[Command]] | None = None,
    ) -> None:
        """Peek (unless done), route, run the opening machine's commands (dial, handshake,
        failover, forwarding), forward the early bytes, start the tunnel.

        `routed`: the routing event went out already. `opened`: the fast path opened the
        tunnel and left bytes to forward (the upstream socket, bytes for the client).
        `decision`: the fast path's routing decision. `machine`: an opening machine the fast
        path started, and its commands to carry out.
        """
        loop = self._loop
        assert loop is not None
        dst = record.original_dst
        assert dst is not None
        upstream_sock: socket.socket | None = None
        try:
            if peeker is not None:
                record.state = ConnState.PEEKING
                record.host, peeked = await self._peek(conn, peeker)
            if opened is not None:
                upstream_sock, trailing = opened
            else:
                if machine is None:
                    machine = await self._decide(record, conn, decision, peeked, routed)
                    if machine is None:
                        return
                got = await self._drive(record, conn, *machine, peeked)
                if got is None:
                    return
                upstream_sock, trailing = got
            if peeked:
                try:
                    await loop.sock_sendall(upstream_sock, peeked)
                except OSError as exc:
                    raise first_bytes_lost(exc) from None
                record.bytes_up += len(peeked)
            if trailing:
                await loop.sock_sendall(conn, trailing)
                record.bytes_down += len(trailing)
        except UpstreamError as exc:
            if upstream_sock is not None:
                upstream_sock.close()
            self._upstream_failed(record, conn, exc)
            return
        except asyncio.CancelledError:
            if upstream_sock is not None:
                upstream_sock.close()
            if record.id in self._closing_by_user:
                self._finish(record, conn, CloseReason.CLOSED_BY_USER, _CLOSED_BY_USER, True)
            else:
                self._finish(record, conn, CloseReason.SHUTDOWN, "the relay stopped", reset=True)
            raise
        except OSError as exc:
            if upstream_sock is not None:
                upstream_sock.close()
            if exc.errno in _ACCEPT_PRESSURE:
                # Our own shortage (e.g. no descriptor left for the upstream socket), not
                # something the client did.
                self._finish(
                    record,
                    conn,
                    CloseReason.INTERNAL_ERROR,
                    f"the relay is out of resources: {exc.strerror or exc}",
                    reset=True,
                )
                return
            # The client went away while we were still setting up its tunnel.
            self._finish(
                record, conn, CloseReason.CLIENT_RESET, f"client side: {exc.strerror or exc}"
            )
            return
        except Exception as exc:
            if upstream_sock is not None:
                upstream_sock.close()
            log.exception("internal error on connection %d", record.id)
            self._finish(record, conn, CloseReason.INTERNAL_ERROR, type(exc).__name__, reset=True)
            return
        self._start_tunnel(record, conn, upstream_sock)

    async def _decide(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        decision: Decision | None,
        peeked: bytes,
        routed: bool,
    ) -> tuple[OpeningMachine, list[Command]] | None:
        """The routing decision and a machine started on it; None when the connection was
        finished here (a loop)."""
        dst = record.original_dst
        assert dst is not None
        router = self._router
        machine = OpeningMachine(retries=0 if router is None else 1)
        if router is None:
            upstream = self.active_upstream
            record.upstream = upstream.name if upstream else None
            decision = Decision(DecisionKind.PROXY, (upstream.name,) if upstream else ())
            machine.start(False)
        elif decision is None:
            host, ip, port = record.host, dst[0], dst[1]
            url = _request_url(host, dst, peeked) if port == 80 else None
            for command in machine.start(router.pac_pending(host, ip, port, time.monotonic())):
                if isinstance(command, EvaluatePac):
                    await self._evaluate_pac(host, ip, port, url)
            decision = router.decide(host, ip, port, url, time.monotonic())
            self._note_decision(record, decision)
        else:
            machine.start(False)
            self._note_decision(record, decision)
        if not routed and self.bus.observed:
            self.bus.publish(
                ConnectionRouted(
                    record.id, record.host, record.upstream, record.route, record.decided_by
                )
            )
        if decision.kind is DecisionKind.PROXY and decision.upstreams:
            if self._dialer.is_upstream_address(dst):
                # The redirect should have excluded the upstream (helper ruleset); if its
                # address changed under us, refuse instead of tunnelling into ourselves.
                self._finish(
                    record,
                    conn,
                    CloseReason.LOOP,
                    f"the redirect caught a connection to the upstream itself "
                    f"({format_authority(*dst)}); its address is not excluded yet",
                    reset=True,
                )
                return None
            machine.forwarding = self._forwarding(decision, dst[1])
        return machine, machine.decided(decision, time.monotonic())

    async def _evaluate_pac(self, host: str | None, ip: str, port: int, url: str | None) -> None:
        """The PAC script's answer for this connection, worked out in a thread: it runs in a
        child process and may take up to its deadline (docs/routing.md, "PAC")."""
        loop = self._loop
        router = self._router
        assert loop is not None and router is not None
        await loop.run_in_executor(None, router.evaluate_pac, host, ip, port, url, time.monotonic())

    async def _drive(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        machine: OpeningMachine,
        commands: list[Command],
        peeked: bytes,
    ) -> tuple[socket.socket, bytes] | None:
        """The coroutine driver of the opening machine: carry out its commands until the
        tunnel is open (its socket and the bytes for the client) or the connection was
        finished here (None: failed, blocked, or served by forwarding)."""
        dst = record.original_dst
        assert dst is not None
        queue = deque(commands)
        opened: tuple[socket.socket, bytes] | None = None
        while queue:
            command = queue.popleft()
            if isinstance(command, Dial):
                if opened is not None:  # a way before this one opened: never both
                    opened[0].close()
                    opened = None
                name = command.upstream
                try:
                    if name is None:
                        opened = (await self._open_direct(record, dst), b"")
                        queue += machine.dialed()
                    else:
                        upstream = self._upstream_for(name)
                        if upstream is None:
                            raise UpstreamError(
                                CloseReason.CONFIG_ERROR,
                                f"the route names upstream {name}, which is not set up",
                            )
                        record.upstream = name

                        def dialed() -> None:
                            if machine.phase is Phase.DIAL:  # once; a 407 may redial
                                machine.dialed()

                        opened = await self._open(record, upstream, dst, dialed)
                        queue += machine.opened(time.monotonic())
                except UpstreamError as exc:
                    queue += self._way_failed(record, machine, exc, time.monotonic())
            elif isinstance(command, Report):
                self._report(command)
            elif isinstance(command, Established):
                assert opened is not None
                if command.upstream is None:
                    record.handshake_latency = command.latency
                return opened
            elif isinstance(command, Forward):
                upstream = self._upstream_for(command.upstream)
                assert upstream is not None
                await self._forward(record, conn, upstream, peeked)
                return None
            elif isinstance(command, Failed):
                self._carry_out_now(record, conn, (command,))
                return None
            # Ask and StepAuth: open_tunnel sends the request and runs the auth steps.
        raise AssertionError("the opening machine stopped without an ending")  # pragma: no cover

    async def _open_direct(self, record: ConnectionRecord, dst: Address) -> socket.socket:
        """DIRECT: connect to the original destination from the reserved source ports, so
        the redirect lets it through instead of sending it back here."""
        record.upstream = None
        record.state = ConnState.CONNECTING
        return await self._dialer.connect_direct(dst, self.settings.connect_timeout)

    async def _forward(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        upstream: UpstreamProxy,
        peeked: bytes,
    ) -> None:
        """Serve the connection's plain HTTP as proxy requests through `upstream`
        (relay/forward.py), then close it with how it ended."""
        dst = record.original_dst
        assert dst is not None
        record.upstream = upstream.name
        record.state = ConnState.OPEN
        record.established_at = time.time()
        if record.handshake_latency is None:
            record.handshake_latency = 0.0
        if self.bus.observed:
            self.bus.publish(
                TunnelEstablished(
                    record.id, record.upstream, record.handshake_latency, record.established_at
                )
            )

        async def dial() -> socket.socket:
            return await self._dialer.connect(
                upstream.host,
                upstream.port,
                self.settings.connect_timeout,
                reserved=upstream.port in self.settings.redirect_ports,
            )

        result = await forward_http(
            conn,
            peeked,
            dst,
            upstream,
            self._credentials_of(upstream),
            self._auth_of(upstream),
            dial,
            host=record.host,
            limits=ForwardLimits(
                idle_timeout=self.settings.idle_timeout,
                permit_timeout=self.settings.handshake_timeout,
            ),
            record=record,
        )
        if result.failure is not None:
            failed = result.failure
            self.bus.publish(
                UpstreamFailed(upstream.name, failed.reason, failed.detail, time.time(), record.id)
            )
        self._finish(record, conn, result.reason, result.detail, reset=result.reset)

    async def _open(
        self,
        record: ConnectionRecord,
        upstream: UpstreamProxy,
        dst: Address,
        on_dialed: Callable[[], None] | None = None,
    ) -> tuple[socket.socket, bytes]:
        creds = self._credentials_of(upstream)
        record.state = ConnState.CONNECTING
        started = time.monotonic()
        auth = self._auth_of(upstream)

        def dialed() -> None:
            record.state = ConnState.HANDSHAKING
            if on_dialed is not None:
                on_dialed()

        try:
            opened = await open_tunnel(
                self._dialer,
                upstream,
                (record.host or dst[0], dst[1]),
                creds,
                auth,
                connect_timeout=self.settings.connect_timeout,
                handshake_timeout=self.settings.handshake_timeout,
                reserved=upstream.port in self.settings.redirect_ports,
                on_dialed=dialed,
            )
        except UpstreamError as exc:
            if exc.rejected and creds is not None:
                exc.detail += (
                    f". Enter the right password for {creds.username} "
                    f"(tray-proxy credentials set {upstream.name})"
                )
            raise
        record.handshake_latency = time.monotonic() - started
        return opened

    def _start_tunnel(
        self, record: ConnectionRecord, conn: socket.socket, upstream_sock: socket.socket
    ) -> None:
        loop = self._loop
        assert loop is not None
        record.state = ConnState.OPEN
        record.established_at = time.time()
        assert record.handshake_latency is not None
        if self.bus.observed:
            self.bus.publish(
                TunnelEstablished(
                    record.id, record.upstream, record.handshake_latency, record.established_at
                )
            )
        assert self._poller is not None
        tunnel = Tunnel(
            loop,
            self._pool,
            self._poller,
            conn,
            upstream_sock,
            record,
            self._tunnel_closed,
            self._batching,
        )
        self._tunnels[record.id] = tunnel
        tunnel.start()

    async def _peek(self, conn: socket.socket, peeker: HostPeeker) -> tuple[str | None, bytes]:
        """Read the client's first bytes (bounded in size and time) for a host name."""
        loop = self._loop
        assert loop is not None

        async def read() -> None:
            # feed() decides on a host name, on bytes that cannot carry one, on the size
            # cap, or on EOF (b"").
            while not peeker.decided and not peeker.feed(await loop.sock_recv(conn, _PEEK_RECV)):
                pass

        with contextlib.suppress(asyncio.TimeoutError):
            await within(self.settings.peek_timeout, read())
        if not peeker.decided:
            peeker.feed(b"")  # time is up: decide on what arrived
        return peeker.host, peeker.buffered

    def _tunnel_closed(self, record: ConnectionRecord, reason: CloseReason, detail: str) -> None:
        self._tunnels.pop(record.id, None)
        self._record_closed(record, reason, detail)
        self._refill_spares()

    def _top_up_spares(self, address: tuple[int, Address]) -> None:
        """A connection took a spare or dialed (its CONNECT is out): during a burst (more
        than one opening in progress), dial replacements at once, as many as the most
        openings in progress within the last second (up to spare_connections), so the next
        connections of the burst find one (docs/benchmarks.md, "Round trip to the proxy").
        Called only then; one connection at a time, the tunnel's end refills instead
        (_refill_spares)."""
        deadlines, spares = self._deadlines, self._spares
        assert deadlines is not None and spares is not None
        pending = len(deadlines.pending)
        now = time.monotonic()
        if pending >= self._burst or now - self._burst_at > _BURST_WINDOW:
            self._burst, self._burst_at = pending, now
        if not self._stopping:
            spares.refill(address, min(spares.keep, self._burst))

    def _refill_spares(self) -> None:
        """A tunnel ended: dial spares for the next connection (relay/spares.py), when the fast
        path applies and no other connection is opening.

        Now, not when a connection's CONNECT leaves: a dial then makes the proxy accept a
        connection while it works on that CONNECT, which cost the lab's sequential connections
        more than the spare saved the next one. In a burst (openings in progress) the proxy
        is busy anyway, and a connection it accepted early costs it one more wakeup than one
        whose request is there when it accepts."""
        spares, deadlines = self._spares, self._deadlines
        if spares is None or self._stopping or (deadlines is not None and deadlines.pending):
            return
        # The route as a connection now would get it: the proxy's address may have moved
        # while the tunnel lasted (a tunnel outlives the route's few-tenths-of-a-second reuse).
        route = self._current_route().route
        if route is not None:
            spares.refill(route[1], _SPARES_BETWEEN_BURSTS)

    def _finish(
        self,
        record: ConnectionRecord,
        conn: socket.socket,
        reason: CloseReason,
        detail: str,
        reset: bool = False,
    ) -> None:
        if reset:
            abort(conn)
        else:
            conn.close()
        self._record_closed(record, reason, detail)

    def _record_closed(self, record: ConnectionRecord, reason: CloseReason, detail: str) -> None:
        record.state = ConnState.CLOSED
        record.closed_at = time.time()
        record.close_reason = reason
        record.close_detail = detail
        self._records.pop(record.id, None)
        self._closed_up += record.bytes_up
        self._closed_down += record.bytes_down
        self.stats[_STAT_KEYS[reason]] += 1
        if self.bus.observed:
            self.bus.publish(
                ConnectionClosed(
                    record.id,
                    reason,
                    detail,
                    record.bytes_up,
                    record.bytes_down,
                    record.closed_at - record.opened_at,
                    record.closed_at,
                )
            )
        if reason in _FAILURES:
            log.warning(
                "conn %d %s -> %s via %s: %s: %s",
                record.id,
                format_authority(*record.client),
                record.destination,
                record.upstream or "-",
                reason.value,
                detail,
            )
        elif log.isEnabledFor(logging.INFO):
            log.info(
                "conn %d %s -> %s via %s: %s, %d B up, %d B down%s",
                record.id,
                format_authority(*record.client),
                record.destination,
                record.upstream or "-",
                reason.value,
                record.bytes_up,
                record.bytes_down,
                f" ({detail})" if detail else "",
            )
        if self._stopping and not self._records:
            self._idle.set()

    # -- idle timeout ---------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        assert self._loop is not None
        interval = min(30.0, max(0.05, self.settings.idle_timeout / 4))
        self._sweeper = self._loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        limit = time.monotonic() - self.settings.idle_timeout
        for tunnel in [t for t in self._tunnels.values() if t.last_active < limit]:
            tunnel.close(
                CloseReason.IDLE_TIMEOUT,
                f"no data either way for {self.settings.idle_timeout:g}s",
            )
        if not self._stopping:
            self._schedule_sweep()


def _request_url(host: str | None, dst: Address, peeked: bytes) -> str | None:
    """The URL of a plain-HTTP request from its first bytes (for the PAC script), or None."""
    line = peeked[:2048].split(b"\r\n", 1)[0].split(b" ")
    if len(line) != 3 or not line[1].startswith(b"/") or not line[2].startswith(b"HTTP/"):
        return None
    authority = host or format_authority(*dst)
    return f"http://{authority}{line[1].decode('ascii', 'replace')}"
