"""The unprivileged side of the redirect: starts the root helper and talks JSON lines to it.

`RedirectController` runs on the app's asyncio loop. It never sends nft text and never sends a
credential: only the fields of a `RuleSpec`, which the helper validates again.

How the helper is started (first that applies):
- already root: `/usr/bin/python3 -I <helper>` (no escalation involved);
- pkexec installed and polkitd running: `pkexec <helper>` (the polkit action names that path);
- otherwise `sudo -n <helper>` (a sudoers drop-in allows exactly that path);
- otherwise `NoPrivilegeMethodError`, whose message says how to fix it.

The helper runs in a session of its own (`start_new_session`): a terminal's Ctrl+C goes to the
app's process group only, so the app decides when the redirect goes (it drains first) instead
of the helper deleting its table under open downloads (issue 16 item 8). The price: without a
controlling terminal pkexec cannot ask for a password in the terminal, so a user outside the
tray-proxy group needs a graphical polkit agent (sudo -n never asks anyway). When tray-proxy runs
as root, the helper gets the environment without SUDO_UID/PKEXEC_UID: the helper serves the
uid those name (the user behind sudo/pkexec), but a root app listens as root.

Which helper: `/usr/libexec/tray-proxy/tray-proxy-helper` when installed, else `helper.py` of
the source tree (development). `TRAY_PROXY_HELPER` overrides the path only when this process is
already root: then no password prompt is involved and root could run anything anyway. For a
normal user an override would let anything that can set the app's environment put its own
script behind the admin prompt the user expects from tray-proxy, so it is ignored (and logged).

Must not import PySide6 or tray_proxy.relay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tray_proxy.errors import UserError
from tray_proxy.firewall.helper import PROTOCOL_VERSION
from tray_proxy.firewall.ruleset import (
    Bridge,
    IPAddress,
    RuleSpec,
    SpecError,
    spec_from_wire,
    spec_to_wire,
)
from tray_proxy.tasks import spawn

log = logging.getLogger(__name__)

INSTALLED_HELPER_PATH: Final = "/usr/libexec/tray-proxy/tray-proxy-helper"
SOURCE_HELPER_PATH: Final = str(Path(__file__).with_name("helper.py"))
POLKIT_ACTION_ID: Final = "org.trayproxy.redirect"
SYSTEM_PYTHON: Final = "/usr/bin/python3"
HELPER_ENV: Final = "TRAY_PROXY_HELPER"
START_TIMEOUT_SECONDS: Final = 120.0  # the user may be typing a password into the polkit dialog
REQUEST_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 10.0
RESOLVE_TIMEOUT_SECONDS: Final = 10.0
_ANSWER_LIMIT: Final = 1024 * 1024
_STDERR_TAIL: Final = 20
# Set by pkexec and sudo for the helper; a root app's own copies would make the helper serve
# the user behind them instead of root.
_LAUNCHER_UID_VARIABLES: Final = ("SUDO_UID", "PKEXEC_UID")


class RedirectError(UserError):
    """The redirect could not be switched or queried; the message is for the user."""


class HelperNotFoundError(RedirectError):
    pass


class NoPrivilegeMethodError(RedirectError):
    pass


class AuthorizationDismissedError(RedirectError):
    pass


class NotAuthorizedError(RedirectError):
    pass


class SudoNotAllowedError(RedirectError):
    pass


class HelperExitedError(RedirectError):
    pass


class HelperTimeoutError(RedirectError):
    pass


class HelperRequestError(RedirectError):
    """The helper refused a request (its message names the field)."""


class UpstreamResolutionError(RedirectError):
    pass


@dataclass(frozen=True)
class RedirectStatus:
    active: bool  # new connections are redirected (our table is in and switched on)
    spec: RuleSpec | None  # what this helper applied, if anything
    # The table is in the kernel: also after `remove`, until the helper exits, so that
    # connections already redirected keep their address translation while the relay drains.
    table_present: bool = False
    # The user the helper serves (it learned the uid from pkexec/sudo, not from us).
    owner_uid: int | None = None
    # Whose connections on this host are captured, in words ("uid 1000 (alice) and system
    # accounts (uid < 1000)"), for `tray-proxy status` and the doctor.
    captured: str | None = None
    # The container bridges the helper captures; the relay must listen on their addresses.
    bridges: tuple[Bridge, ...] = ()


def _grant_from_answer(
    answer: Mapping[str, object],
) -> tuple[int | None, str | None, tuple[Bridge, ...]]:
    """owner_uid, captured and bridges of an apply or status answer (HelperRequestError)."""
    owner = answer.get("owner_uid")
    owner_uid = owner if isinstance(owner, int) and not isinstance(owner, bool) else None
    words = answer.get("captured")
    captured = words[:200] if isinstance(words, str) else None
    raw = answer.get("bridges", [])
    bridges: list[Bridge] = []
    try:
        if not isinstance(raw, list):
            raise ValueError("not a list")
        for item in raw:
            if not isinstance(item, dict):
                raise ValueError("not an object")
            bridges.append(
                Bridge(
                    str(item["name"]),
                    ipaddress.IPv4Address(str(item["address"])),
                    ipaddress.IPv4Network(str(item["network"])),
                )
            )
    except (KeyError, ValueError) as exc:
        raise HelperRequestError(
            f"The redirect helper reported unreadable container bridges ({exc}). Switch the"
            " redirect off and on again."
        ) from None
    return owner_uid, captured, tuple(bridges)


def helper_path(
    euid: int | None = None,
    environ: Mapping[str, str] | None = None,
    installed: str = INSTALLED_HELPER_PATH,
) -> str:
    """The helper to run; see the module docstring for why the override needs root."""
    euid = os.geteuid() if euid is None else euid
    environ = os.environ if environ is None else environ
    override = environ.get(HELPER_ENV)
    if override:
        if euid == 0:
            return override
        log.warning("%s is ignored unless tray-proxy runs as root", HELPER_ENV)
    if os.path.exists(installed):
        return installed
    return SOURCE_HELPER_PATH


def polkit_running(proc: str = "/proc") -> bool:
    """Is polkitd alive? (pkexec without it fails with a confusing message.)"""
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        with contextlib.suppress(OSError), open(os.path.join(proc, pid, "comm")) as f:
            if f.read().strip() == "polkitd":
                return True
    return False


def launch_command(
    helper: str,
    euid: int | None = None,
    which: Callable[[str], str | None] = shutil.which,
    polkit: Callable[[], bool] = polkit_running,
) -> list[str]:
    """The argv that starts `helper` as root, or NoPrivilegeMethodError."""
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return [SYSTEM_PYTHON, "-I", helper]
    pkexec = which("pkexec")
    if pkexec and polkit():
        return [pkexec, helper]
    sudo = which("sudo")
    if sudo:
        return [sudo, "-n", helper]
    raise NoPrivilegeMethodError(
        "Switching the redirect on needs root, but neither polkit (pkexec with polkitd"
        " running) nor sudo is available. Install policykit-1 and the files in installer/"
        " polkit, or sudo and installer/sudoers/tray-proxy, then try again."
    )


def helper_environment(
    euid: int | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    """The helper's environment: ours, minus the launcher uid variables when we are root.

    None (inherit) when not root: pkexec and sudo build the helper's environment themselves.
    """
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return None
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k not in _LAUNCHER_UID_VARIABLES}


def _exit_error(
    argv: Sequence[str], code: int, stderr_tail: str, answered: bool = False
) -> RedirectError:
    """Turn the exit of the helper into words for the user.

    The launchers' exit codes (pkexec 126/127, sudo's refusal) mean something only before the
    helper ever answered: afterwards the code is the helper's own.
    """
    launcher = os.path.basename(argv[0]) if argv else ""
    detail = f" ({stderr_tail})" if stderr_tail else ""
    if answered:
        if code == 0:
            return HelperExitedError(
                "The redirect helper has stopped and removed the redirect; it is off. Switch"
                " it on again to restart it."
            )
        return HelperExitedError(
            f"The redirect helper stopped (exit code {code}){detail}; the redirect is off."
            " See the log for its messages."
        )
    if launcher == "pkexec" and code == 126:
        return AuthorizationDismissedError(
            "The password dialog was closed, so the redirect stayed off. Switch it on again"
            " and authenticate, or ask an administrator to add you to the tray-proxy group."
        )
    if launcher == "pkexec" and code == 127:
        return NotAuthorizedError(
            "You are not allowed to switch the redirect on (polkit refused"
            f" {POLKIT_ACTION_ID}){detail}. Ask an administrator to install the polkit rule"
            " from installer/polkit and add you to the tray-proxy group."
        )
    if launcher == "sudo":
        return SudoNotAllowedError(
            f"sudo refused to start the redirect helper without a password{detail}. Install"
            " installer/sudoers/tray-proxy into /etc/sudoers.d and add yourself to the"
            " tray-proxy group."
        )
    return HelperExitedError(
        f"The redirect helper stopped with exit code {code}{detail}; the redirect is off."
        " See the log for its messages."
    )


class RedirectController:
    """Owns one helper process for as long as the redirect is on."""

    def __init__(
        self,
        command: Sequence[str] | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        stop_timeout: float = STOP_TIMEOUT_SECONDS,
    ) -> None:
        # `command` replaces the computed argv (tests run the helper inside a netns with it).
        self._command = list(command) if command is not None else None
        self._start_timeout = start_timeout
        self._request_timeout = request_timeout
        self._stop_timeout = stop_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._argv: list[str] = []
        self._stderr_task: asyncio.Task[None] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self._lock = asyncio.Lock()
        self._next_id = 0
        # Requests sent whose answers were never read (see _read_answer).
        self._given_up: set[int] = set()
        # Did the running helper answer once? (Then launcher exit codes no longer apply.)
        self._answered = False
        # The exit code of the last helper, once it was collected.
        self.last_exit: int | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        """Start the helper (this may show the polkit password dialog) and check it answers."""
        if self.running:
            return
        await self._reap()  # a helper that died earlier: collect its stderr reader
        argv = self._command if self._command is not None else launch_command(helper_path())
        self._argv = argv
        self._stderr_tail.clear()
        self._given_up.clear()  # a new helper, a new pipe
        self._answered = False
        self.last_exit = None
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=_ANSWER_LIMIT,
                env=helper_environment(),
                # Ctrl+C in a terminal signals the app's process group, not the helper.
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise HelperNotFoundError(
                f"Cannot start the redirect helper: {exc.filename or argv[0]} does not exist."
                " Reinstall tray-proxy."
            ) from None
        except PermissionError as exc:
            raise HelperNotFoundError(
                f"Cannot start the redirect helper: {exc.filename or argv[0]} is not"
                " executable. Reinstall tray-proxy."
            ) from None
        assert self._proc.stderr is not None
        self._stderr_task = spawn(
            self._drain_stderr(self._proc.stderr), name="redirect-helper-stderr"
        )
        try:
            await self._request("status", timeout=self._start_timeout)
        except RedirectError:
            await self._reap()
            raise

    async def apply(self, spec: RuleSpec) -> None:
        await self._request("apply", spec_to_wire(spec))

    async def status(self) -> RedirectStatus:
        answer = await self._request("status")
        raw_spec = answer.get("spec")
        spec = None
        if isinstance(raw_spec, dict):
            try:
                spec = spec_from_wire(raw_spec)
            except SpecError as exc:
                raise HelperRequestError(f"The helper reported an unreadable spec: {exc}") from None
        owner_uid, captured, bridges = _grant_from_answer(answer)
        return RedirectStatus(
            active=answer.get("active") is True,
            spec=spec,
            table_present=answer.get("table_present") is True,
            owner_uid=owner_uid,
            captured=captured,
            bridges=bridges,
        )

    async def remove(self) -> bool:
        """Redirect off for new connections; True if it was on.

        Connections already redirected keep working: the helper keeps its table (switched off)
        until it exits. Stop the helper once the relay has drained them.

        A helper that already exited with status 0 deleted its table and restored what it
        changed (it was signalled, or someone closed its input): the redirect is off, which
        is all `remove` asks, so that is no error (issue 14 bug 3: Ctrl+C printed "stopped
        with exit code 0" while the app was stopping).
        """
        try:
            answer = await self._request("remove")
        except RedirectError:
            if await self._exited_clean():
                log.info("the redirect helper had already removed the redirect and exited")
                return False
            raise
        return answer.get("removed") is True

    async def _exited_clean(self) -> bool:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), min(self._stop_timeout, 2.0))
            if proc.returncode is not None:
                self.last_exit = proc.returncode
        return self.last_exit == 0

    async def stop(self) -> int | None:
        """Close the helper's input (it deletes the table and exits); kill it if it hangs.

        Connections still open through the relay lose their address translation then: call
        `remove` first and let the relay drain before this.
        """
        proc = self._proc
        if proc is None:
            await self._reap()
            return None
        async with self._lock:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), self._stop_timeout)
            except asyncio.TimeoutError:
                log.warning("the redirect helper did not exit in time; terminating it")
                await self._kill(proc)
            await self._reap()
            self.last_exit = proc.returncode
            return proc.returncode

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        for send in (proc.terminate, proc.kill):
            try:
                send()
            except ProcessLookupError:
                return
            except PermissionError:
                # pkexec hands the pid to a root process we may not signal.
                log.error("cannot signal the root helper (pid %s); it stays running", proc.pid)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), self._stop_timeout / 2)
                return

    async def _reap(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), self._stop_timeout)
            if proc.returncode is None:
                await self._kill(proc)
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._stderr_task, 1.0)
            self._stderr_task = None
        self._proc = None

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        while True:
            raw = await stream.readline()
            if not raw:
                return
            text = raw.decode(errors="replace").rstrip()[:300]
            self._stderr_tail.append(text)
            log.info("helper: %s", text)

    async def _request(
        self, op: str, fields: Mapping[str, object] | None = None, timeout: float | None = None
    ) -> dict[str, object]:
        async with self._lock:
            proc = self._proc
            if proc is None:
                raise HelperExitedError(
                    "The redirect helper is not running; switch the redirect on again."
                )
            if proc.returncode is not None:
                raise await self._exited(proc)
            assert proc.stdin is not None and proc.stdout is not None
            self._next_id += 1
            request_id = self._next_id
            line = json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "op": op, **(fields or {})})
            try:
                proc.stdin.write(line.encode() + b"\n")
                try:
                    await proc.stdin.drain()
                    raw = await self._read_answer(
                        proc.stdout, request_id, timeout or self._request_timeout
                    )
                except (asyncio.CancelledError, asyncio.TimeoutError):
                    # Sent, but nobody reads its answer when it comes: the next request skips it.
                    self._given_up.add(request_id)
                    raise
            except (BrokenPipeError, ConnectionResetError):
                raw = b""
            except asyncio.TimeoutError:
                raise HelperTimeoutError(
                    f"The redirect helper did not answer '{op}' in time. Switch the redirect"
                    " off and on again."
                ) from None
            if not raw:
                raise await self._exited(proc)
            # Only the helper writes to stdout (pkexec and sudo do not): it is past the launcher.
            self._answered = True
            return self._check_answer(raw, request_id, op)

    async def _read_answer(
        self, stdout: asyncio.StreamReader, request_id: int, timeout: float
    ) -> bytes:
        """The helper's line for `request_id` (b"" once it closed its output).

        A request given up after it was sent (its caller cancelled, or it timed out) still
        gets its answer later; that line waits in the pipe ahead of this one and is skipped
        here, instead of being taken for this request's answer. Raises TimeoutError when the
        whole wait takes longer than `timeout`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:  # bounded: each line skipped leaves _given_up, and by the deadline
            raw = await asyncio.wait_for(stdout.readline(), max(0.0, deadline - loop.time()))
            earlier = _answer_id(raw)
            if earlier not in self._given_up:
                return raw
            self._given_up.discard(earlier)
            log.debug("skipped the helper's late answer to request %d", earlier)

    async def _exited(self, proc: asyncio.subprocess.Process) -> RedirectError:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), self._stop_timeout)
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
        tail = self._stderr_tail[-1] if self._stderr_tail else ""
        code = proc.returncode if proc.returncode is not None else -1
        if proc.returncode is not None:
            # Reported once; afterwards the controller is simply "not running".
            self._proc = None
            self.last_exit = proc.returncode
        return _exit_error(self._argv, code, tail, self._answered)

    @staticmethod
    def _check_answer(raw: bytes, request_id: int, op: str) -> dict[str, object]:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or answer.get("id") != request_id:
            raise HelperRequestError(
                f"The redirect helper answered '{op}' with something unexpected. Switch the"
                " redirect off and on again."
            )
        if answer.get("ok") is not True:
            error = answer.get("error")
            raise HelperRequestError(f"The redirect helper refused '{op}': {error}")
        return answer


