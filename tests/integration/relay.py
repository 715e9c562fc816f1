"""`RelayProcess`: the real `tray-proxy run` in the lab's client namespace, for end-to-end tests.

It writes a config TOML and a 0700 credentials directory (systemd's CREDENTIALS_DIRECTORY
convention: the password is the file named after the upstream), starts
`python -m tray_proxy run --config FILE --no-redirect -v` through `ip netns exec`, waits for
the "relay listening on" line, and on exit stops it with SIGTERM and checks it exits 0.
The password reaches the relay only through that file: never argv, never an env value.

Must not import tray_proxy (the relay is exercised as a separate process) or PySide6.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

from tests.lab.creds import ProxyCredentials
from tests.lab.dante import DanteProxy
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess, Redirect
from tests.lab.squid import SquidProxy

READY_MARKER = "relay listening on"
# Relay ports come from a range below the kernel's ephemeral ports (32768-60999) and the
# relay's own source ports (61000-64999), so neither can collide with them.
_PORT_RANGE = (20000, 30000)
_used_ports: set[int] = set()
_ports_lock = threading.Lock()


@dataclass(frozen=True)
class UpstreamSpec:
    """One `[[upstream]]` entry plus the password its credentials file holds (None: no file)."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def for_squid(
        cls, squid: SquidProxy, *, name: str = "squid", password: str | None = None
    ) -> UpstreamSpec:
        """Squid as an HTTP CONNECT upstream, with its own credentials unless `password`."""
        creds = squid.credentials
        return cls(
            name=name,
            url=f"http://{squid.host}:{squid.port}",
            username=creds.username if creds else None,
            password=password if password is not None else (creds.password if creds else None),
        )

    @classmethod
    def for_dante(
        cls, dante: DanteProxy, *, name: str = "dante", password: str | None = None
    ) -> UpstreamSpec:
        creds: ProxyCredentials = dante.credentials
        return cls(
            name=name,
            url=f"socks5://{dante.host}:{dante.port}",
            username=creds.username,
            password=password if password is not None else creds.password,
        )


def _port_free(lab: Lab, port: int) -> bool:
    for addr in ("127.0.0.1", "::1"):
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with lab.client.socket(family) as sock:
            try:
                sock.bind((addr, port))
            except OSError:
                return False
    return True


def allocate_port(lab: Lab) -> int:
    """A relay port no other RelayProcess of this run has used and free in the client ns."""
    rng = random.Random()
    with _ports_lock:
        for _ in range(200):
            port = rng.randrange(*_PORT_RANGE)
            if port not in _used_ports and _port_free(lab, port):
                _used_ports.add(port)
                return port
    raise RuntimeError(f"no free relay port found in {_PORT_RANGE} after 200 tries")


