"""What the Monitor, the history and the attribution cost the relay's loop thread, per connection.

A fixed synthetic workload on a uvloop loop, as `tray-proxy run` has it (relay and controller
on one loop): N real loopback TCP connections (so the attribution child finds real sockets),
each announced with the four engine events a tunnel publishes (ConnectionOpened,
ConnectionRouted, TunnelEstablished, ConnectionClosed), delivered through a stand-in for the
controller's EngineInbox (one `call_soon` per burst, one Monitor.feed per batch). The figure is
the loop thread's own CPU time (`time.thread_time`) per connection, which other processes on
a busy machine barely disturb, for each variant against `off` (the same sockets and events, no
Monitor):

- monitor:  the Monitor alone (rows, health, words)
- history:  + the real HistoryWriter (its child writes a temporary SQLite file)
- full:     + the real Attributor (its child looks each connection up), events reduced
            together every HEADLESS_COALESCE seconds, as `tray-proxy run` does
- full-now: the same, each batch reduced at once (coalesce 0: the app's dashboard)

The Monitor of every variant but full-now coalesces; the controller's once-a-second
`traffic()` call is made here too.

`--mode seq`: one connection at a time, a 1 ms pause between connections (the bench's latency
phase: each event its own batch, each attribution answer its own callback). `--mode burst`:
50 connections per loop turn (the conn/s phase). `--profile VARIANT` prints cProfile's top
functions of that variant's loop thread.

    .venv/bin/python -m bench.monitor_cost [--mode seq|burst] [--connections N] [--turns K]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import pstats
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from tray_proxy.monitor.attribution import Attributor
from tray_proxy.monitor.history import HistoryWriter
from tray_proxy.monitor.monitor import HEADLESS_COALESCE, Monitor
from tray_proxy.monitor.rows import ProcessInfo, RowChanges
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    Event,
    TunnelEstablished,
)
from tray_proxy.relay.records import CloseReason

VARIANTS = ("off", "monitor", "history", "full", "full-now")


class Inbox:
    """The controller's EngineInbox on one loop: a queue, one call_soon per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop, drain: Callable[[list[Event]], None]):
        self._loop = loop
        self._drain = drain
        self._queue: collections.deque[Event] = collections.deque()
        self._scheduled = False

    def post(self, event: Event) -> None:
        self._queue.append(event)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        batch = list(self._queue)
        self._queue.clear()
        if batch:
            self._drain(batch)


async def workload(variant: str, mode: str, connections: int, tmp: Path) -> tuple[float, int]:
    """(loop-thread CPU seconds of the workload, rows the history wrote)."""
    loop = asyncio.get_running_loop()
    published: list[RowChanges] = []
    history: HistoryWriter | None = None
    monitor: Monitor | None = None
    if variant != "off":
        if variant in ("history", "full", "full-now"):
            history = HistoryWriter(tmp / f"{variant}-{time.monotonic_ns()}.sqlite3")
        monitor_box: list[Monitor] = []

        def found(results: list[tuple[int, ProcessInfo | None]]) -> None:
            changes = monitor_box[0].process_found(results)
            if changes:
                published.append(changes)

        coalesce = 0.0 if variant == "full-now" else HEADLESS_COALESCE
        attributor = None
        if variant.startswith("full"):
            attributor = Attributor(loop, found, answer_interval=coalesce)
        monitor = Monitor(lambda: {}, history, attributor, coalesce=coalesce)
        monitor_box.append(monitor)
        await asyncio.sleep(1.0)  # the attribution child has started

    def drain(batch: list[Event]) -> None:
        if monitor is not None:
            changes = monitor.feed(batch)
            if changes:
                published.append(changes)
        published.clear()  # nobody watches in `tray-proxy run`

    inbox = Inbox(loop, drain)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    dst = listener.getsockname()
    burst = 1 if mode == "seq" else 50
    held: list[socket.socket] = []
    t0 = time.thread_time()
    conn_id = 0
    tick = time.monotonic() + 1.0
    for _ in range(connections // burst):
        ids = []
        for _ in range(burst):
            conn_id += 1
            client = socket.create_connection(dst)
            server, _peer = listener.accept()
            held += [client, server]
            at = time.time()
            ids.append(conn_id)
            inbox.post(ConnectionOpened(conn_id, client.getsockname()[:2], dst, at))
            if mode == "seq":
                await asyncio.sleep(0)
        for cid in ids:
            inbox.post(ConnectionRouted(cid, "example.com", "lab"))
            if mode == "seq":
                await asyncio.sleep(0)
        for cid in ids:
            inbox.post(TunnelEstablished(cid, "lab", 0.002, time.time()))
            if mode == "seq":
                await asyncio.sleep(0)
        for cid in ids:
            inbox.post(ConnectionClosed(cid, CloseReason.DONE, "", 64, 64, 0.003, time.time()))
        await asyncio.sleep(0)
        for sock in held:
            sock.close()
        held.clear()
        # Time for the attribution child's answer (sleeping costs no thread time).
        await asyncio.sleep(0.001 if mode == "seq" else 0.02)
        if monitor is not None and time.monotonic() >= tick:
            tick += 1.0
            published.append(monitor.traffic(time.time(), {}, 0, 0))
    # Every answer in and every held row out: then the work is all counted.
    deadline = time.monotonic() + 10
    while monitor is not None and time.monotonic() < deadline:
        published.append(monitor.traffic(time.time(), {}, 0, 0))
        if not monitor._held:
            break
        await asyncio.sleep(0.05)
    cpu = time.thread_time() - t0
    listener.close()
    written = 0
    if monitor is not None:
        monitor.close()
    if history is not None:
        written = history.written
    return cpu, written


def run(variant: str, mode: str, connections: int, profile: bool) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="tray-proxy-monitor-cost-") as tmp:
        profiler = cProfile.Profile(time.thread_time) if profile else None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            if profiler is not None:
                profiler.enable()
            result = runner.run(workload(variant, mode, connections, Path(tmp)))
            if profiler is not None:
                profiler.disable()
                stats = pstats.Stats(profiler)
                stats.sort_stats("tottime").print_stats(25)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("seq", "burst"), default="seq")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", choices=VARIANTS)
    args = parser.parse_args()
    if args.profile:
        run(args.profile, args.mode, args.connections, True)
        return
    variants = [v.strip() for v in args.variants.split(",")]
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for turn in range(args.turns):
        order = variants[turn % len(variants) :] + variants[: turn % len(variants)]
        for variant in order:
            seconds, _ = run(variant, args.mode, args.connections, False)
            cpu[variant].append(seconds / args.connections * 1e6)
    base = statistics.median(cpu["off"]) if "off" in cpu else 0.0
    print(f"mode {args.mode}, {args.connections} connections x {args.turns} turns")
    print(f"{'variant':<10} {'µs/conn (median)':>17} {'added':>8}   turns")
    for variant in variants:
        median = statistics.median(cpu[variant])
        turns = " ".join(f"{v:.1f}" for v in cpu[variant])
        print(f"{variant:<10} {median:17.1f} {median - base:8.1f}   {turns}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
