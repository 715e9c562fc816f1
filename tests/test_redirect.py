"""Tests of tray_proxy/redirect.py: settings -> RuleSpec, re-apply on address change, helper
restarts, shutdown order. The helper is an in-memory fake here; tests/firewall/test_e2e_*.py
run the real one. Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

import pytest

from tray_proxy.config import parse_config
from tray_proxy.firewall.client import HelperExitedError, RedirectError, UpstreamResolutionError
from tray_proxy.firewall.ruleset import RuleSpec
from tray_proxy.redirect import (
    ManagedRedirect,
    RedirectSetupError,
    build_rule_spec,
    upstream_endpoints,
)

TWO = (
    '[[upstream]]\nname = "a"\nurl = "http://proxy-a.example:8080"\n'
    '[[upstream]]\nname = "b"\nurl = "socks5://proxy-b.example"\n'
)


class FakeController:
    """Records what the redirect asked of the helper; `die()` simulates a killed helper."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.applied: list[RuleSpec] = []
        self.running = False

    async def start(self) -> None:
        self.calls.append("start")
        self.running = True

    async def apply(self, spec: RuleSpec) -> None:
        self.calls.append("apply")
        self.applied.append(spec)

    async def remove(self) -> bool:
        self.calls.append("remove")
        return True

    async def status(self) -> object:
        raise HelperExitedError("The redirect helper stopped with exit code -9")

    async def stop(self) -> int:
        self.calls.append("stop")
        self.running = False
        return 0

    def die(self) -> None:
        self.running = False


class FakeDNS:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def __call__(self, endpoints: Iterable[tuple[str, int]]) -> tuple:
        out = []
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
        controller=controller,  # type: ignore[arg-type]
        resolve=dns,
        **kw,  # type: ignore[arg-type]
    )
    return managed, controller


def test_spec_takes_every_setting() -> None:
    config = parse_config(
        TWO + "[relay]\nport = 3129\nredirect_ports = [443]\nsource_ports = [62000, 62999]\n"
        '[redirect]\nexclude = ["10.0.0.0/8"]\ncapture_containers = false\n'
        "container_interfaces = []\nreject_quic = false\n"
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
    )


def test_every_upstream_is_an_endpoint_once() -> None:
    config = parse_config(TWO + '[[upstream]]\nname = "c"\nurl = "http://proxy-a.example:8080"\n')
    assert upstream_endpoints(config) == (("proxy-a.example", 8080), ("proxy-b.example", 1080))


def test_source_ports_false_is_refused_with_the_reason() -> None:
    config = parse_config(TWO + "[relay]\nsource_ports = false\n")
    with pytest.raises(RedirectSetupError, match="loop"):
        build_rule_spec(config, 12080, ())


def test_relay_port_among_redirected_ports_is_a_setup_error() -> None:
    config = parse_config(TWO + "[relay]\nport = 443\n")
    with pytest.raises(RedirectSetupError, match="relay_port"):
        build_rule_spec(config, 443, ())


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
    assert controller.calls == ["start", "apply", "apply", "remove", "stop"]


def test_switch_off_keeps_the_helper_until_stop() -> None:
    dns = FakeDNS({"proxy-a.example": ["192.0.2.1"], "proxy-b.example": ["192.0.2.2"]})
    managed, controller = _managed(TWO, dns, helper_check=0.01)

    async def scenario() -> None:
        await managed.start()
        await managed.switch_off()
        # Redirect off for new connections; the helper (and its table) stays while the relay
        # drains, and a helper that dies now is not started again.
        assert controller.calls == ["start", "apply", "remove"]
        assert controller.running and managed.spec is None
        controller.die()
        await asyncio.sleep(0.05)
        assert controller.calls.count("start") == 1
        await managed.switch_off()
        await managed.stop()

    asyncio.run(scenario())
    assert controller.calls == ["start", "apply", "remove", "stop"]


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