class RelayProcess:
    """`with RelayProcess(lab, upstream) as relay:` runs the relay until the block ends.

    `relay.port`, `relay.redirect_ports`, `relay.lines` (stderr so far), `relay.redirect()`
    (the lab's nft redirect to this relay, as a context manager), `relay.rss_kib()`.
    Leaving the block sends SIGTERM and asserts a clean exit 0 within `stop_timeout`; a relay
    that does not comply is killed and the block raises (unless it is already failing).
    """

    def __init__(
        self,
        lab: Lab,
        upstream: UpstreamSpec,
        *,
        redirect_ports: Iterable[int] = (80, 443),
        settings: Mapping[str, Any] | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.lab = lab
        self.upstream = upstream
        self.redirect_ports = tuple(redirect_ports)
        self.settings = dict(settings or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self.workdir = Path()
        self.config_path = Path()
        self.credentials_dir = Path()
        self.process: NsProcess | None = None
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<RelayProcess port={self.port} upstream={self.upstream.name}>"

    # files ---------------------------------------------------------------------------------

    def _write_files(self) -> None:
        self.workdir = self.lab.tmp / f"relay-{self.port}"
        self.workdir.mkdir(mode=0o700)
        self.credentials_dir = self.workdir / "credentials"
        self.credentials_dir.mkdir(mode=0o700)
        if self.upstream.password is not None:
            path = self.credentials_dir / self.upstream.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.upstream.password)
        entry: dict[str, Any] = {"name": self.upstream.name, "url": self.upstream.url}
        if self.upstream.username is not None:
            entry["username"] = self.upstream.username
        relay: dict[str, Any] = {
            "port": self.port,
            "listen": ["127.0.0.1", "::1"],
            "redirect_ports": list(self.redirect_ports),
            "upstream": self.upstream.name,
            "drain_timeout": 1.0,
        }
        relay.update(self.settings)
        self.config_path = self.workdir / "config.toml"
        self.config_path.write_text(tomli_w.dumps({"relay": relay, "upstream": [entry]}))

    # lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> RelayProcess:
        self.port = allocate_port(self.lab)
        self._write_files()
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["CREDENTIALS_DIRECTORY"] = str(self.credentials_dir)
        # The run's control socket and connection history stay in the test's own directory,
        # not root's (/tmp/tray-proxy-0, ~/.local/state): nothing outlives the test.
        for var, sub in (("XDG_RUNTIME_DIR", "runtime"), ("XDG_STATE_HOME", "state")):
            (self.workdir / sub).mkdir(mode=0o700, exist_ok=True)
            env[var] = str(self.workdir / sub)
        env["PYTHONUNBUFFERED"] = "1"
        argv = [
            sys.executable, "-m", "tray_proxy", "run",
            "--config", str(self.config_path), "--no-redirect", "-v",
        ]  # fmt: skip
        self.process = self.lab.client.popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self._reader = threading.Thread(
            target=self._read_stderr, name=f"relay-{self.port}-stderr", daemon=True
        )
        self._reader.start()
        try:
            self.wait_for_line(READY_MARKER, timeout=self.start_timeout)
        except BaseException:
            self._kill()
            raise
        return self

    def _read_stderr(self) -> None:
        # Also kept in the lab's temp dir, which TPLAB_KEEP=1 preserves for debugging.
        assert self.process is not None and self.process.stderr is not None
        with (self.workdir / "relay.stderr").open("w", encoding="utf-8") as copy:
            for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                copy.write(line + "\n")
                copy.flush()
                with self._lock:
                    self._lines.append(line)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problem = self.stop()
        if problem and exc_type is None:
            raise AssertionError(problem)

    def stop(self) -> str | None:
        """SIGTERM, wait for exit 0. Returns what went wrong (None if all well)."""
        proc = self.process
        if proc is None:
            return None
        problem = None
        if proc.poll() is not None:
            problem = f"the relay had already exited with {proc.returncode}"
        else:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                problem = f"the relay did not exit within {self.stop_timeout}s of SIGTERM"
            else:
                if proc.returncode != 0:
                    problem = f"the relay exited with {proc.returncode} after SIGTERM"
        self.returncode = proc.returncode
        self._kill()
        if problem:
            problem += "; stderr tail:\n" + "\n".join(self.lines[-40:])
        return problem

    def _kill(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            self.returncode = proc.stop(grace=2.0)
        finally:
            self.lab.client.forget(proc)
            if self._reader is not None:
                self._reader.join(timeout=10)
            if proc.stderr is not None:
                proc.stderr.close()

    # observing -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.process is not None, "relay not running"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def lines(self) -> list[str]:
        """A snapshot of the stderr lines so far."""
        with self._lock:
            return list(self._lines)

    def mark(self) -> int:
        """A position in the log: pass as `since` to look only at lines logged after it."""
        with self._lock:
            return len(self._lines)

    def find_lines(self, match: str | re.Pattern[str], since: int = 0) -> list[str]:
        test = _matcher(match)
        return [line for line in self.lines[since:] if test(line)]

    def wait_for_line(
        self, match: str | re.Pattern[str], *, since: int = 0, timeout: float = 10.0
    ) -> str:
        """The first stderr line (after `since`) containing / matching `match`."""
        test = _matcher(match)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[since:]:
                if test(line):
                    return line
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(
                    f"the relay exited ({self.process and self.process.returncode}) before "
                    f"logging {match!r}; stderr:\n" + "\n".join(self.lines[-40:])
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no relay log line {match!r} within {timeout}s; stderr tail:\n"
                    + "\n".join(self.lines[-40:])
                )
            time.sleep(0.05)

    def wait_for_count(
        self, match: str | re.Pattern[str], count: int, *, since: int = 0, timeout: float = 10.0
    ) -> list[str]:
        """Poll until at least `count` lines after `since` match; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_lines(match, since)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{len(found)} relay log lines {match!r} within {timeout}s, wanted "
                    f"{count}; stderr tail:\n" + "\n".join(self.lines[-20:])
                )
            time.sleep(0.05)

    def rss_kib(self) -> int:
        """Resident memory of the relay process (`ip netns exec` execs it: same pid)."""
        cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        assert b"tray_proxy" in cmdline, f"pid {self.pid} is not the relay: {cmdline!r}"
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS in /proc/{self.pid}/status")

    def redirect(self, ports: Iterable[int] | None = None) -> Redirect:
        """Apply the lab's nft redirect to this relay now; leave the `with` to remove it."""
        return self.lab.redirect(self.port, tuple(ports) if ports else self.redirect_ports)


def _matcher(match: str | re.Pattern[str]) -> Callable[[str], bool]:
    if isinstance(match, str):
        return lambda line: match in line
    return lambda line: match.search(line) is not None
