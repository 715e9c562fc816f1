"""The connection history: one SQLite row per closed connection, kept across restarts.

`HistoryWriter` is what the app and `tray-proxy run` feed: `submit(rows)` only appends to a
bounded in-memory queue; a child process (history_writer_worker.py) writes batches, one
transaction each, at least every `flush_interval` (0.5 s), and enforces retention. So no disk
write (nor any SQL work taking the GIL) ever happens on the engine's loop or the UI thread,
and a `kill -9` loses at most the last unflushed batch:
SQLite's WAL with synchronous=NORMAL loses no committed transaction when a process dies
(only a power cut can cost the last ones), and never corrupts the file.

`HistoryStore` is what readers use (the dashboard's Log tab, `tray-proxy log`, exports):
keyset pages newest first, filters backed by indexes, `after_rowid` for --follow.

Layout, and why:
- Host names go to a `hosts` dictionary (one row per distinct name) and each connection keeps
  the host's id. A host filter of any shape (exact, `*.suffix` glob, `%substring%`) is then
  matched against the few thousand distinct names, never against a million rows, and the
  matching ids are looked up in the (host_id, started) index.
- Every filtered column has an index ending in `started`, so a page is an index range read
  newest first; a page first selects (id, started) only (covered by the index) and then
  reads the full rows of that page by id.
- Free pages are reused, not vacuumed: retention deletes the oldest rows in chunks, and the
  pages they free hold the next rows, so the file stays near its size limit without the
  write cost of moving pages. The database is created with auto_vacuum=INCREMENTAL only so
  that a lowered size limit can give space back (`incremental_vacuum`, run when a third of
  the file is free pages).

A row holds nothing secret (see monitor/rows.py); no column takes free-form text other than
the engine's `detail` and the failure's `words`.

Must not import PySide6 or asyncio.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import json
import logging
import os
import select
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from platformdirs import user_state_path

from tray_proxy.errors import UserError
from tray_proxy.monitor.history_writer_worker import encode_row
from tray_proxy.monitor.query import HistoryCursor, HistoryEntry, HistoryFilter, HistoryPage
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowState
from tray_proxy.relay.records import CloseReason

__all__ = [
    "HistoryError",
    "HistoryStore",
    "HistoryWriter",
    "default_history_path",
    "export_rows",
]

log = logging.getLogger(__name__)

APP_NAME = "tray-proxy"
FILE_NAME = "history.sqlite3"
# PRAGMA application_id marks the file as ours ("TPXH"); user_version is the schema version.
APPLICATION_ID = 0x54505848
SCHEMA_VERSION = 2  # 2: connections.route (issue 15), added to a version 1 file on open
# More pending rows than this means the disk cannot keep up: the oldest are dropped.
MAX_PENDING = 100_000
RETENTION_INTERVAL = 60.0  # seconds between retention passes of the writer
_CHUNK = 5_000  # rows deleted per retention transaction (readers and the writer interleave)
_MAX_CHUNKS = 2_000  # bound of one retention pass (10 million rows)
# A host filter matching more names than this is passed to SQLite as a subquery.
_MAX_HOST_IDS = 500
# Distinct process or upstream names looked at by a text search at most.
_MAX_DISTINCT = 5_000
# How long a text search scans newest first before it looks the text up through the indexes.
SCAN_BUDGET = 0.05
_PROGRESS_STEPS = 10_000  # SQLite VM steps between two looks at the clock


class HistoryError(UserError):
    """The history cannot be read or written. `str()` says what happened and what to do."""


def default_history_path() -> Path:
    """Where the app and `tray-proxy run` keep the history ([log] path overrides it)."""
    return user_state_path(APP_NAME) / FILE_NAME


# --------------------------------------------------------------------------- schema

_SCHEMA = """
CREATE TABLE hosts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE connections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conn_id INTEGER NOT NULL,
    started REAL NOT NULL,
    established REAL,
    ended REAL,
    client_ip TEXT NOT NULL,
    client_port INTEGER NOT NULL,
    dst_ip TEXT,
    dst_port INTEGER,
    host_id INTEGER REFERENCES hosts(id),
    upstream TEXT,
    state TEXT NOT NULL,
    failed INTEGER NOT NULL,
    handshake_latency REAL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    close_reason TEXT,
    detail TEXT NOT NULL,
    words TEXT NOT NULL,
    process_name TEXT,
    pid INTEGER,
    exe TEXT,
    user TEXT,
    container TEXT,
    exited INTEGER NOT NULL,
    remote INTEGER NOT NULL,
    route TEXT NOT NULL DEFAULT ''
);
CREATE INDEX ix_started ON connections(started);
CREATE INDEX ix_host ON connections(host_id, started);
CREATE INDEX ix_process ON connections(process_name COLLATE NOCASE, started);
CREATE INDEX ix_upstream ON connections(upstream, started);
CREATE INDEX ix_reason ON connections(close_reason, started);
CREATE INDEX ix_failed ON connections(started) WHERE failed = 1;
"""

_COLUMNS = (
    "conn_id",
    "started",
    "established",
    "ended",
    "client_ip",
    "client_port",
    "dst_ip",
    "dst_port",
    "host_id",
    "upstream",
    "state",
    "failed",
    "handshake_latency",
    "bytes_up",
    "bytes_down",
    "close_reason",
    "detail",
    "words",
    "process_name",
    "pid",
    "exe",
    "user",
    "container",
    "exited",
    "remote",
    "route",
)
_HOST_ID = _COLUMNS.index("host_id")  # where _row_values puts the host's id
_INSERT = (
    f"INSERT INTO connections ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
)
_SELECT = (
    "SELECT c.id, "
    + ", ".join(f"c.{name}" for name in _COLUMNS if name != "host_id")
    + ", h.name FROM connections AS c LEFT JOIN hosts AS h ON h.id = c.host_id"
)


def _row_values(row: ConnectionRow, host_id: int | None) -> tuple[object, ...]:
    """The row's values in _COLUMNS' order (history_writer_worker.decode_values makes the
    same from a frame; a test holds them equal)."""
    process = row.process
    dst_ip, dst_port = row.original_dst if row.original_dst is not None else (None, None)
    return (
        row.conn_id,
        row.started,
        row.established,
        row.ended,
        row.client[0],
        row.client[1],
        dst_ip,
        dst_port,
        host_id,
        row.upstream,
        row.state.value,
        1 if row.failed else 0,
        row.handshake_latency,
        row.bytes_up,
        row.bytes_down,
        row.close_reason.value if row.close_reason is not None else None,
        row.detail,
        row.words,
        process.name if process is not None else None,
        process.pid if process is not None else None,
        process.exe if process is not None else None,
        process.user if process is not None else None,
        process.container if process is not None else None,
        1 if process is not None and process.exited else 0,
        1 if process is not None and process.remote else 0,
        row.route,
    )


def _entry(values: Sequence[Any]) -> HistoryEntry:
    (
        rowid,
        conn_id,
        started,
        established,
        ended,
        client_ip,
        client_port,
        dst_ip,
        dst_port,
        upstream,
        state,
        _failed,
        handshake_latency,
        bytes_up,
        bytes_down,
        close_reason,
        detail,
        words,
        process_name,
        pid,
        exe,
        user,
        container,
        exited,
        remote,
        route,
        host,
    ) = values
    process = None
    if process_name is not None:
        process = ProcessInfo(
            pid=pid,
            name=process_name,
            exe=exe,
            user=user,
            exited=bool(exited),
            container=container,
            remote=bool(remote),
        )
    try:
        reason = CloseReason(close_reason) if close_reason is not None else None
    except ValueError:  # written by a newer version with a reason this one does not know
        reason = CloseReason.INTERNAL_ERROR
    try:
        row_state = RowState(state)
    except ValueError:
        row_state = RowState.CLOSED
    row = ConnectionRow(
        conn_id=conn_id,
        started=started,
        client=(client_ip, client_port),
        original_dst=(dst_ip, dst_port) if dst_ip is not None else None,
        host=host,
        upstream=upstream,
        state=row_state,
        established=established,
        handshake_latency=handshake_latency,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        ended=ended,
        close_reason=reason,
        detail=detail,
        words=words,
        process=process,
        route=route,
    )
    return HistoryEntry(rowid=rowid, row=row)


# --------------------------------------------------------------------------- filters


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def host_condition(pattern: str) -> tuple[str, list[object]]:
    """The WHERE clause over `hosts.name` for a host pattern (case-insensitive):
    `*` or `?` make it a glob (`*.example.com`: the subdomains of example.com), `%` a LIKE
    pattern (`%corp%`: contains "corp"); anything else is the exact name."""
    text = pattern.strip().lower()
    if "*" in text or "?" in text:
        return "lower(name) GLOB ?", [text]
    if "%" in text:
        return "name LIKE ?", [text]
    return "name = ? COLLATE NOCASE", [text]


class _Query:
    """A HistoryFilter turned into SQL over `connections AS c`."""

    def __init__(self, conn: sqlite3.Connection, flt: HistoryFilter) -> None:
        self.where: list[str] = []
        self.params: list[object] = []
        self.empty = False  # a filter that can match nothing (an unknown host)
        if flt.since is not None:
            self.where.append("c.started >= ?")
            self.params.append(flt.since)
        if flt.until is not None:
            self.where.append("c.started < ?")
            self.params.append(flt.until)
        if flt.host:
            clause, args = host_condition(flt.host)
            ids = [
                int(r[0])
                for r in conn.execute(
                    f"SELECT id FROM hosts WHERE {clause} LIMIT {_MAX_HOST_IDS + 1}", args
                )
            ]
            if not ids:
                self.empty = True
            elif len(ids) == 1:
                self.where.append("c.host_id = ?")
                self.params.append(ids[0])
            elif len(ids) <= _MAX_HOST_IDS:
                self.where.append(f"c.host_id IN ({', '.join(str(i) for i in ids)})")
            else:
                self.where.append(f"c.host_id IN (SELECT id FROM hosts WHERE {clause})")
                self.params.extend(args)
        if flt.process:
            self.where.append("c.process_name = ? COLLATE NOCASE")
            self.params.append(flt.process)
        if flt.upstream:
            self.where.append("c.upstream = ?")
            self.params.append(flt.upstream)
        if flt.failed_only:
            self.where.append("c.failed = 1")  # a literal, so the partial index applies
        if flt.reason:
            self.where.append("c.close_reason = ?")
            self.params.append(flt.reason)
        if flt.route:
            # No index: a rare question ("what did rule[2] decide?"), read newest first
            # through ix_started until the page is full.
            self.where.append("c.route LIKE ? ESCAPE '\\'")
            self.params.append(f"%{_like_escape(flt.route)}%")
        self.text: str | None = None
        if flt.text:
            # No index serves a substring of five columns. A page first scans newest first
            # until it is full (fast when the text is common); when that takes longer than
            # SCAN_BUDGET, `candidates` finds the rows through the indexes instead (fast
            # when it is rare). See HistoryStore._keys.
            self.text = flt.text
            like = f"%{_like_escape(flt.text)}%"
            columns = ("c.process_name", "c.upstream", "c.dst_ip", "c.words")
            self.where.append(
                "(c.host_id IN (SELECT id FROM hosts WHERE name LIKE ? ESCAPE '\\')"
                + "".join(f" OR {column} LIKE ? ESCAPE '\\'" for column in columns)
                + ")"
            )
            self.params.extend([like] * 5)

    def sql(self, extra: str = "") -> str:
        clauses = [*self.where, extra] if extra else self.where
        return " WHERE " + " AND ".join(clauses) if clauses else ""

    def candidates(self, conn: sqlite3.Connection) -> tuple[str, list[object]]:
        """A subquery of the ids of every row the text can match, each part read through an
        index: hosts through the host dictionary, process and upstream names through their
        distinct values, words through the failed rows (only a failure has words). The
        full WHERE still applies on top, so the result is the same as the scan's."""
        assert self.text is not None
        text = self.text
        like = f"%{_like_escape(text)}%"
        needle = text.lower()
        parts = [
            "SELECT id FROM connections WHERE host_id IN (SELECT id FROM hosts "
            "WHERE name LIKE ? ESCAPE '\\')"
        ]
        params: list[object] = [like]
        for column, collate in (("process_name", " COLLATE NOCASE"), ("upstream", "")):
            for name in _distinct(conn, column, collate):
                if needle in name.lower():
                    parts.append(f"SELECT id FROM connections WHERE {column} = ?{collate}")
                    params.append(name)
        parts.append("SELECT id FROM connections WHERE failed = 1 AND words LIKE ? ESCAPE '\\'")
        params.append(like)
        if all(c in "0123456789abcdefABCDEF.:" for c in text):
            # Could be part of an address: no index helps with a substring, so this scans.
            parts.append("SELECT id FROM connections WHERE dst_ip LIKE ? ESCAPE '\\'")
            params.append(like)
        return " UNION ".join(parts), params


