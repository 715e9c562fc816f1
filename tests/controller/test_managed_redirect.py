"""Tests of tray_proxy/controller/managed_redirect.py: settings -> RuleSpec, re-apply on address
change, helper restarts, shutdown order, the captured bridges handed to the relay. The helper is
an in-memory fake here; tests/firewall/test_e2e_*.py and test_hardening_lab.py run the real one.
Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterable, Sequence

import pytest

from tray_proxy.config import Config, ConfigError, parse_config
from tray_proxy.controller.lifecycle import Lifecycle
from tray_proxy.controller.managed_redirect import (
    ManagedRedirect,
    RedirectSetupError,
    Resolved,
    build_rule_spec,
    upstream_endpoints,
)
from tray_proxy.controller.services import Traffic
from tray_proxy.firewall.client import (
    HelperExitedError,
    RedirectError,
    RedirectStatus,
    UpstreamResolutionError,
)
from tray_proxy.firewall.ruleset import Bridge, IPAddress, RuleSpec
from tray_proxy.relay.events import Event, Observer
from tray_proxy.relay.records import Address
from tray_proxy.relay.secrets import Credentials

TWO = (
    '[[upstream]]\nname = "a"\nurl = "http://proxy-a.example:8080"\n'
    '[[upstream]]\nname = "b"\nurl = "socks5://proxy-b.example"\n'
)


CAPTURED = "uid 1000 (alice) and system accounts (uid < 1000)"


def bridge(name: str, address: str, network: str) -> Bridge:
    return Bridge(name, ipaddress.IPv4Address(address), ipaddress.IPv4Network(network))


DOCKER0 = bridge("docker0", "172.17.0.1", "172.17.0.0/16")
APP_NET = bridge("br-0123456789ab", "172.18.0.1", "172.18.0.0/16")


class FakeController:
    """Records what the redirect asked of the helper; `die()` simulates a killed helper;
    `bridges` is what its status reports as captured (the helper follows Docker itself)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.applied: list[RuleSpec] = []
        self.running = False
        self.bridges: tuple[Bridge, ...] = ()

    async def start(self) -> None:
        self.calls.append("start")
        self.running = True

    async def apply(self, spec: RuleSpec) -> None:
        self.calls.append("apply")
        self.applied.append(spec)

    async def remove(self) -> bool:
        self.calls.append("remove")
        return True

    async def status(self) -> RedirectStatus:
        if not self.running:
            raise HelperExitedError("The redirect helper stopped with exit code -9")
        self.calls.append("status")
        return RedirectStatus(
            active=True,
            spec=self.applied[-1] if self.applied else None,
            table_present=True,
            owner_uid=1000,
            captured=CAPTURED,
            bridges=self.bridges,
        )

    async def stop(self) -> int:
        self.calls.append("stop")
        self.running = False
        return 0

    def die(self) -> None:
        self.running = False


class FakeDNS:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def __call__(self, endpoints: Iterable[tuple[str, int]]) -> Resolved:
        out: list[tuple[IPAddress, int]] = []
        for host, port in endpoints:
            if host not in self.table:
                raise UpstreamResolutionError(f"Cannot resolve proxy {host}:{port}")
            out += [(ipaddress.ip_address(a), port) for a in self.table[host]]
        return tuple(out)


def _managed(text: str, dns: FakeDNS, **kw: object) -> tuple[ManagedRedirect, FakeController]:
    controller = FakeController()
    managed = ManagedRedirect(
        parse_config(text),
        relay_port=12080,
        controller=controller,
        resolve=dns,
        **kw,  # type: ignore[arg-type]
    )
    return managed, controller


