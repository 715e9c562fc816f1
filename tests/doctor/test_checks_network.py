"""The checks that read the kernel's state from /proc (IPv6, reserved ports) and the
settings (exclusions), on a /proc laid out in a temp dir (DoctorEnv.proc), and the redirect
check of a normal user when no instance runs.

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

from tests.doctor.support import write_config
from tray_proxy.doctor import checks_network
from tray_proxy.doctor.context import DoctorEnv
from tray_proxy.doctor.model import CheckResult, CheckStatus

ROUTE = "{dest} 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 {dev}\n"  # noqa: E501
DEFAULT = "0" * 32


def proc(tmp_path: Path, *, ipv6: bool = True, lo_ipv6: bool = True, routes: str = "") -> Path:
    root = tmp_path / "proc"
    for name, on in (("all", ipv6), ("lo", lo_ipv6)):
        conf = root / "sys/net/ipv6/conf" / name
        conf.mkdir(parents=True)
        (conf / "disable_ipv6").write_text("0\n" if on else "1\n")
    (root / "net").mkdir(parents=True)
    (root / "net/ipv6_route").write_text(routes)
    (root / "sys/net/ipv4").mkdir(parents=True)
    (root / "sys/net/ipv4/ip_local_reserved_ports").write_text("\n")
    return root


def check(func: object, env: DoctorEnv) -> CheckResult:
    result = asyncio.run(func(env))  # type: ignore[operator]
    assert isinstance(result, CheckResult)
    return result


def env_with(tmp_path: Path, config_text: str = "", **fields: object) -> DoctorEnv:
    config = tmp_path / "config.toml"
    write_config(config, [{"name": "corp", "url": "http://127.0.0.1:9"}], extra=config_text)
    return DoctorEnv(config, **fields)  # type: ignore[arg-type]


def test_ipv6_off(tmp_path: Path) -> None:
    env = env_with(tmp_path, proc=proc(tmp_path, ipv6=False))
    result = check(checks_network.check_ipv6, env)
    assert result.status is CheckStatus.OK
    assert "IPv6 is off" in result.summary


def test_ipv6_without_a_default_route(tmp_path: Path) -> None:
    env = env_with(tmp_path, proc=proc(tmp_path, routes=ROUTE.format(dest=DEFAULT, dev="lo")))
    result = check(checks_network.check_ipv6, env)
    assert result.status is CheckStatus.OK
    assert "no default route" in result.summary


def test_ipv6_routed_but_the_relay_not_on_loopback_v6(tmp_path: Path) -> None:
    routes = ROUTE.format(dest=DEFAULT, dev="eth0")
    env = env_with(
        tmp_path, '[relay]\nlisten = ["127.0.0.1"]\n', proc=proc(tmp_path, routes=routes)
    )
    result = check(checks_network.check_ipv6, env)
    assert result.status is CheckStatus.WARN
    assert "relay.listen has no ::1" in result.summary
    assert 'listen = ["127.0.0.1", "::1"]' in (result.fix or "")

    env = env_with(tmp_path, proc=proc(tmp_path / "b", lo_ipv6=False, routes=routes))
    result = check(checks_network.check_ipv6, env)
    assert result.status is CheckStatus.WARN
    assert "IPv6 is off on the loopback interface" in result.summary
    assert "net.ipv6.conf.lo.disable_ipv6=0" in (result.fix or "")


def test_ipv6_routed_and_served(tmp_path: Path) -> None:
    env = env_with(tmp_path, proc=proc(tmp_path, routes=ROUTE.format(dest=DEFAULT, dev="eth0")))
    result = check(checks_network.check_ipv6, env)
    assert result.status is CheckStatus.OK
    assert "redirected to [::1]:12080" in result.summary
    assert result.details == (
        "containers' IPv6 connections are refused, so they fall back to IPv4",
    )


def test_exclusions_in_words(tmp_path: Path) -> None:
    env = env_with(tmp_path, '[redirect]\nexclude = ["127.0.0.0/8", "169.254.0.0/16", "::1/128"]\n')
    result = check(checks_network.check_exclusions, env)
    assert result.status is CheckStatus.OK
    assert "direct: 127.0.0.0/8 (this machine, loopback)" in result.details

    env = env_with(tmp_path, '[redirect]\nexclude = ["10.20.0.0/16", "8.8.8.0/24"]\n')
    result = check(checks_network.check_exclusions, env)
    assert result.status is CheckStatus.WARN
    assert result.summary.startswith("connections to 10.20.0.0/16 go direct")
    assert "direct: 8.8.8.0/24" in result.details
    assert checks_network.describe_network(ipaddress.ip_network("10.0.0.0/8")) == (
        "10.0.0.0/8 (private network 10.x.x.x)"
    )


def test_redirect_as_a_normal_user_with_no_instance(tmp_path: Path) -> None:
    """Without root the kernel's tables cannot be listed; reserved relay source ports left
    by a killed helper are the visible trace of a stale redirect."""
    fake_proc = proc(tmp_path)
    socket_path = tmp_path / "runtime" / "tray-proxy.sock"
    env = env_with(tmp_path, proc=fake_proc, euid=1000, control_socket=socket_path)
    result = check(checks_network.check_redirect, env)
    assert result.status is CheckStatus.OK
    assert result.summary == "off: no tray-proxy is running"
    assert "sudo nft list table inet tray_proxy" in result.details[0]

    (fake_proc / "sys/net/ipv4/ip_local_reserved_ports").write_text("61000-64999\n")
    env = env_with(tmp_path, proc=fake_proc, euid=1000, control_socket=socket_path)
    result = check(checks_network.check_redirect, env)
    assert result.status is CheckStatus.WARN
    assert "61000-64999 are still reserved" in result.summary
    assert "sudo nft delete table inet tray_proxy" in (result.fix or "")