def _distinct(conn: sqlite3.Connection, column: str, collate: str) -> list[str]:
    """The distinct values of an indexed column, one index seek per value (a skip scan)."""
    rows = conn.execute(
        f"""WITH RECURSIVE d(v) AS (
            SELECT (SELECT min({column}{collate}) FROM connections)
            UNION ALL
            SELECT (SELECT min({column}{collate}) FROM connections WHERE {column}{collate} > d.v)
            FROM d WHERE d.v IS NOT NULL LIMIT {_MAX_DISTINCT}
        ) SELECT v FROM d WHERE v IS NOT NULL"""
    ).fetchall()
    return [str(r[0]) for r in rows]


# --------------------------------------------------------------------------- the store


def _move_aside(path: Path, why: str) -> Path:
    """Rename a database we cannot use (and its WAL) out of the way; returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for n in range(1, 100):
        if not target.exists():
            break
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return target  # another process (the app's reader or writer) moved it first
    except OSError as exc:
        raise HistoryError(
            f"The connection history {path} {why}, and it cannot be renamed: "
            f"{exc.strerror or exc}. Move it away yourself, or set [log] path in the settings."
        ) from None
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        os.replace(wal, target.with_name(target.name + "-wal"))
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + "-shm").unlink()
    log.warning(
        "The connection history %s %s; moved it to %s and started a new, empty history.",
        path,
        why,
        target,
    )
    return target


def _create_file(path: Path) -> None:
    """Make the directory (0700) and an empty file (0600) before SQLite does: SQLite gives
    the -wal and -shm files the database's own mode."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise HistoryError(
            f"Cannot create the connection history {path}: {exc.strerror or exc}. "
            "Check that the directory is writable, or set [log] path in the settings."
        ) from None
    os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit (BEGIN ... COMMIT), one per batch.
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _classify(conn: sqlite3.Connection) -> str:
    """ "new", "ours", "newer" or "foreign"; raises sqlite3.DatabaseError for a corrupt file.

    The three reads share one read transaction: read one by one, a header from before
    another process created the schema and a table count from after it made our own fresh
    file look like another program's."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    finally:
        if own:
            conn.execute("COMMIT")
    if app_id == 0 and version == 0 and tables == 0:
        return "new"
    if app_id != APPLICATION_ID:
        return "foreign"
    return "newer" if version > SCHEMA_VERSION else "ours"


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (BEGIN IMMEDIATE: the write lock at once), committed at the
    end of the block, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _create_schema(conn: sqlite3.Connection) -> None:
    # auto_vacuum must be set before the first table exists.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    with _immediate(conn):
        if _classify(conn) == "new":  # another process may have won the race
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# A version 1 file (the release before routing) gets what version 2 added, in place, inside
# one transaction: the column comes with a constant default, so SQLite only rewrites the
# table's definition, not its rows (a million-row history migrates in milliseconds).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE connections ADD COLUMN route TEXT NOT NULL DEFAULT ''",),
}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older schema of ours up to SCHEMA_VERSION. The version is read again under
    the write lock: another process (the app's writer, a reader) may have migrated first."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    with _immediate(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _open(path: Path, *, check: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the history at `path`, moving a corrupt or foreign file
    aside. `check` runs SQLite's quick_check as well (a full read: the writer does it once,
    on its own thread).

    Opens racing on a new file (the app's writer and a reader) can meet SQLite's "database
    is locked" where it does not wait (switching to WAL needs the file to itself): tried
    again a few times, briefly, before that is an error."""
    for attempt in range(_LOCKED_RETRIES):
        try:
            return _open_once(path, check=check)
        except _Locked:
            time.sleep(0.02 * (attempt + 1))
    return _open_once(path, check=check, retried=True)


