"""What one flush of the dashboard's Connections tab costs the UI thread, without the lab:
a quick loop for working on the tables (bench/dashboard.py measures the whole app under
real load). Usage, from the repository root:

    .venv/bin/python -m bench.dashboard_tables [--rows 10000] [--batch 100] [--flushes 30]
                                               [--size 1000x700] [--view closed|active]
                                               [--contend] [--switch-interval S]
                                               [--stream SECONDS]

The tab (tray_proxy/ui/dashboard/connections.py) is shown offscreen at `--size`, its Closed
table filled to `--rows`; then each flush brings what the bridge brings at 1,000 new
connections a second every 100 ms: `--batch` connections opened, then the same closed.
Prints, per flush: the time in the tab's apply (models, proxy sorting), the time Qt then
takes to process events and paint, and how many data() and lessThan() calls into Python
those made. Then the same with the tables' repaints switched off, which tells model work
from painting.

`--stream SECONDS` instead feeds the tab as the bridge does at 1,000 connections a second
(every 100 ms, `--batch` rows closed and 13 opened, through `apply` and the tab's own pace)
while a 16 ms precise timer notes how late each tick comes, as bench/dashboard_app.py does
in the app: the UI loop's lateness, and how often the Closed table was painted.

`--contend` runs a second Python thread that stands in for the relay (busy in Python 3 ms,
then 2 ms without the GIL, like a uvloop thread working through bursts of callbacks): each
call from Qt into Python (data(), lessThan(), rowCount(), ...) then waits for the GIL as it
does in the app, which shows what the number of those calls costs (the convoy effect).

Imports PySide6 (runs offscreen); must not import the lab modules. Not a test: the figures
depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="closed rows to start with")
    parser.add_argument("--batch", type=int, default=100, help="connections per flush")
    parser.add_argument("--flushes", type=int, default=30)
    parser.add_argument("--size", default="1000x700", help="the tab's size, WIDTHxHEIGHT")
    parser.add_argument("--view", choices=["closed", "active"], default="closed")
    parser.add_argument("--contend", action="store_true", help="a GIL-holding thread beside")
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval (s)")
    parser.add_argument("--stream", type=float, help="seconds of a paced stream (see above)")
    parser.add_argument("--no-pace", action="store_true", help="apply every batch at once")
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if not (1 <= args.flushes <= 1000 and 0 <= args.rows <= 1_000_000 and args.batch >= 1):
        parser.error("--flushes 1..1000, --rows 0..1000000, --batch >= 1")
    width, _, height = args.size.partition("x")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from PySide6.QtCore import QEvent, QObject, Qt, QTimer
    from PySide6.QtWidgets import QApplication, QTableView

    from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowChanges, RowState
    from tray_proxy.relay.records import CloseReason
    from tray_proxy.ui.dashboard.connections import ConnectionsTab
    from tray_proxy.ui.dashboard.pace import FlushPace
    from tray_proxy.ui.models import connections as models

    app = QApplication.instance() or QApplication(["bench"])
    # Every method Qt calls back into Python, counted (each call takes the GIL).
    calls: dict[str, int] = {}
    for cls in (models.ConnectionTableModel, models.ConnectionFilter):
        for name in _CALLBACKS:
            if name in vars(cls):
                _count(cls, name, calls)

    class Services:
        """What the tab asks of the app: nothing is open, closing does nothing."""

        def open_rows(self) -> list[ConnectionRow]:
            return []

        def close_connections(self, ids: object) -> None:
            return None

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    tab = ConnectionsTab(Services())
    tab.resize(int(width), int(height))
    tab.show()
    (tab.show_closed if args.view == "closed" else tab.show_active).click()
    next_id = iter(range(1, 1 << 40))

    def opened_row() -> ConnectionRow:
        conn_id, now = next(next_id), time.time()
        return ConnectionRow(
            conn_id,
            now,
            ("10.0.0.2", 20000 + conn_id % 40000),
            ("93.184.216.34", 443),
            host=f"host{conn_id % 50}.example.com",
            upstream="corp",
            state=RowState.OPEN,
            established=now,
            handshake_latency=0.0004,
            process=ProcessInfo(4242, "curl", "/usr/bin/curl", "user"),
        )

    def closed(row: ConnectionRow) -> ConnectionRow:
        return dataclasses.replace(
            row, state=RowState.CLOSED, ended=time.time(), close_reason=CloseReason.DONE
        )

    tab.apply(RowChanges(closed=tuple(closed(opened_row()) for _ in range(args.rows))))
    tab.flush_pending()
    if args.no_pace:
        tab.pace = FlushPace(share=1.0, floor=1.0, ceiling=1.0)  # never spaced
    app.processEvents()

    stop = threading.Event()

    def relay_stand_in() -> None:
        deadline = time.monotonic() + 600  # bounded whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            busy_until = time.perf_counter() + 0.003
            while time.perf_counter() < busy_until:
                pass
            time.sleep(0.002)

    if args.contend:
        threading.Thread(target=relay_stand_in, name="relay stand-in", daemon=True).start()

    def flushes(label: str) -> None:
        applied, painted = [], []
        calls.clear()
        for _ in range(args.flushes):
            rows = tuple(opened_row() for _ in range(args.batch))
            began = time.perf_counter()
            tab.apply(RowChanges(opened=rows))
            tab.apply(RowChanges(closed=tuple(closed(r) for r in rows)))
            tab.flush_pending()  # (all of it now, not in the tab's paced steps)
            middle = time.perf_counter()
            app.processEvents()
            applied.append(middle - began)
            painted.append(time.perf_counter() - middle)
        print(
            f"{label}: per flush of {args.batch} connections, apply "
            f"{statistics.median(applied) * 1000:.1f} ms (max {max(applied) * 1000:.1f}), "
            f"events and paint {statistics.median(painted) * 1000:.1f} ms "
            f"(max {max(painted) * 1000:.1f}); calls into Python per flush: "
            + ", ".join(f"{n}() {c // args.flushes}" for n, c in sorted(calls.items()))
        )

    def stream(seconds: float) -> None:
        lateness: list[float] = []
        paints = [0]
        last = [time.perf_counter()]
        open_rows: list[ConnectionRow] = []

        class PaintCounter(QObject):
            def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802
                if event.type() == QEvent.Type.Paint:
                    paints[0] += 1
                return False

        counter = PaintCounter()
        tab.current_view.viewport().installEventFilter(counter)

        def tick() -> None:
            now = time.perf_counter()
            lateness.append(max(0.0, now - last[0] - 0.016))
            last[0] = now

        def batch() -> None:
            nonlocal open_rows
            fresh = [opened_row() for _ in range(args.batch - len(open_rows))]
            done = tuple(closed(r) for r in [*open_rows, *fresh])
            open_rows = [opened_row() for _ in range(13)]
            tab.apply(RowChanges(opened=tuple(open_rows), closed=done))

        probe, feeder = QTimer(), QTimer()
        probe.setTimerType(Qt.TimerType.PreciseTimer)
        probe.setInterval(16)
        probe.timeout.connect(tick)
        feeder.setInterval(100)
        feeder.timeout.connect(batch)
        calls.clear()
        probe.start()
        feeder.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.001)  # (the loop's wait, as in the app: the GIL is free meanwhile)
        probe.stop()
        feeder.stop()
        ordered = sorted(lateness)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(
            f"stream of {seconds:g} s: 16 ms timer late p50 {statistics.median(ordered) * 1000:.1f}"
            f" / p99 {p99 * 1000:.1f} / max {ordered[-1] * 1000:.1f} ms; closed table painted "
            f"{paints[0] / seconds:.1f}/s; pace {tab.pace.spacing * 1000:.0f} ms apart; calls "
            "into Python per second: "
            + ", ".join(f"{n}() {c / seconds:.0f}" for n, c in sorted(calls.items()))
        )

    print(
        f"Connections tab at {args.size}, {args.view} table shown, "
        f"{tab.closed.rowCount():,} closed rows, Qt platform {os.environ['QT_QPA_PLATFORM']}"
    )
    if args.stream:
        stream(args.stream)
        stop.set()
        return 0
    flushes("tables painted")
    for view in tab.findChildren(QTableView):
        view.setUpdatesEnabled(False)
    flushes("tables not painted")
    stop.set()
    return 0


_CALLBACKS = (
    "data",
    "index",
    "multiData",
    "flags",
    "rowCount",
    "columnCount",
    "headerData",
    "lessThan",
    "filterAcceptsRow",
)


def _count(cls: type, name: str, calls: dict[str, int]) -> None:
    method = vars(cls)[name]

    def counted(self: Any, *args: Any) -> Any:
        calls[name] = calls.get(name, 0) + 1
        return method(self, *args)

    setattr(cls, name, counted)


if __name__ == "__main__":
    sys.exit(main())
