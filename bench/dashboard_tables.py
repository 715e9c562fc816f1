"""What one flush of the dashboard's Connections tab costs the UI thread, without the lab:
a quick loop for working on the tables (bench/dashboard.py measures the whole app under
real load). Usage, from the repository root:

    .venv/bin/python -m bench.dashboard_tables [--rows 10000] [--batch 100] [--flushes 30]
                                               [--size 1000x700] [--view closed|active]
                                               [--contend] [--switch-interval S]

The tab (tray_proxy/ui/dashboard/connections.py) is shown offscreen at `--size`, its Closed
table filled to `--rows`; then each flush brings what the bridge brings at 1,000 new
connections a second every 100 ms: `--batch` connections opened, then the same closed.
Prints, per flush: the time in the tab's apply (models, proxy sorting), the time Qt then
takes to process events and paint, and how many data() and lessThan() calls into Python
those made. Then the same with the tables' repaints switched off, which tells model work
from painting.

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
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if not (1 <= args.flushes <= 1000 and 0 <= args.rows <= 1_000_000 and args.batch >= 1):
        parser.error("--flushes 1..1000, --rows 0..1000000, --batch >= 1")
    width, _, height = args.size.partition("x")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from PySide6.QtWidgets import QApplication, QTableView

    from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowChanges, RowState
    from tray_proxy.relay.records import CloseReason
    from tray_proxy.ui.dashboard.connections import ConnectionsTab
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

    print(
        f"Connections tab at {args.size}, {args.view} table shown, "
        f"{tab.closed.rowCount():,} closed rows, Qt platform {os.environ['QT_QPA_PLATFORM']}"
    )
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
