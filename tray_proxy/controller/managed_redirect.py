"""The redirect as the app and `tray-proxy run` use it: settings -> RuleSpec -> root helper.

`ManagedRedirect` owns one `RedirectController` while the redirect is on. It resolves every
configured upstream (not only the active one: switching upstreams must not open a loop),
builds the `RuleSpec` from the settings and the relay's real port, applies it, and then keeps
it true:
- every `resolve_interval` seconds (60) it resolves the upstreams again and re-applies when
  their addresses changed, so a proxy whose DNS name moves stays excluded;
- when the helper dies under it (killed), the table it left behind still points at the relay;
  a new helper switches that stale table off at start and the spec is applied again, replacing
  it in one transaction (a few times at most, then the failure is reported);
- the relay listens on the container bridges the helper captures (issue 16 item 4): the helper
  DNATs a captured bridge's connections to that bridge's own gateway address, never to
  127.0.0.1, so the relay must listen there too. After each apply, and every
  `bridge_interval` seconds while containers are captured (Docker and Podman add and remove
  networks at any time; the helper follows them by itself), the helper's status says which
  bridges it captures, and `on_bridges` gets their addresses whenever that list changed.
  The same status says whose traffic is captured (`captured`, shown by `tray-proxy status`).

Shutdown is two steps, with the relay's drain between them: `switch_off()` stops redirecting
new connections but keeps the table, so connections already redirected keep their address
translation; `stop()` ends the helper, which deletes the table. Deleting it while connections
are open through the relay would reset or hang them (helper.py explains why).

Failures reach the owner through `on_failure`, as a `RedirectError` whose message is for the
user. Must not import PySide6 or tray_proxy.relay.engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Protocol

from tray_proxy.config import Config
from tray_proxy.firewall.client import (
    RedirectController,
    RedirectError,
    RedirectStatus,
    UpstreamResolutionError,
    resolve_upstreams,
)
from tray_proxy.firewall.ruleset import Bridge, IPAddress, RuleSpec, SpecError
from tray_proxy.tasks import spawn

log = logging.getLogger(__name__)

RESOLVE_INTERVAL_SECONDS: Final = 60.0
HELPER_CHECK_SECONDS: Final = 1.0
# How often the captured bridges are asked for: a new Docker network waits at most this long
# for the relay to listen on its gateway (its connections are refused until then).
BRIDGE_CHECK_SECONDS: Final = 3.0
MAX_HELPER_RESTARTS: Final = 3

Endpoint = tuple[str, int]
Resolved = tuple[tuple[IPAddress, int], ...]
Resolver = Callable[[Iterable[Endpoint]], Awaitable[Resolved]]
# Told the addresses the relay must listen on besides loopback (the captured bridges');
# answers those it listens on now.
BridgeListener = Callable[[tuple[str, ...]], Awaitable[tuple[str, ...]]]


class HelperControl(Protocol):
    """What a ManagedRedirect needs of `firewall.client.RedirectController`."""

    @property
    def running(self) -> bool: ...

    async def start(self) -> None: ...

    async def apply(self, spec: RuleSpec) -> None: ...

    async def status(self) -> RedirectStatus: ...

    async def remove(self) -> bool: ...

    async def stop(self) -> int | None: ...


class RedirectSetupError(RedirectError):
    """The settings cannot be turned into a safe redirect; nothing was applied."""


def check_redirect_settings(config: Config) -> None:
    """Refuse settings that would make the redirect loop, before anything is started."""
    if config.relay.source_ports is None:
        raise RedirectSetupError(
            "relay.source_ports is false, so the redirect could not tell the relay's own "
            "connections from others and would send them back into the relay (a loop). Set "
            "source_ports = [61000, 64999] in [relay], or run with --no-redirect and manage "
            "the redirect yourself."
        )


def upstream_endpoints(config: Config) -> tuple[Endpoint, ...]:
    """Every configured upstream's (host, port), without repeats."""
    seen: list[Endpoint] = []
    for upstream in config.upstreams:
        endpoint = (upstream.host, upstream.port)
        if endpoint not in seen:
            seen.append(endpoint)
    return tuple(seen)


