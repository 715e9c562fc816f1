"""`tray-proxy log`: read the connection history from a shell, for headless users and scripts.

Reads the same SQLite file the tray app and `tray-proxy run` write (`[log] path` in the
settings, else the XDG state dir; `--file` overrides both). Output is one line per
connection, newest last; `--json` writes JSON lines (one object per line, the fields of
monitor/history.py's EXPORT_FIELDS), `--csv` the same fields with a header line. `--follow`
keeps printing new connections (every 0.5 s) until Ctrl+C, which exits 0.

Problems are one line on stderr: exit 2 for a bad argument or settings file, 1 for a
history that cannot be read. A missing history is not an error: nothing was recorded yet.

cli.py wires it in (`add_subcommand` in build_parser, `run` in main).
Must not import PySide6, and nothing heavy at module level: `tray-proxy --help` stays fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from tray_proxy.monitor.query import HistoryEntry, HistoryFilter
    from tray_proxy.monitor.rows import ConnectionRow

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

COMMAND = "log"
DEFAULT_LIMIT = 100
FOLLOW_INTERVAL = 0.5
FOLLOW_BATCH = 5_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)


def add_subcommand(
    subparsers: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
) -> None:
    """Add `log` to the CLI; `common` carries --config and -v."""
    parser = subparsers.add_parser(
        COMMAND,
        parents=[common],
        help="show the connection history (what connected where, through which proxy)",
        description="Show connections from the history the tray app and `tray-proxy run` "
        "record, newest last. Times are local. Host patterns: example.com (exact), "
        "*.example.com (its subdomains), %corp% (contains corp).",
    )
    parser.add_argument(
        "--since", metavar="WHEN", help="only connections started since: 30m, 1h, 2d, 1w or a date"
    )
    parser.add_argument(
        "--until", metavar="WHEN", help="only connections started before: 30m, 1h, 2d or a date"
    )
    parser.add_argument("--host", metavar="PATTERN", help="host name: exact, *.suffix or %%part%%")
    parser.add_argument("--process", metavar="NAME", help="program name, e.g. curl")
    parser.add_argument("--upstream", metavar="NAME", help="the upstream proxy's name")
    parser.add_argument(
        "--route",
        metavar="TEXT",
        help="the routing decision contains TEXT: direct, block, rule[2], pac, default",
    )
    parser.add_argument("--failed", action="store_true", help="only failed connections")
    parser.add_argument(
        "--limit",
        metavar="N",
        default=str(DEFAULT_LIMIT),
        help=f"show the newest N connections (default {DEFAULT_LIMIT}; 0: all)",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON lines, one object per connection")
    form.add_argument("--csv", action="store_true", help="CSV with a header line")
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new connections until Ctrl+C"
    )
    parser.add_argument(
        "--file", metavar="PATH", type=Path, help="the history file (default: from the settings)"
    )


class _Usage(Exception):
    """A bad argument: the message names it."""


def parse_when(text: str, option: str, now: float) -> float:
    """`30m`, `1h`, `2d`, `1w` ago, or an ISO date/time (local time unless it has an offset)."""
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2).lower()]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise _Usage(
            f"{option}: cannot read {text!r}; use an age like 30m, 1h, 2d, 1w "
            "or a date like 2026-12-01 or 2026-12-01T09:30"
        ) from None
    return when.timestamp()  # naive: local time, as the user reads clocks


def _filter(args: argparse.Namespace, now: float) -> HistoryFilter:
    from tray_proxy.monitor.query import HistoryFilter

    since = parse_when(args.since, "--since", now) if args.since else None
    until = parse_when(args.until, "--until", now) if args.until else None
    if since is not None and until is not None and since >= until:
        raise _Usage("--since: must be earlier than --until")
    for option, value in (
        ("--host", args.host),
        ("--process", args.process),
        ("--route", args.route),
    ):
        if value is not None and not value.strip():
            raise _Usage(f"{option}: must not be empty")
    return HistoryFilter(
        since=since,
        until=until,
        host=args.host,
        process=args.process,
        upstream=args.upstream,
        failed_only=args.failed,
        route=args.route,
    )


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise _Usage(f"--limit: must be a whole number 0 or more (0: all), got {text!r}")
    return value


def history_path(args: argparse.Namespace) -> Path:
    """--file, else the settings' [log] path, else the default file."""
    if args.file is not None:
        return Path(args.file).expanduser()
    from tray_proxy.config import default_config_path, load_config
    from tray_proxy.monitor.history import default_history_path

    if args.config is not None:
        config = load_config(args.config)  # an explicit file must exist
    else:
        config = load_config(default_config_path(), missing_ok=True)
    return config.log.path or default_history_path()


