"""A fake Docker Engine API on a Unix socket: `GET /networks` answers the networks a test sets.

Why a fake: no Docker engine runs on this machine (nor in CI), and the redirect helper only
asks Docker which bridges it manages. Everything else in the tests around it is real (the
bridges are real Linux bridges in a lab namespace, the traffic real curl through real nft).
The answer follows the Engine API's documented `GET /v1.xx/networks` (NetworkResource, as
Docker 28 returns it: Docker's field names and nesting, the built-in `host` and `none`
networks included; written from the API reference, not recorded from an engine). A bridge
network's interface is Options["com.docker.network.bridge.name"], else "br-" + Id[:12].

`with FakeDocker(path) as docker:` serves on `path` from a thread until the block ends;
`docker.set_networks([...])` changes the answer at any time; `docker.requests` lists the
paths asked. Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socketserver
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DockerNetwork:
    """One network as Docker reports it. `bridge_name` None: Docker's default naming."""

    name: str
    subnet: str
    gateway: str
    driver: str = "bridge"
    bridge_name: str | None = None
    network_id: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def interface(self) -> str:
        """The Linux bridge Docker makes for it (what the helper must resolve)."""
        return self.bridge_name or "br-" + self.network_id[:12]

    def to_json(self) -> dict[str, Any]:
        options: dict[str, str] = {}
        if self.bridge_name is not None:
            options = {
                "com.docker.network.bridge.default_bridge": "true",
                "com.docker.network.bridge.enable_icc": "true",
                "com.docker.network.bridge.enable_ip_masquerade": "true",
                "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
                "com.docker.network.bridge.name": self.bridge_name,
                "com.docker.network.driver.mtu": "1500",
            }
        return {
            "Name": self.name,
            "Id": self.network_id,
            "Created": "2025-11-20T09:12:44.123456789Z",
            "Scope": "local",
            "Driver": self.driver,
            "EnableIPv4": True,
            "EnableIPv6": False,
            "IPAM": {
                "Driver": "default",
                "Options": None,
                "Config": [{"Subnet": self.subnet, "Gateway": self.gateway}],
            },
            "Internal": False,
            "Attachable": False,
            "Ingress": False,
            "ConfigFrom": {"Network": ""},
            "ConfigOnly": False,
            "Containers": {},
            "Options": options,
            "Labels": {},
        }


# Docker always lists these two besides its bridges; the helper must ignore them.
_BUILTIN = [
    {
        "Name": "host", "Id": "4b3b1c0a" * 8, "Created": "2025-11-20T09:12:44Z",
        "Scope": "local", "Driver": "host", "EnableIPv4": True, "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": None}, "Internal": False,
        "Attachable": False, "Ingress": False, "ConfigFrom": {"Network": ""},
        "ConfigOnly": False, "Containers": {}, "Options": {}, "Labels": {},
    },
    {
        "Name": "none", "Id": "9e1f7d2c" * 8, "Created": "2025-11-20T09:12:44Z",
        "Scope": "local", "Driver": "null", "EnableIPv4": True, "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": None}, "Internal": False,
        "Attachable": False, "Ingress": False, "ConfigFrom": {"Network": ""},
        "ConfigOnly": False, "Containers": {}, "Options": {}, "Labels": {},
    },
]  # fmt: skip


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeDocker


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "Docker/28.5.1 (linux)"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        fake.record(self.path)
        if path == "/_ping" or path.endswith("/_ping"):
            self._send(200, b"OK", "text/plain; charset=utf-8")
        elif path == "/networks" or path.endswith("/networks"):
            self._send(200, json.dumps(fake.answer()).encode(), "application/json")
        else:
            self._send(404, b'{"message":"page not found"}\n', "application/json")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Api-Version", "1.51")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"  # a Unix socket peer has no address; BaseHTTPRequestHandler wants one

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the fake's requests are in `requests`


class FakeDocker:
    """The fake engine on the Unix socket `path` (made 0660 root, as dockerd makes it)."""

    def __init__(self, path: Path, networks: Iterable[DockerNetwork] = ()) -> None:
        self.path = path
        self._networks = list(networks)
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def set_networks(self, networks: Iterable[DockerNetwork]) -> None:
        with self._lock:
            self._networks = list(networks)

    def answer(self) -> list[dict[str, Any]]:
        with self._lock:
            return [n.to_json() for n in self._networks] + _BUILTIN

    def record(self, path: str) -> None:
        with self._lock:
            self._requests.append(path)

    @property
    def requests(self) -> list[str]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> FakeDocker:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = _Server(str(self.path), _Handler)
        server.fake = self
        os.chmod(self.path, 0o660)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="fake-docker"
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