def test_spec_takes_every_setting() -> None:
    config = parse_config(
        TWO + "[relay]\nport = 3129\nredirect_ports = [443]\nsource_ports = [62000, 62999]\n"
        '[redirect]\nexclude = ["10.0.0.0/8"]\ncapture_containers = false\n'
        'container_interfaces = []\nreject_quic = false\ncapture = "owner"\n'
    )
    upstreams = ((ipaddress.ip_address("192.0.2.1"), 8080),)
    assert build_rule_spec(config, 3129, upstreams) == RuleSpec(
        relay_port=3129,
        redirect_ports=(443,),
        excluded_networks=(ipaddress.ip_network("10.0.0.0/8"),),
        upstreams=upstreams,
        relay_source_ports=(62000, 62999),
        container_interfaces=(),
        capture_containers=False,
        reject_quic=False,
        capture="owner",
    )


def test_capture_defaults_to_owner_and_system_and_is_validated() -> None:
    config = parse_config(TWO)
    assert config.redirect.capture == "owner+system"
    assert build_rule_spec(config, 12080, ()).capture == "owner+system"
    for value in ("all", "owner"):
        config = parse_config(TWO + f'[redirect]\ncapture = "{value}"\n')
        assert build_rule_spec(config, 12080, ()).capture == value
    with pytest.raises(ConfigError, match=r"redirect\.capture: must be one of 'owner\+system'"):
        parse_config(TWO + '[redirect]\ncapture = "everyone"\n')


def test_every_upstream_is_an_endpoint_once() -> None:
    config = parse_config(TWO + '[[upstream]]\nname = "c"\nurl = "http://proxy-a.example:8080"\n')
    assert upstream_endpoints(config) == (("proxy-a.example", 8080), ("proxy-b.example", 1080))


def test_source_ports_false_is_refused_with_the_reason() -> None:
    config = parse_config(TWO + "[relay]\nsource_ports = false\n")
    with pytest.raises(RedirectSetupError, match="loop"):
        build_rule_spec(config, 12080, ())


def test_relay_port_among_redirected_ports_is_a_setup_error() -> None:
    # The settings file refuses this at load; a relay bound to another port than configured
    # (a restart) must still never be redirected to itself.
    with pytest.raises(RedirectSetupError, match="relay_port"):
        build_rule_spec(parse_config(TWO), 443, ())


def test_start_excludes_all_upstreams_and_reapplies_only_on_change() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["2001:db8::2"]})
    managed, controller = _managed(TWO, dns, resolve_interval=3600)

    async def scenario() -> None:
        spec = await managed.start()
        assert [str(a) for a, _ in spec.upstreams] == ["192.0.2.1", "2001:db8::2"]
        assert await managed.refresh() is False  # same addresses: no nft run
        dns.table["proxy-a.example"] = ["192.0.2.9"]
        assert await managed.refresh() is True
        assert [str(a) for a, _ in controller.applied[-1].upstreams] == [
            "192.0.2.9",
            "2001:db8::2",
        ]
        del dns.table["proxy-b.example"]  # a DNS failure keeps the last good address
        assert await managed.refresh() is False
        await managed.stop()

    asyncio.run(scenario())
    assert controller.calls == [
        *("start", "apply", "status"),  # what the helper captures, after each apply
        *("apply", "status"),
        *("remove", "stop"),
    ]


def test_reloaded_settings_exclude_the_new_upstreams_at_the_next_refresh() -> None:
    """A reload while on (ProxyController.reload -> Lifecycle.update_redirect): the upstream
    that left is no longer excluded, the new one is, in one apply."""
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["2001:db8::2"]})
    dns.table["proxy-c.example"] = ["192.0.2.3"]
    managed, controller = _managed(TWO, dns, resolve_interval=3600)
    reloaded = parse_config(
        '[[upstream]]\nname = "a"\nurl = "http://proxy-a.example:8080"\n'
        '[[upstream]]\nname = "c"\nurl = "http://proxy-c.example:3128"\n'
    )

    async def scenario() -> None:
        await managed.start()
        managed.update_config(reloaded)
        assert managed.config is reloaded
        assert await managed.refresh() is True
        assert sorted((str(a), p) for a, p in controller.applied[-1].upstreams) == [
            ("192.0.2.1", 8080),
            ("192.0.2.3", 3128),
        ]
        await managed.stop()

    asyncio.run(scenario())


