"""Container capture reaches only the bridges Docker and Podman manage (issue 16 item 4).

Real bridges in a throwaway namespace (`ip link add ... type bridge`), real nft, the real
helper; Docker's side is `FakeDockerEngine` (no Docker engine runs here), Podman's its network
files in a temp directory. A bridge named like a container network (`br-lan`) but unknown to
Docker is never captured; neither is a Docker network whose bridge is missing, not a bridge,
lacks its gateway address, or is internal.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firewall.conftest import HelperSession, in_ns, wait_until
from tray_proxy.firewall.ruleset import RuleSpec, spec_to_wire

DOCKER_ID = "0123456789ab" + "cdef" * 13  # a 64-hex network id; its bridge is br-0123456789ab
INTERNAL_ID = "fedcba987654" + "0" * 52
MISSING_ID = "aaaaaaaaaaaa" + "1" * 52
NO_ADDRESS_ID = "bbbbbbbbbbbb" + "2" * 52
NOT_A_BRIDGE_ID = "cccccccccccc" + "3" * 52
LATER_ID = "dddddddddddd" + "4" * 52


def docker_network(
    name: str,
    net_id: str,
    subnet: str,
    gateway: str | None,
    *,
    bridge_name: str | None = None,
    internal: bool = False,
    driver: str = "bridge",
) -> dict[str, object]:
    """One entry of `GET /networks` in the shape Docker 28 (API 1.48) answers it."""
    options = {
        "com.docker.network.bridge.default_bridge": "true",
        "com.docker.network.bridge.enable_icc": "true",
        "com.docker.network.bridge.enable_ip_masquerade": "true",
        "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
        "com.docker.network.bridge.name": bridge_name,
        "com.docker.network.driver.mtu": "1500",
    }
    config: dict[str, str] = {"Subnet": subnet}
    if gateway is not None:
        config["Gateway"] = gateway
    return {
        "Name": name,
        "Id": net_id,
        "Created": "2025-06-02T09:14:27.184376212Z",
        "Scope": "local",
        "Driver": driver,
        "EnableIPv4": True,
        "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": [config]},
        "Internal": internal,
        "Attachable": False,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {},
        "Options": options if bridge_name else {},
        "Labels": {"com.docker.compose.network": name} if not bridge_name else {},
    }


DOCKER_NETWORKS: list[dict[str, object]] = [
    docker_network(
        "bridge", "f2de39df4171" + "5" * 52, "172.17.0.0/16", "172.17.0.1", bridge_name="docker0"
    ),
    {
        "Name": "host",
        "Id": "6b2c1a7e0f3d" + "6" * 52,
        "Driver": "host",
        "IPAM": {"Driver": "default", "Options": None, "Config": []},
        "Internal": False,
        "Options": {},
    },
    {
        "Name": "none",
        "Id": "9d8c7b6a5f4e" + "7" * 52,
        "Driver": "null",
        "IPAM": {"Driver": "default", "Options": None, "Config": []},
        "Internal": False,
        "Options": {},
    },
    # A compose project's network: no bridge name option, so Docker names it br-<id[:12]>.
    docker_network("app_default", DOCKER_ID, "172.18.0.0/16", "172.18.0.1"),
    docker_network("isolated", INTERNAL_ID, "172.19.0.0/16", "172.19.0.1", internal=True),
    docker_network("elsewhere", MISSING_ID, "172.20.0.0/16", "172.20.0.1"),
    docker_network("unconfigured", NO_ADDRESS_ID, "172.21.0.0/16", "172.21.0.1"),
    docker_network("veth", NOT_A_BRIDGE_ID, "172.22.0.0/16", "172.22.0.1"),
]

PODMAN_NETWORK = {
    "name": "podnet",
    "id": "3b2c9f0e" * 8,
    "driver": "bridge",
    "network_interface": "podman1",
    "created": "2025-06-02T09:20:11.406713054Z",
    "subnets": [{"subnet": "10.89.0.0/24", "gateway": "10.89.0.1"}],
    "ipv6_enabled": False,
    "internal": False,
    "dns_enabled": True,
    "ipam_options": {"driver": "host-local"},
}


class FakeDockerEngine:
    """A stand-in for the Docker Engine API on a Unix socket; it answers `GET /networks`.

    A fake because no Docker engine runs on this machine or in CI. The answer is a list of
    network objects in the shape Docker 28 gives (`docker_network`); tests change `networks`
    to create or remove networks while the helper runs.
    """

    def __init__(self, path: Path, networks: list[dict[str, object]]) -> None:
        self.networks = list(networks)
        self.requests: list[str] = []
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                engine.requests.append(self.path)
                if self.path != "/networks":
                    self.send_error(404)
                    return
                body = json.dumps(engine.networks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Api-Version", "1.48")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.path = path
        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        if self.path.exists():
            self.path.unlink()


@pytest.fixture
def engine_dir(tmp_path: Path) -> Iterator[tuple[FakeDockerEngine, Path]]:
    os.chmod(tmp_path, 0o755)
    podman = tmp_path / "networks"
    podman.mkdir()
    (podman / "podnet.json").write_text(json.dumps(PODMAN_NETWORK))
    engine = FakeDockerEngine(tmp_path / "docker.sock", DOCKER_NETWORKS)
    try:
        yield engine, podman
    finally:
        engine.close()


def add_bridge(ns: str, name: str, cidr: str | None) -> None:
    in_ns(ns, "ip", "link", "add", name, "type", "bridge")
    if cidr:
        in_ns(ns, "ip", "addr", "add", cidr, "dev", name)
    in_ns(ns, "ip", "link", "set", name, "up")


def start(start_helper, engine: FakeDockerEngine, podman: Path, **options: object) -> HelperSession:
    paths = {
        "docker_socket": str(engine.path),
        "podman_dir": str(podman),
        "policy_path": str(podman / "no-policy.json"),
    }
    helper: HelperSession = start_helper(paths=paths, **options)
    return helper


def lab_bridges(ns: str) -> None:
    add_bridge(ns, "docker0", "172.17.0.1/16")
    add_bridge(ns, "br-0123456789ab", "172.18.0.1/16")
    add_bridge(ns, "br-lan", "192.168.77.1/24")  # the office LAN, not a container network
    add_bridge(ns, "br-fedcba987654", "172.19.0.1/16")  # Docker's, but internal
    add_bridge(ns, "br-bbbbbbbbbbbb", None)  # Docker's, gateway address not (yet) there
    add_bridge(ns, "podman1", "10.89.0.1/24")
    in_ns(ns, "ip", "link", "add", "br-cccccccccccc", "type", "veth", "peer", "name", "tpx0")
    in_ns(ns, "ip", "addr", "add", "172.22.0.1/16", "dev", "br-cccccccccccc")


def names(answer: dict[str, object]) -> list[object]:
    bridges = answer["bridges"]
    assert isinstance(bridges, list)
    return [b["name"] for b in bridges]


def test_only_bridges_docker_and_podman_manage_are_captured(
    netns: str, start_helper, engine_dir: tuple[FakeDockerEngine, Path]
) -> None:
    engine, podman = engine_dir
    lab_bridges(netns)
    helper = start(start_helper, engine, podman)
    answer = helper.request("apply", **spec_to_wire(RuleSpec(relay_port=3129)))
    assert answer["ok"] is True, answer
    assert answer["bridges"] == [
        {"name": "br-0123456789ab", "address": "172.18.0.1", "network": "172.18.0.0/16"},
        {"name": "docker0", "address": "172.17.0.1", "network": "172.17.0.0/16"},
        {"name": "podman1", "address": "10.89.0.1", "network": "10.89.0.0/24"},
    ]
    assert engine.requests == ["/networks"]
    listed = in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout
    assert "dnat ip to 172.18.0.1:3129" in listed
    assert "dnat ip to 172.17.0.1:3129" in listed
    assert "dnat ip to 10.89.0.1:3129" in listed
    for absent in ("br-lan", "br-fedcba987654", "br-bbbbbbbbbbbb", "br-cccccccccccc", "br-*"):
        assert absent not in listed
    assert "127.0.0.1" not in listed
    for name in ("docker0", "br-lan"):
        path = f"/proc/sys/net/ipv4/conf/{name}/route_localnet"
        assert in_ns(netns, "cat", path).stdout.strip() == "0"
    assert names(helper.request("status")) == names(answer)


def test_container_interfaces_only_narrow_the_managed_set(
    netns: str, start_helper, engine_dir: tuple[FakeDockerEngine, Path]
) -> None:
    engine, podman = engine_dir
    lab_bridges(netns)
    helper = start(start_helper, engine, podman)
    narrow = RuleSpec(relay_port=3129, container_interfaces=("docker0", "br-l*"))
    answer = helper.request("apply", **spec_to_wire(narrow))
    assert names(answer) == ["docker0"]  # br-lan matches the pattern but Docker does not know it


def test_no_bridges_without_container_capture(
    netns: str, start_helper, engine_dir: tuple[FakeDockerEngine, Path]
) -> None:
    engine, podman = engine_dir
    lab_bridges(netns)
    helper = start(start_helper, engine, podman)
    host_only = RuleSpec(relay_port=3129, capture_containers=False)
    answer = helper.request("apply", **spec_to_wire(host_only))
    assert answer["bridges"] == []
    assert engine.requests == []
    assert "dnat" not in in_ns(netns, "nft", "list", "table", "inet", "tray_proxy").stdout


def test_new_and_removed_docker_networks_are_followed(
    netns: str, start_helper, engine_dir: tuple[FakeDockerEngine, Path]
) -> None:
    engine, podman = engine_dir
    add_bridge(netns, "docker0", "172.17.0.1/16")
    helper = start(start_helper, engine, podman)
    assert names(helper.request("apply", **spec_to_wire(RuleSpec(relay_port=3129)))) == ["docker0"]

    # `docker network create`: Docker answers with the network and sets up its bridge.
    engine.networks.append(docker_network("later", LATER_ID, "172.23.0.0/16", "172.23.0.1"))
    add_bridge(netns, "br-dddddddddddd", "172.23.0.1/16")

    def listed() -> str:
        return in_ns(netns, "nft", "list", "chain", "inet", "tray_proxy", "prerouting").stdout

    wait_until(lambda: "172.23.0.1:3129" in listed(), timeout=10, what="the new bridge's DNAT")
    assert names(helper.request("status")) == ["br-dddddddddddd", "docker0"]

    # `docker network rm`: the bridge goes, and with it our rules for it.
    engine.networks.pop()
    in_ns(netns, "ip", "link", "delete", "br-dddddddddddd")
    wait_until(lambda: "172.23.0.1" not in listed(), timeout=10, what="the removed bridge")
    assert names(helper.request("status")) == ["docker0"]
    assert "container bridges now captured" in helper.stderr()


def test_a_docker_socket_not_owned_by_root_is_ignored(
    netns: str, start_helper, engine_dir: tuple[FakeDockerEngine, Path]
) -> None:
    """Anyone could run a fake engine; only root's socket speaks for Docker."""
    engine, podman = engine_dir
    lab_bridges(netns)
    os.chown(engine.path, 42421, -1)
    helper = start(start_helper, engine, podman)
    answer = helper.request("apply", **spec_to_wire(RuleSpec(relay_port=3129)))
    assert names(answer) == ["podman1"]
    assert engine.requests == []
    assert "is not a socket owned by root" in helper.stderr()


def test_an_unreachable_docker_leaves_podman_captured(
    netns: str, start_helper, engine_dir: tuple[FakeDockerEngine, Path]
) -> None:
    engine, podman = engine_dir
    lab_bridges(netns)
    engine.close()
    dead = engine.path.parent / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))  # a socket file nobody listens on
        engine.path = dead
        helper = start(start_helper, engine, podman)
        answer = helper.request("apply", **spec_to_wire(RuleSpec(relay_port=3129)))
    assert names(answer) == ["podman1"]
    assert "cannot ask Docker for its networks" in helper.stderr()


def test_podmans_default_network_counts_only_when_its_bridge_is_there(
    netns: str, start_helper, engine_dir: tuple[FakeDockerEngine, Path]
) -> None:
    engine, podman = engine_dir
    engine.networks = []
    helper = start(start_helper, engine, podman)
    wire = spec_to_wire(RuleSpec(relay_port=3129))
    assert helper.request("apply", **wire)["bridges"] == []
    add_bridge(netns, "podman0", "10.88.0.1/16")
    assert names(helper.request("apply", **wire)) == ["podman0"]
