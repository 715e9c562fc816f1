"""Single instance and the local control socket of the running app.

One `tray-proxy` runs per user: the tray app or a headless `tray-proxy run`, which answer
alike (tray_proxy.controller.commands). The first one takes an exclusive `flock` on a lock
file and listens on a Unix socket next to it; a second one finds the lock taken and talks to
the socket instead (`raise` brings the first one's window up; the CLI sends `status`,
`enable`, `disable`, `quit`).

Where: `$XDG_RUNTIME_DIR/tray-proxy.sock` when that directory is the user's own (mode 0700, no
symlink). Without it (WSL without systemd, a plain `su`), in a 0700 directory under the user's
home: `$XDG_STATE_HOME/tray-proxy/control-<host>/` (default `~/.local/state/...`). Not /tmp:
another user could pre-create `/tmp/tray-proxy-<uid>` and so block the app for good (issue 16,
item 6); in the user's home no one else can create anything. Not an abstract socket name
either: anyone can bind a name first (the same block), and names are per network namespace.
The host name keeps two machines sharing an NFS home from taking each other's lock.
The socket itself is 0600, and both sides check the other's uid (SO_PEERCRED): the server
answers only its own user, and the client talks only to a server of its own user.

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
import pwd
import re
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final

from tray_proxy.errors import UserError
from tray_proxy.tasks import spawn

log = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
# A command is one of these words, optionally followed by " ARGUMENT" (`credentials-changed
# NAME`: the name of an upstream whose password changed; never a secret).
COMMANDS: Final = frozenset(
    {"status", "enable", "disable", "quit", "raise", "credentials-changed", "reload"}
)
MAX_LINE: Final = 64 * 1024
SOCKET_NAME: Final = "tray-proxy.sock"
# enable may wait for the user to type a password into the polkit dialog.
COMMAND_TIMEOUTS: Final[Mapping[str, float]] = {
    "enable": 180.0,
    "disable": 60.0,
    "credentials-changed": 40.0,
    # reads the settings file and may apply the redirect again (one helper round trip)
    "reload": 40.0,
}


MAX_COMMAND_CHARS: Final = 256


def command_word(command: object) -> str | None:
    """The command's first word when it is a string, else None."""
    return command.partition(" ")[0] if isinstance(command, str) else None


DEFAULT_TIMEOUT: Final = 10.0
ACCEPT_BATCH: Final = 8  # connections the server takes per readiness of its socket
LISTEN_BACKLOG: Final = 64  # connections waiting to be taken while the app's loop is busy
# sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH: Final = 107

Handler = Callable[[str], Awaitable[dict[str, Any]]]
# The answer to a command that needs no waiting (`status`), or None: the handler answers it.
Immediate = Callable[[str], dict[str, Any] | None]


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
    fallback = home_control_dir(environ, uid)
    try:
        fallback.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(
            f"Cannot create {fallback} for tray-proxy's control socket: {exc.strerror}. "
            "Set XDG_RUNTIME_DIR to a directory of yours with mode 0700 and start again."
        ) from None
    if not _private_dir(fallback, uid):
        raise ControlError(
            f"{fallback} is not a private directory of yours (it must be owned by you, mode "
            "0700, not a symlink). Remove it, or set XDG_RUNTIME_DIR, and start again."
        )
    if len(os.fsencode(fallback / SOCKET_NAME)) > _MAX_SOCKET_PATH:
        raise ControlError(
            f"{fallback} is too long a path for a Unix socket ({_MAX_SOCKET_PATH} bytes at "
            "most). Set XDG_RUNTIME_DIR to a shorter directory of yours with mode 0700."
        )
    return fallback


