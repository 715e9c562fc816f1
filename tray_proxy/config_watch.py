"""Notices the settings file changing on disk, for reload without a restart (issue 15 section 6).

Editors save in several ways, and each looks different to the kernel: tray-proxy's own writer
and most editors write a temp file and rename it over (IN_MOVED_TO), vim may rename the old
file away and create a new one (IN_CREATE, IN_CLOSE_WRITE), others truncate and write in
place (IN_CLOSE_WRITE), and a dotfile manager may point the symlink somewhere else. A watch on
the file itself dies with the first rename, so `ConfigWatcher` watches the *directories*
(the one holding the path, and the one holding the file the symlink points to) with inotify
through ctypes, and looks at the two names it cares about. Events are debounced (an editor's
save is several of them) and the content is hashed: `touch`, or a save without a change,
calls nothing. Where inotify is unavailable (no instances left, a sandbox) it polls the
file's metadata every `poll_interval` seconds instead.

A deleted file calls nothing: the app keeps the settings it has until a file is there again
(an editor deletes before it writes; the debounce usually hides that anyway).

Must not import PySide6, qasync or the relay engine.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

from tray_proxy.netwatch import Debounce

__all__ = ["ConfigWatcher"]

_log = logging.getLogger(__name__)

# linux/inotify.h
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_DIR_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
# The watched directory itself went away or moved: watch again where the path now leads.
_REWATCH = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_Q_OVERFLOW
_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 65536
_MAX_READS = 64  # per readiness callback: a busy directory cannot hold the loop
_MAX_FILE = 4 << 20  # bytes hashed at most: a settings file is a few KiB


class _Inotify:
    """The three libc calls, through ctypes (the stdlib has no inotify)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._init = libc.inotify_init1
        self._init.argtypes = [ctypes.c_int]
        self._init.restype = ctypes.c_int
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        fd = self._init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd

    def add_watch(self, directory: str) -> int:
        wd = self._add(self.fd, os.fsencode(directory), _DIR_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        return int(wd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_events(data: bytes) -> list[tuple[int, int, str]]:
    """(wd, mask, name) for each inotify event in `data`; a torn tail is ignored."""
    events: list[tuple[int, int, str]] = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        if start + length > len(data):
            break
        name = data[start : start + length].split(b"\0", 1)[0]
        events.append((wd, mask, os.fsdecode(name)))
        offset = start + length
    return events


def _digest(path: Path) -> bytes | None:
    """The content's hash, or None when there is no readable file."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read(_MAX_FILE)).digest()
    except OSError:
        return None


def _signature(path: Path) -> tuple[str, int, int, int, int] | None:
    """What a poll compares: where the path leads, and that file's identity, size, mtime."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigWatcher:
    """Calls `on_change()` on the loop when the settings file's content changes.

        watcher = ConfigWatcher(config_path, on_change)
        watcher.start(loop, content=bytes_the_app_loaded)
        ...
        save_config(config, config_path); watcher.acknowledge()   # the app's own save
        ...
        watcher.close()

    `debounce`: quiet time after the last event before the file is read (an editor's save
    is several events); `max_delay` caps it while events keep coming. `inotify=False` forces
    the metadata poll (as where inotify is unavailable). Use from the loop's thread.
    """

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], None],
        *,
        debounce: float = 0.2,
        max_delay: float = 2.0,
        poll_interval: float = 2.0,
        inotify: bool = True,
    ) -> None:
        self.path = Path(os.path.abspath(path))
        self._on_change = on_change
        self._debounce = debounce
        self._max_delay = max_delay
        self._poll_interval = poll_interval
        self._want_inotify = inotify
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: _Inotify | None = None
        self._watches: dict[int, str] = {}  # wd -> directory
        self._names: set[tuple[str, str]] = set()  # (directory, name) that matter
        self._stale = False  # a watched directory went away: watch again at the next check
        self._burst: Debounce | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._digest: bytes | None = None
        self._signature: tuple[str, int, int, int, int] | None = None
        self.mode = "stopped"  # "inotify" or "poll" once started
        self.checks = 0  # content reads (for tests and diagnostics)
        self.changes = 0  # on_change calls

    def start(
        self, loop: asyncio.AbstractEventLoop | None = None, content: bytes | None = None
    ) -> None:
        """Start watching. `content`: the bytes the caller loaded; when the file no longer
        holds them (it changed between load and start), on_change comes right away."""
        if self._loop is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._burst = Debounce(
            self._loop, self._settled, quiet=self._debounce, max_delay=self._max_delay
        )
        self._digest = _digest(self.path)
        self._signature = _signature(self.path)
        if self._want_inotify:
            try:
                self._inotify = _Inotify()
                self._watch()
                self._loop.add_reader(self._inotify.fd, self._readable)
                self.mode = "inotify"
            except OSError as exc:
                _log.info("settings watch: inotify unavailable (%s); polling instead", exc)
                self._drop_inotify()
        if self._inotify is None:
            self._start_polling()
        if content is not None and hashlib.sha256(content[:_MAX_FILE]).digest() != self._digest:
            self._digest = hashlib.sha256(content[:_MAX_FILE]).digest()
            self._schedule()

    def acknowledge(self) -> None:
        """The caller wrote the file itself (e.g. from the UI): its content is current, so
        the events of that write call nothing."""
        self._digest = _digest(self.path)
        self._signature = _signature(self.path)

    def close(self) -> None:
        """Stop watching; no callback comes after this. Idempotent."""
        if self._burst is not None:
            self._burst.cancel()
            self._burst = None
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        self._drop_inotify()
        self._loop = None
        self.mode = "stopped"

    # inotify -------------------------------------------------------------------------------

    def _drop_inotify(self) -> None:
        if self._inotify is None:
            return
        if self._loop is not None and not self._loop.is_closed() and self._inotify.fd >= 0:
            self._loop.remove_reader(self._inotify.fd)
        self._inotify.close()
        self._inotify = None
        self._watches.clear()

    def _targets(self) -> set[tuple[str, str]]:
        real = Path(os.path.realpath(self.path))
        return {(str(self.path.parent), self.path.name), (str(real.parent), real.name)}

    def _watch(self) -> None:
        """Watch the directories the path and its symlink target are in (again after a
        change). A directory that does not exist is an OSError: the caller polls."""
        assert self._inotify is not None
        targets = self._targets()
        directories = {directory for directory, _name in targets}
        if targets == self._names and set(self._watches.values()) == directories:
            return
        # inotify returns the same wd for a directory watched again, so re-adding is cheap;
        # watches on directories no longer needed only cost events we ignore by name.
        for directory in sorted(directories):
            self._watches[self._inotify.add_watch(directory)] = directory
        self._names = targets

    def _readable(self) -> None:
        assert self._inotify is not None and self._loop is not None
        relevant = False
        for _ in range(_MAX_READS):
            try:
                data = os.read(self._inotify.fd, _READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                _log.warning("settings watch: reading inotify events failed: %s", exc)
                break
            for wd, mask, name in parse_events(data):
                if mask & _REWATCH:
                    self._stale = True
                    relevant = True
                    if mask & IN_IGNORED:
                        self._watches.pop(wd, None)
                    continue
                directory = self._watches.get(wd)
                if directory is not None and (directory, name) in self._names:
                    relevant = True
        if relevant:
            self._schedule()

    # debounce and check --------------------------------------------------------------------

    def _schedule(self) -> None:
        assert self._burst is not None
        self._burst.note()

    def _settled(self) -> None:
        if self._stale or (self._inotify is not None and self._targets() != self._names):
            self._rewatch()
        self._check()

    def _rewatch(self) -> None:
        self._stale = False
        if self._inotify is None:
            return
        try:
            self._watch()
        except OSError as exc:
            # The directory is gone (config dir removed): poll until it is back.
            _log.info("settings watch: %s; polling instead", exc)
            self._drop_inotify()
            self._start_polling()

    def _check(self) -> None:
        self.checks += 1
        self._signature = _signature(self.path)
        digest = _digest(self.path)
        if digest is None or digest == self._digest:
            return
        self._digest = digest
        self.changes += 1
        self._on_change()

    # polling -------------------------------------------------------------------------------

    def _start_polling(self) -> None:
        assert self._loop is not None
        self.mode = "poll"
        self._poll_timer = self._loop.call_later(self._poll_interval, self._poll)

    def _poll(self) -> None:
        """One stat() per interval; a change is read after the debounce like an event (a
        file being written in place is then complete)."""
        assert self._loop is not None
        signature = _signature(self.path)
        if signature != self._signature:
            self._signature = signature
            self._schedule()
        self._poll_timer = self._loop.call_later(self._poll_interval, self._poll)
