"""Moving bytes between the client and the upstream once the tunnel is open.

Must not import PySide6.

Bytes never enter Python: each direction uses `os.splice` socket -> pipe -> socket. Pipes
come from a small shared pool and a direction holds one only while bytes are in flight, so
an idle tunnel costs two sockets and a few small objects (shared/BENCHMARKS.md lesson 4).
Readiness comes from the engine's Poller (relay/poller.py): one epoll set that the loop
watches as a single descriptor, the same on plain asyncio, uvloop and qasync.
Backpressure: a direction stops reading its source while its pipe still holds bytes the
destination has not taken. Half-close: EOF on one side becomes
`shutdown(SHUT_WR)` on the other once everything before it was delivered, while the
other direction keeps flowing.

Read batching (`ReadBatching`): a direction whose source outruns the loop (a splice brings
in `BATCH_START` bytes or more) gets SO_RCVLOWAT raised, so the kernel wakes the relay once
per batch instead of once per few segments. Each wakeup costs a loop iteration, two splices
and a window-update ACK, so fewer, larger ones cut the relay's CPU per GiB by about a third
(bench/). A tick every `BATCH_TICK` seconds, armed only while some direction batches, sizes
the batch to what arrived in the last tick; a direction that moved nothing for a tick drops
to the lowest mark, and after another one stops batching: the bytes of a burst's tail that
wait below the mark are released within three ticks (6 ms). Small exchanges never batch.
A batching direction whose destination is full waits for room on the same tick rather than
on EPOLLOUT: a socket reports room once a third of its buffer is free, which would wake the
loop for each third, while the two thirds still queued keep it sending until the tick
(about a fifth less relay CPU per GiB uploaded, and no loss of throughput, in bench/).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import select
import socket
import struct
import time
from collections.abc import Callable

from tray_proxy.relay.poller import READ_EDGES, WRITE_EDGES, Poller
from tray_proxy.relay.records import CloseReason, ConnectionRecord

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20  # bytes per splice; bounded by /proc/sys/fs/pipe-max-size
PIPE_RETRY = 0.1  # seconds a direction waits when no pipe can be made
BATCH_TICK = 0.002  # seconds between batch resizes; a burst's tail waits three at most
BATCH_START = 64 * 1024  # a splice this large starts batching, with this mark
BATCH_MAX = 2 << 20  # the highest mark; a wakeup then drains it in a few splices
DRAIN_BUDGET = 4 << 20  # bytes one readiness callback moves at most
# A destination whose send buffer has grown this large still holds enough when it reports
# room (two thirds of it) to keep sending through a batching tick: a batching direction then
# waits for room on the tick. A smaller one (a young connection) is waited for on EPOLLOUT.
DEEP_SNDBUF = 3 << 20


class PipePool:
    """Kernel pipes lent to directions while they have bytes in flight."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = 32) -> None:
        # Empty pipes ready to lend. _Direction.pump pops from it itself (a call less per
        # wakeup of every tunnel); take() makes a new pipe when it is empty.
        self.free: list[tuple[int, int, int]] = []
        self._size = size
        self._keep = keep
        self.created = 0

    def take(self) -> tuple[int, int, int]:
        """(read fd, write fd, capacity in bytes)."""
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        capacity = 65536
        with contextlib.suppress(OSError):  # over pipe-max-size or the user's pipe quota
            capacity = fcntl.fcntl(w, _F_SETPIPE_SZ, self._size)
        self.created += 1
        return r, w, capacity

    def give_back(self, pipe: tuple[int, int, int]) -> None:
        """Return an EMPTY pipe. A pipe that may still hold bytes must be closed instead."""
        if len(self.free) < self._keep:
            self.free.append(pipe)
        else:
            close_pipe(pipe)

    def close(self) -> None:
        while self.free:
            close_pipe(self.free.pop())


def close_pipe(pipe: tuple[int, int, int]) -> None:
    for fd in pipe[:2]:
        with contextlib.suppress(OSError):
            os.close(fd)


