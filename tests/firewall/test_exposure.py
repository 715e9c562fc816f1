"""The redirect's exposure rules with real packets between namespaces this test creates.

host (runs the helper; a stand-in relay listens on 127.0.0.1 and reports SO_ORIGINAL_DST)
  ├─ docker0 bridge ── container 172.30.0.2
  └─ veth ──────────── remote    198.51.100.2 (another machine on the network)

No relay and no curl here: a 30-line listener stands in for the relay's accept path.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.firewall.conftest import HelperSession, in_ns, make_netns, unique_name
from tray_proxy.firewall.ruleset import RuleSpec, spec_to_wire

RELAY_PORT = 3129
PRIVATE_PORT = 5432  # a loopback-only service that must stay private

LISTENER = r"""
import select, socket, struct, sys, time
servers = []
for port in (int(sys.argv[1]), int(sys.argv[2])):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    servers.append(s)
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    ready, _, _ = select.select(servers, [], [], 1)
    for s in ready:
        conn, _ = s.accept()
        try:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
            port, addr = struct.unpack("!2xH4s8x", raw)
            conn.sendall(f"{socket.inet_ntoa(addr)}:{port}\n".encode())
        except OSError:
            conn.sendall(b"no-original-dst\n")
        conn.close()
"""

CONNECT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.settimeout(float(sys.argv[3]))
    print("answer", s.recv(100).decode().strip())
except OSError as exc:
    print("failed", type(exc).__name__)
"""


def connect(ns: str, host: str, port: int, timeout: float = 2.0) -> str:
    done = in_ns(ns, sys.executable, "-c", CONNECT, host, str(port), str(timeout), timeout=30)
    return done.stdout.strip()


@contextlib.contextmanager
def lab() -> Iterator[tuple[str, str, str]]:
    suffix = unique_name("")
    with (
        make_netns(f"tph{suffix}") as host,
        make_netns(f"tpc{suffix}") as container,
        make_netns(f"tpr{suffix}") as remote,
    ):
        cmds = [
            ["ip", "-n", host, "link", "add", "docker0", "type", "bridge"],
            ["ip", "-n", host, "addr", "add", "172.30.0.1/24", "dev", "docker0"],
            ["ip", "-n", host, "link", "set", "docker0", "up"],
            [
                "ip",
                "-n",
                host,
                "link",
                "add",
                "vc0",
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                container,
            ],
            ["ip", "-n", host, "link", "set", "vc0", "master", "docker0", "up"],
            ["ip", "-n", container, "addr", "add", "172.30.0.2/24", "dev", "eth0"],
            ["ip", "-n", container, "link", "set", "eth0", "up"],
            ["ip", "-n", container, "route", "add", "default", "via", "172.30.0.1"],
            [
                "ip",
                "-n",
                host,
                "link",
                "add",
                "vr0",
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                remote,
            ],
            ["ip", "-n", host, "addr", "add", "198.51.100.1/24", "dev", "vr0"],
            ["ip", "-n", host, "link", "set", "vr0", "up"],
            ["ip", "-n", remote, "addr", "add", "198.51.100.2/24", "dev", "eth0"],
            ["ip", "-n", remote, "link", "set", "eth0", "up"],
            ["ip", "-n", remote, "route", "add", "default", "via", "198.51.100.1"],
        ]
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True, timeout=20)
        in_ns(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield host, container, remote


@pytest.fixture(scope="module")
def redirected() -> Iterator[tuple[str, str, str]]:
    with lab() as (host, container, remote):
        listener = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host,
                sys.executable,
                "-c",
                LISTENER,
                str(RELAY_PORT),
                str(PRIVATE_PORT),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        helper = HelperSession(host)
        try:
            assert listener.stdout is not None
            assert listener.stdout.readline().strip() == "ready"
            spec = RuleSpec(relay_port=RELAY_PORT, reject_quic=False)
            assert helper.request("apply", **spec_to_wire(spec))["ok"] is True
            yield host, container, remote
        finally:
            helper.shutdown()
            listener.kill()
            listener.wait(10)
            if listener.stdout is not None:
                listener.stdout.close()


def test_container_traffic_reaches_the_loopback_relay_with_its_original_destination(
    redirected: tuple[str, str, str],
) -> None:
    _host, container, _remote = redirected
    assert connect(container, "198.51.100.2", 443) == "answer 198.51.100.2:443"
    assert connect(container, "198.51.100.2", 80) == "answer 198.51.100.2:80"


def test_host_traffic_is_redirected(redirected: tuple[str, str, str]) -> None:
    host, _container, _remote = redirected
    assert connect(host, "198.51.100.2", 443) == "answer 198.51.100.2:443"


def test_other_hosts_cannot_reach_the_relay(redirected: tuple[str, str, str]) -> None:
    _host, container, remote = redirected
    assert connect(remote, "198.51.100.1", RELAY_PORT, timeout=1.5).startswith("failed")
    assert connect(container, "172.30.0.1", RELAY_PORT, timeout=1.5).startswith("failed")
    # Traffic from another machine through the host is not captured (prerouting is bridge-only).
    assert connect(remote, "172.30.0.2", 443, timeout=1.5).startswith("failed")


def test_route_localnet_is_on_only_while_captured(redirected: tuple[str, str, str]) -> None:
    host, _container, _remote = redirected
    path = "/proc/sys/net/ipv4/conf/docker0/route_localnet"
    assert in_ns(host, "cat", path).stdout.strip() == "1"
    assert in_ns(host, "cat", "/proc/sys/net/ipv4/conf/vr0/route_localnet").stdout.strip() == "0"


def test_private_loopback_service_is_not_reachable_from_the_container(
    redirected: tuple[str, str, str],
) -> None:
    _host, container, _remote = redirected
    # The DNAT goes to the relay port only: other ports on the bridge address stay closed.
    assert connect(container, "172.30.0.1", PRIVATE_PORT, timeout=1.5).startswith("failed")
