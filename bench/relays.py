"""The relays under test, each started as its own process in the lab's client namespace.

`TrayProxyRun` (`tray-proxy run`, engine on a uvloop loop, connection history off),
`TrayProxyRunMonitored` (the same with the history and process attribution on),
`TrayProxyQasync` (the engine on qasync, bench/qasync_relay.py) and `Redsocks` (Debian's
redsocks, `type = http-connect`, splice off or on). Each writes its config into the run's
temp dir, exposes the relay's pid for CPU and RSS readings, and stops its process group on
`stop()`.

Must not import PySide6. Secrets: the tray-proxy password goes to a 0600 file in a 0700
$CREDENTIALS_DIRECTORY; redsocks has no other way than its (0600) config file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sqlite3
import sys
import time
from pathlib import Path

from tests.lab import LabError, Namespace
from tests.lab.netns import NsProcess

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_NAME = "lab"
REDSOCKS = "/usr/sbin/redsocks"


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


_libc = ctypes.CDLL(None, use_errno=True)


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of a process (all its threads, also finished ones, user and system), in
    seconds, to the nanosecond: its CLOCK_PROCESS_CPUTIME_ID clock (clock_getcpuclockid(3)).

    /proc/PID/stat gives the same sum in clock ticks (10 ms): a 1 GiB stream costs a relay
    about 20 of them, so the tick alone would move a CPU-per-GiB ratio by 5-10 %.
    """
    clock = ctypes.c_int()
    code = _libc.clock_getcpuclockid(pid, ctypes.byref(clock))
    if code != 0:
        raise LabError(f"no CPU clock for pid {pid}: {os.strerror(code)}")
    return time.clock_gettime(clock.value)


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, kernel) CPU seconds of a process, all its threads, from /proc/PID/stat: in
    clock ticks (10 ms), fine for the connection-rate phase (about 100 ticks a row and
    round), not for CPU per GiB (proc_cpu_seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LabError(f"no VmRSS for pid {pid}")


class Relay:
    """One relay process listening on 127.0.0.1:`port` in the client namespace."""

    label = "relay"
    key = "relay"

    def __init__(self, ns: Namespace, workdir: Path, port: int) -> None:
        self.ns = ns
        self.workdir = workdir
        self.port = port
        self.process: NsProcess | None = None
        self.log_path = workdir / f"{self.key}-{port}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def config_text(self) -> str:
        """The config this relay ran with, secrets redacted, for docs/benchmarks.md."""
        return ""

    @property
    def pid(self) -> int:
        assert self.process is not None, "relay not started"
        # `ip netns exec` execs the command in place: the leader's pid is the relay's.
        return self.process.pid

    def start(self, timeout: float = 30.0) -> Relay:
        with self.log_path.open("wb") as log:
            self.process = self.ns.popen(self.argv(), stdout=log, stderr=log, env=self.env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._listening():
                return self
            time.sleep(0.05)
        self.stop()
        raise LabError(
            f"{self.label} did not listen on 127.0.0.1:{self.port} within {timeout:.0f}s; "
            f"its log:\n{self.log_path.read_text(errors='replace')[-2000:]}"
        )

    def _listening(self) -> bool:
        out = self.ns.run(["ss", "-Hltn", f"sport = :{self.port}"], check=False)
        return b"LISTEN" in out.stdout

    def stop(self) -> None:
        if self.process is not None:
            proc, self.process = self.process, None
            try:
                proc.stop(grace=5.0)
            finally:
                self.ns.forget(proc)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TrayProxyRelay(Relay):
    """Shared config for both tray-proxy rows: the TOML of `tray-proxy run`."""

    def __init__(
        self,
        ns: Namespace,
        workdir: Path,
        port: int,
        upstream: tuple[str, int],
        username: str,
        password_file: Path,
    ) -> None:
        super().__init__(ns, workdir, port)
        self.upstream = upstream
        self.username = username
        self.config_path = workdir / f"{self.key}-{port}.toml"
        self.config_path.write_text(self.config_text())
        self.creds_dir = workdir / f"{self.key}-{port}-credentials"
        self.creds_dir.mkdir(mode=0o700)
        _write_private(self.creds_dir / UPSTREAM_NAME, password_file.read_text().strip())

    # More [relay] lines, for a variant row.
    relay_extra = ""

    def log_text(self) -> str:
        """The [log] table: the connection history (and with it process attribution) off,
        so the rows measure the relay; TrayProxyRunMonitored switches it on."""
        return "\n[log]\nenabled = false\n"

    def config_text(self) -> str:
        host, port = self.upstream
        return (
            "[relay]\n"
            f"port = {self.port}\n"
            f"{self.relay_extra}"
            'listen = ["127.0.0.1"]\n'
            "redirect_ports = [443]\n"
            f'upstream = "{UPSTREAM_NAME}"\n'
            "connect_timeout = 10.0\n"
            "handshake_timeout = 10.0\n"
            "idle_timeout = 600.0\n"
            "peek_timeout = 1.0\n"
            "\n[[upstream]]\n"
            f'name = "{UPSTREAM_NAME}"\n'
            f'url = "http://{host}:{port}"\n'
            f'username = "{self.username}"\n'
            f"{self.log_text()}"
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME")}
        env["CREDENTIALS_DIRECTORY"] = str(self.creds_dir)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env


class TrayProxyRun(TrayProxyRelay):
    label = "tray-proxy run (uvloop)"
    key = "tray-run"

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "tray_proxy", "run",
            "--config", str(self.config_path), "--no-redirect",
        ]  # fmt: skip


class TrayProxyRunNoSpares(TrayProxyRun):
    """`tray-proxy run` without spare connections to the proxy: what the spares add."""

    label = "tray-proxy run, spare_connections = 0"
    key = "tray-run-nospare"
    relay_extra = "spare_connections = 0\n"


class TrayProxyRunMonitored(TrayProxyRun):
    """`tray-proxy run` with what the dashboard needs switched on: the connection history
    (SQLite, its writer thread) and process attribution. Its cost is this row against
    `tray-proxy run` of the same run (target: conn/s and added p50 within 5 %)."""

    label = "tray-proxy run, history + attribution on"
    key = "tray-run-monitored"

    @property
    def history_path(self) -> Path:
        return self.workdir / f"{self.key}-{self.port}-history.sqlite3"

    def log_text(self) -> str:
        return f'\n[log]\nenabled = true\npath = "{self.history_path}"\n'

    def history_counts(self) -> tuple[int, int] | None:
        """(connections written, of them with a process) once the relay has stopped; None
        when there is no history file or it is not the schema this knows."""
        if not self.history_path.exists():
            return None
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.history_path}?mode=ro", uri=True, timeout=5)
            ) as conn:
                total, named = conn.execute(
                    "SELECT count(*), count(process_name) FROM connections"
                ).fetchone()
        except sqlite3.Error:
            return None
        return int(total), int(named)


