"""Which program made a connection: the client socket's 4-tuple -> socket inode -> PID ->
name, executable and user, looked up off the engine's loop, one pass per burst of requests.

A redirected connection reaches the relay from the program's own socket, whose local address
is the relay's peer (`client`) and whose remote address is the original destination (before
the NAT). One pass answers every request that arrived meanwhile:

1. the kernel's socket table, asked for exactly those 4-tuples over netlink `sock_diag`
   (an exact lookup per tuple, all in one message: the cost follows the requests, not the
   thousands of TIME_WAIT lines /proc/net/tcp lists on a busy relay). A request without an
   original destination (a connection that was not redirected) reads /proc/net/tcp{,6}
   and matches the client address alone, only when exactly one socket has it;
2. the inodes' owners, from /proc/<pid>/fd, cheapest first, stopping as soon as every inode
   has its owner: a socket fd remembered from an earlier scan (believed only after one
   readlink shows that fd still holds it); the recently seen processes (their new and
   freed-socket fds first); then, once the kernel has been asked again which sockets are
   still held (a socket closed meanwhile has no owner to search for), every other
   process, newest first; the relay's own fd table last (its sockets are the far ends of
   redirected connections: read only for a connection it made itself). Processes of
   other users are skipped when their uid cannot own the socket;
3. the process's name, executable and user with psutil (kept while the pid runs the same
   image).

The child answers a quiet period's request at once, before a short-lived program has
closed its socket; busy, it keeps to a share of one core (a token bucket) and lets the
bursts grow instead.

Matching is on the full 4-tuple (IPv4-mapped IPv6 forms both ways); a lookup that would
need a guess answers less instead. What each outcome answers:

- found:                         ProcessInfo(pid, name, exe, user)
- the process ended between the steps:
                                 ProcessInfo(pid, name from /proc or "?", user, exited=True)
- the socket outlived its process (closed: FIN_WAIT2, TIME_WAIT; or held by no process):
                                 ProcessInfo(None, "?", user when the kernel still has the
                                 socket's uid, exited=True)
- the socket's owner not readable (another user's process):
                                 ProcessInfo(None, "?", user from the socket's uid)
- client address not of this host (container traffic through prerouting):
                                 ProcessInfo(None, "?", remote=True, container=name or None)
- no socket with that 4-tuple at all (closed and gone), or an ambiguous client address
  without a destination: None

The lookups run in a child process (`tray_proxy.monitor.attribution_worker`, at a lower
priority), so they never take the relay's GIL; it is started from the loop's thread and
reads sockets and the process table in that thread's network namespace.

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import itertools
import json
import logging
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from tray_proxy.monitor.rows import ProcessInfo
from tray_proxy.relay.records import Address

log = logging.getLogger(__name__)

Deliver = Callable[[list[tuple[int, ProcessInfo | None]]], None]
Any4 = tuple[Address, Address]  # (local, remote) of one TCP socket, IPv4 written plainly

# Requests waiting for a pass; beyond this, a request is answered None at once (a relay
# taking thousands of connections per burst would otherwise grow this without bound).
MAX_PENDING = 4096
# CPU seconds the worker may spend at once beyond its share (a quiet worker has them all:
# a costly pass, such as the first, reading every process's fd table, costs no rest). Each
# burst of connections after a quiet spell gets them, and a busy worker spends all it may:
# with 50 ms and a 3 % share it took 28-32 µs a connection over bursts like the bench's
# (1,000 connections in 0.3 s, then a quiet 2 s), its passes of two or three connections
# each; with 10 ms and 2 %, 22-24 µs, in fewer, longer passes.
_CPU_BURST = 0.01
# The longest rest between passes, whatever the last one cost.
_MAX_REST = 0.25
# close() waits this long for the child to end (a pass in progress finishes first).
JOIN_TIMEOUT = 2.0
# The child that runs the lookups: `python -I` and these arguments.
_WORKER = ["-m", "tray_proxy.monitor.attribution_worker"]
# A child that died or could not start is started again this often, after this backoff
# (doubled each time); requests meanwhile are answered None.
_MAX_RESTARTS = 3
_RESTART_BACKOFF = 1.0
# The pids that owned sockets lately, scanned first (a browser opens many connections).
_RECENT_PIDS = 64
# Socket fds remembered from fd-table scans (a readlink checks one before it is believed).
_KNOWN_SOCKETS = 16384
# Processes whose name, executable and user are kept (checked against /proc at each use).
_KNOWN_PROCESSES = 1024
# Per process, the fds where sought sockets were last found, read before its fd table.
_HITS_KEPT = 4
# How long this host's addresses and Docker's container addresses are trusted.
_LOCAL_ADDRESSES_TTL = 5.0
_DOCKER_TTL = 10.0
_DOCKER_TIMEOUT = 3.0

_TCP_LISTEN = 10
# Closed sockets the kernel keeps as full sockets (their uid is still theirs); a closed
# socket in any other state is a timewait sock (FIN_WAIT2, TIME_WAIT), listed with uid 0.
_TCP_ORPHAN_STATES = frozenset({4, 9, 11})  # FIN_WAIT1, LAST_ACK, CLOSING


class Attributor:
    """Finds the program behind connections, in batches, in a child process.

    The lookups run in `python -m tray_proxy.monitor.attribution_worker` (started with the
    Attributor, from the loop's thread: it inherits that thread's network namespace and
    the uid, which it needs to see the same sockets), so they never compete with the
    relay's loop for this process's GIL. This side only writes request lines to the
    child's stdin and reads its answers (one JSON line per pass) from its stdout, both
    non-blocking on the loop: no thread.

    `request()` only queues (cheap; meant for the loop thread, safe from any); `deliver` is
    called on the loop thread with every requested id answered exactly once (None:
    nothing found, or no child to ask: it could not start, or died; it is restarted at
    most _MAX_RESTARTS times, after a backoff). Ask as soon as the connection opens: a
    program that has closed its socket can no longer be named. `close()` stops the child;
    requests still unanswered then are not answered (the loop is going away).

    `answer_interval` > 0 (headless `tray-proxy run`, whose relay shares the loop): the
    answers are read every that many seconds while some are awaited, not as each pass
    writes them; each read woke the relay's loop once per pass, about once per connection
    at a quiet relay's pace (issue 13: the history may cost the relay 5 %).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Deliver,
        *,
        delay: float = 0.0005,
        cpu_share: float = 0.02,
        answer_interval: float = 0.0,
    ) -> None:
        """A burst gathers for at least `delay`; the child's CPU time stays near
        `cpu_share` of one core over time (a token bucket of _CPU_BURST seconds): quiet, a
        connection is looked up within `delay`, before a short-lived program has closed
        its socket; busy, the child rests between passes and the bursts grow instead of
        the cost (passes of 0.5 ms at 2%: one every 25 ms)."""
        self._loop = loop
        self._deliver = deliver
        self._delay = delay
        self._cpu_share = cpu_share
        self._answer_interval = answer_interval
        self._answer_timer: asyncio.TimerHandle | None = None
        self._lock = threading.Lock()  # guards _queued, _unanswered, _overflow, _closed
        # Requests not yet handed to the child: (id, client, destination).
        self._queued: list[tuple[int, Address, Address | None]] = []
        self._flush_scheduled = False
        # Ids asked and not answered yet (queued, in the pipe, or in the child's pass).
        self._unanswered: dict[int, None] = {}
        self._overflow: list[tuple[int, ProcessInfo | None]] = []
        self._closed = False
        # The thread the loop runs on, when made there (see _schedule); None: not known,
        # every callback then goes through call_soon_threadsafe.
        self._loop_thread = threading.get_ident() if asyncio._get_running_loop() is loop else None
        # Loop thread only from here on.
        self._child: subprocess.Popen[bytes] | None = None
        self._out = bytearray()  # bytes for the child's stdin not written yet
        self._writing = False  # a writer callback waits for room in the pipe
        self._in = b""  # the child's output after its last complete line
        self._restarts = 0
        self._down_until = 0.0  # monotonic: no child before then (None answers meanwhile)
        self._given_up = False
        self.passes = 0  # lookup passes run so far (one per burst)
        # Started now, on the loop's thread, not at the first request: a child still
        # importing (a few hundred ms on a busy host) would find that connection's short
        # program gone.
        self._schedule(self._prestart)

    def request(self, conn_id: int, client: Address, original_dst: Address | None) -> None:
        """Ask who made connection `conn_id`; the answer comes later through `deliver`."""
        self.request_all(((conn_id, client, original_dst),))

    def request_all(self, requests: Sequence[tuple[int, Address, Address | None]]) -> None:
        """`request` for each (conn id, client, original destination), handed to the child
        together (one write, in a headless run)."""
        with self._lock:
            if self._closed:
                return
            unanswered = self._unanswered
            overflow = self._overflow
            had_overflow = bool(overflow)
            for request in requests:
                if len(unanswered) >= MAX_PENDING:
                    overflow.append((request[0], None))
                    continue
                unanswered[request[0]] = None
                self._queued.append(request)
            if overflow and not had_overflow:
                self._schedule(self._deliver_overflow)
            if self._flush_scheduled or not self._queued:
                return
            self._flush_scheduled = True
        if self._answer_interval > 0.0 and threading.get_ident() == self._loop_thread:
            # Headless run, on the loop: written now, without a callback of its own (the
            # worker gathers a burst's later requests itself; writing to it while it does
            # wakes nobody).
            self._flush()
        else:
            self._schedule(self._flush)

    def close(self) -> None:
        """Stop the child: its stdin closed (it exits at once, a pass in progress ends
        first), waited for up to JOIN_TIMEOUT, killed after that. Never leaves a zombie."""
        with self._lock:
            self._closed = True
            self._queued.clear()
            self._unanswered.clear()
        self._stop_child()

    # loop thread -----------------------------------------------------------------------------

    def _schedule(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            # The thread, not asyncio._get_running_loop(): that costs a getpid() system
            # call each time (it checks for a fork), once per connection here.
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(callback)
            else:
                loop.call_soon_threadsafe(callback)

    def _deliver_overflow(self) -> None:
        with self._lock:
            answers, self._overflow = self._overflow, []
        if answers:
            self._deliver(answers)

    def _flush(self) -> None:
        """Hand the queued requests to the child (started here, on the loop's thread)."""
        with self._lock:
            requests, self._queued = self._queued, []
            self._flush_scheduled = False
            if self._closed or not requests:
                return
        if self._child is None and not self._start():
            self._answer_all_none()
            return
        self._out += _request_lines(requests)
        if not self._writing:
            self._write()
        if self._answer_interval > 0.0 and self._answer_timer is None and self._child:
            self._answer_timer = self._loop.call_later(self._answer_interval, self._poll)

    def _poll(self) -> None:
        """Read the answers written so far; again later while some are awaited."""
        self._answer_timer = None
        if self._child is None:
            return
        for _ in range(64):  # 4 MiB at most per poll; the rest at the next
            if not self._read():
                break
        with self._lock:
            waiting = bool(self._unanswered)
        if waiting and self._child is not None:
            self._answer_timer = self._loop.call_later(self._answer_interval, self._poll)

    def _prestart(self) -> None:
        if self._child is None and not self._closed:
            self._start()

    def _start(self) -> bool:
        """Start the child unless it failed for good or is in its backoff; True if running."""
        if self._given_up or time.monotonic() < self._down_until:
            return False
        command = [
            sys.executable,
            "-I",
            *_WORKER,
            "--relay-pid",
            str(os.getpid()),
            "--delay",
            repr(self._delay),
            "--cpu-share",
            repr(self._cpu_share),
        ]
        try:
            child = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                close_fds=True,
                # Its own session: a terminal's Ctrl+C or hang-up is for the app, which then
                # ends the worker by closing its stdin (it also ends when the app dies).
                start_new_session=True,
            )
        except OSError as exc:
            self._failed(f"it could not start: {exc}")
            return False
        assert child.stdin is not None and child.stdout is not None
        os.set_blocking(child.stdin.fileno(), False)
        os.set_blocking(child.stdout.fileno(), False)
        self._child = child
        self._in = b""
        if self._answer_interval > 0.0:
            # Up to a poll's worth of answers at 10,000 connections a second (best effort:
            # a full pipe only makes the child wait).
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(child.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        else:
            self._loop.add_reader(child.stdout.fileno(), self._read)
        return True

    def _write(self) -> None:
        child = self._child
        if child is None or child.stdin is None:
            return
        try:
            written = os.write(child.stdin.fileno(), self._out)
        except BlockingIOError:
            written = 0
        except OSError as exc:  # EPIPE: the child has gone
            self._child_died(f"writing to it failed: {exc}")
            return
        del self._out[:written]
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(child.stdin.fileno(), self._write)
        elif not self._out and self._writing:
            self._writing = False
            self._loop.remove_writer(child.stdin.fileno())

    def _read(self) -> bool:
        """One read of the child's answers; True if it read some."""
        child = self._child
        if child is None or child.stdout is None:
            return False
        try:
            data = os.read(child.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._child_died(f"reading from it failed: {exc}")
            return False
        if not data:
            self._child_died("it ended")
            return False
        lines = (self._in + data).split(b"\n")
        self._in = lines.pop()
        delivered: list[tuple[int, ProcessInfo | None]] = []
        for line in lines:
            answers = self._answers(line)
            if answers is None:
                continue
            self.passes += 1
            delivered += answers
        if delivered:  # the passes read at once, in one delivery
            self._deliver(delivered)
        return True

    def _answers(self, line: bytes) -> list[tuple[int, ProcessInfo | None]] | None:
        """One pass's answers, for the ids still waiting (None: not an answer line)."""
        try:
            batch = json.loads(line)
        except ValueError:
            log.debug("process attribution wrote %r", line[:200])
            return None
        if not isinstance(batch, list):
            return None
        answers: list[tuple[int, ProcessInfo | None]] = []
        with self._lock:
            unanswered = self._unanswered
            for item in batch:
                conn_id, fields = item
                if conn_id not in unanswered:
                    continue  # not asked (or answered already): never twice
                del unanswered[conn_id]
                answers.append((conn_id, None if fields is None else ProcessInfo(*fields)))
        return answers

    def _child_died(self, why: str) -> None:
        self._stop_child(why)
        self._failed(why)
        self._answer_all_none()

    def _failed(self, why: str) -> None:
        if self._restarts >= _MAX_RESTARTS:
            self._given_up = True
            log.warning("process attribution stopped: %s; programs are no longer named", why)
            return
        backoff = _RESTART_BACKOFF * 2**self._restarts
        self._restarts += 1
        self._down_until = time.monotonic() + backoff
        log.warning("process attribution stopped: %s; starting it again in %.1f s", why, backoff)

    def _answer_all_none(self) -> None:
        """Every request still waiting is answered None (no child to ask)."""
        with self._lock:
            ids, self._unanswered = list(self._unanswered), {}
            self._queued.clear()
        self._out.clear()
        if ids and not self._closed:
            # In a callback of its own: this may run inside request() (a write that found
            # the child gone), whose caller is in the middle of its own bookkeeping.
            answers: list[tuple[int, ProcessInfo | None]] = [(conn_id, None) for conn_id in ids]
            self._schedule(functools.partial(self._deliver_if_open, answers))

    def _deliver_if_open(self, answers: list[tuple[int, ProcessInfo | None]]) -> None:
        if not self._closed:
            self._deliver(answers)

    def _stop_child(self, why: str | None = None) -> None:
        """End the child and reap it. From another thread while the loop runs (close() from
        an executor), the loop's reader and writer are the loop's to remove: the child is
        sent SIGTERM instead of its end-of-file, and the pipes are closed on the loop."""
        child, self._child = self._child, None
        if child is None:
            return
        writing, self._writing = self._writing, False
        loop = self._loop
        if asyncio._get_running_loop() is loop or not loop.is_running():
            self._release(child, writing)
        else:
            with contextlib.suppress(OSError):
                child.terminate()
            try:
                loop.call_soon_threadsafe(self._release, child, writing)
            except RuntimeError:  # closed meanwhile: no reader left to remove
                self._release(child, False)
        try:
            child.wait(JOIN_TIMEOUT if why is None else 0.2)
        except subprocess.TimeoutExpired:
            if why is None:
                log.warning("process attribution did not stop within %.0f s", JOIN_TIMEOUT)
            child.kill()
            child.wait()

    def _release(self, child: subprocess.Popen[bytes], writing: bool) -> None:
        """Stop watching the child's pipes and close them (its stdin's end: its EOF)."""
        loop_open = not self._loop.is_closed()
        timer, self._answer_timer = self._answer_timer, None
        if timer is not None:
            timer.cancel()
        if child.stdin is not None:
            if writing and loop_open:
                self._loop.remove_writer(child.stdin.fileno())
            with contextlib.suppress(OSError):
                child.stdin.close()
        if child.stdout is not None:
            if loop_open and self._answer_interval <= 0.0:
                self._loop.remove_reader(child.stdout.fileno())
            child.stdout.close()


def _request_lines(requests: Sequence[tuple[int, Address, Address | None]]) -> bytes:
    """Requests as the worker reads them: `id ip port [ip port]`, one a line."""
    lines = [
        f"{conn_id} {client[0]} {client[1]}\n"
        if dst is None
        else f"{conn_id} {client[0]} {client[1]} {dst[0]} {dst[1]}\n"
        for conn_id, client, dst in requests
    ]
    return "".join(lines).encode("ascii", "replace")


# The lookup ----------------------------------------------------------------------------------


def _plain(address: Address) -> Address:
    """The address with an IPv4-mapped IPv6 form written as IPv4 (and no scope)."""
    ip, port = address[0], address[1]
    ip = ip.split("%", 1)[0]
    if ":" in ip:
        with contextlib.suppress(ValueError):
            mapped = ipaddress.IPv6Address(ip).ipv4_mapped
            if mapped is not None:
                return (str(mapped), port)
            return (str(ipaddress.IPv6Address(ip)), port)
    return (ip, port)


@dataclass(frozen=True, slots=True)
class SocketEntry:
    """One TCP socket of the kernel's table, as far as attribution needs it."""

    state: int
    uid: int
    inode: int


class ProcessLookup:
    """One lookup pass over the kernel's tables. Not thread-safe: the worker owns it."""

    def __init__(self, *, use_sock_diag: bool = True, relay_pid: int | None = None) -> None:
        """`use_sock_diag=False` reads /proc/net/tcp{,6} only (the fallback; for tests).
        `relay_pid`: the relay's process (its fd table is read last), when the lookup runs
        in another one."""
        self._relay_pid = os.getpid() if relay_pid is None else relay_pid
        self._diag: socket.socket | None = None
        self._diag_broken = not use_sock_diag
        self._recent: OrderedDict[int, None] = OrderedDict()
        # "socket:[inode]" -> (pid, fd) of every socket fd seen in a scan, oldest first.
        self._known: dict[str, tuple[int, str]] = {}
        # fd -> whether it held a socket, at the last scan of each recent pid.
        self._tables: dict[int, dict[str, bool]] = {}
        # pid -> the fds where this lookup last found a sought socket, newest last: a program
        # that connects again and again (a package manager, a browser) mostly closes one
        # connection and opens the next in the same fd, the lowest free one. Read first,
        # before the fd table is listed: with hundreds of fds open, one readlink instead of
        # hundreds.
        self._hits: dict[int, collections.deque[str]] = {}
        # pid -> (what identifies that process's image, its ProcessInfo).
        self._details: dict[int, tuple[tuple[bytes, str, int], ProcessInfo]] = {}
        self.fd_tables_read = 0  # /proc/<pid>/fd tables read so far (for tests and benches)
        self.fds_read = 0  # their fds read (readlink) so far
        self._link_buffer = ctypes.create_string_buffer(_LINK_BUFFER)
        self._users: dict[int, str] = {}
        self._local: frozenset[str] = frozenset()
        self._local_at = -_LOCAL_ADDRESSES_TTL
        self._docker = DockerNames()
        self._me = os.geteuid()

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    def find(
        self, burst: Sequence[tuple[int, Address, Address | None]]
    ) -> list[tuple[int, ProcessInfo | None]]:
        """Answer every request of the burst: conn id -> ProcessInfo or None."""
        wanted = [
            (conn_id, _plain(client), None if dst is None else _plain(dst))
            for conn_id, client, dst in burst
        ]
        exact = {(client, dst) for _, client, dst in wanted if dst is not None}
        sockets = self._sockets(exact)
        loose = [client for _, client, dst in wanted if dst is None]
        by_client = self._sockets_by_client(loose) if loose else {}
        found: dict[int, SocketEntry | None] = {}
        for conn_id, client, dst in wanted:
            found[conn_id] = by_client.get(client) if dst is None else sockets.get((client, dst))
        inodes = {entry.inode: entry.uid for entry in found.values() if entry and entry.inode}
        owners, unreadable, gone = self._owners(
            inodes, functools.partial(self._still_held, found, wanted)
        )
        answers: list[tuple[int, ProcessInfo | None]] = []
        details: dict[int, ProcessInfo] = {}
        for conn_id, client, _ in wanted:
            entry = found[conn_id]
            if entry is None:
                answers.append((conn_id, self._not_found(client[0])))
                continue
            known = entry.inode != 0 or entry.state in _TCP_ORPHAN_STATES
            user = self._user(entry.uid) if known else None
            pid = owners.get(entry.inode) if entry.inode else None
            if pid is not None:
                info = details.get(pid)
                if info is None:
                    info = details[pid] = self._process(pid, user)
                answers.append((conn_id, info))
            elif (
                entry.inode
                and entry.inode not in gone
                and (unreadable is None or entry.uid in unreadable)
            ):
                answers.append((conn_id, ProcessInfo(pid=None, name="?", user=user)))
            else:
                answers.append((conn_id, ProcessInfo(pid=None, name="?", user=user, exited=True)))
        return answers

    # 1. sockets --------------------------------------------------------------------------------

    def _sockets(self, exact: Iterable[Any4]) -> dict[Any4, SocketEntry]:
        tuples = list(exact)
        if not tuples:
            return {}
        if not self._diag_broken:
            try:
                return self._sock_diag(tuples)
            except OSError as exc:
                # A socket that cannot be made means no sock_diag here (a kernel without
                # inet_diag, a sandbox): /proc from now on. A failed exchange (a reply lost
                # to a full buffer, a timeout) costs this pass a /proc read and a new socket.
                if self._diag is None:
                    log.info("sock_diag unavailable (%s); reading /proc/net/tcp instead", exc)
                    self._diag_broken = True
                else:
                    log.debug("sock_diag lookup failed (%s); reading /proc/net/tcp", exc)
                    self.close()
        table = _read_proc_tcp({client[1] for client, _ in tuples})
        return {key: table[key] for key in tuples if key in table}

    def _sock_diag(self, tuples: list[Any4]) -> dict[Any4, SocketEntry]:
        if self._diag is None:
            diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
            diag.settimeout(2.0)
            self._diag = diag
        result: dict[Any4, SocketEntry] = {}
        for start in range(0, len(tuples), _DIAG_CHUNK):
            chunk = tuples[start : start + _DIAG_CHUNK]
            self._diag.send(b"".join(_diag_request(i, *key) for i, key in enumerate(chunk)))
            for seq, entry in _diag_replies(self._diag, len(chunk)):
                # An exact lookup falls back to a listener on the local port: only the very
                # 4-tuple asked counts.
                if entry is not None and 0 <= seq < len(chunk) and entry[0] == chunk[seq]:
                    result[chunk[seq]] = entry[1]
        return result

    def _sockets_by_client(self, clients: Sequence[Address]) -> dict[Address, SocketEntry]:
        table = _read_proc_tcp({port for _, port in clients})
        live: dict[Address, list[SocketEntry]] = {}
        closed: dict[Address, list[SocketEntry]] = {}
        for (local, _), entry in table.items():
            if entry.state != _TCP_LISTEN:
                (live if entry.inode else closed).setdefault(local, []).append(entry)
        # A socket some process holds is the one: the closed ones with that address are
        # earlier connections (TIME_WAIT). Several of either kind (the same local address
        # to other destinations): no guess.
        found: dict[Address, SocketEntry] = {}
        for client in clients:
            held = live.get(client, [])
            if len(held) == 1:
                found[client] = held[0]
            elif not held and len(closed.get(client, ())) == 1:
                found[client] = closed[client][0]
        return found

    def _still_held(
        self,
        found: Mapping[int, SocketEntry | None],
        wanted: Sequence[tuple[int, Address, Address | None]],
        inodes: set[int],
    ) -> set[int]:
        """Which of `inodes` (sockets of this pass's requests) are still held by a process.
        Asked again by exact 4-tuple; a request without a destination counts as held."""
        keys: dict[Any4, int] = {}
        held: set[int] = set()
        for conn_id, client, dst in wanted:
            entry = found[conn_id]
            if entry is None or entry.inode not in inodes:
                continue
            if dst is None:
                held.add(entry.inode)
            else:
                keys[(client, dst)] = entry.inode
        if keys:
            now = self._sockets(keys)
            held.update(
                inode for key, inode in keys.items() if (e := now.get(key)) and e.inode == inode
            )
        return held

    # 2. owners ---------------------------------------------------------------------------------

    def _owners(
        self, inodes: Mapping[int, int], still_held: Callable[[set[int]], set[int]]
    ) -> tuple[dict[int, int], set[int] | None, set[int]]:
        """inode -> pid for the inodes given (inode -> the socket's uid); the uids whose
        processes could not all be read (None: some process of unknown uid); and the inodes
        found closed meanwhile.

        `still_held(inodes)` asks the kernel again which of them some process still holds:
        a socket closed since the pass began has no owner left to find, and reading every
        process's fd table to learn that is the most a pass can cost.
        """
        gone: set[int] = set()
        if not inodes:
            return {}, set(), gone
        targets = {f"socket:[{inode}]": inode for inode in inodes}
        owners: dict[int, int] = {}
        # Sockets seen in earlier scans: one readlink says whether that fd still holds it.
        for link, (pid, fd) in [
            (link, self._known[link]) for link in targets if link in self._known
        ]:
            try:
                held = os.readlink(f"/proc/{pid}/fd/{fd}") == link
            except OSError:
                held = False
            if held:
                owners[targets.pop(link)] = pid
                self._remember(pid)
            else:
                del self._known[link]
        if not targets:
            return owners, set(), gone
        # The relay itself last, and only for a socket still held that no other process
        # has: its own sockets are the far ends of redirected connections, never their
        # clients, and its fd table is the largest (two sockets per tunnel).
        me = self._relay_pid
        skip = {me, os.getpid()}  # the lookup's own process holds none of those sockets
        unreadable: set[int] | None = set()
        uids = set(inodes.values())
        recent = [pid for pid in reversed(self._recent) if pid not in skip]
        unreadable = self._scan(recent, targets, owners, uids, unreadable, learn=True)
        for stage in ("rest", "mine"):
            if not targets:
                break
            left = still_held(set(targets.values()))
            for link in [link for link, inode in targets.items() if inode not in left]:
                gone.add(targets.pop(link))
            if not targets:
                break
            if stage == "mine":
                unreadable = self._scan([me], targets, owners, uids, unreadable, learn=False)
                break
            try:
                pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
            except OSError:
                return owners, None, gone
            # Newest first: a program that just started (a curl) has the highest pid.
            rest = sorted(
                (pid for pid in pids if pid not in self._recent and pid not in skip),
                reverse=True,
            )
            unreadable = self._scan(rest, targets, owners, uids, unreadable, learn=True)
        for pid in [pid for pid in self._tables if pid not in self._recent]:
            del self._tables[pid]
            self._hits.pop(pid, None)
        return owners, unreadable, gone

    def _scan(
        self,
        pids: Iterable[int],
        targets: dict[str, int],
        owners: dict[int, int],
        uids: set[int],
        unreadable: set[int] | None,
        *,
        learn: bool,
    ) -> set[int] | None:
        """Read the fd tables of `pids` until every target has its owner (found ones move
        from `targets` to `owners`); the socket fds seen are remembered for later passes."""
        known = self._known
        for pid in pids:
            uid = -1
            if self._me != 0:
                # A socket's uid is its creator's; another user's process holds it only if
                # it was passed along, and that process's fds cannot be read anyway.
                try:
                    uid = os.stat(f"/proc/{pid}").st_uid
                except OSError:
                    continue
                if uid not in uids:
                    continue
            try:
                fd_dir = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                self._recent.pop(pid, None)
                continue  # ended meanwhile
            except OSError:
                if uid < 0 or unreadable is None:
                    unreadable = None
                else:
                    unreadable.add(uid)
                continue
            self.fd_tables_read += 1
            old = self._tables.get(pid) if learn else None
            table: dict[str, bool] = {}
            try:
                hits = self._hits.get(pid) if old else None
                # Where its sockets were last found first: often that is all it takes.
                done = bool(hits) and self._read_fds(
                    pid, fd_dir, list(reversed(hits or ())), table, targets, owners, learn
                )
                fds: list[str] | None = None  # listed: not all found at those fds
                if not done:
                    fds = [fd for fd in os.listdir(fd_dir) if fd not in table]
                    if old:
                        # The kernel gives a new socket the lowest free fd: a number this
                        # process did not have at its last scan, or one a closed socket
                        # freed. Those first, lowest first; files last.
                        fds.sort(
                            key=lambda fd: (
                                0 if fd not in old else 1 if old[fd] else 2,
                                len(fd),
                                fd,
                            )
                        )
                    done = self._read_fds(pid, fd_dir, fds, table, targets, owners, learn)
                if done and old:
                    for fd in old if fds is None else fds:  # not read this time: as last seen
                        table.setdefault(fd, old.get(fd, True))
            except OSError:
                pass  # ended while being read
            finally:
                os.close(fd_dir)
            if learn and pid in self._recent:
                self._tables[pid] = table
            if not targets:
                break
        if len(known) > _KNOWN_SOCKETS:
            # The oldest first: mostly sockets closed long ago (an inode is never reused
            # while its socket lives, so a stale entry only costs memory).
            for link in list(itertools.islice(known, len(known) - _KNOWN_SOCKETS // 2)):
                del known[link]
        return unreadable

    def _read_fds(
        self,
        pid: int,
        fd_dir: int,
        fds: Iterable[str],
        table: dict[str, bool],
        targets: dict[str, int],
        owners: dict[int, int],
        learn: bool,
    ) -> bool:
        """Read these fds of `pid` (into `table`: fd -> holds a socket) until every target
        has its owner; True once none is left."""
        known = self._known
        readlink = self._readlink
        for fd in fds:
            link = readlink(fd, fd_dir)
            if link is None:
                continue  # closed meanwhile
            self.fds_read += 1
            is_socket = table[fd] = link[:7] == "socket:"
            if is_socket and learn:
                known[link] = (pid, fd)
            inode = targets.pop(link, None)
            if inode is not None:
                owners[inode] = pid
                self._remember(pid)
                if learn:
                    hits = self._hits.get(pid)
                    if hits is None:
                        hits = self._hits[pid] = collections.deque(maxlen=_HITS_KEPT)
                    elif fd in hits:
                        hits.remove(fd)
                    hits.append(fd)
                if not targets:
                    return True
        return not targets

    def _readlink(self, name: str, dir_fd: int) -> str | None:
        """Where /proc/<pid>/fd/<name> points (None: that fd is closed). Reading a
        process's fd table is one call per fd: through os.readlink each released the GIL
        and waited to get it back from the busy relay thread."""
        if _libc_readlinkat is None:
            try:
                return os.readlink(name, dir_fd=dir_fd)
            except OSError:
                return None
        buffer = self._link_buffer
        size = _libc_readlinkat(dir_fd, name.encode(), buffer, _LINK_BUFFER)
        if size < 0:
            return None
        if size >= _LINK_BUFFER:  # a long path, cut short: ask again the usual way
            try:
                return os.readlink(name, dir_fd=dir_fd)
            except OSError:
                return None
        return ctypes.string_at(buffer, size).decode("utf-8", "surrogateescape")

    def _remember(self, pid: int) -> None:
        self._recent[pid] = None
        self._recent.move_to_end(pid)
        while len(self._recent) > _RECENT_PIDS:
            self._recent.popitem(last=False)

    # 3. processes ------------------------------------------------------------------------------

    def _process(self, pid: int, socket_user: str | None) -> ProcessInfo:
        """The process's name, executable and user; psutil's answer is kept while the pid
        still runs the same image (start time and name, executable, owner all unchanged:
        an exec or a pid reused by another process changes at least one)."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
            exe_link = os.readlink(f"/proc/{pid}/exe")
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return self._ask_psutil(pid, socket_user)  # ended, or not ours to read
        # The name ends at the last ")"; the start time is the 22nd field of the line.
        comm, _, fields = stat.rpartition(b")")
        started = fields.split()[19:20]
        identity = (comm + b")" + b"".join(started), exe_link, owner)
        cached = self._details.get(pid)
        if cached is not None and cached[0] == identity:
            return cached[1]
        info = self._ask_psutil(pid, socket_user)
        if not info.exited:
            if len(self._details) >= _KNOWN_PROCESSES:
                self._details.clear()
            self._details[pid] = (identity, info)
        return info

    def _ask_psutil(self, pid: int, socket_user: str | None) -> ProcessInfo:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                name = proc.name()
                try:
                    exe: str | None = proc.exe() or None
                except psutil.AccessDenied:
                    exe = None
                try:
                    user: str | None = proc.username()
                except (psutil.AccessDenied, KeyError):
                    user = socket_user
        except psutil.NoSuchProcess:
            return ProcessInfo(pid=pid, name=_comm(pid), user=socket_user, exited=True)
        except psutil.AccessDenied:
            return ProcessInfo(pid=pid, name=_comm(pid), user=socket_user)
        return ProcessInfo(pid=pid, name=name or "?", exe=exe, user=user)

    def _user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            self._users[uid] = name
        return name

    def _not_found(self, ip: str) -> ProcessInfo | None:
        if self._is_local(ip):
            return None
        return ProcessInfo(pid=None, name="?", remote=True, container=self._docker.name_for(ip))

    def _is_local(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return True
        if address.is_loopback:
            return True
        now = time.monotonic()
        if now - self._local_at > _LOCAL_ADDRESSES_TTL or (
            ip not in self._local and now - self._local_at > 1.0
        ):
            self._local = _local_addresses()
            self._local_at = now
        return ip in self._local


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read().strip() or "?"
    except OSError:
        return "?"


def _local_addresses() -> frozenset[str]:
    """This host's addresses (in this thread's network namespace)."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(_plain((addr.address, 0))[0])
    return frozenset(found)


# sock_diag (linux/inet_diag.h) -----------------------------------------------------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_DIAG_MSG = struct.Struct("=BBBB")  # family, state, timer, retrans
_DIAG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_NO_COOKIE = struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # if, cookie[2]
# Requests per message: their replies must fit the netlink socket's receive buffer.
_DIAG_CHUNK = 128
_DIAG_BUFFER = 1 << 16
_LINK_BUFFER = 4096
_MSG_DONTWAIT = 0x40


def _libc_function(name: str, *argtypes: Any) -> Any:
    """A libc function called without releasing the GIL (PyDLL), or None: for calls
    that never block. Written when the lookups ran in a thread of the relay (handing the
    GIL to the busy loop and waiting to get it back cost more than the call); in the
    child process it only saves the release."""
    try:
        function = getattr(ctypes.PyDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_ssize_t
    return function


_libc_recv = _libc_function("recv", ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
_libc_readlinkat = _libc_function(
    "readlinkat", ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t
)


def _diag_request(seq: int, local: Address, remote: Address) -> bytes:
    family = socket.AF_INET6 if ":" in local[0] or ":" in remote[0] else socket.AF_INET

    def addr(ip: str) -> bytes:
        if family == socket.AF_INET:
            return socket.inet_pton(socket.AF_INET, ip) + bytes(12)
        if ":" not in ip:
            ip = f"::ffff:{ip}"
        return socket.inet_pton(socket.AF_INET6, ip)

    body = (
        _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
        + struct.pack("!HH", local[1], remote[1])
        + addr(local[0])
        + addr(remote[0])
        + _NO_COOKIE
    )
    header = _NLMSG_HEADER.pack(
        _NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0
    )
    return header + body


def _diag_address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return _plain((socket.inet_ntop(socket.AF_INET6, raw), 0))[0]


def _recv_queued(sock: socket.socket, buffer: ctypes.Array[ctypes.c_char]) -> bytes | None:
    """A datagram already queued on `sock`, read without releasing the GIL (None: none).

    The kernel answers sock_diag in the sender's context: every reply is queued by the time
    send() returns, so this never waits. socket.recv releases the GIL for each reply, and
    the busy relay thread takes it each time: a pass of 20 replies waited for up to 20 of
    Python's switch intervals (5 ms each) while the programs asked about closed their
    sockets, and forced as many thread switches on the relay.
    """
    if _libc_recv is None:
        return None
    received = _libc_recv(sock.fileno(), buffer, len(buffer), _MSG_DONTWAIT)
    if received < 0:
        return None  # nothing queued (or an error socket.recv will report)
    return ctypes.string_at(buffer, received)


def _diag_replies(
    sock: socket.socket, count: int
) -> Iterable[tuple[int, tuple[Any4, SocketEntry] | None]]:
    """Each request's reply: (seq, ((local, remote), entry)) or (seq, None) for no socket."""
    answered = 0
    buffer = ctypes.create_string_buffer(_DIAG_BUFFER)
    for _ in range(count):  # a reply message per request, usually many per datagram
        if answered >= count:
            return
        data = _recv_queued(sock, buffer)
        if data is None:
            data = sock.recv(_DIAG_BUFFER)
        offset = 0
        while offset + _NLMSG_HEADER.size <= len(data):
            length, kind, _, seq, _ = _NLMSG_HEADER.unpack_from(data, offset)
            if length < _NLMSG_HEADER.size:
                break
            body = offset + _NLMSG_HEADER.size
            answered += 1
            if kind == _NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", data, body)
                if -errno not in (0, 2):  # ENOENT: no such socket
                    log.debug("sock_diag lookup %d failed: %s", seq, os.strerror(-errno))
                yield seq, None
            elif kind == _SOCK_DIAG_BY_FAMILY:
                family, state, _, _ = _DIAG_MSG.unpack_from(data, body)
                sport, dport = struct.unpack_from("!HH", data, body + 4)
                local = _diag_address(family, data[body + 8 : body + 24])
                remote = _diag_address(family, data[body + 24 : body + 40])
                _, _, _, uid, inode = _DIAG_TAIL.unpack_from(data, body + 52)
                if state == _TCP_LISTEN:
                    yield seq, None
                else:
                    key = ((local, sport), (remote, dport))
                    yield seq, (key, SocketEntry(state=state, uid=uid, inode=inode))
            offset += (length + 3) & ~3


# /proc/net/tcp{,6} (the fallback, and lookups by client address alone) -------------------------


def _proc_address(text: str) -> Address:
    ip_hex, port_hex = text.split(":")
    raw = bytes.fromhex(ip_hex)
    # Each 32-bit word is printed in host byte order.
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return _plain((socket.inet_ntop(family, raw), int(port_hex, 16)))


def _read_proc_tcp(local_ports: set[int]) -> dict[Any4, SocketEntry]:
    """The sockets of /proc/thread-self/net/tcp{,6} whose local port is one of `local_ports`."""
    ports = {f":{port:04X}" for port in local_ports}
    table: dict[Any4, SocketEntry] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/thread-self/net/{name}", encoding="ascii") as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[1][-5:] not in ports:
                continue
            key = (_proc_address(fields[1]), _proc_address(fields[2]))
            table[key] = SocketEntry(
                state=int(fields[3], 16), uid=int(fields[7]), inode=int(fields[9])
            )
    return table


# Docker ----------------------------------------------------------------------------------------


class DockerNames:
    """Container address -> container name, from the `docker` CLI, cached for a while.

    Only asked for connections from another address; a host without Docker costs one PATH
    lookup per _DOCKER_TTL.
    """

    def __init__(self, ttl: float = _DOCKER_TTL) -> None:
        self._ttl = ttl
        self._names: dict[str, str] = {}
        self._at = -ttl

    def name_for(self, ip: str) -> str | None:
        now = time.monotonic()
        if now - self._at > self._ttl or (ip not in self._names and now - self._at > 1.0):
            self._names = _docker_addresses()
            self._at = time.monotonic()
        return self._names.get(ip)


def _docker(args: Sequence[str], docker: str) -> str | None:
    try:
        done = subprocess.run(
            [docker, *args],
            capture_output=True,
            timeout=_DOCKER_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("docker %s: %s", args[0], exc)
        return None
    if done.returncode != 0:
        log.debug("docker %s exited %d", " ".join(args[:2]), done.returncode)
        return None
    return done.stdout.decode("utf-8", "replace")


def _docker_addresses() -> dict[str, str]:
    """Every running container's addresses -> its name, from `docker network inspect`."""
    docker = shutil.which("docker")
    if docker is None:
        return {}
    listing = _docker(["network", "ls", "--quiet", "--no-trunc"], docker)
    ids = listing.split() if listing else []
    if not ids:
        return {}
    text = _docker(["network", "inspect", *ids], docker)
    if text is None:
        return {}
    try:
        networks = json.loads(text)
    except ValueError:
        return {}
    names: dict[str, str] = {}
    for network in networks if isinstance(networks, list) else ():
        containers = network.get("Containers") if isinstance(network, dict) else None
        if not isinstance(containers, dict):
            continue
        for container in containers.values():
            if not isinstance(container, dict) or not container.get("Name"):
                continue
            for key in ("IPv4Address", "IPv6Address"):
                cidr = container.get(key)
                if isinstance(cidr, str) and cidr:
                    names[_plain((cidr.split("/", 1)[0], 0))[0]] = str(container["Name"])
    return names