class ReadBatching:
    """The SO_RCVLOWAT marks of the directions that batch, resized on one shared tick, which
    also retries the batching directions that wait for room (wait_room)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = BATCH_TICK) -> None:
        self._loop = loop
        self._tick_seconds = tick
        self._batching: set[_Direction] = set()
        self._room: set[_Direction] = set()  # batching directions whose destination is full
        self.room_waits = 0  # times a batching direction waited for room on the tick
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._batching)

    def start(self, direction: _Direction) -> None:
        if not self._batching:
            self._timer = self._loop.call_later(self._tick_seconds, self._tick)
        self._batching.add(direction)
        direction.set_lowat(BATCH_MAX)

    def wait_room(self, direction: _Direction) -> None:
        """`direction` (batching) found its destination full: try again on the next tick
        rather than on each EPOLLOUT. The destination still holds most of what was written
        (a socket reports room once a third of its buffer is free), so it keeps sending
        meanwhile, and the next write finds room for a whole batch."""
        self._room.add(direction)
        self.room_waits += 1

    def forget(self, direction: _Direction) -> None:
        """The direction ended: no mark to reset, only the reference to drop."""
        self._batching.discard(direction)
        self._room.discard(direction)
        if not self._batching and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        if self._room:
            room, self._room = self._room, set()
            for direction in room:
                if direction.tunnel.closed or direction.waiting:
                    continue
                pending = direction.pending
                direction.can_write = True
                direction.pump()
                if direction in self._room and direction.pending == pending:
                    # Not a byte went: the reader stalled (a paused download, say). Wait for
                    # its room on EPOLLOUT rather than asking every tick until it resumes.
                    self._room.discard(direction)
                    direction.watch_room()
        for direction in list(self._batching):
            moved, direction.moved = direction.moved, 0
            if moved:
                # About one wakeup per tick at the rate of the last tick.
                mark = min(BATCH_MAX, max(BATCH_START, 1 << (moved.bit_length() - 1)))
                if mark != direction.lowat:
                    direction.set_lowat(mark)
            elif not direction.pending:
                # Nothing came in a whole tick, and we were not waiting on the destination:
                # the rate fell, or a burst ended with its tail below the mark. Drop to the
                # lowest mark (the kernel signals readable at once if the tail is above it);
                # after another idle tick stop batching, which releases any tail.
                if direction.lowat > BATCH_START:
                    direction.set_lowat(BATCH_START)
                else:
                    direction.set_lowat(1)
                    self._batching.discard(direction)
        if self._batching:
            self._timer = self._loop.call_later(self._tick_seconds, self._tick)


class _Direction:
    """One way of a tunnel: src socket -> pipe -> dst socket.

    The tunnel's sockets are watched edge-triggered (Poller.watch): `can_read` and
    `can_write` say what the last events allowed, until a splice answers EAGAIN.
    """

    __slots__ = (
        "tunnel",
        "src",
        "dst",
        "pipe",
        "pending",
        "eof",
        "finished",
        "upstream_bound",
        "lowat",
        "moved",
        "can_read",
        "can_write",
        "waiting",
        "muted",
        "room_watched",
        "deep",
    )

    def __init__(self, tunnel: Tunnel, src: int, dst: int, upstream_bound: bool) -> None:
        self.tunnel = tunnel
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int, int] | None = None
        self.pending = 0  # bytes in the pipe not yet delivered to dst
        self.eof = False
        self.finished = False  # EOF seen and everything delivered, dst shut for writing
        self.upstream_bound = upstream_bound  # True: client -> upstream
        self.lowat = 1  # SO_RCVLOWAT of src (1 unless batching)
        self.moved = 0  # bytes read from src since the last batching tick
        # Until a splice says EAGAIN, assume there may be something to read and room to
        # write: bytes may have queued before the sockets were watched.
        self.can_read = True
        self.can_write = True
        self.waiting = False  # a pump is scheduled (budget spent, or no pipe to be had)
        # src's readability is not reported while its bytes have nowhere to go: each arrival
        # would otherwise wake the loop for nothing.
        self.muted = False
        # dst's room to write is watched only once a splice into it met EAGAIN: most
        # connections never fill a socket, and a socket with room reports it at once, which
        # would wake the loop for nothing when the tunnel starts.
        self.room_watched = False
        self.deep = False  # dst's send buffer reached DEEP_SNDBUF (see _deep)

    def pump(self) -> None:
        """Move what can be moved now: flush the pipe, read, repeat.

        Reads go on until EAGAIN, EOF or an error, not once per wakeup: one wakeup serves
        what came meanwhile, and an error (RST) queued behind the data is seen at once.
        `budget` keeps one busy direction from starving the loop; past it the direction
        carries on in a callback of its own (no new edge would come for bytes already
        there).

        This runs once per wakeup of a busy tunnel, right after the kernel moved a few MiB
        through the CPU's caches: it keeps its state in locals and asks the poller for a
        new event mask only when the mute state differs at the end from the start (a
        destination that fills up again within the same wakeup, the usual case of a fast
        sender and a slower receiver, costs no epoll_ctl).
        """
        tunnel = self.tunnel
        self.waiting = False
        was_muted = self.muted
        splice = os.splice
        src, dst = self.src, self.dst
        budget = DRAIN_BUDGET
        moved = 0
        while True:
            pending = self.pending
            if pending:
                # Flush the pipe first: a read waits for the destination to take it all.
                if self.can_write:
                    pipe = self.pipe
                    assert pipe is not None
                    while pending:
                        try:
                            m = splice(pipe[0], dst, pending, flags=_SPLICE_FLAGS)
                        except BlockingIOError:
                            self.can_write = False  # see _wait_for_room
                            break
                        except OSError as exc:
                            tunnel.fail(self.upstream_bound, exc)
                            return
                        pending -= m
                        self.pending = pending
                if pending:
                    # The destination is full: reading waits for its room.
                    self.muted = True
                    self._wait_for_room()
                    break
            self.muted = False
            if self.eof:
                self._finish()  # a tunnel it closes takes the empty pipe back (stop)
                break
            if not self.can_read:
                break
            if budget <= 0:
                self._later(0.0)
                break
            pipe = self.pipe
            if pipe is None:
                free = tunnel.pool.free
                if free:
                    pipe = self.pipe = free.pop()
                else:
                    try:
                        pipe = self.pipe = tunnel.pool.take()
                    except OSError:
                        # No descriptor for a pipe (EMFILE/ENFILE): try again shortly, as
                        # the listener does, instead of failing.
                        self._later(PIPE_RETRY)
                        break
            try:
                n = splice(src, pipe[1], pipe[2], flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self.can_read = False
                continue
            except OSError as exc:
                tunnel.fail(not self.upstream_bound, exc)
                return
            if n == 0:
                self.eof = True
                continue
            self.pending = n
            moved += n
            budget -= n
            # Counted as it comes: the record is read when the tunnel closes, which may
            # happen further down this very loop.
            if self.upstream_bound:
                tunnel.record.bytes_up += n
            else:
                tunnel.record.bytes_down += n
            if n >= BATCH_START and self.lowat == 1 and tunnel.batching is not None:
                tunnel.batching.start(self)
        # An empty pipe goes back to the pool between wakeups: an idle tunnel holds none.
        pipe = self.pipe
        if pipe is not None and not self.pending:
            self.pipe = None
            tunnel.pool.give_back(pipe)
        if moved:
            self.moved += moved
            tunnel.last_active = time.monotonic()
        if self.muted != was_muted and not tunnel.closed:
            tunnel.update_events(src)

    def _wait_for_room(self) -> None:
        """The destination is full: a batching direction whose destination is deep asks
        again on the batching tick (see ReadBatching.wait_room), any other on EPOLLOUT."""
        batching = self.tunnel.batching
        if self.lowat != 1 and batching is not None and self._deep():
            batching.wait_room(self)
            if self.room_watched:
                self.room_watched = False
                self.tunnel.update_events(self.dst)
        else:
            self.watch_room()

    def watch_room(self) -> None:
        """Wait for the destination's room on EPOLLOUT."""
        if not self.room_watched:
            self.room_watched = True
            self.tunnel.update_events(self.dst)

    def _deep(self) -> bool:
        if not self.deep:
            # Autotuning only grows a send buffer (short of memory pressure): once deep,
            # it stays deep enough, and the question is not asked again.
            with contextlib.suppress(OSError):
                size = self.tunnel.socks[self.dst].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                self.deep = size >= DEEP_SNDBUF
        return self.deep

    def _later(self, delay: float) -> None:
        if not self.waiting:
            self.waiting = True
            self.tunnel.loop.call_later(delay, self.pump)

    def set_lowat(self, mark: int) -> None:
        self.lowat = mark
        # Fails only on a socket that is going away; its direction ends with it.
        with contextlib.suppress(OSError):
            self.tunnel.socks[self.src].setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        tunnel = self.tunnel
        other = tunnel.down if self.upstream_bound else tunnel.up
        if other.finished:
            # The last direction: closing both sockets next sends this FIN too (and
            # both were read to their end, so close() sends no RST).
            tunnel.direction_finished()
            return
        try:
            tunnel.socks[self.dst].shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                tunnel.fail(self.upstream_bound, exc)
                return
        tunnel.direction_finished()

    def stop(self) -> None:
        tunnel = self.tunnel
        if self.lowat != 1 and tunnel.batching is not None:
            tunnel.batching.forget(self)
        if self.pipe is not None:
            if self.pending:
                close_pipe(self.pipe)  # still holds bytes: never lend it out again
            else:
                tunnel.pool.give_back(self.pipe)
            self.pipe = None


