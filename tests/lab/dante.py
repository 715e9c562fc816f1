"""Dante (danted 1.4) SOCKS5 server for the lab, with username/password auth.

Dante's `username` method checks the system password database, so the lab creates a
throwaway system user (no home, no shell, password set through chpasswd's stdin) and deletes
it at teardown. Plain context manager; bench scripts use it too.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.lab.creds import ProxyCredentials
from tests.lab.netns import LabError, Namespace, NsProcess

DANTED = "/usr/sbin/danted"


class SystemUser:
    """A throwaway local account; `remove()` deletes it (safe to call twice)."""

    def __init__(self, credentials: ProxyCredentials) -> None:
        self.credentials = credentials
        self.created = False

    def create(self) -> SystemUser:
        name = self.credentials.username
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             "--comment", "tray-proxy lab (temporary)", name],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise LabError(f"useradd {name} failed: {result.stderr.decode(errors='replace')}")
        self.created = True
        # chpasswd reads "user:password" on stdin: the password never appears in argv.
        result = subprocess.run(
            ["chpasswd"],
            input=f"{name}:{self.credentials.password}\n".encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"chpasswd for {name} failed (exit {result.returncode})")
        return self

    def remove(self) -> None:
        if self.created:
            result = subprocess.run(
                ["userdel", "--force", self.credentials.username],
                capture_output=True,
                timeout=30,
                check=False,
            )
            if result.returncode not in (0, 6):  # 6: already gone
                raise LabError(
                    f"userdel {self.credentials.username}: {result.stderr.decode().strip()}"
                )
            self.created = False

    def __enter__(self) -> SystemUser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class DanteProxy:
    """danted on `port` at the proxy namespace's v4 and v6 address, SOCKS5 username auth.

    Attributes for consumers: `host` / `host6`, `port`, `credentials`, `log_path`, `workdir`.
    """

    def __init__(
        self,
        ns: Namespace,
        workdir: Path,
        credentials: ProxyCredentials,
        *,
        port: int = 1080,
        addresses: Sequence[str] | None = None,
    ) -> None:
        if ns.v4 is None or ns.v6 is None:
            raise LabError("proxy namespace has no addresses yet")
        self.ns = ns
        self.workdir = workdir
        self.credentials = credentials
        self.port = port
        self.addresses = list(addresses) if addresses else [ns.v4, ns.v6]
        self.host = next((a for a in self.addresses if ":" not in a), ns.v4)
        self.host6 = next((a for a in self.addresses if ":" in a), ns.v6)
        self.conf_path = workdir / "danted.conf"
        self.log_path = workdir / "danted.log"
        self.pid_file = workdir / "danted.pid"
        self.process: NsProcess | None = None

    def __repr__(self) -> str:
        return f"<DanteProxy {self.host}:{self.port} user={self.credentials.username}>"

    def proxy_url(self, family: int = 4, scheme: str = "socks5h") -> str:
        host = self.host if family == 4 else f"[{self.host6}]"
        return f"{scheme}://{host}:{self.port}"

    def render_config(self) -> str:
        internal = [f"internal: {a} port = {self.port}" for a in self.addresses]
        return "\n".join(
            [
                "# tray-proxy lab danted: generated",
                f"logoutput: {self.log_path}",
                *internal,
                "external: eth0",
                "clientmethod: none",
                "socksmethod: username",
                # root to read /etc/shadow for the username method; nobody for the rest.
                "user.privileged: root",
                "user.unprivileged: nobody",
                "client pass {",
                "  from: 0/0 to: 0/0",
                "  log: error",
                "}",
                "socks pass {",
                "  from: 0/0 to: 0/0",
                "  command: connect",
                "  socksmethod: username",
                "  log: connect disconnect error",
                "}",
                "",
            ]
        )

    def start(self, timeout: float = 20.0) -> DanteProxy:
        """Start and wait until it serves; on failure nothing is left running."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.render_config())
        self.log_path.touch()
        with (self.workdir / "danted.stderr").open("wb") as stderr:
            self.process = self.ns.popen(
                [DANTED, "-f", str(self.conf_path), "-p", str(self.pid_file), "-N", "1"],
                stdout=stderr,
                stderr=stderr,
            )
        try:
            for addr in self.addresses:
                self.ns.wait_port(addr, self.port, timeout, process=self.process, what="danted")
        except LabError as exc:
            raise LabError(
                f"{exc}; danted log:\n{self.log_path.read_text(errors='replace')[-2000:]}"
                f"\nstderr:\n{(self.workdir / 'danted.stderr').read_text(errors='replace')}"
            ) from None

    def stop(self) -> None:
        if self.process is not None:
            proc, self.process = self.process, None
            try:
                proc.stop(grace=3.0)
            finally:
                self.ns.forget(proc)

    def __enter__(self) -> DanteProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        """The first log line containing `needle`, polled until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text().splitlines():
                if needle in line:
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no danted log line with {needle!r} within {timeout}s; log:\n"
                    + self.log_text()[-3000:]
                )
            time.sleep(0.05)
