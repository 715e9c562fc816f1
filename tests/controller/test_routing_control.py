"""The controller's routing side with the fakes: upstream health changes and accepted
credentials as the user sees them, `reload` (live vs. switch off/on), the UI's save applied
without a restart, `captured` in the status, and teardown when a step's report raises."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from tests.controller.fakes import BACKUP, CORP, Rig, run, until
from tray_proxy.config import Config, ConfigError
from tray_proxy.controller import NoticeKind, State
from tray_proxy.controller.status import Status
from tray_proxy.firewall.ruleset import RuleSpec
from tray_proxy.monitor.health import UpstreamState
from tray_proxy.relay.events import (
    CredentialsAccepted,
    CredentialsRejected,
    RoutingError,
    TunnelEstablished,
    UpstreamFailed,
    UpstreamHealthChanged,
)
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.settings import RelaySettings, UpstreamKind
from tray_proxy.routing.settings import RoutingSettings


def test_an_upstream_going_down_and_back_is_a_notice_and_the_upstreams_state() -> None:
    rig = Rig()

    async def main() -> tuple[Status, Status]:
        await rig.controller.enable()
        rig.from_engine(UpstreamHealthChanged("corp", False, "connection refused"))
        await until(lambda: bool(rig.notices()), "the down notice")
        down = rig.controller.status()
        rig.from_engine(UpstreamHealthChanged("corp", True))
        await until(lambda: len(rig.notices()) == 2, "the back notice")
        return down, rig.controller.status()

    down, back = run(main())
    first, second = rig.notices()
    assert first.kind is NoticeKind.UPSTREAM_DOWN
    assert first.text == "Proxy corp is down (connection refused); using backup."
    assert [u.failing for u in down.upstreams] == [True, False]
    assert second.kind is NoticeKind.UPSTREAM_BACK
    assert second.text == "Proxy corp is back: new connections use it again."
    assert [u.failing for u in back.upstreams] == [False, False]


def test_every_upstream_down_says_direct() -> None:
    rig = Rig()

    async def main() -> None:
        await rig.controller.enable()
        rig.from_engine(
            UpstreamHealthChanged("backup", False, "timed out"),
            UpstreamHealthChanged("corp", False, "timed out"),
        )
        await until(lambda: len(rig.controller.status().last_errors) == 2, "two errors")

    run(main())
    # One notice a minute per kind (a flapping proxy must not spam); the errors say both.
    assert len(rig.notices()) == 1
    assert rig.controller.status().last_error == (
        "Proxy corp is down (timed out); no proxy is left, so new connections go direct."
    )
    assert rig.controller.state is State.DEGRADED


def test_credentials_accepted_ends_degraded() -> None:
    rig = Rig()

    async def main() -> None:
        await rig.controller.enable()
        rig.controller._transition(State.DEGRADED, "Proxy corp rejected the credentials")
        rig.from_engine(CredentialsAccepted("corp", "alice"))
        await until(lambda: rig.controller.state is State.ON, "back on")

    run(main())
    notice = rig.notices()[-1]
    assert notice.kind is NoticeKind.UPSTREAM_BACK
    assert notice.text == "Proxy corp works again: it accepted the login."


def test_a_pac_script_that_fails_reaches_the_user() -> None:
    """The relay's RoutingError (published once per new PAC failure) is an error the status
    and the Overview show, and a warning notice: a broken PAC file must not go unseen."""
    rig = Rig()

    async def main() -> None:
        await rig.controller.enable()
        rig.from_engine(RoutingError("http://wpad/wpad.dat answered 404"))
        await until(lambda: bool(rig.notices()), "the notice")

    run(main())
    (notice,) = rig.notices()
    assert notice.kind is NoticeKind.ROUTING_FAILED
    assert notice.text == (
        "The PAC script cannot be used: http://wpad/wpad.dat answered 404. Until it works "
        "again, new connections follow the rules and the default of the settings file."
    )
    assert rig.controller.status().last_error == notice.text
    assert rig.controller.state is State.ON  # the rules still route: not an outage


def test_status_says_whose_traffic_is_captured() -> None:
    rig = Rig()
    run(rig.controller.enable())
    # The fake helper's status names nobody; the controller passes the helper's words on.
    assert rig.controller._life._managed is not None
    rig.controller._life._managed.captured = "uid 1000 (alice) and system accounts"
    status = rig.controller.status()
    assert status.captured == "uid 1000 (alice) and system accounts"
    assert status.to_dict()["captured"] == "uid 1000 (alice) and system accounts"
    assert status.to_dict()["routing"] is None


def test_reload_applies_routing_live_and_names_what_needs_a_restart() -> None:
    rig = Rig()
    run(rig.controller.enable())
    old = rig.store.config
    rules = RoutingSettings(default="backup")
    rig.store.config = dataclasses.replace(
        old, routing=rules, relay=dataclasses.replace(old.relay, port=13080)
    )
    answer = run(rig.controller.reload())
    relay = rig.relays.relays[-1]
    assert [c.routing for c in relay.reloaded] == [rules]
    assert answer["applied"] == ["routing"]  # same upstreams: the redirect stays as it is
    assert answer["restart"] == ["the relay's port"]
    assert answer["message"] == (
        "The settings were reloaded: new connections follow them; open connections stay. "
        "Changed, and used after a switch off and on: the relay's port."
    )
    assert rig.log.calls.count("relay.start") == 1  # no restart
    assert rig.controller.config is rig.store.config
    # Again (the file watch and `tray-proxy reload` both ran): still not in use.
    assert run(rig.controller.reload())["restart"] == ["the relay's port"]


def test_reload_with_a_new_upstream_address_applies_the_redirect_again() -> None:
    rig = Rig()
    run(rig.controller.enable())
    moved = dataclasses.replace(BACKUP, host="proxy2.corp.example", port=3129)
    rig.store.config = dataclasses.replace(rig.store.config, upstreams=(CORP, moved))
    answer = run(rig.controller.reload())
    assert answer["applied"] == ["routing", "redirect"]
    assert answer["restart"] == []
    spec: RuleSpec = rig.redirect.specs[-1]
    assert [port for _address, port in spec.upstreams] == [8080, 3129]
    assert rig.log.calls.count("relay.start") == 1
    assert rig.log.calls.count("redirect.start") == 1


def test_reload_of_a_broken_file_keeps_the_running_settings() -> None:
    rig = Rig()
    run(rig.controller.enable())
    running = rig.controller.config

    def broken() -> Config:
        raise ConfigError("config.toml", "relay.port", "must be a number")

    rig.store.load = broken  # type: ignore[method-assign]
    try:
        run(rig.controller.reload())
    except Exception as exc:
        assert "not reloaded" in str(exc) and "relay.port" in str(exc)
    else:
        raise AssertionError("reload of a broken file must raise")
    assert rig.controller.config is running
    assert rig.relays.relays[-1].reloaded == []


def test_reload_while_off_only_reads_the_file() -> None:
    rig = Rig()
    rig.store.config = Config(RelaySettings(), (BACKUP,))
    answer = run(rig.controller.reload())
    assert answer == {"applied": [], "restart": [], "message": "The settings were reloaded."}
    assert rig.controller.config is rig.store.config


def test_saving_an_upstream_while_on_reloads_without_a_restart() -> None:
    rig = Rig()
    run(rig.controller.enable())
    moved = dataclasses.replace(CORP, port=8081)
    run(rig.controller.save_upstream(moved))
    relay = rig.relays.relays[-1]
    assert [c.upstreams[0] for c in relay.reloaded] == [moved]
    assert rig.log.calls.count("relay.start") == 1
    assert rig.log.calls[-1] == "relay.retry corp"
    assert rig.log.calls.count("redirect.apply") == 2  # once at start, once for the address


class RaisingSteps:
    def relay_started(self, addresses: object, upstream: str) -> None:
        pass

    def redirect_on(self, spec: RuleSpec) -> None:
        pass

    def removing_redirect(self) -> None:
        raise BrokenPipeError("stdout closed")

    def draining(self) -> None:
        raise BrokenPipeError("stdout closed")


def test_a_raising_step_report_keeps_the_switch_off_order() -> None:
    """A step's report that raises (a closed terminal) is not a redirect that stayed on:
    the redirect goes off, then the relay drains, then the helper ends (followups: H4)."""
    rig = Rig(steps=RaisingSteps())
    run(rig.controller.enable())
    run(rig.controller.disable())
    tail = [c for c in rig.log.calls if c in ("redirect.remove", "relay.stop", "redirect.stop")]
    assert tail == ["redirect.remove", "relay.stop", "redirect.stop"]
    assert rig.controller.state is State.OFF


def test_with_a_second_upstream_failures_of_the_first_are_not_degraded() -> None:
    """Failover: connections to corp fail and go through backup; the user is told once when
    the relay's health says corp is down, the state stays On (it was Degraded before, with
    "Proxy backup works again" at the next tunnel through backup)."""
    rig = Rig()
    down = UpstreamFailed("corp", CloseReason.UPSTREAM_UNREACHABLE, "connection refused")

    async def main() -> None:
        await rig.controller.enable()
        rig.from_engine(down, down, down, TunnelEstablished(1, "backup", 0.01))
        rig.from_engine(UpstreamHealthChanged("corp", False, "connection refused"))
        await until(lambda: bool(rig.notices()), "the notice")
        rig.from_engine(UpstreamHealthChanged("backup", False, "timed out"))
        await until(lambda: rig.controller.state is State.DEGRADED, "every upstream down")
        rig.from_engine(UpstreamHealthChanged("backup", True))
        await until(lambda: rig.controller.state is State.ON, "one back")

    run(main())
    kinds = [n.kind for n in rig.notices()]
    assert kinds == [NoticeKind.UPSTREAM_DOWN, NoticeKind.UPSTREAM_BACK]
    assert rig.notices()[0].text == "Proxy corp is down (connection refused); using backup."


def test_health_probes_while_on_feed_the_relay_and_the_upstreams_card() -> None:
    """With probes on, a loopback proxy that answers 407 to the login-less probe works: the
    relay hears it, and the card says the proxy answered."""

    async def main() -> tuple[Rig, list[tuple[str, bool, float | None, str]]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="x"\r\nContent-Length: 0\r\n\r\n'
                )
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        local = dataclasses.replace(BACKUP, name="local", kind=UpstreamKind.HTTP, port=port)
        rig = Rig(upstreams=(local,), probes=True, watch_network=False, probe_interval=0.05)
        try:
            await rig.controller.enable()
            relay = rig.relays.relays[-1]
            await until(lambda: any(p[1] for p in relay.probes), "a good probe")
            await until(
                lambda: any(h.last_probe for h in rig.controller.status().health.upstreams),
                "the card's probe",
            )
            await rig.controller.disable()
        finally:
            server.close()
        return rig, relay.probes

    rig, probes = run(main())
    assert probes[0][:2] == ("local", True)
    (card,) = rig.controller.status().health.upstreams
    assert card.last_probe is not None
    assert card.last_probe.words.startswith("health probe: the proxy answered in ")
    assert card.state is UpstreamState.UP


def test_credentials_accepted_puts_the_upstreams_card_back_to_working() -> None:
    rig = Rig()

    async def main() -> None:
        await rig.controller.enable()
        rig.from_engine(CredentialsRejected("corp", "alice"))
        await until(lambda: _card_state(rig, "corp") is UpstreamState.AUTH_FAILED, "refused")
        rig.from_engine(CredentialsAccepted("corp", "alice"))
        await until(lambda: _card_state(rig, "corp") is UpstreamState.UP, "working again")

    run(main())


def _card_state(rig: Rig, name: str) -> UpstreamState | None:
    # The card reads the monitor's snapshot, refreshed by the traffic tick; ask for it here.
    monitor = rig.controller._monitor
    if monitor is None:
        return None
    for health in monitor.health(0.0).upstreams:
        if health.name == name:
            return health.state
    return None