# --------------------------------------------------------------------------- output


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def human_line(row: ConnectionRow) -> str:
    """time  process  destination  via upstream  outcome  up/down  latency [ - words]

    A connection the rules sent DIRECT or blocked says `direct` or `block` where the
    upstream goes (the route's first word; --json and --csv have the whole decision)."""
    started = dt.datetime.fromtimestamp(row.started).strftime("%Y-%m-%d %H:%M:%S")
    process = row.process.label if row.process is not None else "?"
    action = row.route_action
    if action in ("direct", "block"):
        via = action
    else:
        via = f"via {row.upstream}" if row.upstream else "via -"
    reason = row.close_reason.value if row.close_reason is not None else row.state.value
    outcome = f"FAILED {reason}" if row.failed else reason
    latency = (
        f"{row.handshake_latency * 1000:.0f} ms" if row.handshake_latency is not None else "- ms"
    )
    line = (
        f"{started}  {process}  {row.destination}  {via}  {outcome}  "
        f"up {_size(row.bytes_up)} down {_size(row.bytes_down)}  {latency}"
    )
    if row.failed:
        why = row.words or row.detail
        if why:
            line += f"  - {why}"
    return _one_line(line)


def _one_line(text: str) -> str:
    # A host name or detail can never break the one-line-per-connection format.
    return "".join(c if c.isprintable() else " " for c in text)


class _Printer:
    def __init__(self, out: TextIO, fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        self._csv: Any = None
        if fmt == "csv":
            import csv

            from tray_proxy.monitor.history import EXPORT_FIELDS

            self._csv = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, lineterminator="\n")
            self._csv.writeheader()

    def entries(self, entries: list[HistoryEntry]) -> None:
        from tray_proxy.monitor.history import export_record

        for entry in entries:
            if self.fmt == "human":
                self.out.write(human_line(entry.row) + "\n")
            elif self.fmt == "json":
                import json

                self.out.write(json.dumps(export_record(entry), ensure_ascii=False) + "\n")
            else:
                record = export_record(entry)
                self._csv.writerow({k: "" if v is None else v for k, v in record.items()})
        self.out.flush()


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl+C ends --follow (or a long listing): not a failure
    except BrokenPipeError:
        # `tray-proxy log | head`: the reader left. Point stdout at /dev/null so that the
        # interpreter's own flush at exit does not complain a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from tray_proxy.config import ConfigError
    from tray_proxy.monitor.history import HistoryError, HistoryStore

    try:
        flt = _filter(args, time.time())
        limit = _limit(args.limit)
    except _Usage as exc:
        print(f"tray-proxy log: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = history_path(args)
    except ConfigError as exc:
        print(f"tray-proxy log: {exc}", file=sys.stderr)
        return EXIT_USAGE
    fmt = "json" if args.json else "csv" if args.csv else "human"

    if not path.exists():
        print(
            f"tray-proxy log: no connection history at {path}: nothing has been recorded yet "
            "(the tray app and `tray-proxy run` record connections there)",
            file=sys.stderr,
        )
        if not args.follow:
            if fmt == "csv":
                _Printer(sys.stdout, fmt).entries([])  # the header alone: an empty table
            return EXIT_OK
        while not path.exists():
            time.sleep(FOLLOW_INTERVAL)
    try:
        store = HistoryStore(path)
    except HistoryError as exc:
        print(f"tray-proxy log: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    printer = _Printer(sys.stdout, fmt)
    try:
        last = store.latest_rowid()  # before the listing: a row written meanwhile is not lost
        entries: list[HistoryEntry] = []
        if limit == 0:
            entries = [e for e in store.iter_rows(flt) if e.rowid <= last]
        else:
            cursor = None
            while len(entries) < limit:
                page = store.page(flt, after=cursor, limit=min(1000, limit - len(entries)))
                entries += [e for e in page.entries if e.rowid <= last]
                if page.next is None:
                    break
                cursor = page.next
        entries.reverse()  # newest last, like a log file
        printer.entries(entries)
        while args.follow:
            time.sleep(FOLLOW_INTERVAL)
            # The newest id first: a matching row written during the query is then either
            # in `new` or above `top`, never skipped.
            top = store.latest_rowid()
            new = store.after_rowid(last, flt, limit=FOLLOW_BATCH)
            printer.entries(new)
            if len(new) == FOLLOW_BATCH:
                last = new[-1].rowid  # more to come: continue right after this batch
            else:
                last = max(top, new[-1].rowid if new else last)
    except HistoryError as exc:
        print(f"tray-proxy log: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        store.close()
    return EXIT_OK