def build_rule_spec(config: Config, relay_port: int, upstreams: Resolved) -> RuleSpec:
    """The ruleset for these settings, the relay's real port and the upstreams' addresses."""
    check_redirect_settings(config)
    source_ports = config.relay.source_ports
    assert source_ports is not None
    redirect = config.redirect
    try:
        return RuleSpec(
            relay_port=relay_port,
            redirect_ports=config.relay.redirect_ports,
            excluded_networks=redirect.exclude,
            upstreams=upstreams,
            relay_source_ports=source_ports,
            container_interfaces=redirect.container_interfaces,
            capture_containers=redirect.capture_containers,
            reject_quic=redirect.reject_quic,
            capture=redirect.capture,
        )
    except SpecError as exc:
        raise RedirectSetupError(
            f"The redirect cannot be built from the settings ({exc}). Fix the settings file"
            " (docs/config.md) and start again."
        ) from None


class ManagedRedirect:
    """`await start()`; to end: `await switch_off()`, drain the relay, `await stop()`."""

    def __init__(
        self,
        config: Config,
        relay_port: int,
        controller: HelperControl | None = None,
        *,
        resolve: Resolver = resolve_upstreams,
        on_failure: Callable[[RedirectError], None] | None = None,
        on_bridges: BridgeListener | None = None,
        resolve_interval: float = RESOLVE_INTERVAL_SECONDS,
        helper_check: float = HELPER_CHECK_SECONDS,
        bridge_interval: float = BRIDGE_CHECK_SECONDS,
        max_restarts: int = MAX_HELPER_RESTARTS,
    ) -> None:
        self.config = config
        self.relay_port = relay_port
        self.controller: HelperControl = (
            controller if controller is not None else RedirectController()
        )
        self._resolve = resolve
        self._on_failure = on_failure
        self._on_bridges = on_bridges
        self._resolve_interval = resolve_interval
        self._helper_check = helper_check
        self._bridge_interval = bridge_interval
        self._max_restarts = max_restarts
        self._endpoints = upstream_endpoints(config)
        # Last good addresses per endpoint: a failed re-resolve keeps them excluded.
        self._addresses: dict[Endpoint, Resolved] = {}
        self.spec: RuleSpec | None = None
        self.restarts = 0
        self.failure: RedirectError | None = None
        # What the helper reported last: whose traffic it captures (its words), for whom,
        # and the container bridges the relay must listen on.
        self.captured: str | None = None
        self.owner_uid: int | None = None
        self.bridges: tuple[Bridge, ...] = ()
        self._told_addresses: tuple[str, ...] = ()
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> RuleSpec:
        """Resolve, start the helper (maybe a password prompt), apply. Raises RedirectError."""
        check_redirect_settings(self.config)
        await self._resolve_all(strict=True)
        spec = build_rule_spec(self.config, self.relay_port, self._upstreams())
        await self.controller.start()
        await self.controller.apply(spec)
        self.spec = spec
        await self.sync_status()
        self._watcher = spawn(self._watch(), name="redirect-watch")
        return spec

    async def switch_off(self) -> None:
        """Redirect off for new connections; the helper and its table stay. Never raises."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self.controller.running and self.spec is not None:
            try:
                await self.controller.remove()
            except RedirectError as exc:
                # The helper may have been stopped by the same Ctrl+C (same process group);
                # it deletes the table itself then.
                log.warning("removing the redirect: %s", exc)
        self.spec = None

    async def detach(self) -> None:
        """Stop watching; leave the helper and its table as they are. Never raises.

        For an owner that hands the helper to a new ManagedRedirect (the relay restarted on
        another port) or that switches the redirect off itself.
        """
        self._stopping = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def stop(self) -> None:
        """End the helper, which deletes the table (after `switch_off`, if not done yet).

        Call it after the relay drained: connections still open through the relay lose their
        address translation when the table goes. Never raises RedirectError.
        """
        await self.switch_off()
        await self.controller.stop()

    def update_config(self, config: Config) -> None:
        """New settings while on (a reload): the next `refresh()` builds the rules from them,
        with the new upstreams' addresses excluded; addresses already resolved for upstreams
        that stay are kept until then."""
        self.config = config
        self._endpoints = upstream_endpoints(config)
        self._addresses = {e: a for e, a in self._addresses.items() if e in self._endpoints}

    async def refresh(self) -> bool:
        """Resolve the upstreams again; re-apply when their addresses changed. True if so."""
        await self._resolve_all(strict=False)
        spec = build_rule_spec(self.config, self.relay_port, self._upstreams())
        if spec == self.spec:
            return False
        log.info(
            "upstream addresses changed to %s; applying the redirect again",
            ", ".join(f"{a}:{p}" for a, p in spec.upstreams),
        )
        await self.controller.apply(spec)
        self.spec = spec
        await self.sync_status()
        return True

    async def sync_status(self) -> RedirectStatus:
        """Ask the helper what it captures; tell `on_bridges` when the bridges changed."""
        status = await self.controller.status()
        self.captured = status.captured
        self.owner_uid = status.owner_uid
        self.bridges = status.bridges
        addresses = tuple(sorted({str(b.address) for b in status.bridges}))
        if addresses != self._told_addresses and self._on_bridges is not None:
            log.info(
                "container bridges captured: %s",
                ", ".join(f"{b.name} ({b.address}, {b.network})" for b in status.bridges) or "none",
            )
            try:
                listening = await self._on_bridges(addresses)
            except Exception:
                log.exception("the relay could not listen on %s", ", ".join(addresses))
                listening = ()
            missing = sorted(set(addresses) - set(listening))
            if missing:
                # The redirect stays on: only these bridges' containers lose the relay (a
                # bridge that lost its address meanwhile), and the next check tries again.
                log.warning(
                    "the relay does not listen on %s yet; trying again in %.0f s",
                    ", ".join(missing),
                    self._bridge_interval,
                )
                return status
            self._told_addresses = addresses
        return status

    # -- internals

    def _upstreams(self) -> Resolved:
        merged: list[tuple[IPAddress, int]] = []
        for endpoint in self._endpoints:
            for pair in self._addresses.get(endpoint, ()):
                if pair not in merged:
                    merged.append(pair)
        return tuple(merged)

    async def _resolve_all(self, strict: bool) -> None:
        active = self.config.active_upstream()
        for endpoint in self._endpoints:
            try:
                self._addresses[endpoint] = await self._resolve([endpoint])
            except UpstreamResolutionError as exc:
                is_active = active is not None and (active.host, active.port) == endpoint
                if strict and is_active and endpoint not in self._addresses:
                    raise
                # A proxy that is not in use (or was resolved before) must not block the
                # redirect: keep what we had and say so.
                log.warning("%s", exc)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        next_resolve = loop.time() + self._resolve_interval
        next_bridges = loop.time() + self._bridge_interval
        try:
            while not self._stopping:
                await asyncio.sleep(self._helper_check)
                if not self.controller.running:
                    await self._restart_helper()
                elif loop.time() >= next_resolve:
                    next_resolve = loop.time() + self._resolve_interval
                    await self.refresh()
                elif self.config.redirect.capture_containers and loop.time() >= next_bridges:
                    next_bridges = loop.time() + self._bridge_interval
                    await self.sync_status()
        except RedirectError as exc:
            self.failure = exc
            if self._on_failure is not None:
                self._on_failure(exc)  # the owner tells the user, once
            else:
                log.error("%s", exc)

    async def _restart_helper(self) -> None:
        # status() on a dead helper raises the error that explains its exit.
        try:
            await self.controller.status()
            reason = "it stopped"
        except RedirectError as exc:
            reason = str(exc)
        if self._stopping:
            return
        if self.restarts >= self._max_restarts:
            raise RedirectError(
                f"The redirect helper stopped {self.restarts + 1} times ({reason}). Its table"
                " may still redirect ports to the relay: run `sudo nft delete table inet"
                " tray_proxy` if web access fails after tray-proxy exits."
            )
        self.restarts += 1
        log.warning("the redirect helper stopped (%s); starting it again", reason)
        spec = self.spec
        await self.controller.start()  # the new helper removes the stale table first
        if spec is not None:
            await self.controller.apply(spec)
            await self.sync_status()
