"""The one lifecycle (ARCHITECTURE, "Lifecycle, health and history"): what switching on and
off does, and in which order, for the tray app and headless `tray-proxy run` alike (both go
through `ProxyController`, which drives a `Lifecycle`).

Switching on: check the settings (an active upstream; settings that cannot loop), read the
credentials, start the relay, then redirect to it (`redirect.ManagedRedirect`: resolve the
upstreams, start the root helper, apply the ruleset, keep it true while on).

Switching off is the reverse with a drain between: the redirect goes off for new connections
first, so none reaches a relay that is going away; then the relay drains (bounded by its
drain_timeout); then the helper ends and deletes its table. The helper outlives the drain
because deleting the table takes the address translation away from connections still open
through the relay (they would be reset or hang).

`LifecycleSteps` lets a caller say each step as it happens (`tray-proxy run` prints them on
stderr); the app passes none. Without a `RedirectService` (`run --no-redirect`) the redirect
steps are skipped: the caller manages the redirect.

Must not import PySide6, qasync or the relay engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from tray_proxy.config import Config
from tray_proxy.controller.managed_redirect import (
    HELPER_CHECK_SECONDS,
    RESOLVE_INTERVAL_SECONDS,
    ManagedRedirect,
    check_redirect_settings,
)
from tray_proxy.controller.services import RedirectService, RelayFactory, RelayHandle, Resolver
from tray_proxy.errors import UserError
from tray_proxy.firewall.client import RedirectError
from tray_proxy.firewall.ruleset import RuleSpec, SpecError
from tray_proxy.relay.events import Observer
from tray_proxy.relay.records import Address
from tray_proxy.relay.settings import UpstreamProxy

log = logging.getLogger(__name__)

__all__ = [
    "REDIRECT_OFF_TIMEOUT",
    "RELAY_START_TIMEOUT",
    "RELAY_STOP_MARGIN",
    "Lifecycle",
    "LifecycleSteps",
    "check_settings",
    "is_known",
    "user_message",
]

RELAY_START_TIMEOUT: Final = 30.0
REDIRECT_OFF_TIMEOUT: Final = 15.0
RELAY_STOP_MARGIN: Final = 5.0  # on top of the configured drain timeout


def user_message(exc: BaseException) -> str:
    """The text to show for a failure: its own for a UserError (and the ruleset's SpecError,
    which cannot subclass it: the root helper is standalone), else a generic one."""
    if is_known(exc):
        return str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "A step took too long and was abandoned. Try again; see the log for details."
    return f"Unexpected {type(exc).__name__}: {exc}. See the log for details."


def is_known(exc: BaseException) -> bool:
    """Is this a failure written for the user (no traceback in the log needed)?"""
    return isinstance(exc, UserError | SpecError)


def check_settings(config: Config, *, redirect: bool) -> UpstreamProxy:
    """The active upstream; raises UserError for settings that cannot be switched on (no
    upstream; with the redirect, settings that would make it loop). Touches nothing."""
    upstream = config.active_upstream()
    if upstream is None:
        where = f" in {config.path}" if config.path is not None else ""
        raise UserError(
            "No upstream proxy is set up. Run `tray-proxy setup` (or add an [[upstream]] "
            f"with a name and url{where}, see docs/config.md), then switch on again."
        )
    if redirect:
        check_redirect_settings(config)
    return upstream


class LifecycleSteps(Protocol):
    """Told each step as it happens (headless `run` prints them)."""

    def relay_started(self, addresses: tuple[Address, ...], upstream: str) -> None: ...

    def redirect_on(self, spec: RuleSpec) -> None: ...

    def removing_redirect(self) -> None: ...

    def draining(self) -> None: ...


class QuietSteps:
    """The app's LifecycleSteps: the controller's states already say it all."""

    def relay_started(self, addresses: tuple[Address, ...], upstream: str) -> None:
        pass

    def redirect_on(self, spec: RuleSpec) -> None:
        pass

    def removing_redirect(self) -> None:
        pass

    def draining(self) -> None:
        pass


class Lifecycle:
    """Starts and stops one relay and its redirect, in the one order. Runs on one loop."""

    def __init__(
        self,
        relay_factory: RelayFactory,
        redirect: RedirectService | None,
        *,
        resolver: Resolver,
        on_redirect_failure: Callable[[RedirectError], None],
        on_relay_stopped: Callable[[], None],
        watch_interval: float = HELPER_CHECK_SECONDS,
        resolve_interval: float = RESOLVE_INTERVAL_SECONDS,
        steps: LifecycleSteps | None = None,
    ) -> None:
        self._relay_factory = relay_factory
        self._redirect = redirect
        self._resolve = resolver
        self._on_redirect_failure = on_redirect_failure
        self._on_relay_stopped = on_relay_stopped
        self._watch_interval = watch_interval
        self._resolve_interval = resolve_interval
        self._steps: LifecycleSteps = steps if steps is not None else QuietSteps()
        self.relay: RelayHandle | None = None
        # True while the relay is being stopped on purpose (its EngineStopped is expected).
        self.stopping_relay = False
        self._managed: ManagedRedirect | None = None

    @property
    def manages_redirect(self) -> bool:
        """False for `run --no-redirect`: the caller manages the redirect."""
        return self._redirect is not None

    @property
    def helper_running(self) -> bool:
        return self._redirect is not None and self._redirect.running

    # -- on

    async def switch_on(
        self,
        config: Config,
        observer: Observer,
        *,
        before_relay: Callable[[], Awaitable[None]] | None = None,
    ) -> UpstreamProxy:
        """Check, read credentials (`before_relay`), start the relay, redirect to it.
        Raises on failure and leaves the cleaning up to `teardown` (the caller's choice of
        when: it may want to say why first)."""
        upstream = check_settings(config, redirect=self.manages_redirect)
        if before_relay is not None:
            await before_relay()
        relay = await self.start_relay(config, observer)
        self._steps.relay_started(relay.addresses, upstream.name)
        if self._redirect is not None:
            # The active proxy must resolve, a spare that does not only warns; apply()
            # replaces a running helper's table in one transaction (a relay restart).
            self._managed = ManagedRedirect(
                config,
                relay.addresses[0][1],
                self._redirect,
                resolve=self._resolve,
                on_failure=self._on_redirect_failure,
                on_bridges=self._listen_on_bridges,
                resolve_interval=self._resolve_interval,
                helper_check=self._watch_interval,
            )
            spec = await self._managed.start()
            self._steps.redirect_on(spec)
        return upstream

    @property
    def captured(self) -> str | None:
        """Whose traffic the redirect captures, in the helper's words (None: not on)."""
        return self._managed.captured if self._managed is not None else None

    async def _listen_on_bridges(self, addresses: tuple[str, ...]) -> tuple[str, ...]:
        # The helper DNATs captured container bridges to their own gateway address: the
        # relay listens there on its port, besides loopback (issue 16 item 4).
        relay = self.relay
        if relay is None:
            return ()
        loop = asyncio.get_running_loop()
        listening = await loop.run_in_executor(None, relay.set_extra_listen, addresses)
        return tuple(host for host, _port in listening)

    async def start_relay(self, config: Config, observer: Observer) -> RelayHandle:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._relay_factory, config, observer)
        try:
            relay = await asyncio.wait_for(asyncio.shield(future), RELAY_START_TIMEOUT)
        except asyncio.CancelledError:
            # The worker thread still starts the relay: stop what it started.
            with contextlib.suppress(Exception):
                started = await future
                await loop.run_in_executor(None, started.stop, RELAY_STOP_MARGIN)
            raise
        self.relay = relay
        return relay

    # -- off

    async def detach_redirect(self) -> None:
        """Stop watching the redirect, leaving the helper and its table as they are (a
        restart hands the helper to a new manager; teardown switches it off itself)."""
        managed, self._managed = self._managed, None
        if managed is not None:
            await managed.detach()

    async def teardown(self, drain: float) -> None:
        """Redirect off, relay drained, helper stopped: in that order. Never raises."""
        await self.detach_redirect()
        redirect = self._redirect
        if redirect is not None and redirect.running:
            # A step's own failure (it only says what happens) is not a redirect that
            # stayed on: it must not end the helper before the relay reset its clients.
            self._step(self._steps.removing_redirect)
            try:
                await asyncio.wait_for(redirect.remove(), REDIRECT_OFF_TIMEOUT)
            except Exception as exc:
                # Still drain first. Ending the helper now would delete the table, and with it
                # the address translation of every open connection: their clients would never
                # see their data or their end, and hang to their own timeouts. New connections
                # the redirect still sends to the relay meanwhile are refused (its listener is
                # closed), which fails fast.
                log.warning("removing the redirect failed: %s", user_message(exc))
        await self.stop_relay(drain)
        await self.stop_helper()

    async def stop_relay(self, drain: float) -> None:
        relay = self.relay
        if relay is None:
            return
        self.stopping_relay = True
        try:
            self._step(self._steps.draining)
            await asyncio.get_running_loop().run_in_executor(
                None, relay.stop, drain + RELAY_STOP_MARGIN
            )
        except Exception:
            log.exception("stopping the relay failed")
        finally:
            self.stopping_relay = False
            self.relay = None
            self._on_relay_stopped()

    @staticmethod
    def _step(step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:
            log.exception("a switch-off step's report failed")

    async def update_redirect(self, config: Config) -> bool:
        """Settings reloaded while on: redirect with the new upstreams' addresses excluded
        (the helper's apply replaces its table in one transaction and keeps NAT state, so
        open tunnels stay). True when the rules changed. Raises RedirectError."""
        managed = self._managed
        if managed is None:
            return False
        managed.update_config(config)
        return await managed.refresh()

    async def stop_helper(self) -> None:
        if self._redirect is None:
            return
        try:
            await asyncio.wait_for(self._redirect.stop(), REDIRECT_OFF_TIMEOUT)
        except Exception as exc:
            log.warning("stopping the redirect helper failed: %s", user_message(exc))
