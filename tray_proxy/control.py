"""Single instance and the local control socket of the running app.

One `tray-proxy` runs per user: the tray app or a headless `tray-proxy run`, which answer
alike (tray_proxy.controller.commands). The first one takes an exclusive `flock` on a lock
file and listens on a Unix socket next to it; a second one finds the lock taken and talks to
the socket instead (`raise` brings the first one's window up; the CLI sends `status`,
`enable`, `disable`, `quit`).

Where: `$XDG_RUNTIME_DIR/tray-proxy.sock` (that directory is the user's own, mode 0700), or,
without it, `/tmp/tray-proxy-<uid>/`, a 0700 directory that must be ours and no symlink:
anyone could pre-create a directory in /tmp. The socket itself is 0600, and the server also
checks the peer's uid (SO_PEERCRED), so only the same user can switch the redirect.

Protocol: one JSON object per line. Request `{"v": 1, "cmd": "status"}`; answer
`{"ok": true, ...}` or `{"ok": false, "error": "what happened and what to do"}`.

Must not import PySide6 (the CLI uses the client without Qt) or the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from tray_proxy.errors import UserError

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
COMMANDS: Final = frozenset({"status", "enable", "disable", "quit", "raise"})
MAX_LINE: Final = 64 * 1024
SOCKET_NAME: Final = "tray-proxy.sock"
# enable may wait for the user to type a password into the polkit dialog.
COMMAND_TIMEOUTS: Final[Mapping[str, float]] = {"enable": 180.0, "disable": 60.0}
DEFAULT_TIMEOUT: Final = 10.0

Handler = Callable[[str], Awaitable[dict[str, Any]]]


class ControlError(UserError):
    """The control socket cannot be used; the message says why and what to do."""


class NotRunningError(ControlError):
    """No tray-proxy instance is running for this user."""


def runtime_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The private directory for the socket and the lock; created (0700) when needed."""
    environ = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and _private_dir(Path(xdg), uid):
        return Path(xdg)
    fallback = Path("/tmp") / f"tray-proxy-{uid}"
    try:
        fallback.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"Cannot create {fallback}: {exc.strerror}.") from None
    if not _private_dir(fallback, uid):
        raise ControlError(
            f"{fallback} is not a private directory of yours (it must be owned by you, mode "
            "0700, not a symlink). Remove it, or set XDG_RUNTIME_DIR, and start again."
        )
    return fallback


def _private_dir(path: Path, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_IMODE(st.st_mode) & 0o077 == 0


def socket_path(environ: Mapping[str, str] | None = None) -> Path:
    return runtime_dir(environ) / SOCKET_NAME


# --------------------------------------------------------------------------- client


def send_command(
    command: str, path: Path | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Send one command to the running instance and return its answer (a dict with "ok").

    Raises NotRunningError when no instance listens, ControlError on any other failure.
    """
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    path = path or socket_path()
    timeout = timeout if timeout is not None else COMMAND_TIMEOUTS.get(command, DEFAULT_TIMEOUT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunningError("tray-proxy is not running.") from None
        except OSError as exc:
            raise ControlError(f"Cannot reach tray-proxy at {path}: {exc.strerror}.") from None
        try:
            request = {"v": PROTOCOL_VERSION, "cmd": command}
            sock.sendall(json.dumps(request).encode() + b"\n")
            raw = _read_line(sock)
        except TimeoutError:
            raise ControlError(
                f"tray-proxy did not answer {command!r} within {timeout:.0f} s."
            ) from None
        except OSError as exc:
            raise ControlError(f"The connection to tray-proxy failed: {exc.strerror}.") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError("tray-proxy answered with something unreadable.")
    return answer


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ControlError("tray-proxy closed the connection without an answer.")
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_LINE:
            raise ControlError("tray-proxy's answer is too long.")


# --------------------------------------------------------------------------- server


class InstanceLock:
    """The exclusive per-user lock that makes this process "the" running instance."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "tray-proxy.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True when we are the first instance; False when another one holds the lock."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class ControlServer:
    """Serves the control socket on the app's loop; `handler(cmd)` produces each answer."""

    def __init__(self, handler: Handler, directory: Path | None = None) -> None:
        self._handler = handler
        self.directory = directory or runtime_dir()
        self.path = self.directory / SOCKET_NAME
        self._lock = InstanceLock(self.directory)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    def claim(self) -> bool:
        """Take the single-instance lock; False when another instance runs."""
        return self._lock.acquire()

    async def start(self) -> None:
        """Listen (call after `claim()` returned True)."""
        # We hold the lock, so a socket file left here is from a crashed instance.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # On Linux the mode of a socket's inode becomes the mode of the file bind()
            # creates, so it is 0600 from the start (no window, no process-wide umask).
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(8)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            raise
        log.info("control socket at %s", self.path)

    def release(self) -> None:
        """Give up the single-instance lock (idempotent; close() does it too)."""
        self._lock.release()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._lock.release()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if not _same_user(writer):
                return
            try:
                raw = await asyncio.wait_for(reader.readline(), DEFAULT_TIMEOUT)
            except (ValueError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                raw = b""
            answer = await self._answer(raw)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: send one JSON object per line"}
        if request.get("v") != PROTOCOL_VERSION:
            return {
                "ok": False,
                "error": f"protocol version {request.get('v')!r} is not supported; "
                "use the tray-proxy command of the same version as the running app",
            }
        command = request.get("cmd")
        if command not in COMMANDS:
            return {"ok": False, "error": f"unknown command; known: {', '.join(sorted(COMMANDS))}"}
        try:
            answer = await self._handler(command)
        except Exception as exc:
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"{command} failed: {exc}"}
        return {"ok": True, **answer}


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        log.warning("control socket: refused a connection from uid %d", uid)
        return False
    return True
