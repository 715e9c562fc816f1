"""Start and describe the lab's origin servers (origin_server.py) in the origin namespace.

Gives URLs, the expected SHA-256 of `/bytes` bodies, and the origin's event log (who
connected, from which address). Plain Python (no pytest).
Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.lab.netns import LabError, Namespace, NsProcess
from tests.lab.origin_server import pattern_chunks, pattern_sha256
from tests.lab.pki import LabPKI

__all__ = ["Origins", "pattern_chunks", "pattern_sha256"]

SERVER_SCRIPT = Path(__file__).with_name("origin_server.py")
HOSTNAME = "origin.lab.test"
ALT_HOSTNAME = "www.lab.test"


class Origins:
    """HTTP :80, HTTPS :443 and raw TCP :5001 on the origin namespace's v4 and v6 address."""

    def __init__(
        self,
        ns: Namespace,
        pki: LabPKI,
        workdir: Path,
        *,
        http_port: int = 80,
        https_port: int = 443,
        tcp_port: int = 5001,
    ) -> None:
        if ns.v4 is None or ns.v6 is None:
            raise LabError("origin namespace has no addresses yet")
        self.ns = ns
        self.v4: str = ns.v4
        self.v6: str = ns.v6
        self.hostname = HOSTNAME
        self.alt_hostname = ALT_HOSTNAME
        self.http_port = http_port
        self.https_port = https_port
        self.tcp_port = tcp_port
        self.ca_path = pki.ca_cert
        self._pki = pki
        self.workdir = workdir
        self.log_path = workdir / "origin-events.jsonl"
        self.stderr_path = workdir / "origin-stderr.log"
        self.process: NsProcess | None = None

    def __repr__(self) -> str:
        return f"<Origins {self.hostname} v4={self.v4} v6={self.v6}>"

    def start(self, timeout: float = 15.0) -> Origins:
        """Start and wait until it serves; on failure nothing is left running."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        with self.stderr_path.open("wb") as stderr:
            self.process = self.ns.popen(
                [
                    sys.executable, "-I", "-u", str(SERVER_SCRIPT),
                    "--http-port", str(self.http_port),
                    "--https-port", str(self.https_port),
                    "--tcp-port", str(self.tcp_port),
                    "--cert", str(self._pki.server_cert),
                    "--key", str(self._pki.server_key),
                    "--log", str(self.log_path),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )  # fmt: skip
        # READY is printed after every socket is bound and listening: no probe connection
        # needed (one would show up in the event log tests read).
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.process.stdout.readline()
                    if line.strip() == b"READY":
                        return
                    if not line:
                        break
        raise LabError(
            f"origin servers did not start: {self.stderr_path.read_text(errors='replace')[-2000:]}"
        )

    def stop(self) -> None:
        if self.process is not None:
            proc, self.process = self.process, None
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # the server exits on EOF
                proc.stop(grace=3.0)
            finally:
                if proc.stdout is not None:
                    proc.stdout.close()
                self.ns.forget(proc)

    def __enter__(self) -> Origins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # URLs ----------------------------------------------------------------------------------

    def url(self, scheme: str = "https", path: str = "/health", host: str | None = None) -> str:
        """URL on the origin; `host` is a name, "v4", "v6" or None (the lab host name)."""
        if host is None:
            host = self.hostname
        elif host == "v4":
            host = self.v4
        elif host in ("v6",):
            host = f"[{self.v6}]"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = self.https_port if scheme == "https" else self.http_port
        default = 443 if scheme == "https" else 80
        return f"{scheme}://{host}{'' if port == default else f':{port}'}{path}"

    @property
    def http_url(self) -> str:
        return self.url("http", "/")

    @property
    def https_url(self) -> str:
        return self.url("https", "/")

    @staticmethod
    def bytes_path(n: int, seed: str | int = 0) -> str:
        return f"/bytes/{n}?seed={seed}"

    @staticmethod
    def expected_sha256(n: int, seed: str | int = 0) -> str:
        """SHA-256 of the body of `/bytes/<n>?seed=<seed>` (and of `SEND n seed` on TCP)."""
        return pattern_sha256(n, str(seed))

    # events --------------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every request / TCP session the origins logged so far, oldest first."""
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if predicate(event):
                    return event
            if time.monotonic() >= deadline:
                raise AssertionError(f"no matching origin event within {timeout}s")
            time.sleep(0.05)
