"""Where the doctor looks: every path, program and setting a check reads, as one `DoctorEnv`
with the real defaults, so tests point a check at a temp dir instead of faking the check.

Also the two bounded ways a check waits for the world: `run_command` (a subprocess with a
timeout, killed with its process group when it overruns) and `in_thread` (a blocking call in a
daemon thread with a timeout: keyring and D-Bus calls can hang for minutes, and a hung daemon
thread does not keep the doctor from exiting, where a pool's worker would).

Must not import PySide6 or the relay engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from tray_proxy.config import Config, ConfigError, ProbeSettings, load_config
from tray_proxy.firewall.client import INSTALLED_HELPER_PATH, SOURCE_HELPER_PATH
from tray_proxy.firewall.helper import NFT_CANDIDATES

__all__ = [
    "CommandResult",
    "DoctorEnv",
    "in_thread",
    "run_command",
]

T = TypeVar("T")

COMMAND_TIMEOUT: Final = 10.0
CHECK_TIMEOUT: Final = 30.0  # a whole check, probes included; then it is reported as failed


@dataclass(frozen=True)
class DoctorEnv:
    """Everything the checks read from the machine. The defaults are the real places."""

    config_path: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    euid: int = field(default_factory=os.geteuid)
    uid: int = field(default_factory=os.getuid)
    # The root helper looks for nft at these fixed paths, never on $PATH (a normal user's
    # PATH on Debian has no /usr/sbin), so the doctor looks where the helper will.
    nft_candidates: tuple[str, ...] = NFT_CANDIDATES
    helper_path: Path = Path(INSTALLED_HELPER_PATH)
    source_helper_path: Path = Path(SOURCE_HELPER_PATH)
    polkit_policy: Path = Path("/usr/share/polkit-1/actions/org.trayproxy.redirect.policy")
    polkit_rules: Path = Path("/etc/polkit-1/rules.d/50-tray-proxy.rules")
    sudoers_dropin: Path = Path("/etc/sudoers.d/tray-proxy")
    group: str = "tray-proxy"
    proc: Path = Path("/proc")
    local_ca_dir: Path = Path("/usr/local/share/ca-certificates")
    wslg_dir: Path = Path("/mnt/wslg")
    docker_desktop_dir: Path = Path("/mnt/wsl/docker-desktop")
    docker_socket: Path = Path("/var/run/docker.sock")
    control_socket: Path | None = None  # None: control.socket_path() of this user
    # None: [probe] target / timeout of the settings, like the app's Test connection.
    probe_target: tuple[str, int] | None = None
    probe_timeout: float | None = None
    command_timeout: float = COMMAND_TIMEOUT
    check_timeout: float = CHECK_TIMEOUT
    _memo: dict[str, tuple[bool, object]] = field(default_factory=dict, repr=False, compare=False)
    _key_locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def which(self, program: str) -> str | None:
        """`program` on this environment's PATH (not the doctor's own)."""
        return shutil.which(program, path=self.environ.get("PATH", os.defpath))

    def target(self) -> tuple[str, int]:
        """Where the upstream probes ask the proxy to connect."""
        if self.probe_target is not None:
            return self.probe_target
        try:
            return self.config().probe.target
        except ConfigError:
            return ProbeSettings().target

    def timeout(self) -> float:
        """How long one probe (dial + proxy handshake) may take."""
        if self.probe_timeout is not None:
            return self.probe_timeout
        try:
            return self.config().probe.timeout
        except ConfigError:
            return ProbeSettings().timeout

    def config(self) -> Config:
        """The settings (a missing file is an empty configuration); raises ConfigError."""
        return self.memo("config", lambda: load_config(self.config_path, missing_ok=True))

    def memo(self, key: str, compute: Callable[[], T]) -> T:
        """`compute()` once per doctor run, shared by the checks that need it (a failure is
        raised to every caller alike). One lock per key: a hung keyring must not hold up
        the checks that only need the settings."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self._memo:
                try:
                    self._memo[key] = (True, compute())
                except Exception as exc:  # handed to each caller, who reports it
                    self._memo[key] = (False, exc)
            ok, value = self._memo[key]
        if not ok:
            assert isinstance(value, Exception)
            raise value
        return value  # type: ignore[return-value]


@dataclass(frozen=True)
class CommandResult:
    """A finished command. `returncode` None: it did not finish within the timeout (killed),
    or could not start (`error` says why)."""

    argv: tuple[str, ...]
    returncode: int | None
    stdout: str
    stderr: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_command(
    argv: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> CommandResult:
    """Run `argv` to its end, at most `timeout` seconds; never raises for the command's sake.

    Its own session, so a timeout kills whatever it started too (cmd.exe through WSL interop
    starts Windows processes behind a Linux one)."""
    args = tuple(argv)
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        return CommandResult(args, None, "", "", f"cannot run {args[0]}: {exc.strerror or exc}")
    try:
        out, err = proc.communicate(input.encode() if input is not None else None, timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return CommandResult(args, None, "", "", f"{args[0]} did not finish within {timeout:g} s")
    return CommandResult(
        args, proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    )


async def in_thread(func: Callable[[], T], timeout: float) -> T:
    """`func()` in a daemon thread; asyncio.TimeoutError after `timeout` seconds (the thread
    is then abandoned: it cannot be stopped, and being a daemon it cannot hold the exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            future.set_exception(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result: object = func()
        except BaseException as exc:  # handed to the awaiting check
            outcome: tuple[bool, object] = (False, exc)
        else:
            outcome = (True, result)
        with contextlib.suppress(RuntimeError):  # the loop closed while we hung
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=work, name="tray-proxy-doctor", daemon=True).start()
    return await asyncio.wait_for(future, timeout)