_LOCKED_RETRIES = 5
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED


class _Locked(Exception):
    pass


def _open_once(path: Path, *, check: bool, retried: bool = False) -> sqlite3.Connection:
    _create_file(path)
    for _attempt in range(2):  # a second time after moving a bad file aside
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path)
            kind = _classify(conn)
            if kind == "foreign":
                conn.close()
                _move_aside(path, "is an SQLite database of another program")
                _create_file(path)
                continue
            if kind == "newer":
                conn.close()
                raise HistoryError(
                    f"The connection history {path} was written by a newer tray-proxy. "
                    "Update tray-proxy, or set [log] path to another file in the settings."
                )
            if kind == "new":
                _create_schema(conn)
            else:
                _migrate(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Keep the WAL from staying large after a burst (it is truncated at checkpoints).
            conn.execute("PRAGMA journal_size_limit = 16777216")
            if check:
                result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {result}")
            return conn
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            code = getattr(exc, "sqlite_errorcode", 0)
            if not retried and isinstance(code, int) and (code & 0xFF) in _BUSY_CODES:
                raise _Locked() from None
            if _is_transient(exc):
                raise HistoryError(
                    f"The connection history {path} cannot be opened: {exc}. "
                    "Check the disk and the file's permissions."
                ) from None
            _move_aside(path, f"cannot be read ({exc})")
            _create_file(path)
        except OSError as exc:
            if conn is not None:
                conn.close()
            raise HistoryError(
                f"The connection history {path} cannot be opened: {exc.strerror or exc}. "
                "Check the disk and the file's permissions."
            ) from None
    raise HistoryError(
        f"The connection history {path} cannot be used even after moving it aside. "
        "Set [log] path in the settings to another file."
    )


# SQLite's primary result codes that say nothing about the file's content: permissions,
# busy, locked, no memory, read-only, I/O error, disk full, cannot open.
_TRANSIENT_CODES = frozenset({3, 5, 6, 7, 8, 10, 13, 14})


def _is_transient(exc: sqlite3.DatabaseError) -> bool:
    """The file may be fine (locked, busy, disk full, ...): never move it aside for this."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _TRANSIENT_CODES
    text = str(exc).lower()
    return any(w in text for w in ("locked", "busy", "readonly", "disk i/o", "is full", "unable"))


class HistoryStore:
    """One connection to the history file. Thread-safe (one lock); `export` opens its own
    connection so that a long export does not hold up `page` on another thread."""

    def __init__(self, path: Path, *, check: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = _open(path, check=check)
        self._host_ids: dict[str, int] = {}

    # -- reading

    def page(
        self,
        filter: HistoryFilter,  # the name HistoryReader's protocol uses
        *,
        after: HistoryCursor | None = None,
        limit: int = 200,
    ) -> HistoryPage:
        """The newest `limit` rows matching `filter`, older than `after` (keyset paging)."""
        limit = max(1, limit)
        with self._lock, self._errors():
            query = _Query(self._conn, filter)
            if query.empty:
                return HistoryPage((), None)
            params = list(query.params)
            extra = ""
            if after is not None:
                extra = "(c.started, c.id) < (?, ?)"
                params += [after.started, after.rowid]
            # Ids first (read from the index alone), then the rows of this page only.
            keys = self._keys(query, extra, params, limit + 1)
            more = len(keys) > limit
            keys = keys[:limit]
            entries = self._fetch([k[0] for k in keys])
        entries.sort(key=lambda e: (e.row.started, e.rowid), reverse=True)
        cursor = None
        if more and entries:
            cursor = HistoryCursor(started=entries[-1].row.started, rowid=entries[-1].rowid)
        return HistoryPage(tuple(entries), cursor)

    def _keys(
        self, query: _Query, extra: str, params: list[object], limit: int
    ) -> list[tuple[int, float]]:
        order = " ORDER BY c.started DESC, c.id DESC LIMIT ?"
        sql = f"SELECT c.id, c.started FROM connections AS c{query.sql(extra)}{order}"
        if query.text is None:
            return self._conn.execute(sql, [*params, limit]).fetchall()
        deadline = time.monotonic() + SCAN_BUDGET
        self._conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
        try:
            return self._conn.execute(sql, [*params, limit]).fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupt" not in str(exc):
                raise
        finally:
            self._conn.set_progress_handler(None, 0)
        # A rare text: start from the rows it can match (CROSS JOIN keeps that order).
        source, source_params = query.candidates(self._conn)
        sql = (
            f"SELECT c.id, c.started FROM ({source}) AS m CROSS JOIN connections AS c "
            f"ON c.id = m.id{query.sql(extra)}{order}"
        )
        return self._conn.execute(sql, [*source_params, *params, limit]).fetchall()

    def iter_rows(self, filter: HistoryFilter) -> Iterator[HistoryEntry]:
        """Every row matching `filter`, newest first, read a page at a time."""
        cursor: HistoryCursor | None = None
        while True:
            page = self.page(filter, after=cursor, limit=1000)
            yield from page.entries
            if page.next is None:
                return
            cursor = page.next

    def latest_rowid(self) -> int:
        """The id of the newest row written (0 when empty); --follow starts after it."""
        with self._lock, self._errors():
            value = self._conn.execute("SELECT max(id) FROM connections").fetchone()[0]
        return int(value or 0)

    def after_rowid(
        self,
        rowid: int,
        filter: HistoryFilter,
        limit: int = 10_000,
    ) -> list[HistoryEntry]:
        """Rows written after `rowid` that match `filter`, oldest first (for --follow)."""
        with self._lock, self._errors():
            query = _Query(self._conn, filter)
            if query.empty:
                # A host that did not exist yet may appear later: only the ids move on.
                return []
            ids = [
                r[0]
                for r in self._conn.execute(
                    f"SELECT c.id FROM connections AS c{query.sql('c.id > ?')} "
                    "ORDER BY c.id LIMIT ?",
                    [*query.params, rowid, limit],
                )
            ]
            entries = self._fetch(ids)
        entries.sort(key=lambda e: e.rowid)
        return entries

    def count(self) -> int:
        with self._lock, self._errors():
            return int(self._conn.execute("SELECT count(*) FROM connections").fetchone()[0])

    def export(self, filter: HistoryFilter, path: Path, fmt: str) -> int:
        """Write every row matching `filter` to `path` ("csv" or "json": JSON lines)."""
        if fmt not in ("csv", "json"):
            raise ValueError(f"unknown export format {fmt!r}")
        reader = HistoryStore(self.path)
        try:
            with open(path, "w", encoding="utf-8", newline="") as fp:
                return export_rows(reader.iter_rows(filter), fp, fmt)
        except OSError as exc:
            raise HistoryError(
                f"Cannot write the export to {path}: {exc.strerror or exc}. "
                "Choose another file or folder."
            ) from None
        finally:
            reader.close()

    def _fetch(self, ids: Sequence[int]) -> list[HistoryEntry]:
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        rows = self._conn.execute(f"{_SELECT} WHERE c.id IN ({marks})", list(ids)).fetchall()
        return [_entry(values) for values in rows]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise HistoryError(
                f"Cannot read the connection history {self.path}: {exc}. "
                "If this persists, quit tray-proxy and move the file away; a new one is made."
            ) from None

    # -- writing (the writer thread; tests and the bench call these directly)

    def write(self, rows: Sequence[ConnectionRow]) -> None:
        """Append `rows` in one transaction."""
        self.write_values([(row.host, list(_row_values(row, None))) for row in rows])

    def write_values(self, rows: Sequence[tuple[str | None, list[object]]]) -> None:
        """Append rows given as (host name, the column values of `_row_values` with the host
        id left None, as a list), in one transaction: the writer child's way, which gets
        the values straight from the relay's frames (history_writer_worker.decode_values)."""
        if not rows:
            return
        with self._lock:
            conn = self._conn
            try:
                with _immediate(conn):
                    for host, values in rows:
                        values[_HOST_ID] = self._host_id(host)
                    conn.executemany(_INSERT, [values for _, values in rows])
            except BaseException:
                self._host_ids.clear()  # ids made inside the rolled-back transaction
                raise

    def _host_id(self, host: str | None) -> int | None:
        if not host:
            return None
        name = host.lower()
        cached = self._host_ids.get(name)
        if cached is not None:
            return cached
        conn = self._conn
        found = conn.execute("SELECT id FROM hosts WHERE name = ?", (name,)).fetchone()
        if found is None:
            cursor = conn.execute("INSERT INTO hosts (name) VALUES (?)", (name,))
            host_id = int(cursor.lastrowid or 0)
        else:
            host_id = int(found[0])
        if len(self._host_ids) > 50_000:
            self._host_ids.clear()
        self._host_ids[name] = host_id
        return host_id

    def retention(self, now: float, *, max_age_days: float, max_bytes: int) -> int:
        """Delete the oldest rows until none is older than `max_age_days` and the file's
        used pages fit in `max_bytes`. Chunked, one transaction per chunk. Returns how many
        rows went."""
        removed = 0
        cutoff = now - max_age_days * 86400.0
        for _ in range(_MAX_CHUNKS):
            n = self._delete_oldest("started < ?", [cutoff], _CHUNK)
            removed += n
            if n < _CHUNK:
                break
        for _ in range(_MAX_CHUNKS):
            used = self._used_bytes()
            if used <= max_bytes:
                break
            rows = self.count()
            if rows == 0:
                break
            # Aim a tenth below the limit, so that the next pass is not one row later.
            share = (used - 0.9 * max_bytes) / used
            n = self._delete_oldest("1", [], max(100, min(_CHUNK, int(rows * share) + 1)))
            removed += n
            if n == 0:
                break
        if removed:
            with self._lock:
                self._conn.execute(
                    "DELETE FROM hosts WHERE NOT EXISTS "
                    "(SELECT 1 FROM connections WHERE host_id = hosts.id)"
                )
                self._host_ids.clear()
                pages, free = self._pages()
                if free * 3 > pages:
                    # One page per step: executescript steps it to the end, execute would not.
                    self._conn.executescript(f"PRAGMA incremental_vacuum({free});")
                    # The file shrinks when the WAL is written back; PASSIVE never waits for
                    # a reader (the next automatic checkpoint finishes it then).
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return removed

    def _delete_oldest(self, where: str, params: list[object], limit: int) -> int:
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM connections WHERE id IN (SELECT id FROM connections "
                f"WHERE {where} ORDER BY started LIMIT ?)",
                [*params, limit],
            )
            return max(0, cursor.rowcount)

    def _pages(self) -> tuple[int, int]:
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages), int(free)

    def _used_bytes(self) -> int:
        with self._lock:
            pages, free = self._pages()
            size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * int(size)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the writer