class TrayProxyQasync(TrayProxyRelay):
    label = "tray-proxy engine on qasync"
    key = "tray-qasync"

    def argv(self) -> list[str]:
        script = ROOT / "bench" / "qasync_relay.py"
        return [sys.executable, str(script), "--config", str(self.config_path)]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["QT_QPA_PLATFORM"] = "offscreen"
        env["PYTHONPATH"] = str(ROOT)
        return env


class Redsocks(Relay):
    """Debian's redsocks 0.5 as the reference (`type = http-connect`)."""

    def __init__(
        self,
        ns: Namespace,
        workdir: Path,
        port: int,
        upstream: tuple[str, int],
        username: str,
        password_file: Path,
        splice: bool,
    ) -> None:
        self.splice = splice
        self.key = f"redsocks-splice-{'on' if splice else 'off'}"
        self.label = f"redsocks, splice = {'on' if splice else 'off'}"
        super().__init__(ns, workdir, port)
        self.upstream = upstream
        self.username = username
        self.config_path = workdir / f"{self.key}-{port}.conf"
        # redsocks reads its login only from this file: a reference run, 0600 in a 0711 dir.
        _write_private(self.config_path, self._render(password_file.read_text().strip()))

    def _render(self, password: str) -> str:
        host, port = self.upstream
        return (
            "base {\n"
            "  log_debug = off;\n"
            "  log_info = off;\n"
            '  log = "stderr";\n'
            "  daemon = off;\n"
            "  redirector = iptables;\n"
            "}\n"
            "redsocks {\n"
            "  local_ip = 127.0.0.1;\n"
            f"  local_port = {self.port};\n"
            f"  ip = {host};\n"
            f"  port = {port};\n"
            "  type = http-connect;\n"
            f'  login = "{self.username}";\n'
            f'  password = "{password}";\n'
            f"  splice = {'on' if self.splice else 'off'};\n"
            "}\n"
        )

    def config_text(self) -> str:
        return self._render("***")

    def argv(self) -> list[str]:
        return [REDSOCKS, "-c", str(self.config_path)]