def _answer_id(raw: bytes) -> int | None:
    """The id a helper's answer line carries, if it is one."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    request_id = answer.get("id") if isinstance(answer, dict) else None
    return request_id if isinstance(request_id, int) else None


async def resolve_upstreams(
    hosts_ports: Iterable[tuple[str, int]], timeout: float = RESOLVE_TIMEOUT_SECONDS
) -> tuple[tuple[IPAddress, int], ...]:
    """Resolve upstream proxy names to the addresses the ruleset must leave alone."""
    loop = asyncio.get_running_loop()
    result: list[tuple[IPAddress, int]] = []
    for host, port in hosts_ports:
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
                timeout,
            )
        except asyncio.TimeoutError:
            raise UpstreamResolutionError(
                f"Resolving proxy {host}:{port} took longer than {timeout:.0f} s. Check the"
                " name and your DNS, then try again."
            ) from None
        except (OSError, UnicodeError) as exc:
            raise UpstreamResolutionError(
                f"Cannot resolve proxy {host}:{port} ({exc}). Check the proxy's address in "
                "Credentials… (tray menu) or with `tray-proxy setup`, and your DNS."
            ) from None
        for _family, _type, _proto, _canon, sockaddr in infos:
            # A scoped IPv6 address ("fe80::1%eth0") cannot go into an nft set; drop the scope.
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if (address, port) not in result:
                result.append((address, port))
    return tuple(result)
