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

Level-triggered, like `loop.add_reader`: a callback runs on every dispatch while its
condition holds. A descriptor must be removed before it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from collections.abc import Callable

_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_BATCH = 512  # events taken per dispatch; more wait for the next one (level-triggered)

log = logging.getLogger(__name__)


class Poller:
    """add_reader / add_writer for the tunnels' sockets, on a private epoll set."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
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

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._readers.clear()
        self._writers.clear()
        self._masks.clear()

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0
        )
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        epoll = self._epoll
        if not mask:
            del self._masks[fd]
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
        for fd, events in self._epoll.poll(0, _BATCH):
            try:
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
