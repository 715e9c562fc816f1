"""The redirect's exposure rules with real packets between namespaces this test creates.

host (runs the helper; a stand-in relay listens on 0.0.0.0 - the worst case - and reports
      SO_ORIGINAL_DST)
  ├─ docker0 bridge ── container 172.30.0.2   (a network the Docker engine reports)
  ├─ br-lan bridge ─── lan       192.168.77.2 (a bridge with a container-like name that no
  │                                            container tool manages: the office LAN)
  └─ veth ──────────── remote    198.51.100.2 (another machine on the network)

No relay and no curl here: a 30-line listener stands in for the relay's accept path, and
`FakeDockerEngine` for Docker (no engine runs here).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firewall.conftest import HelperSession, in_ns, make_netns, unique_name
from tests.firewall.test_helper_bridges import FakeDockerEngine, docker_network
from tray_proxy.firewall.ruleset import RuleSpec, spec_to_wire

RELAY_PORT = 3129
PRIVATE_PORT = 5432  # a loopback-only service that must stay private

LISTENER = r"""
import select, socket, struct, sys, time
servers = []
for host, port in (("0.0.0.0", int(sys.argv[1])), ("127.0.0.1", int(sys.argv[2]))):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
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
        make_netns(f"tpl{suffix}") as lan,
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
            ["ip", "-n", host, "link", "add", "br-lan", "type", "bridge"],
            ["ip", "-n", host, "addr", "add", "192.168.77.1/24", "dev", "br-lan"],
            ["ip", "-n", host, "link", "set", "br-lan", "up"],
            ["ip", "-n", host, "link", "add", "vl0", "type", "veth", "peer", "eth0", "netns", lan],
            ["ip", "-n", host, "link", "set", "vl0", "master", "br-lan", "up"],
            ["ip", "-n", lan, "addr", "add", "192.168.77.2/24", "dev", "eth0"],
            ["ip", "-n", lan, "link", "set", "eth0", "up"],
            ["ip", "-n", lan, "route", "add", "default", "via", "192.168.77.1"],
        ]
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True, timeout=20)
        in_ns(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield host, container, remote, lan


Lab = tuple[str, str, str, str]


@pytest.fixture(scope="module")
def redirected() -> Iterator[Lab]:
    with lab() as (host, container, remote, lan), tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        docker = FakeDockerEngine(
            Path(tmp) / "docker.sock",
            [
                docker_network(
                    "bridge",
                    "f2de39df4171" + "5" * 52,
                    "172.30.0.0/24",
                    "172.30.0.1",
                    bridge_name="docker0",
                )
            ],
        )
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
        paths = {
            "docker_socket": str(docker.path),
            "podman_dir": str(Path(tmp) / "none"),
            "policy_path": str(Path(tmp) / "none.json"),
        }
        helper = HelperSession(host, paths=paths, listen=False)
        try:
            assert listener.stdout is not None
            assert listener.stdout.readline().strip() == "ready"
            spec = RuleSpec(relay_port=RELAY_PORT, reject_quic=False)
            answer = helper.request("apply", **spec_to_wire(spec))
            assert answer["bridges"] == [
                {"name": "docker0", "address": "172.30.0.1", "network": "172.30.0.0/24"}
            ], answer
            yield host, container, remote, lan
        finally:
            helper.shutdown()
            docker.close()
            listener.kill()
            listener.wait(10)
            if listener.stdout is not None:
                listener.stdout.close()


def test_container_traffic_reaches_the_relay_on_its_bridge_with_its_original_destination(
    redirected: Lab,
) -> None:
    _host, container, _remote, _lan = redirected
    assert connect(container, "198.51.100.2", 443) == "answer 198.51.100.2:443"
    assert connect(container, "198.51.100.2", 80) == "answer 198.51.100.2:80"


def test_host_traffic_is_redirected(redirected: Lab) -> None:
    host, _container, _remote, _lan = redirected
    assert connect(host, "198.51.100.2", 443) == "answer 198.51.100.2:443"


def test_a_machine_on_a_bridge_no_container_tool_manages_is_not_captured(
    redirected: Lab,
) -> None:
    """issue 16 item 4: a machine on `br-lan` used the relay (and the owner's login)."""
    host, _container, _remote, lan = redirected
    # Forwarded to the remote machine as it is (nothing listens there: refused), not relayed.
    assert connect(lan, "198.51.100.2", 443, timeout=1.5) == "failed ConnectionRefusedError"
    assert connect(lan, "192.168.77.1", RELAY_PORT, timeout=1.5).startswith("failed")
    assert connect(lan, "172.30.0.1", RELAY_PORT, timeout=1.5).startswith("failed")


def test_other_hosts_cannot_reach_the_relay(redirected: Lab) -> None:
    _host, container, remote, _lan = redirected
    assert connect(remote, "198.51.100.1", RELAY_PORT, timeout=1.5).startswith("failed")
    # Straight to the bridge address (no DNAT by our rule): dropped, although it listens there.
    assert connect(container, "172.30.0.1", RELAY_PORT, timeout=1.5).startswith("failed")
    assert connect(remote, "172.30.0.1", RELAY_PORT, timeout=1.5).startswith("failed")
    # Traffic from another machine through the host is not captured (prerouting is bridge-only).
    assert connect(remote, "172.30.0.2", 443, timeout=1.5).startswith("failed")


def test_route_localnet_is_never_switched_on(redirected: Lab) -> None:
    host, _container, _remote, _lan = redirected
    for name in ("docker0", "br-lan", "vr0"):
        path = f"/proc/sys/net/ipv4/conf/{name}/route_localnet"
        assert in_ns(host, "cat", path).stdout.strip() == "0"


def test_private_loopback_service_is_not_reachable_from_the_container(redirected: Lab) -> None:
    _host, container, _remote, _lan = redirected
    # The DNAT goes to the relay port only: other ports on the bridge address stay closed.
    assert connect(container, "172.30.0.1", PRIVATE_PORT, timeout=1.5).startswith("failed")