def test_switch_off_keeps_the_helper_until_stop() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]})
    managed, controller = _managed(TWO, dns, helper_check=0.01)

    async def scenario() -> None:
        await managed.start()
        await managed.switch_off()
        # Redirect off for new connections; the helper (and its table) stays while the relay
        # drains, and a helper that dies now is not started again.
        assert controller.calls == ["start", "apply", "status", "remove"]
        assert controller.running and managed.spec is None
        controller.die()
        await asyncio.sleep(0.05)
        assert controller.calls.count("start") == 1
        await managed.switch_off()
        await managed.stop()

    asyncio.run(scenario())
    assert controller.calls == ["start", "apply", "status", "remove", "stop"]


def test_unresolvable_active_upstream_fails_start_other_only_warns() -> None:
    only_b = FakeDNS({"proxy-b.example": ["192.0.2.2"]})
    managed, controller = _managed(TWO, only_b)
    with pytest.raises(UpstreamResolutionError):
        asyncio.run(managed.start())
    assert controller.calls == []  # nothing started as root for nothing
    only_a = FakeDNS({"proxy-a.example": ["192.0.2.1"]})
    managed, controller = _managed(TWO, only_a)

    async def scenario() -> RuleSpec:
        spec = await managed.start()
        await managed.stop()
        return spec

    assert [str(a) for a, _ in asyncio.run(scenario()).upstreams] == ["192.0.2.1"]


def test_periodic_resolve_reapplies() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]})
    managed, controller = _managed(TWO, dns, resolve_interval=0.05, helper_check=0.01)

    async def scenario() -> None:
        await managed.start()
        dns.table["proxy-a.example"] = ["192.0.2.7"]
        for _ in range(200):
            if len(controller.applied) >= 2:
                break
            await asyncio.sleep(0.01)
        await managed.stop()

    asyncio.run(scenario())
    assert str(controller.applied[-1].upstreams[0][0]) == "192.0.2.7"


def test_a_killed_helper_is_restarted_then_reported() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]})
    failures: list[RedirectError] = []
    managed, controller = _managed(
        TWO, dns, helper_check=0.01, max_restarts=1, on_failure=failures.append
    )

    async def wait_for(condition: object) -> None:
        for _ in range(300):
            if condition():  # type: ignore[operator]
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")

    async def scenario() -> None:
        await managed.start()
        controller.die()
        await wait_for(lambda: controller.calls.count("start") == 2)
        assert controller.applied[-1] == controller.applied[0]  # same spec again
        controller.die()
        await wait_for(lambda: failures)
        await managed.stop()

    asyncio.run(scenario())
    assert managed.restarts == 1
    assert "stopped 2 times" in str(failures[0]) and "nft delete table" in str(failures[0])


class Listener:
    """The relay's side of `on_bridges`: the address sets it was told, in order."""

    def __init__(self) -> None:
        self.told: list[tuple[str, ...]] = []
        self.fail = False

    async def __call__(self, addresses: tuple[str, ...]) -> tuple[str, ...]:
        if self.fail:  # as the relay: a bind failure is an event, the address is not listened on
            return ()
        self.told.append(addresses)
        return addresses


async def _wait_for(condition: object, what: str) -> None:
    for _ in range(300):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_relay_listens_on_the_captured_bridges_as_they_come_and_go() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]})
    listener = Listener()
    managed, controller = _managed(
        TWO, dns, on_bridges=listener, helper_check=0.01, bridge_interval=0.02
    )
    controller.bridges = (DOCKER0,)

    async def scenario() -> None:
        await managed.start()
        # Told before start() returns: the helper already DNATs docker0 to its gateway.
        assert listener.told == [("172.17.0.1",)]
        assert managed.captured == CAPTURED and managed.owner_uid == 1000
        assert managed.bridges == (DOCKER0,)
        controller.bridges = (APP_NET, DOCKER0)  # `docker network create` meanwhile
        await _wait_for(lambda: len(listener.told) == 2, "the new bridge")
        polls = controller.calls.count("status")
        await _wait_for(lambda: controller.calls.count("status") >= polls + 3, "more polls")
        assert len(listener.told) == 2  # an unchanged list is not told again
        controller.bridges = ()  # the networks were removed
        await _wait_for(lambda: len(listener.told) == 3, "the bridges gone")
        await managed.stop()

    asyncio.run(scenario())
    assert listener.told == [("172.17.0.1",), ("172.17.0.1", "172.18.0.1"), ()]