def home_control_dir(environ: Mapping[str, str], uid: int) -> Path:
    """Where the socket and the lock go without a usable XDG_RUNTIME_DIR (not created here)."""
    state = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):
        base = Path(state)
    else:
        home = environ.get("HOME", "")
        if not os.path.isabs(home):
            try:
                home = pwd.getpwuid(uid).pw_dir
            except KeyError:
                home = ""
        if not os.path.isabs(home):
            raise ControlError(
                "No home directory is known for tray-proxy's control socket (HOME is not set). "
                "Set HOME, or XDG_RUNTIME_DIR to a directory of yours with mode 0700."
            )
        base = Path(home) / ".local" / "state"
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"
    return base / "tray-proxy" / f"control-{host}"


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
    word = command_word(command)
    if word not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    path = path or socket_path()
    timeout = timeout if timeout is not None else COMMAND_TIMEOUTS.get(word, DEFAULT_TIMEOUT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunningError("tray-proxy is not running.") from None
        except BlockingIOError:
            raise ControlError(
                f"tray-proxy did not take the connection within {timeout:.0f} s (it is busy "
                f"or hanging); {path} is there."
            ) from None
        except OSError as exc:
            raise ControlError(f"Cannot reach tray-proxy at {path}: {exc.strerror}.") from None
        # A socket of another user must not get our commands nor feed us answers.
        owner = _peer_uid(sock)
        if owner != os.getuid():
            who = "an unknown user" if owner is None else f"another user (uid {owner})"
            raise ControlError(
                f"{path} is served by {who}, not by your tray-proxy; nothing was sent. "
                "Remove that socket (or ask an administrator to) and start tray-proxy again."
            )
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


def _connect(sock: socket.socket, path: Path, timeout: float) -> None:
    """Connect within `timeout` seconds. A Unix socket whose queue of connections not yet
    taken is full refuses a socket with a timeout at once (EAGAIN) instead of waiting, as
    it would for a blocking one: try again until the time is up."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


class _Line:
    """One line gathered from the chunks a socket gives: `add` returns it (without its
    newline) once it is whole; `size` counts what came before the newline."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> bytes | None:
        newline = chunk.find(b"\n")
        if newline >= 0:
            self._chunks.append(chunk[:newline])
            return b"".join(self._chunks)
        self._chunks.append(chunk)
        self.size += len(chunk)
        return None


def _read_line(sock: socket.socket) -> bytes:
    line = _Line()
    while line.size <= MAX_LINE:
        chunk = sock.recv(4096)
        if not chunk:
            raise ControlError("tray-proxy closed the connection without an answer.")
        whole = line.add(chunk)
        if whole is not None:
            return whole
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
    """Serves the control socket on the app's loop; `handler(cmd)` produces each answer,
    `immediate(cmd)` (optional) the ones it can give without waiting."""

    def __init__(
        self,
        handler: Handler,
        directory: Path | None = None,
        *,
        immediate: Immediate | None = None,
    ) -> None:
        self._handler = handler
        self._immediate = immediate
        self.directory = directory or runtime_dir()
        self.path = self.directory / SOCKET_NAME
        self._lock = InstanceLock(self.directory)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: set[asyncio.Task[None]] = set()

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
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            # Plain socket calls on the loop, not asyncio's streams: under the app's qasync
            # loop every callback and every readiness is a pass of Qt's event loop, each of
            # which may wait behind a table update. Streams took about ten passes for one
            # request; this takes two (the readiness, then the accept that answers) when the
            # request came with the connection and `immediate` answers it, one more when
            # the handler does.
            loop = asyncio.get_running_loop()
            loop.add_reader(sock.fileno(), self._accept)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        log.info("control socket at %s", self.path)

    def release(self) -> None:
        """Give up the single-instance lock (idempotent; close() does it too)."""
        self._lock.release()

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._lock.release()

    def _accept(self) -> None:
        """The listening socket is readable: take the connections waiting (a bounded few;
        the rest make it readable again). Each is answered at once when it can be
        (`_answer_now`), otherwise by a task of its own."""
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client sees its connection end
                log.warning("control socket: cannot accept a connection: %s", exc)
                return
            conn.setblocking(False)
            if not _same_user(conn):
                conn.close()
                continue
            if not self._answer_now(conn):
                self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            try:
                try:
                    async with asyncio.timeout(DEFAULT_TIMEOUT):
                        raw = await _receive_line(loop, conn)
                except TimeoutError:
                    raw = b""
                answer = await self._answer(raw)
                await loop.sock_sendall(conn, json.dumps(answer).encode() + b"\n")
            except (ConnectionError, asyncio.CancelledError):
                pass

    def _request(self, raw: bytes) -> str | dict[str, Any]:
        """The command a request line asks for, or the answer refusing it."""
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
        if (
            not isinstance(command, str)
            or command_word(command) not in COMMANDS
            or len(command) > MAX_COMMAND_CHARS
        ):
            return {"ok": False, "error": f"unknown command; known: {', '.join(sorted(COMMANDS))}"}
        return command

    async def _answer(self, raw: bytes) -> dict[str, Any]:
        command = self._request(raw)
        if not isinstance(command, str):
            return command
        try:
            answer = await self._handler(command)
        except Exception as exc:
            return _failed(command, exc)
        return {"ok": True, **answer}

    def _answer_now(self, conn: socket.socket) -> bool:
        """Answer in this pass of the loop when the whole request came with the connection
        (the CLI sends it at once) and `immediate` answers it without waiting (`status`),
        or it is refused. True when answered; otherwise nothing was read from `conn`."""
        try:
            peeked = conn.recv(4096, socket.MSG_PEEK)  # a CLI request is a few dozen bytes
        except OSError:  # nothing yet (EAGAIN), or the client is gone: the task sees to it
            return False
        line, newline, _rest = peeked.partition(b"\n")
        if not newline:
            return False
        command = self._request(line)
        if isinstance(command, str):
            try:
                answer = self._immediate(command) if self._immediate is not None else None
            except Exception as exc:
                answer = _failed(command, exc)
            else:
                if answer is None:
                    return False  # it needs the handler, which may wait
                answer = {"ok": True, **answer}
        else:
            answer = command
        data = json.dumps(answer).encode() + b"\n"
        try:
            conn.recv(len(line) + 1)  # the request, now answered
            sent = conn.send(data)
        except OSError:
            conn.close()  # the client left; it asked and went
            return True
        if sent == len(data):
            conn.close()
        else:  # a full socket buffer: the rest from a task
            self._spawn(self._send_rest(conn, data[sent:]))
        return True

    async def _send_rest(self, conn: socket.socket, data: bytes) -> None:
        with conn, contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await asyncio.get_running_loop().sock_sendall(conn, data)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = spawn(coro, name="control-socket client", loop=self._loop)
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)


def _failed(command: str, exc: Exception) -> dict[str, Any]:
    """The answer to a command whose handler raised (logged with its traceback)."""
    log.exception("control command %s failed", command)
    return {"ok": False, "error": f"{command} failed: {exc}"}


async def _receive_line(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """One request line without its newline; b"" when the client sent no whole line of at
    most MAX_LINE bytes (the answer is then "bad request")."""
    line = _Line()
    while line.size <= MAX_LINE:
        chunk = await loop.sock_recv(conn, 4096)  # tries at once, waits only when nothing came
        if not chunk:
            return b""
        whole = line.add(chunk)
        if whole is not None:
            return whole
    return b""


def _same_user(sock: socket.socket) -> bool:
    uid = _peer_uid(sock)
    if uid != os.getuid():
        log.warning("control socket: refused a connection from uid %s", uid)
        return False
    return True


def _peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end (as of its connect() or listen())."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
