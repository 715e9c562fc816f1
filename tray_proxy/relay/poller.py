"""One epoll set for the sockets of every tunnel, which the event loop watches as one fd.

Must not import PySide6.

`loop.add_reader` costs differ a lot between the loops the engine runs on: uvloop (libuv)
makes a poll handle per descriptor, probes each new one with an epoll ADD + DEL and a
FIONBIO, and closes it asynchronously; qasync makes a QSocketNotifier per descriptor. A
relay registers and drops a few descriptors per connection, so that cost lands on every
connection. Here a registration is one epoll_ctl and a dict entry, the same on every loop.

It also gives the engine the kernel's events as they are: libuv drops a poll handle whose
descriptor reports EPOLLERR after its reader took the data before it, so a reset queued
behind data went unnoticed (tests/relay/test_pipe.py). Here an error or hang-up wakes both
the reader and the writer, as asyncio's selector loop does, and they see it on their next
call.

Two kinds of registration. `add_reader` / `add_writer` are level-triggered, like
`loop.add_reader`: a callback runs on every dispatch while its condition holds. `watch` is
edge-triggered for both directions at once (EPOLLET): the callback gets the event mask when
the socket becomes readable or writable again, and the caller keeps track of what it may do
until the kernel answers EAGAIN. A tunnel registers each socket once that way and never
touches the registration again until it closes, however often backpressure comes and goes.
A descriptor must be removed before it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from collections.abc import Callable

_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
# What `watch` asks for by default; `watch_events` changes it (errors and hang-ups are
# always reported).
READ_EDGES = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
WRITE_EDGES = select.EPOLLOUT | select.EPOLLET
WATCH_MASK = READ_EDGES | WRITE_EDGES
_BATCH = 512  # events taken per dispatch; more wait for the next one (level-triggered)

log = logging.getLogger(__name__)


class Poller:
    """add_reader / add_writer for the tunnels' sockets, on a private epoll set."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        self._watchers: dict[int, Callable[[int], object]] = {}
        self._masks: dict[int, int] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def __len__(self) -> int:
        """Descriptors registered."""
        return len(self._masks)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def switch_to_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """`callback` reads `fd` and nothing writes to it any more: one epoll_ctl at most."""
        self._writers.pop(fd, None)
        self._readers[fd] = callback
        self._update(fd)

    def forget(self, fd: int) -> None:
        """Drop every registration of `fd` without telling the kernel: only right before
        the descriptor is closed, which removes it from the epoll set anyway (one syscall
        less per socket)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._watchers.pop(fd, None)
        self._masks.pop(fd, None)

    def watch(self, fd: int, callback: Callable[[int], object], events: int = WATCH_MASK) -> None:
        """Edge-triggered `events` of `fd` (EPOLLET and what else; errors and hang-ups
        always) go to `callback(events)`; any level-triggered reader or writer of `fd` is
        dropped."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._watchers[fd] = callback
        self._apply(fd, events, self._masks.get(fd, 0))

    def watch_events(self, fd: int, events: int) -> None:
        """Change what a watched `fd` reports. Asking again reports what is ready now."""
        if fd in self._watchers and events != self._masks.get(fd, 0):
            self._apply(fd, events, self._masks.get(fd, 0))

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._readers.clear()
        self._writers.clear()
        self._watchers.clear()
        self._masks.clear()

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0
        )
        old = self._masks.get(fd, 0)
        if mask != old:
            self._apply(fd, mask, old)

    def _apply(self, fd: int, mask: int, old: int) -> None:
        epoll = self._epoll
        if not mask:
            self._masks.pop(fd, None)
            # Gone already if it was closed before being removed (no other reference).
            with contextlib.suppress(FileNotFoundError, OSError):
                epoll.unregister(fd)
            return
        try:
            if old:
                epoll.modify(fd, mask)
            else:
                epoll.register(fd, mask)
        except FileExistsError:
            # Registered under this number before and closed without being removed while
            # another reference kept it in the set: take the entry over.
            epoll.modify(fd, mask)
        except FileNotFoundError:
            # We thought it registered; the kernel dropped it (closed, number reused).
            epoll.register(fd, mask)
        self._masks[fd] = mask

    def _dispatch(self) -> None:
        readers = self._readers
        writers = self._writers
        watchers = self._watchers
        for fd, events in self._epoll.poll(0, _BATCH):
            try:
                watcher = watchers.get(fd)
                if watcher is not None:
                    watcher(events)
                    continue
                if events & _READ:
                    callback = readers.get(fd)
                    if callback is not None:
                        callback()
                if events & _WRITE:
                    # Looked up after the reader ran: it may have removed or replaced it.
                    callback = writers.get(fd)
                    if callback is not None:
                        callback()
            except Exception:  # one connection's bug must not stall the others' events
                log.exception("relay: a socket callback failed (fd %d)", fd)