class HistoryWriter:
    """Writes closed connections to the history from a child process
    (monitor/history_writer_worker.py), so that no SQL work takes the caller's GIL.

    `submit` may be called from any thread and never blocks nor touches the disk: it encodes
    the rows into frames and queues them. A small thread hands the queued bytes to the child
    at least every `flush_interval` (only `os.write`, no per-row work); the child writes
    what it gets, one transaction per batch, and runs retention at start and every
    `retention_interval`. When the child cannot keep up, the queue keeps the newest
    `max_pending` rows and counts the dropped ones (`dropped`), logged once. When the child
    dies, `error` says so, the rows it held are counted dropped, and it is restarted at most
    RESTARTS times (with a backoff); rows queued while there is none are dropped too.
    """

    RESTARTS = 3
    BACKOFF = 0.5  # seconds before the first restart; doubled after each

    def __init__(
        self,
        path: Path,
        *,
        max_age_days: float = 30.0,
        max_bytes: int = 200 * 1024 * 1024,
        flush_interval: float = 0.5,
        max_pending: int = MAX_PENDING,
        retention_interval: float = RETENTION_INTERVAL,
    ) -> None:
        self.path = path
        self.max_age_days = max_age_days
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.retention_interval = retention_interval
        self.dropped = 0
        self.written = 0
        self.error: str | None = None  # the last failure, written for the user
        self._max_pending = max_pending
        self._pending: deque[bytes] = deque()  # encoded rows, one frame each
        self._lock = threading.Lock()
        self._flushed = threading.Condition(self._lock)
        self._stop = False
        self._submitted = 0
        self._done = 0  # rows written, failed by an error or dropped
        self._inflight = 0  # rows handed to the child and not yet reported
        self._restarts = 0
        self._warned = False
        self.child: subprocess.Popen[bytes] | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[ConnectionRow]) -> None:
        """Queue `rows` for writing (any thread; never touches the disk)."""
        if not rows:
            return
        skipped = max(0, len(rows) - self._max_pending)  # would be dropped at once
        lines = [encode_row(row) for row in rows[skipped:]]
        with self._lock:
            self._pending.extend(lines)
            self._submitted += len(rows)
            over = skipped + max(0, len(self._pending) - self._max_pending)
            if over > 0:
                for _ in range(over - skipped):
                    self._pending.popleft()
                self._drop(over)

    def _drop(self, n: int, *, overflow: bool = True) -> None:
        # With the lock held.
        if overflow and not self._warned:
            self._warned = True
            log.warning(
                "The connection history cannot keep up (disk too slow?): "
                "dropping the oldest unwritten rows."
            )
        self.dropped += n
        self._done += n
        self._flushed.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._submitted
            self._poke()
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._flushed.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the child and the thread (waits at most
        `timeout`)."""
        with self._lock:
            self._stop = True
        self._poke()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("The connection history writer did not finish within %g s.", timeout)

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full: already poked; closed: already stopped
            os.write(self._wake_w, b"x")

    # -- the thread: bytes to the child, its reports back

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # noqa: BLE001 - a bug here must not kill the app: log it
            log.exception("The connection history writer failed")
            self._fail(f"The connection history writer failed; {self.path} is not updated.")
        finally:
            if self.child is not None and self.child.poll() is None:
                self.child.kill()
                self.child.wait()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with self._lock:
                self._flushed.notify_all()

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        argv = [
            sys.executable,
            "-I",
            "-m",
            "tray_proxy.monitor.history_writer_worker",
            "--path",
            str(self.path),
            "--max-age-days",
            repr(float(self.max_age_days)),
            "--max-bytes",
            str(int(self.max_bytes)),
            "--retention-interval",
            repr(float(self.retention_interval)),
        ]
        try:
            # Its own session: a terminal's Ctrl+C or hang-up to the app's process group must
            # not kill the writer before the app has handed it the last rows; the app ends it
            # by closing its stdin (so does the app's death).
            child = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
            )
        except OSError as exc:
            self._fail(f"The connection history writer could not be started: {exc}.")
            return None
        assert child.stdin is not None and child.stdout is not None
        os.set_blocking(child.stdin.fileno(), False)
        with contextlib.suppress(OSError):  # fewer, larger writes (Linux's F_SETPIPE_SZ)
            fcntl.fcntl(child.stdin.fileno(), 1031, 1 << 20)
        return child

    def _serve(self) -> None:
        child = self.child = self._spawn()
        out = memoryview(b"")  # bytes taken from the queue, not yet in the pipe
        reports = b""
        next_tick = time.monotonic() + self.flush_interval
        restart_at: float | None = None
        closing_stdin = False
        while True:
            with self._lock:
                stopping = self._stop
            now = time.monotonic()
            if child is None:
                # No child (restarting or given up): what is queued is dropped.
                with self._lock:
                    if self._pending:
                        n = len(self._pending)
                        self._pending.clear()
                        self._drop(n, overflow=False)
                if stopping:
                    return
                if restart_at is not None and now >= restart_at:
                    restart_at = None
                    child = self.child = self._spawn()
                    if child is None:
                        restart_at = self._death(None)
                    continue
            elif stopping or now >= next_tick:
                if not out:
                    with self._lock:
                        lines = list(self._pending)
                        self._pending.clear()
                        self._inflight += len(lines)
                    out = memoryview(b"".join(lines))
                if stopping and not out and not closing_stdin:
                    with self._lock:
                        empty = not self._pending
                    if empty:
                        closing_stdin = True
                        assert child.stdin is not None
                        with contextlib.suppress(OSError):
                            child.stdin.close()
                next_tick = time.monotonic() + self.flush_interval
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            if child is not None:
                assert child.stdout is not None and child.stdin is not None
                poller.register(child.stdout.fileno(), select.POLLIN)
                if out and not closing_stdin:
                    poller.register(child.stdin.fileno(), select.POLLOUT)
            until = restart_at if child is None else next_tick
            if until is None:
                until = time.monotonic() + self.flush_interval
            wait_ms = max(0, int((until - time.monotonic()) * 1000) + 1)
            if stopping and child is not None and out:
                wait_ms = min(wait_ms, 50)
            for fd, _events in poller.poll(wait_ms):
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    next_tick = time.monotonic()  # hand over at once (flush, close)
                elif child is not None and fd == child.stdout.fileno():  # type: ignore[union-attr]
                    data = os.read(fd, 65536)
                    if data:
                        reports += data
                        *lines_in, reports = reports.split(b"\n")
                        for line in lines_in:
                            self._report(line)
                        continue
                    # The child ended: at close, after writing everything; else it died.
                    code = child.wait()
                    assert child.stdout is not None
                    child.stdout.close()
                    if child.stdin is not None:
                        with contextlib.suppress(OSError):
                            child.stdin.close()
                    child = self.child = None
                    out = memoryview(b"")
                    if closing_stdin and code == 0 and not self._inflight:
                        return
                    restart_at = self._death(code)
                    if stopping:
                        with self._lock:
                            if self._pending:
                                n = len(self._pending)
                                self._pending.clear()
                                self._drop(n, overflow=False)
                        return
                    break
                elif child is not None and out:
                    try:
                        n = os.write(fd, out)
                    except BlockingIOError:
                        continue
                    except OSError:
                        continue  # broken pipe: the child's stdout's end tells
                    out = out[n:]

    def _report(self, line: bytes) -> None:
        kind, _, rest = line.partition(b" ")
        count_text, _, message = rest.partition(b" ")
        try:
            n = int(count_text)
        except ValueError:
            return
        with self._lock:
            self._inflight -= n
            self._done += n
            if kind == b"W":
                self.written += n
                self.error = None
            self._flushed.notify_all()
        if kind == b"E":
            try:
                text = str(json.loads(message))
            except ValueError:
                text = message.decode(errors="replace")
            self._fail(text)

    def _death(self, code: int | None) -> float | None:
        """The child died (or did not start): account for its rows; when to restart."""
        with self._lock:
            lost = self._inflight
            self._inflight = 0
            if lost:
                self._drop(lost, overflow=False)
        how = (
            "could not be started" if code is None else f"stopped unexpectedly (exit status {code})"
        )
        if self._restarts >= self.RESTARTS:
            self._fail(
                f"The connection history writer {how}; new connections are no longer saved "
                f"to {self.path} until tray-proxy is restarted."
            )
            return None
        delay = self.BACKOFF * (1 << self._restarts)
        self._restarts += 1
        self._fail(
            f"The connection history writer {how}; {lost} connections were not saved. "
            "It is being restarted."
        )
        return time.monotonic() + delay

    def _fail(self, message: str) -> None:
        if message != self.error:
            log.warning("%s", message)
        self.error = message


# --------------------------------------------------------------------------- export

EXPORT_FIELDS = (
    "id",
    "started",
    "ended",
    "duration_s",
    "process",
    "pid",
    "exe",
    "user",
    "container",
    "process_exited",
    "client",
    "original_destination",
    "host",
    "upstream",
    "state",
    "bytes_up",
    "bytes_down",
    "handshake_ms",
    "close_reason",
    "detail",
    "words",
    # Added with the history's version 2: last, so a script that reads the CSV by position
    # keeps working.
    "route",
)


def iso_time(stamp: float | None) -> str | None:
    """Local time with its UTC offset, millisecond precision."""
    if stamp is None:
        return None
    return dt.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="milliseconds")


def _address(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def export_record(entry: HistoryEntry) -> dict[str, object]:
    """One row as the exports write it (the field names are EXPORT_FIELDS)."""
    row = entry.row
    process = row.process
    duration = row.duration
    return {
        "id": entry.rowid,
        "started": iso_time(row.started),
        "ended": iso_time(row.ended),
        "duration_s": round(duration, 3) if duration is not None else None,
        "process": process.name if process is not None else None,
        "pid": process.pid if process is not None else None,
        "exe": process.exe if process is not None else None,
        "user": process.user if process is not None else None,
        "container": process.container if process is not None else None,
        "process_exited": process.exited if process is not None else None,
        "client": _address(row.client),
        "original_destination": _address(row.original_dst),
        "host": row.host,
        "upstream": row.upstream,
        "state": row.state.value,
        "bytes_up": row.bytes_up,
        "bytes_down": row.bytes_down,
        "handshake_ms": (
            round(row.handshake_latency * 1000, 1) if row.handshake_latency is not None else None
        ),
        "close_reason": row.close_reason.value if row.close_reason is not None else None,
        "detail": row.detail,
        "words": row.words,
        "route": row.route,
    }


def export_rows(entries: Iterable[HistoryEntry], fp: TextIO, fmt: str) -> int:
    """Write `entries` to `fp`: "csv" with a header line, or "json" as JSON lines (one
    object per line, so a stream can be read before it ends). Returns the row count."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(fp, fieldnames=EXPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
        for entry in entries:
            record = export_record(entry)
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
            count += 1
    elif fmt == "json":
        for entry in entries:
            fp.write(json.dumps(export_record(entry), ensure_ascii=False) + "\n")
            count += 1
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    return count