# socket.socket.close without its two Python-level steps (it only marks the object closed
# for makefile(), which the relay never uses): two calls less per socket of every tunnel.
_close = _socket.socket.close
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class Tunnel:
    """Both directions between a client socket and an upstream socket.

    `on_close(record, reason, detail)` is called exactly once, after both sockets are
    closed.
    The byte counters of `record` are kept current as chunks move.
    """

    __slots__ = (
        "loop",
        "pool",
        "poller",
        "client",
        "upstream",
        "socks",
        "up",
        "down",
        "closed",
        "last_active",
        "record",
        "batching",
        "_on_close",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: PipePool,
        poller: Poller,
        client: socket.socket,
        upstream: socket.socket,
        record: ConnectionRecord,
        on_close: Callable[[ConnectionRecord, CloseReason, str], None],
        batching: ReadBatching | None = None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.poller = poller
        self.client = client
        self.upstream = upstream
        self.socks = {client.fileno(): client, upstream.fileno(): upstream}
        self.up = _Direction(self, client.fileno(), upstream.fileno(), upstream_bound=True)
        self.down = _Direction(self, upstream.fileno(), client.fileno(), upstream_bound=False)
        self.closed = False
        self.last_active = time.monotonic()
        self.record = record
        self.batching = batching
        self._on_close = on_close

    def start(self) -> None:
        # Once per socket for the tunnel's whole life: backpressure never re-registers.
        # Registering reports what is ready already (bytes that queued meanwhile, room to
        # write), so the first events start both directions.
        # partial: the poller calls _on_event without a Python frame in between.
        up, down = self.up, self.down
        self.poller.watch(up.src, functools.partial(self._on_event, up, down), READ_EDGES)
        self.poller.watch(down.src, functools.partial(self._on_event, down, up), READ_EDGES)

    def update_events(self, fd: int) -> None:
        """Ask the poller for what the directions on `fd` need: readability unless the
        reading one is muted, room once the writing one has met a full socket."""
        reading, writing = (self.up, self.down) if fd == self.up.src else (self.down, self.up)
        events = 0 if reading.muted else READ_EDGES
        if writing.room_watched:
            events |= WRITE_EDGES
        self.poller.watch_events(fd, events or select.EPOLLET)

    def _on_event(self, reading: _Direction, writing: _Direction, events: int) -> None:
        """`reading` reads from the socket the events are about; `writing` writes to it."""
        if events & _READABLE:
            reading.can_read = True
            if not reading.finished and not reading.waiting:
                reading.pump()
        if events & _WRITABLE and not self.closed:
            writing.can_write = True
            if writing.pending and not writing.waiting:
                writing.pump()

    def direction_finished(self) -> None:
        if self.up.finished and self.down.finished:
            self.close(CloseReason.DONE, "")

    def fail(self, upstream_side: bool, exc: OSError) -> None:
        """An error on one side: reset the other so its peer sees a failure, not a clean end."""
        words = os.strerror(exc.errno) if exc.errno else str(exc)
        if upstream_side:
            self.close(CloseReason.UPSTREAM_RESET, f"upstream side: {words}", reset=True)
        else:
            self.close(CloseReason.CLIENT_RESET, f"client side: {words}", reset=True)

    def close(self, reason: CloseReason, detail: str, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        # Both sockets are closed below, which takes them out of the epoll set.
        self.poller.forget(self.up.src)
        self.poller.forget(self.down.src)
        self.up.stop()
        self.down.stop()
        # The directions point back here: dropping them lets reference counting free the
        # tunnel now rather than leaving a cycle for the garbage collector, whose passes
        # over a busy relay's young objects showed up in the latency of new connections.
        del self.up, self.down
        for sock in (self.client, self.upstream):
            if reset:
                abort(sock)
            else:
                _close(sock)
        self._on_close(self.record, reason, detail)


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), so the peer cannot mistake a failed transfer for a
    complete one."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
