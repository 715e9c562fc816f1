"""The one lifecycle the app and headless `tray-proxy run` share: the order of switching on
and off, the steps a headless run prints, and the same without a redirect (--no-redirect).

No Qt. The relay and the root helper are the in-memory fakes of tests/controller/fakes.py.
"""

from __future__ import annotations

import pytest

from tests.controller.fakes import CORP, FakeRedirect, FakeRelayFactory, Log, fake_resolve, run
from tray_proxy.config import Config
from tray_proxy.controller.lifecycle import RELAY_STOP_MARGIN, Lifecycle, check_settings
from tray_proxy.controller.managed_redirect import RedirectSetupError
from tray_proxy.errors import UserError
from tray_proxy.firewall.client import HelperExitedError, RedirectError
from tray_proxy.firewall.ruleset import RuleSpec
from tray_proxy.relay.events import Event
from tray_proxy.relay.records import Address
from tray_proxy.relay.settings import RelaySettings


class Steps:
    """Records the steps as `tray-proxy run` would print them, in the same Log."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def relay_started(self, addresses: tuple[Address, ...], upstream: str) -> None:
        self.log.calls.append(f"say relay listening {addresses[0][1]} {upstream}")

    def redirect_on(self, spec: RuleSpec) -> None:
        self.log.calls.append(f"say redirect on {spec.redirect_ports}")

    def removing_redirect(self) -> None:
        self.log.calls.append("say removing the redirect")

    def draining(self) -> None:
        self.log.calls.append("say draining")


def _ignore(_event: Event) -> None:
    pass


def _lifecycle(log: Log, *, redirect: bool = True) -> tuple[Lifecycle, list[str]]:
    seen: list[str] = []
    life = Lifecycle(
        FakeRelayFactory(log),
        FakeRedirect(log) if redirect else None,
        resolver=fake_resolve,
        on_redirect_failure=lambda exc: seen.append(f"failure {exc}"),
        on_relay_stopped=lambda: seen.append("relay stopped"),
        steps=Steps(log),
    )
    return life, seen


CONFIG = Config(RelaySettings(), (CORP,))


def test_switch_on_then_teardown_in_the_one_order_with_its_steps() -> None:
    log = Log()
    life, seen = _lifecycle(log)

    async def scenario() -> None:
        async def credentials() -> None:
            log.calls.append("credentials read")

        upstream = await life.switch_on(CONFIG, _ignore, before_relay=credentials)
        assert upstream == CORP
        assert life.relay is not None and life.helper_running
        await life.teardown(1.0)
        assert life.relay is None

    run(scenario())
    assert log.calls == [
        "credentials read",  # the relay must not start without its passwords
        "relay.start",
        "say relay listening 12080 corp",
        "redirect.start",
        "redirect.apply",
        "say redirect on (80, 443)",
        # Off: the redirect first, then the relay drains, then the helper deletes its table.
        "say removing the redirect",
        "redirect.remove",
        "say draining",
        "relay.stop",
        "redirect.stop",
    ]
    assert seen == ["relay stopped"]


def test_without_a_redirect_only_the_relay_starts_and_drains() -> None:
    """`tray-proxy run --no-redirect`: the caller manages the redirect."""
    log = Log()
    life, _seen = _lifecycle(log, redirect=False)
    # Settings that would make a redirect loop are fine when there is none.
    config = Config(RelaySettings(source_ports=None), (CORP,))

    async def scenario() -> None:
        await life.switch_on(config, _ignore)
        assert not life.manages_redirect and not life.helper_running
        await life.teardown(1.0)

    run(scenario())
    assert log.calls == [
        "relay.start",
        "say relay listening 12080 corp",
        "say draining",
        "relay.stop",
    ]


def test_a_failed_remove_still_drains_before_the_helper_ends() -> None:
    # The helper's table holds the open connections' address translation: ending it first
    # left their clients hanging (a drain they could not receive, then no reset either).
    log = Log()
    life, _seen = _lifecycle(log)

    async def scenario() -> None:
        await life.switch_on(CONFIG, _ignore)
        redirect = life._redirect
        assert isinstance(redirect, FakeRedirect)
        redirect.fail_remove = HelperExitedError("The redirect helper stopped")
        log.calls.clear()
        await life.teardown(1.0)

    run(scenario())
    assert log.calls == [
        "say removing the redirect",
        "redirect.remove",
        "say draining",
        "relay.stop",
        "redirect.stop",
    ]


def test_the_drain_is_bounded_by_the_settings_plus_a_margin() -> None:
    log = Log()
    factory = FakeRelayFactory(log)
    life = Lifecycle(
        factory,
        None,
        resolver=fake_resolve,
        on_redirect_failure=lambda _exc: None,
        on_relay_stopped=lambda: None,
    )

    async def scenario() -> None:
        await life.switch_on(CONFIG, _ignore)
        await life.teardown(2.5)
        await life.teardown(2.5)  # nothing left: no second stop

    run(scenario())
    assert factory.relays[0].drain_bound == 2.5 + RELAY_STOP_MARGIN
    assert log.calls.count("relay.stop") == 1


def test_settings_are_checked_before_anything_starts() -> None:
    with pytest.raises(UserError, match="No upstream proxy is set up"):
        check_settings(Config(RelaySettings(), ()), redirect=False)
    loop = Config(RelaySettings(source_ports=None), (CORP,))
    with pytest.raises(RedirectSetupError, match="loop"):
        check_settings(loop, redirect=True)
    assert check_settings(loop, redirect=False) == CORP

    log = Log()
    life, _seen = _lifecycle(log)
    with pytest.raises(RedirectError):
        run(life.switch_on(loop, _ignore))
    assert log.calls == []
