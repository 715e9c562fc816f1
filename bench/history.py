"""Bench of the connection history (tray_proxy/monitor/history.py) at 1,000,000 rows.

Builds a history file in a temporary directory (one transaction of executemany, through
HistoryStore.write), then times what the Log tab and `tray-proxy log` do: open the store and
read the first page, filters by host (exact, `*.suffix`, `%substring%`), failed only, by
process, the text box, the second page of a filter; and the writer's throughput. Prints a
table and removes the file. Targets (issue 13): open + first page < 1 s, a host filter's first
page < 200 ms.

    .venv/bin/python -m bench.history [--rows 1000000]
"""

from __future__ import annotations

import argparse
import functools
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tray_proxy.monitor.history import HistoryStore, HistoryWriter
from tray_proxy.monitor.query import HistoryFilter
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowState
from tray_proxy.relay.records import CloseReason

T = TypeVar("T")

_PROCESSES = ["curl", "firefox", "git", "pip", "apt", "code", "python3", "wget", "node", "java"]
_UPSTREAMS = ["corp", "corp-backup", "lab-socks"]
_FAILURES = [
    CloseReason.UPSTREAM_AUTH_FAILED,
    CloseReason.UPSTREAM_REFUSED,
    CloseReason.UPSTREAM_TIMEOUT,
    CloseReason.UPSTREAM_RESET,
]


def _hosts(rng: random.Random) -> list[str]:
    # A realistic mix: a few very common hosts, many rare ones, one that appears only 5 times.
    common = ["github.com", "pypi.org", "files.pythonhosted.org", "api.github.com"]
    rare = [f"svc{i}.cdn{i % 37}.example.net" for i in range(3000)]
    return common + rare


def build(store: HistoryStore, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    hosts = _hosts(rng)
    start = time.time() - 20 * 86400
    step = 20 * 86400 / rows
    batch: list[ConnectionRow] = []
    for i in range(rows):
        if i % 1000 == 0:
            host = "needle.rare.example.org"  # 1 in 1000 rows
        elif rng.random() < 0.5:
            host = hosts[rng.randrange(4)]
        else:
            host = hosts[4 + rng.randrange(len(hosts) - 4)]
        failed = rng.random() < 0.02
        started = start + i * step
        batch.append(
            ConnectionRow(
                conn_id=i,
                started=started,
                client=("127.0.0.1", 30000 + i % 30000),
                original_dst=(f"10.{i % 250}.{i % 199}.{i % 251}", 443),
                host=host,
                upstream=_UPSTREAMS[i % 3],
                state=RowState.FAILED if failed else RowState.CLOSED,
                established=None if failed else started + 0.02,
                handshake_latency=None if failed else 0.02,
                bytes_up=rng.randrange(100_000),
                bytes_down=rng.randrange(10_000_000),
                ended=started + 1.5,
                close_reason=_FAILURES[i % 4] if failed else CloseReason.DONE,
                detail="HTTP/1.1 407 Proxy Authentication Required" if failed else "",
                words="proxy.corp:8080 refused the password for alice (407)." if failed else "",
                process=ProcessInfo(pid=1000 + i % 5000, name=_PROCESSES[i % 10], user="alice"),
            )
        )
        if len(batch) == 50_000:
            store.write(batch)
            batch = []
    store.write(batch)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tray-proxy-bench-history-"))
    path = tmp / "history.sqlite3"
    try:
        store = HistoryStore(path)
        seconds, _ = timed(lambda: build(store, args.rows))
        store.close()
        size = path.stat().st_size / 2**20
        print(f"built {args.rows:,} rows in {seconds:.1f} s ({size:.0f} MiB)")
        results: list[tuple[str, float, int]] = []

        def open_first() -> int:
            s = HistoryStore(path)
            try:
                return len(s.page(HistoryFilter()).entries)
            finally:
                s.close()

        seconds, n = timed(open_first)
        results.append(("open + first page (cold connection)", seconds, n))

        store = HistoryStore(path)
        cases = [
            ("host exact, common (github.com)", HistoryFilter(host="github.com")),
            ("host exact, rare (1 in 1000)", HistoryFilter(host="needle.rare.example.org")),
            ("host exact, absent", HistoryFilter(host="nowhere.invalid")),
            ("host *.example.net (3000 names)", HistoryFilter(host="*.example.net")),
            ("host *.cdn7.example.net", HistoryFilter(host="*.cdn7.example.net")),
            ("host %needle% (substring)", HistoryFilter(host="%needle%")),
            ("host %github% (substring)", HistoryFilter(host="%github%")),
            ("failed only (2 %)", HistoryFilter(failed_only=True)),
            ("process firefox", HistoryFilter(process="firefox")),
            ("upstream lab-socks + failed", HistoryFilter(upstream="lab-socks", failed_only=True)),
            ("last hour (since)", HistoryFilter(since=time.time() - 3600)),
            ("text 'github' (common)", HistoryFilter(text="github")),
            ("text 'needle' (1 in 1000)", HistoryFilter(text="needle")),
            ("text 'absent' (no match)", HistoryFilter(text="absent-everywhere")),
        ]
        for name, flt in cases:
            seconds, page = timed(functools.partial(store.page, flt))
            results.append((name, seconds, len(page.entries)))
        suffix = HistoryFilter(host="*.example.net")
        first = store.page(suffix)
        seconds, page = timed(functools.partial(store.page, suffix, after=first.next))
        results.append(("host *.example.net, second page", seconds, len(page.entries)))
        seconds, _ = timed(store.latest_rowid)
        results.append(("latest_rowid (--follow start)", seconds, 1))
        store.close()

        # The writer: 100,000 rows submitted at once, until written.
        reader = HistoryStore(path)
        rows = [e.row for e in reader.iter_rows(HistoryFilter(process="git"))][:100_000]
        reader.close()
        writer = HistoryWriter(tmp / "writer.sqlite3", flush_interval=0.5)
        t0 = time.perf_counter()
        writer.submit(rows)
        writer.flush(timeout=60)
        seconds = time.perf_counter() - t0
        writer.close()
        results.append((f"writer: {len(rows):,} rows submitted to written", seconds, len(rows)))

        # Retention down to 200 MiB (the default limit), as the writer does at start.
        store = HistoryStore(path)
        before = store.count()
        seconds, removed = timed(
            functools.partial(store.retention, time.time(), max_age_days=30, max_bytes=200 * 2**20)
        )
        store.close()
        results.append((f"retention to 200 MiB ({before:,} rows before)", seconds, removed))
        seconds, n = timed(open_first)
        results.append(("open + first page after retention", seconds, n))

        width = max(len(r[0]) for r in results)
        print(f"{'query':<{width}}  {'ms':>8}  rows")
        for name, secs, count in results:
            print(f"{name:<{width}}  {secs * 1000:8.1f}  {count}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