def test_a_relay_that_cannot_listen_keeps_the_redirect_and_is_asked_again() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]})
    listener = Listener()
    listener.fail = True
    failures: list[RedirectError] = []
    managed, controller = _managed(
        TWO,
        dns,
        on_bridges=listener,
        on_failure=failures.append,
        helper_check=0.01,
        bridge_interval=0.02,
    )
    controller.bridges = (DOCKER0,)

    async def scenario() -> None:
        await managed.start()
        assert listener.told == [] and managed.spec is not None
        listener.fail = False
        await _wait_for(lambda: listener.told == [("172.17.0.1",)], "a second attempt")
        await managed.stop()

    asyncio.run(scenario())
    assert failures == []


def test_no_bridge_polling_without_container_capture() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]})
    listener = Listener()
    managed, controller = _managed(
        TWO + "[redirect]\ncapture_containers = false\n",
        dns,
        on_bridges=listener,
        helper_check=0.01,
        bridge_interval=0.01,
    )

    async def scenario() -> None:
        await managed.start()
        await asyncio.sleep(0.1)  # ten bridge intervals: none may poll
        await managed.stop()

    asyncio.run(scenario())
    assert controller.calls.count("status") == 1  # the one after apply
    assert listener.told == []  # no bridges captured: nothing to tell


class ListeningRelay:
    """A RelayHandle that records the extra addresses it is told to listen on."""

    def __init__(self) -> None:
        self.addresses: tuple[Address, ...] = (("127.0.0.1", 12080),)
        self.extra: list[tuple[str, ...]] = []
        self.threads: list[int] = []

    def set_extra_listen(self, addresses: Sequence[str]) -> tuple[Address, ...]:
        self.threads.append(threading.get_ident())
        self.extra.append(tuple(addresses))
        return tuple((a, 12080) for a in addresses)

    def stop(self, timeout: float) -> None:
        pass

    def retry_credentials(self, upstream: str) -> None:
        pass

    def update_credentials(self, upstream: str, credentials: Credentials | None) -> None:
        pass

    def close_connections(self, ids: Iterable[int]) -> int:
        return 0

    def traffic(self) -> Traffic:
        return ({}, 0, 0)


def test_the_lifecycle_makes_the_relay_listen_on_the_captured_bridges() -> None:
    relays: list[ListeningRelay] = []

    def start(config: Config, observer: Observer) -> ListeningRelay:
        relays.append(ListeningRelay())
        return relays[-1]

    helper = FakeController()
    helper.bridges = (DOCKER0, APP_NET)
    life = Lifecycle(
        start,
        helper,
        resolver=FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]}),
        on_redirect_failure=lambda exc: None,
        on_relay_stopped=lambda: None,
    )

    def ignore(_event: Event) -> None:
        pass

    async def scenario() -> tuple[str | None, int]:
        await life.switch_on(parse_config(TWO), ignore)
        captured = life.captured
        await life.teardown(0.1)
        return captured, threading.get_ident()

    captured, loop_thread = asyncio.run(scenario())
    assert captured == CAPTURED and life.captured is None
    assert relays[0].extra == [("172.17.0.1", "172.18.0.1")]
    # A blocking call into the relay's loop: never made on the controller's loop.
    assert relays[0].threads and loop_thread not in relays[0].threads
