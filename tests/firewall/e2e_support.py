"""Support for the redirect's end-to-end tests: the real `tray-proxy run` (redirect on) in the
lab's client namespace, and the checks that it leaves the client and the host as it found them.

`RedirectedRun` starts `python -m tray_proxy run --config FILE -v` (no `--no-redirect`) inside
the client namespace as root, so the relay starts the root helper itself, in that namespace.
The password reaches it only through a 0600 file in $CREDENTIALS_DIRECTORY.

Must not import PySide6 or tray_proxy.ui.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from tests.integration.relay import UpstreamSpec, allocate_port
from tests.lab.environment import Lab
from tests.lab.netns import Namespace, NsProcess

REDIRECT_ON = "tray-proxy: redirect on"
RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"
HELPER_STATE_DIR = Path("/run/tray-proxy-helper")
# Everything but loopback is redirected, so the lab's 10.200.x addresses are captured.
LOOPBACK_ONLY = ["127.0.0.0/8", "::1/128"]
# "conn 7 10.200.1.2:41234 -> origin.lab.test:443 via squid: ..." (relay log, -v)
CONN_LINE = re.compile(r"conn \d+ (?P<client>\S+) -> (?P<dst>\S+) via (?P<upstream>\S+):")


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def tables(ns: Namespace | None) -> str:
    """`nft list tables` in `ns` (None: the namespace this test process runs in, the host's)."""
    argv = ["nft", "list", "tables"]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns.name, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    return done.stdout


def has_our_table(ns: Namespace | None) -> bool:
    return "table inet tray_proxy" in tables(ns)


def read_in_ns(ns: Namespace, path: str) -> str:
    return ns.run(["cat", path]).stdout.decode().strip()


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `condition` until true; return the seconds it took, or fail naming `what`."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def client_left_clean(lab: Lab) -> Iterator[None]:
    """Fail if a test leaves our table, reserved ports or helper state in the client namespace,
    or touches the host's namespace at all; repair the shared client namespace either way."""
    client = lab.client
    client_ino = os.stat(f"/run/netns/{client.name}").st_ino
    state_file = HELPER_STATE_DIR / f"netns-{client_ino}.json"
    host_reserved = Path(RESERVED_PORTS).read_text()
    host_had_table = has_our_table(None)
    client_reserved = read_in_ns(client, RESERVED_PORTS)
    assert not has_our_table(client), "a previous test left table inet tray_proxy in the client"
    problems: list[str] = []
    try:
        yield
    finally:
        if has_our_table(client):
            problems.append("table inet tray_proxy is still in the client namespace")
            client.run(["nft", "delete", "table", "inet", "tray_proxy"], check=False)
        now = read_in_ns(client, RESERVED_PORTS)
        if now != client_reserved:
            problems.append(f"client ip_local_reserved_ports is {now!r}, was {client_reserved!r}")
            client.run(["sh", "-c", f'echo "$1" > {RESERVED_PORTS}', "sh", client_reserved])
        if state_file.exists():
            problems.append(f"helper state {state_file} was left behind")
            state_file.unlink()
        if Path(RESERVED_PORTS).read_text() != host_reserved:
            problems.append("the host's ip_local_reserved_ports changed")
        if has_our_table(None) and not host_had_table:
            problems.append("table inet tray_proxy appeared in the host's namespace")
    if problems:
        raise AssertionError("; ".join(problems))


@dataclass
class RunResult:
    returncode: int | None
    lines: list[str]


class RedirectedRun:
    """`with RedirectedRun(lab, upstream) as run:` — tray-proxy with its redirect on.

    Leaving the block sends SIGTERM to the relay alone (the helper must be stopped by it) and
    asserts exit 0; whatever is left of the process group is killed afterwards.
    """

    def __init__(
        self,
        lab: Lab,
        upstream: UpstreamSpec,
        *,
        exclude: Sequence[str] = LOOPBACK_ONLY,
        redirect: dict[str, Any] | None = None,
        relay: dict[str, Any] | None = None,
        wait_for: str | None = REDIRECT_ON,
        timeout: float = 30.0,
    ) -> None:
        self.lab = lab
        self.upstream = upstream
        self.redirect_settings = {"exclude": list(exclude), **(redirect or {})}
        self.relay_settings = dict(relay or {})
        self.wait_for = wait_for
        self.timeout = timeout
        self.port = 0
        self.workdir = Path()
        self.process: NsProcess | None = None
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # -- lifecycle

    def _write_files(self) -> Path:
        self.workdir = self.lab.tmp / f"redirected-{self.port}"
        self.workdir.mkdir(mode=0o700)
        credentials = self.workdir / "credentials"
        credentials.mkdir(mode=0o700)
        if self.upstream.password is not None:
            fd = os.open(credentials / self.upstream.name, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.upstream.password)
        entry: dict[str, Any] = {"name": self.upstream.name, "url": self.upstream.url}
        if self.upstream.username is not None:
            entry["username"] = self.upstream.username
        relay = {"port": self.port, "upstream": self.upstream.name, "drain_timeout": 1.0}
        relay.update(self.relay_settings)
        doc = {"relay": relay, "redirect": self.redirect_settings, "upstream": [entry]}
        config = self.workdir / "config.toml"
        config.write_text(tomli_w.dumps(doc))
        return config

    def __enter__(self) -> RedirectedRun:
        self.port = allocate_port(self.lab)
        config = self._write_files()
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["CREDENTIALS_DIRECTORY"] = str(self.workdir / "credentials")
        # The run's control socket and connection history stay in the test's own directory,
        # not root's (/tmp/tray-proxy-0, ~/.local/state): nothing outlives the test.
        for var, sub in (("XDG_RUNTIME_DIR", "runtime"), ("XDG_STATE_HOME", "state")):
            (self.workdir / sub).mkdir(mode=0o700, exist_ok=True)
            env[var] = str(self.workdir / sub)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("TRAY_PROXY_HELPER", None)
        argv = [sys.executable, "-m", "tray_proxy", "run", "--config", str(config), "-v"]
        self.process = self.lab.client.popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self._reader = threading.Thread(target=self._read, name="tray-proxy-run", daemon=True)
        self._reader.start()
        if self.wait_for is not None:
            try:
                self.wait_for_line(self.wait_for, timeout=self.timeout)
            except BaseException:
                self.kill_all()
                raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        problem = None
        if self.process is not None and self.process.poll() is None:
            code = self.terminate()
            if code != 0:
                problem = f"tray-proxy exited with {code} after SIGTERM"
        self.kill_all()
        if problem and exc_type is None:
            raise AssertionError(problem + "; log:\n" + "\n".join(self.lines[-40:]))

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to tray-proxy only; its exit code (None if it did not exit in time)."""
        proc = self.process
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        self.returncode = proc.returncode
        return proc.returncode

    def kill_all(self) -> None:
        """Kill what is left of the process group (relay and helper) and reap it."""
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            code = proc.stop(grace=3.0)
            if self.returncode is None:
                self.returncode = code
        finally:
            self.lab.client.forget(proc)
            if self._reader is not None:
                self._reader.join(timeout=10)
            if proc.stderr is not None:
                proc.stderr.close()

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            with self._lock:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    # -- observing

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def mark(self) -> int:
        with self._lock:
            return len(self._lines)

    def wait_for_line(self, text: str, *, since: int = 0, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[since:]:
                if text in line:
                    return line
            proc = self.process
            if proc is None or proc.poll() is not None:
                # The reader may still hold the last lines; give it a moment to finish.
                if self._reader is not None:
                    self._reader.join(timeout=2)
                for line in self.lines[since:]:
                    if text in line:
                        return line
                raise AssertionError(
                    f"tray-proxy exited ({proc and proc.returncode}) before logging {text!r}:\n"
                    + "\n".join(self.lines[-40:])
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no {text!r} in tray-proxy's log within {timeout} s:\n"
                    + "\n".join(self.lines[-40:])
                )
            time.sleep(0.05)

    def connections(self, since: int = 0) -> list[re.Match[str]]:
        """The relay's per-connection log lines (one per accepted connection, when it closes)."""
        found = (CONN_LINE.search(line) for line in self.lines[since:])
        return [m for m in found if m is not None]

    def wait_for_connections(self, count: int, since: int, timeout: float = 10.0) -> None:
        wait_until(
            lambda: len(self.connections(since)) >= count,
            timeout,
            f"{count} relay connection lines; log:\n" + "\n".join(self.lines[-20:]),
        )

    def helper_pids(self) -> list[int]:
        """Children of tray-proxy running the helper script."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == self.pid and b"helper" in cmdline:
                pids.append(int(entry))
        return pids
