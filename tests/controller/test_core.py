"""The controller's state machine: transitions, the order of the shutdown path, engine health.

No Qt. The redirect and the config file are small in-memory fakes; one test drives the real
relay engine on its own thread. Every test runs its own asyncio loop with a deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

import pytest

from tests.controller.fakes import (
    BACKUP,
    CORP,
    FakeRedirect,
    FakeStore,
    Log,
    Rig,
    fake_resolve,
    run,
    until,
)
from tray_proxy.config import Config
from tray_proxy.controller import (
    ALLOWED,
    DOWN_AFTER_FAILURES,
    RELAY_STOP_MARGIN,
    NoticeKind,
    NoticeLimiter,
    ProxyController,
    State,
    StatusUpdated,
    engine_relay_factory,
)
from tray_proxy.firewall.client import (
    AuthorizationDismissedError,
    HelperExitedError,
    UpstreamResolutionError,
)
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    EngineStopped,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import RelaySettings, UpstreamProxy


def test_enable_goes_off_enabling_on_and_applies_the_spec() -> None:
    rig = Rig()

    async def scenario() -> None:
        status = await rig.controller.enable()
        assert status.state is State.ON
        assert "corp" in status.message

    run(scenario())
    assert rig.transitions() == [(State.OFF, State.ENABLING), (State.ENABLING, State.ON)]
    assert rig.log.calls == ["relay.start", "redirect.start", "redirect.apply"]
    spec = rig.redirect.specs[0]
    assert spec.relay_port == 12080
    assert spec.redirect_ports == (80, 443)
    # Every upstream's address is excluded, so switching upstreams needs no new spec.
    assert spec.upstreams == ((ipaddress.ip_address("192.0.2.10"), 8080),) + (
        (ipaddress.ip_address("192.0.2.10"), 1080),
    )
    # Each transition is followed by a status the views can draw.
    assert isinstance(rig.events[1], StatusUpdated)
    assert rig.events[1].status.state is State.ENABLING


def test_disable_takes_the_redirect_off_then_drains_then_stops_the_helper() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.controller.enable()
        rig.log.calls.clear()
        status = await rig.controller.disable()
        assert status.state is State.OFF

    run(scenario())
    # The helper (and its table) outlives the relay's drain: deleting the table earlier would
    # take the address translation away from the connections still open through the relay.
    assert rig.log.calls == ["redirect.remove", "relay.stop", "redirect.stop"]
    assert rig.relays.relays[0].drain_bound == RelaySettings().drain_timeout + RELAY_STOP_MARGIN
    assert rig.transitions()[-2:] == [(State.ON, State.DISABLING), (State.DISABLING, State.OFF)]


def test_a_failed_remove_still_drains_the_relay_before_the_helper_ends() -> None:
    rig = Rig()
    rig.redirect.fail_remove = HelperExitedError("The redirect helper stopped")

    async def scenario() -> None:
        await rig.controller.enable()
        rig.log.calls.clear()
        assert (await rig.controller.disable()).state is State.OFF

    run(scenario())
    # The redirect may still be on. Its table holds the open connections' address
    # translation, so the helper ends after the drain, as always: new connections meanwhile
    # meet the relay's closed port (refused at once), open ones finish or are reset.
    assert rig.log.calls == ["redirect.remove", "relay.stop", "redirect.stop"]


def test_shutdown_from_on_uses_the_same_order_and_is_idempotent() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.controller.enable()
        rig.log.calls.clear()
        await rig.controller.shutdown()
        await rig.controller.shutdown()
        # After shutdown nothing switches on again (the app is quitting).
        assert (await rig.controller.enable()).state is State.OFF

    run(scenario())
    assert rig.log.calls == ["redirect.remove", "relay.stop", "redirect.stop"]
    assert rig.controller.state is State.OFF


def test_no_upstream_is_an_error_that_says_what_to_do() -> None:
    rig = Rig(upstreams=())
    status = run(rig.controller.enable())
    assert status.state is State.ERROR
    assert "No upstream proxy is set up" in status.message
    assert "relay.start" not in rig.log.calls
    assert status.last_error == status.message


def test_helper_refusal_rolls_back_and_notifies() -> None:
    rig = Rig()
    rig.redirect.fail_start = AuthorizationDismissedError(
        "The password dialog was closed, so the redirect stayed off."
    )
    status = run(rig.controller.enable())
    assert status.state is State.ERROR
    assert status.message.startswith("The password dialog was closed")
    # The relay that was already started is stopped again: nothing is left running.
    assert rig.relays.relays[0].stopped
    assert [n.kind for n in rig.notices()] == [NoticeKind.HELPER_REFUSED]
    # From Error the user may try again.
    rig.redirect.fail_start = None
    assert run(rig.controller.enable()).state is State.ON


def test_disable_while_enabling_cancels_the_attempt_and_cleans_up() -> None:
    rig = Rig()

    async def scenario() -> None:
        rig.redirect.start_gate = asyncio.Event()  # never set: the dialog stays open
        enabling = asyncio.create_task(rig.controller.enable())
        await until(lambda: "redirect.start" in rig.log.calls, "the helper start")
        assert rig.controller.state is State.ENABLING
        status = await rig.controller.disable()
        assert status.state is State.OFF
        assert (await enabling).state is State.OFF

    run(scenario())
    assert rig.relays.relays[0].stopped
    assert rig.transitions()[-2:] == [
        (State.ENABLING, State.DISABLING),
        (State.DISABLING, State.OFF),
    ]


def test_a_second_enable_waits_for_the_first_instead_of_starting_twice() -> None:
    rig = Rig()

    async def scenario() -> None:
        a, b = await asyncio.gather(rig.controller.enable(), rig.controller.enable())
        assert a.state is State.ON and b.state is State.ON

    run(scenario())
    assert rig.log.calls.count("relay.start") == 1


def test_upstream_down_then_back_degrades_and_recovers_with_notices() -> None:
    # One upstream: nothing to fail over to (several: test_routing_control.py).
    rig = Rig(upstreams=(CORP,))
    down = UpstreamFailed("corp", CloseReason.UPSTREAM_UNREACHABLE, "connection refused")

    async def scenario() -> None:
        await rig.controller.enable()
        rig.from_engine(*[down] * (DOWN_AFTER_FAILURES - 1))
        await asyncio.sleep(0.05)
        assert rig.controller.state is State.ON  # a couple of failures are not "down"
        rig.from_engine(down)
        await until(lambda: rig.controller.state is State.DEGRADED, "degraded")
        assert rig.controller.status().upstreams[0].failing
        rig.from_engine(TunnelEstablished(7, "corp", 0.042))
        await until(lambda: rig.controller.state is State.ON, "back on")

    run(scenario())
    assert [n.kind for n in rig.notices()] == [NoticeKind.UPSTREAM_DOWN, NoticeKind.UPSTREAM_BACK]
    status = rig.controller.status()
    assert status.upstreams[0].latency == pytest.approx(0.042)
    assert not status.upstreams[0].failing
    # Three identical failures in a row are one entry with a count, not three lines.
    (entry,) = status.last_errors
    assert entry.text == "corp: connection refused" and entry.count == DOWN_AFTER_FAILURES
    assert entry.display == f"corp: connection refused ({DOWN_AFTER_FAILURES} times)"


def test_rejected_credentials_degrade_at_once() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.controller.enable()
        rig.from_engine(UpstreamFailed("corp", CloseReason.UPSTREAM_AUTH_FAILED, "407"))
        await until(lambda: rig.controller.state is State.DEGRADED, "degraded")

    run(scenario())
    (notice,) = rig.notices()
    assert notice.kind is NoticeKind.CREDENTIALS_REJECTED
    assert "Open Credentials" in notice.text
    assert "Open Credentials" in rig.controller.status().message


def test_a_refused_destination_does_not_mark_the_proxy_down() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.controller.enable()
        rig.from_engine(*[UpstreamFailed("corp", CloseReason.UPSTREAM_REFUSED, "403")] * 10)
        await until(lambda: len(rig.controller.status().last_errors) > 0, "the error")

    run(scenario())
    assert rig.controller.state is State.ON
    assert rig.notices() == []


def test_engine_events_cross_threads_in_bursts_and_count_connections() -> None:
    rig = Rig()
    opened = [
        ConnectionOpened(i, ("127.0.0.1", 40000 + i), ("192.0.2.1", 443)) for i in range(1000)
    ]
    closed = [ConnectionClosed(i, CloseReason.DONE, "", 10, 20, 0.1) for i in range(400)]

    async def scenario() -> None:
        await rig.controller.enable()
        before = len(rig.events)
        rig.from_engine(*opened, *closed)
        await until(lambda: rig.controller.status().total_connections == 1000, "all events")

        def updates() -> list[StatusUpdated]:
            return [e for e in rig.events[before:] if isinstance(e, StatusUpdated)]

        await until(
            lambda: updates()[-1:] != [] and updates()[-1].status.total_connections == 1000,
            "the status",
        )
        # One status per burst at most (and at most one every STATUS_INTERVAL), not per event.
        assert 1 <= len(updates()) <= 50, len(updates())

    run(scenario())
    status = rig.controller.status()
    assert status.active_connections == 600


def test_events_of_a_stopped_engine_are_ignored() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.controller.enable()
        old = rig.relays.relays[0].observer
        await rig.controller.disable()
        await rig.controller.enable()
        threading.Thread(target=old, args=(ConnectionOpened(1, ("127.0.0.1", 1), None),)).start()
        await asyncio.sleep(0.1)

    run(scenario())
    assert rig.controller.status().active_connections == 0


def test_a_helper_that_dies_while_on_is_started_again_with_the_same_spec() -> None:
    rig = Rig(watch_interval=0.02)

    async def scenario() -> None:
        await rig.controller.enable()
        rig.log.calls.clear()
        rig.redirect.running = False  # killed; a new helper removes its stale table
        await until(lambda: rig.log.calls[-1:] == ["redirect.apply"], "the spec applied again")

    run(scenario())
    assert rig.log.calls == ["redirect.start", "redirect.apply"]
    assert rig.redirect.specs[0] == rig.redirect.specs[1]
    assert rig.controller.state is State.ON
    assert not rig.relays.relays[0].stopped


def test_a_helper_that_cannot_be_started_again_means_error() -> None:
    rig = Rig(watch_interval=0.02)

    async def scenario() -> None:
        await rig.controller.enable()
        rig.redirect.fail_start = AuthorizationDismissedError("The password dialog was closed.")
        rig.redirect.running = False
        await until(lambda: rig.controller.state is State.ERROR, "error")

    run(scenario())
    message = rig.controller.status().message
    assert "password dialog was closed" in message and "switch it on again" in message
    assert [n.kind for n in rig.notices()] == [NoticeKind.HELPER_STOPPED]
    assert rig.relays.relays[0].stopped


def test_source_ports_false_is_an_error_and_nothing_is_applied() -> None:
    rig = Rig()
    rig.store.config = Config(RelaySettings(source_ports=None), (CORP, BACKUP))
    status = run(rig.controller.enable())
    assert status.state is State.ERROR
    assert "relay.source_ports is false" in status.message
    assert "source_ports = [61000, 64999]" in status.message
    assert rig.redirect.specs == []
    assert "redirect.start" not in rig.log.calls and "relay.start" not in rig.log.calls


def dns_without(*missing: str) -> Callable[[Iterable[tuple[str, int]]], Awaitable[Any]]:
    async def resolve(pairs: Iterable[tuple[str, int]]) -> tuple[Any, ...]:
        pairs = list(pairs)
        for host, port in pairs:
            if host in missing:
                raise UpstreamResolutionError(f"Cannot resolve proxy {host}:{port}.")
        return await fake_resolve(pairs)

    return resolve


def test_an_unresolvable_spare_only_warns_but_the_active_proxy_must_resolve() -> None:
    spare = replace(BACKUP, host="spare.invalid")
    ok = Rig(upstreams=(CORP, spare), resolver=dns_without("spare.invalid"))
    assert run(ok.controller.enable()).state is State.ON
    assert ok.redirect.specs[0].upstreams == ((ipaddress.ip_address("192.0.2.10"), 8080),)

    bad = Rig(upstreams=(CORP, spare), resolver=dns_without("proxy.corp.example"))
    status = run(bad.controller.enable())
    assert status.state is State.ERROR
    assert "Cannot resolve proxy proxy.corp.example:8080" in status.message
    assert bad.redirect.specs == []


def test_upstream_addresses_are_resolved_again_while_on() -> None:
    address = ["192.0.2.10"]

    async def moving(pairs: Iterable[tuple[str, int]]) -> tuple[Any, ...]:
        return tuple((ipaddress.ip_address(address[0]), port) for _host, port in pairs)

    rig = Rig(upstreams=(CORP,), resolver=moving, watch_interval=0.01, resolve_interval=0.02)

    async def scenario() -> None:
        await rig.controller.enable()
        address[0] = "192.0.2.99"  # the proxy's DNS name moved
        await until(lambda: len(rig.redirect.specs) == 2, "the spec applied again")
        await rig.controller.disable()

    run(scenario())
    assert rig.redirect.specs[1].upstreams == ((ipaddress.ip_address("192.0.2.99"), 8080),)


def test_relay_that_stops_by_itself_means_error() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.controller.enable()
        rig.from_engine(EngineStopped())
        await until(lambda: rig.controller.state is State.ERROR, "error")

    run(scenario())
    assert rig.log.calls[-3:] == ["redirect.remove", "relay.stop", "redirect.stop"]


def test_selecting_an_upstream_saves_it_and_restarts_only_the_relay() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.controller.enable()
        rig.log.calls.clear()
        status = await rig.controller.select_upstream("backup")
        assert status.state is State.ON
        assert status.upstream == "backup"

    run(scenario())
    assert rig.store.saved[-1].relay.upstream == "backup"
    assert rig.log.calls == ["relay.stop", "relay.start", "redirect.start", "redirect.apply"]
    assert "redirect.stop" not in rig.log.calls
    assert rig.relays.configs[-1].active_upstream() == BACKUP
    assert [a for a in rig.controller.status().upstreams if a.active][0].name == "backup"


def test_selecting_an_unknown_upstream_is_reported_not_raised() -> None:
    rig = Rig()
    status = run(rig.controller.select_upstream("nope"))
    assert status.state is State.OFF
    assert "no upstream named 'nope'" in (status.last_error or "")


def test_only_listed_transitions_are_possible() -> None:
    rig = Rig()
    with pytest.raises(AssertionError, match="off -> on"):
        rig.controller._transition(State.ON, "x")
    # Every state can get back to Off, and Off is reachable from everywhere but itself.
    for state in State:
        assert (
            state is State.OFF or State.OFF in ALLOWED[state] or State.DISABLING in ALLOWED[state]
        )


def test_notice_limiter_lets_one_per_kind_through_per_interval() -> None:
    now = [100.0]
    limiter = NoticeLimiter(60.0, clock=lambda: now[0])
    assert limiter.allow(NoticeKind.UPSTREAM_DOWN)
    assert not limiter.allow(NoticeKind.UPSTREAM_DOWN)
    assert limiter.allow(NoticeKind.UPSTREAM_BACK)
    assert limiter.allow(NoticeKind.TEST_RESULT) and limiter.allow(NoticeKind.TEST_RESULT)
    now[0] += 61
    assert limiter.allow(NoticeKind.UPSTREAM_DOWN)


class FakeProbe:
    def __init__(self, result: ProbeResult) -> None:
        self.result = result
        self.calls: list[tuple[UpstreamProxy, Credentials | None]] = []

    async def __call__(self, upstream: UpstreamProxy, creds: Credentials | None) -> ProbeResult:
        self.calls.append((upstream, creds))
        return self.result


class FakeSource:
    def __init__(self, entries: dict[str, Credentials]) -> None:
        self.entries = entries

    def get(self, upstream: str, username: str | None) -> Credentials | None:
        return self.entries.get(upstream)


ALICE = Credentials("alice", Secret("wrong"))


def test_test_connection_reports_a_wrong_password_as_such() -> None:
    probe = FakeProbe(
        ProbeResult(
            ProbeOutcome.AUTH_FAILED,
            None,
            407,
            "proxy.corp.example:8080 rejected the password for alice (407)",
        )
    )
    rig = Rig(probe=probe, credential_source=FakeSource({"corp": ALICE}))
    text = run(rig.controller.test_connection())
    assert probe.calls == [(CORP, ALICE)]  # the stored login went to the probe
    assert "rejected the password for alice (407)" in text
    assert "Open Credentials" in text and "works" not in text
    assert [(n.kind, n.text) for n in rig.notices()] == [(NoticeKind.TEST_RESULT, text)]
    assert rig.controller.status().last_error == text
    assert "wrong" not in text


def test_test_connection_reports_a_working_proxy() -> None:
    probe = FakeProbe(ProbeResult(ProbeOutcome.OK, 0.012, None, "OK in 12 ms"))
    rig = Rig(probe=probe)
    text = run(rig.controller.test_connection())
    assert probe.calls == [(CORP, None)]  # no credential source: no login
    # The target is the settings' [probe] target (followups: H6), in describe_probe's words.
    assert text == (
        "Proxy corp works. OK: proxy.corp.example:8080 opened a tunnel to "
        "www.microsoft.com:443 in 12 ms."
    )
    assert rig.controller.status().last_error is None


def test_test_connection_through_the_real_probe_reports_a_refused_connection() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rig = Rig(upstreams=(replace(BACKUP, port=dead),))
    text = run(rig.controller.test_connection())
    assert f"connection refused by 127.0.0.1:{dead}" in text
    assert "Check the address" in text


def test_status_is_json_and_diagnostics_hold_no_login_name() -> None:
    rig = Rig()
    run(rig.controller.enable())
    data = json.loads(json.dumps(rig.controller.status().to_dict()))
    assert data["state"] == "on"
    assert [u["name"] for u in data["upstreams"]] == ["corp", "backup"]
    report = rig.controller.diagnostics({"qt": "6.x"})
    assert "state: on" in report and "http://proxy.corp.example:8080" in report
    assert "qt 6.x" in report
    assert "alice" not in report  # the login name is personal; "login set" is enough


def test_real_engine_on_its_own_thread_listens_and_stops() -> None:
    """The real RelayEngine + EngineThread behind the controller (redirect still a fake)."""
    log = Log()
    settings = RelaySettings(port=0, listen=("127.0.0.1",), drain_timeout=0.5)
    store = FakeStore(Config(settings, (CORP,)))
    redirect = FakeRedirect(log)
    controller = ProxyController(store, engine_relay_factory(), redirect, resolver=fake_resolve)

    async def scenario() -> int:
        status = await controller.enable()
        assert status.state is State.ON, status.message
        ((host, port),) = status.relay_addresses
        # A direct connection (not redirected) is accepted and then refused by the engine;
        # the controller counts it through the cross-thread event path.
        reader, writer = await asyncio.open_connection(host, port)
        await until(lambda: controller.status().total_connections == 1, "the connection event")
        writer.close()
        await controller.disable()
        return port

    port = run(scenario())
    assert redirect.specs[0].relay_port == port
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass
