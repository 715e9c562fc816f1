"""Tests of tray_proxy/monitor/history.py: the SQLite connection history.

Real SQLite files under tmp_path; the kill -9 test runs a writer in a separate process.
Must not import PySide6.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import marshal
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tray_proxy.monitor.history import (
    EXPORT_FIELDS,
    HistoryError,
    HistoryStore,
    HistoryWriter,
    _row_values,
    default_history_path,
    export_rows,
)
from tray_proxy.monitor.history_writer_worker import decode_values, encode_row
from tray_proxy.monitor.query import HistoryFilter
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowState
from tray_proxy.relay.records import CloseReason

# A password the rest of the test "knows" (as if typed into Credentials); it must never reach
# the history or an export.
KNOWN_PASSWORD = "Tr4y-pr0xy-test-password-9f3c"


ROUTES = (
    "block (rule[1]: proxy.corp -> block)",  # (the failed rows)
    "direct (rule[0]: .example.com -> direct)",
    "",  # no router (one upstream)
    "proxy corp, lab (default)",
)


def make_row(i: int, **changes: object) -> ConnectionRow:
    failed = i % 4 == 0
    row = ConnectionRow(
        conn_id=i,
        started=1_700_000_000.0 + i,
        client=("127.0.0.1", 40_000 + i),
        original_dst=("93.184.216.34", 443),
        host=("api.example.com", "example.com", "proxy.corp", None)[i % 4],
        upstream=("corp", "lab")[i % 2],
        state=RowState.FAILED if failed else RowState.CLOSED,
        established=None if failed else 1_700_000_000.0 + i + 0.01,
        handshake_latency=None if failed else 0.01,
        bytes_up=10 * i,
        bytes_down=100 * i,
        ended=1_700_000_000.0 + i + 2,
        close_reason=CloseReason.UPSTREAM_AUTH_FAILED if failed else CloseReason.DONE,
        detail="HTTP/1.1 407 Proxy Authentication Required" if failed else "",
        words="proxy.corp:8080 refused the password for alice (407). Open Credentials to fix it."
        if failed
        else "",
        process=ProcessInfo(pid=100 + i, name=("curl", "Firefox", "git")[i % 3], user="alice"),
        route=ROUTES[i % 4],
    )
    return replace(row, **changes)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tray-proxy" / "history.sqlite3"


@pytest.fixture
def store(path: Path) -> HistoryStore:
    s = HistoryStore(path)
    yield s  # type: ignore[misc]
    s.close()


def test_default_path_is_in_the_xdg_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_history_path() == tmp_path / "tray-proxy" / "history.sqlite3"


def test_every_field_round_trips(store: HistoryStore) -> None:
    full = ConnectionRow(
        conn_id=7,
        started=1_700_000_123.456789,
        client=("::1", 51_234),
        original_dst=("2001:db8::5", 8443),
        host="www.example.org",
        upstream="corp",
        state=RowState.FAILED,
        established=1_700_000_123.5,
        handshake_latency=0.0431,
        bytes_up=12_345_678_901,
        bytes_down=98_765,
        ended=1_700_000_130.25,
        close_reason=CloseReason.UPSTREAM_RESET,
        detail="connection reset by peer",
        words="The proxy closed the connection mid-transfer.",
        process=ProcessInfo(
            pid=4242,
            name="python3",
            exe="/usr/bin/python3.11",
            user="alice",
            exited=True,
            container="web-1",
            remote=True,
        ),
        route="proxy corp, backup (rule[2]: *.example.org -> corp)",
    )
    bare = ConnectionRow(
        conn_id=8, started=1_700_000_200.0, client=("10.0.0.2", 1), original_dst=None
    )
    store.write([full, bare])
    entries = store.page(HistoryFilter()).entries
    assert [e.row for e in entries] == [bare, full]
    assert entries[1].rowid < entries[0].rowid


def test_file_and_directory_are_private(path: Path, store: HistoryStore) -> None:
    store.write([make_row(1)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) == 0o600


def _all(store: HistoryStore, flt: HistoryFilter, limit: int = 7) -> list[int]:
    """Every matching conn id, page by page (keyset)."""
    out: list[int] = []
    cursor = None
    for _ in range(1000):
        page = store.page(flt, after=cursor, limit=limit)
        out += [e.row.conn_id for e in page.entries]
        if page.next is None:
            return out
        cursor = page.next
    raise AssertionError("paging did not end")


def test_keyset_paging_has_no_duplicates_or_gaps_even_with_equal_start_times(
    store: HistoryStore,
) -> None:
    # Three rows per start time: the rowid breaks the tie.
    rows = [make_row(i, started=1_700_000_000.0 + i // 3) for i in range(100)]
    store.write(rows[:50])
    store.write(rows[50:])
    assert _all(store, HistoryFilter()) == list(range(99, -1, -1))
    for limit in (1, 3, 50, 100, 500):
        assert _all(store, HistoryFilter(), limit) == list(range(99, -1, -1))


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (HistoryFilter(host="example.com"), lambda r: r.host == "example.com"),
        (HistoryFilter(host="EXAMPLE.com"), lambda r: r.host == "example.com"),
        (HistoryFilter(host="*.example.com"), lambda r: r.host == "api.example.com"),
        (
            HistoryFilter(host="%example%"),
            lambda r: r.host in ("api.example.com", "example.com"),
        ),
        (HistoryFilter(host="nowhere.invalid"), lambda r: False),
        (HistoryFilter(process="firefox"), lambda r: r.process.name == "Firefox"),
        (HistoryFilter(upstream="lab"), lambda r: r.upstream == "lab"),
        (HistoryFilter(failed_only=True), lambda r: r.failed),
        (HistoryFilter(reason="done"), lambda r: r.close_reason is CloseReason.DONE),
        (HistoryFilter(since=1_700_000_010.0), lambda r: r.started >= 1_700_000_010.0),
        (HistoryFilter(until=1_700_000_010.0), lambda r: r.started < 1_700_000_010.0),
        (
            HistoryFilter(text="corp"),
            lambda r: "corp" in (r.host or "") + r.words + (r.upstream or ""),
        ),
        (HistoryFilter(text="GIT"), lambda r: r.process.name == "git"),
        (HistoryFilter(text="100%_"), lambda r: False),  # LIKE wildcards are literal
        (HistoryFilter(route="direct"), lambda r: r.route_action == "direct"),
        (HistoryFilter(route="RULE["), lambda r: "rule[" in r.route),
        (HistoryFilter(route="%"), lambda r: False),  # literal here too
        (
            HistoryFilter(route="block", failed_only=True),
            lambda r: r.failed and r.route_action == "block",
        ),
        (
            HistoryFilter(host="*.example.com", failed_only=False, upstream="lab", since=1.0),
            lambda r: r.host == "api.example.com" and r.upstream == "lab",
        ),
    ],
)
def test_each_filter(store: HistoryStore, flt: HistoryFilter, expected: object) -> None:
    rows = [make_row(i) for i in range(40)]
    store.write(rows)
    want = [r.conn_id for r in reversed(rows) if expected(r)]  # type: ignore[operator]
    assert _all(store, flt, limit=3) == want


def test_iter_rows_latest_and_after_rowid(store: HistoryStore) -> None:
    assert store.latest_rowid() == 0
    store.write([make_row(i) for i in range(2500)])
    assert [e.row.conn_id for e in store.iter_rows(HistoryFilter())] == list(range(2499, -1, -1))
    last = store.latest_rowid()
    store.write([make_row(i) for i in range(2500, 2510)])
    new = store.after_rowid(last, HistoryFilter(failed_only=True))
    assert [e.row.conn_id for e in new] == [2500, 2504, 2508]
    assert store.after_rowid(store.latest_rowid(), HistoryFilter()) == []


def test_retention_by_age(store: HistoryStore) -> None:
    now = 1_700_100_000.0
    old = [make_row(i, started=now - 40 * 86400 + i) for i in range(12_000)]
    young = [make_row(100_000 + i, started=now - 86400 + i) for i in range(10)]
    store.write(old + young)
    removed = store.retention(now, max_age_days=30, max_bytes=1 << 40)
    assert removed == 12_000
    assert sorted(e.row.conn_id for e in store.iter_rows(HistoryFilter())) == [
        r.conn_id for r in young
    ]
    # The hosts only old rows named are gone from the dictionary too; filters still work.
    assert _all(store, HistoryFilter(host="example.com")) == [
        r.conn_id for r in reversed(young) if r.host == "example.com"
    ]


def test_retention_by_size_keeps_the_newest_and_reuses_free_pages(
    path: Path, store: HistoryStore
) -> None:
    now = time.time()
    rows = [make_row(i, started=now - 1000 + i * 0.01, detail="x" * 200) for i in range(30_000)]
    store.write(rows)
    limit = 2 * 1024 * 1024
    assert path.stat().st_size > 2 * limit
    removed = store.retention(now, max_age_days=30, max_bytes=limit)
    kept = sorted(e.row.conn_id for e in store.iter_rows(HistoryFilter()))
    assert removed == 30_000 - len(kept) > 0
    assert kept == list(range(30_000 - len(kept), 30_000))  # the newest survive, no holes
    assert 0 < len(kept) < 15_000
    assert store._used_bytes() <= limit
    assert path.stat().st_size <= limit * 1.5  # most free pages were given back
    # More rows: the file stays near the limit.
    store.write([make_row(50_000 + i, started=now + i, detail="x" * 200) for i in range(5000)])
    store.retention(now, max_age_days=30, max_bytes=limit)
    assert store._used_bytes() <= limit


def _assert_moved_aside(path: Path, original: bytes, caplog: pytest.LogCaptureFixture) -> None:
    aside = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes()[: len(original)] == original
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in m and str(aside[0]) in m for m in messages), messages


def test_a_corrupt_file_is_moved_aside(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    garbage = b"this is not a database\n" * 500
    path.write_bytes(garbage)
    with HistoryStore(path) as store:
        store.write([make_row(1)])
        assert store.count() == 1
    _assert_moved_aside(path, garbage, caplog)


def test_damaged_pages_are_found_by_the_writers_check(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with HistoryStore(path) as store:
        store.write([make_row(i, detail="y" * 300) for i in range(3000)])
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for n in range(3, 60, 2):  # scribble over table and index pages, keep the header
        data[n * page + 8 : n * page + 400] = os.urandom(392)
    path.write_bytes(bytes(data))
    original = bytes(data[:100])
    with HistoryStore(path, check=True) as store:
        assert store.count() == 0
    _assert_moved_aside(path, original, caplog)


def test_a_foreign_sqlite_file_is_moved_aside(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.execute("INSERT INTO notes VALUES ('keep me')")
    con.commit()
    con.close()
    original = path.read_bytes()
    with HistoryStore(path) as store:
        assert store.count() == 0
    _assert_moved_aside(path, original, caplog)
    aside = next(path.parent.glob("history.sqlite3.corrupt-*"))
    con = sqlite3.connect(aside)
    assert con.execute("SELECT text FROM notes").fetchall() == [("keep me",)]
    con.close()


def test_a_history_from_a_newer_version_is_refused_not_moved(path: Path) -> None:
    HistoryStore(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(HistoryError, match="newer tray-proxy"):
        HistoryStore(path)
    assert path.exists()
    assert not list(path.parent.glob("*.corrupt-*"))


# The schema of version 1 (the release before routing), as that release created it: kept
# here verbatim so that the migration is tested on a real file of the old shape.
V1_SCHEMA = """
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
    remote INTEGER NOT NULL
);
CREATE INDEX ix_started ON connections(started);
CREATE INDEX ix_host ON connections(host_id, started);
CREATE INDEX ix_process ON connections(process_name COLLATE NOCASE, started);
CREATE INDEX ix_upstream ON connections(upstream, started);
CREATE INDEX ix_reason ON connections(close_reason, started);
CREATE INDEX ix_failed ON connections(started) WHERE failed = 1;
"""


def make_v1_file(path: Path, rows: int) -> None:
    """A history as version 1 wrote it: its pragmas, its DDL, rows through its columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA auto_vacuum = INCREMENTAL")
    con.execute("BEGIN")
    for statement in V1_SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)
    con.execute(f"PRAGMA application_id = {0x54505848}")
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO hosts (id, name) VALUES (1, 'example.com')")
    con.executemany(
        "INSERT INTO connections (conn_id, started, established, ended, client_ip, "
        "client_port, dst_ip, dst_port, host_id, upstream, state, failed, handshake_latency, "
        "bytes_up, bytes_down, close_reason, detail, words, process_name, pid, exe, user, "
        "container, exited, remote) VALUES (?, ?, ?, ?, '127.0.0.1', 40000, "
        "'93.184.216.34', 443, 1, 'corp', 'closed', 0, 0.01, 10, 20, 'done', '', '', "
        "'curl', 7, NULL, 'alice', NULL, 0, 0)",
        ((i, 1_700_000_000.0 + i, 1_700_000_000.01 + i, 1_700_000_001.0 + i) for i in range(rows)),
    )
    con.execute("COMMIT")
    con.execute("PRAGMA journal_mode = WAL")
    con.close()


def _version_and_columns(path: Path) -> tuple[int, list[str]]:
    con = sqlite3.connect(path)
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        columns = [r[1] for r in con.execute("PRAGMA table_info(connections)")]
    finally:
        con.close()
    return version, columns


def test_a_version_1_history_is_migrated_in_place_and_keeps_every_row(path: Path) -> None:
    make_v1_file(path, 1000)
    with HistoryStore(path) as store:
        assert store.count() == 1000
        oldest = list(store.iter_rows(HistoryFilter()))[-1].row
        assert (oldest.conn_id, oldest.host, oldest.upstream, oldest.route) == (
            0,
            "example.com",
            "corp",
            "",  # recorded before routing existed: no decision
        )
        assert oldest.process is not None and oldest.process.name == "curl"
        store.write([make_row(5000, route="direct (default)")])
        assert store.page(HistoryFilter(route="direct"), limit=5).entries[0].row.conn_id == 5000
    version, columns = _version_and_columns(path)
    assert version == 2 and columns.count("route") == 1 and columns[-1] == "route"
    assert not list(path.parent.glob("*.corrupt-*"))  # migrated, not moved aside
    with HistoryStore(path) as again:  # opening a migrated file changes nothing
        assert again.count() == 1001
    assert _version_and_columns(path) == (version, columns)


def test_opens_racing_on_a_version_1_file_migrate_it_once(path: Path) -> None:
    make_v1_file(path, 100)
    errors: list[BaseException] = []
    counts: list[int] = []
    barrier = threading.Barrier(6)

    def open_it() -> None:
        try:
            barrier.wait(5)
            with HistoryStore(path) as store:
                counts.append(store.count())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [] and counts == [100] * 6
    assert _version_and_columns(path)[1].count("route") == 1


def test_migrating_a_large_version_1_history_rewrites_no_rows(path: Path) -> None:
    # ADD COLUMN with a constant default changes the table's definition only: the open of a
    # big old history stays as quick as any open (bench/history.py: 1M rows under 1 s).
    make_v1_file(path, 200_000)
    size = path.stat().st_size
    began = time.monotonic()
    HistoryStore(path).close()
    assert time.monotonic() - began < 1.0
    assert path.stat().st_size <= size + 64 * 1024  # no copy of the rows


def _fields(i: int) -> tuple[object, ...]:
    """encode_row's fields of make_row(i), to spoil one."""
    fields = marshal.loads(encode_row(make_row(i))[4:])
    assert isinstance(fields, tuple)
    return fields


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"process": None},
        {"process": ProcessInfo(pid=None, name="?", user="bob", exited=True)},
        {"process": ProcessInfo(pid=7, name="nginx", container="web", remote=True)},
        {"original_dst": None, "host": None, "upstream": None},
        {"state": RowState.OPEN, "close_reason": None, "ended": None},
        {"route": ""},
    ],
)
@pytest.mark.parametrize("i", [1, 4])  # closed, failed
def test_the_writer_childs_values_are_the_rows_values(i: int, changes: dict[str, object]) -> None:
    """The child stores a frame's values as decode_values makes them, without a
    ConnectionRow: they are what the store makes of the row itself, host name apart."""
    row = make_row(i, **changes)
    host, values = decode_values(encode_row(row)[4:])
    assert host == row.host
    assert tuple(values) == _row_values(row, None)
    # A frame from an app started before the upgrade (no route; the child starts from the
    # files on disk, so after `pip install -U` under a running app it gets the old app's
    # frames): a row with route "", not "malformed".
    old = marshal.dumps(marshal.loads(encode_row(row)[4:])[:-1])
    assert tuple(decode_values(old)[1]) == _row_values(replace(row, route=""), None)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage",
        marshal.dumps((1, 2)),
        marshal.dumps(tuple(range(19))),
        marshal.dumps(tuple("bogus" if n == 8 else f for n, f in enumerate(_fields(1)))),
        marshal.dumps(tuple("bogus" if n == 14 else f for n, f in enumerate(_fields(1)))),
        marshal.dumps(tuple((1, 2) if n == 17 else f for n, f in enumerate(_fields(1)))),
    ],
)
def test_a_malformed_frame_is_refused_by_decode_values(payload: bytes) -> None:
    with pytest.raises((ValueError, TypeError, EOFError)):
        decode_values(payload)


def test_writer_batches_from_many_threads_and_close_flushes(path: Path) -> None:
    writer = HistoryWriter(path, flush_interval=0.05)
    try:

        def produce(base: int) -> None:
            for j in range(20):
                writer.submit([make_row(base + j * 10 + k) for k in range(10)])

        threads = [threading.Thread(target=produce, args=(t * 1000,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert writer.flush(10)
        with HistoryStore(path) as store:
            assert store.count() == 800
        writer.submit([make_row(99_999)])  # written by close, not by a timer
    finally:
        writer.close()
    with HistoryStore(path) as store:
        assert store.count() == 801
    assert writer.dropped == 0
    assert writer.error is None


def test_submit_never_blocks_and_the_queue_is_bounded(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = HistoryWriter(path, flush_interval=0.2, max_pending=1000)
    try:
        rows = [make_row(i) for i in range(5000)]
        t0 = time.monotonic()
        writer.submit(rows)
        assert time.monotonic() - t0 < 0.1
        assert writer.dropped == 4000
        assert writer.flush(10)
    finally:
        writer.close()
    with HistoryStore(path) as store:
        # The newest rows were kept.
        assert sorted(e.row.conn_id for e in store.iter_rows(HistoryFilter())) == list(
            range(4000, 5000)
        )
    warnings = [r for r in caplog.records if "cannot keep up" in r.getMessage()]
    assert len(warnings) == 1


def test_writer_enforces_retention(path: Path) -> None:
    with HistoryStore(path) as store:
        store.write([make_row(i, started=time.time() - 90 * 86400) for i in range(100)])
    writer = HistoryWriter(path, max_age_days=30)
    try:
        writer.submit([make_row(1000, started=time.time())])
        assert writer.flush(10)
    finally:
        writer.close()
    with HistoryStore(path) as store:
        assert [e.row.conn_id for e in store.iter_rows(HistoryFilter())] == [1000]


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tray_proxy.monitor.history import HistoryWriter
    from tray_proxy.monitor.rows import ConnectionRow

    writer = HistoryWriter(Path(sys.argv[1]))  # the default flush interval, 0.5 s
    n = 0
    for _ in range(100_000):
        rows = [
            ConnectionRow(conn_id=n + k, started=1e9 + n + k, client=("127.0.0.1", 1),
                          original_dst=("10.0.0.1", 443), host=f"h{(n + k) % 97}.example",
                          detail="d" * 100)
            for k in range(50)
        ]
        writer.submit(rows)
        n += 50
        print(n, time.time(), flush=True)
        time.sleep(0.005)
    """
)


def test_kill_9_during_a_write_burst_loses_at_most_the_last_second(path: Path) -> None:
    path.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and seen < 20_000:
            time.sleep(0.05)
            if path.exists():
                try:
                    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
                    seen = con.execute("SELECT count(*) FROM connections").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:
                    seen = 0  # the schema is not there yet
        assert seen >= 20_000, proc.stderr.read() if proc.poll() is not None else "too slow"
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    submitted = [(int(n), float(t)) for n, t in (line.split() for line in out.splitlines())]
    assert "Traceback" not in err
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [r[0] for r in con.execute("SELECT conn_id FROM connections ORDER BY conn_id")]
    finally:
        con.close()
    # Whole batches, in order, no holes: everything up to the last flush is there.
    assert ids == list(range(len(ids)))
    assert len(ids) >= seen
    # Everything submitted more than a second (plus scheduling slack) before the kill is there.
    settled = max((n for n, t in submitted if t < killed_at - 1.5), default=0)
    assert len(ids) >= settled
    assert submitted[-1][0] >= len(ids)
    with HistoryStore(path) as store:  # and the app opens it again as it is
        assert store.count() == len(ids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fp:  # a zombie is not alive
        return fp.read().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(check: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_a_child_process_writes_the_rows_and_close_reaps_it(path: Path) -> None:
    writer = HistoryWriter(path, flush_interval=0.05)
    try:
        assert _wait_for(lambda: writer.child is not None)  # started by the writer's thread
        child = writer.child
        assert child is not None and child.pid != os.getpid() and _alive(child.pid)
        assert child.args[1:4] == ["-I", "-m", "tray_proxy.monitor.history_writer_worker"]
        rows = [make_row(i) for i in range(50)]
        writer.submit(rows)
        assert writer.flush(10)  # True once the rows are in the file
        with HistoryStore(path) as store:
            assert [e.row for e in store.iter_rows(HistoryFilter())] == rows[::-1]
        assert writer.written == 50
        # No SQLite work in the parent: the file is only open in the child.
        own = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
                own.add(os.readlink(f"/proc/self/fd/{fd}"))
        assert str(path) not in own
        assert _alive(child.pid)
    finally:
        writer.close()
    assert child.returncode == 0  # reaped, ended at its stdin's end
    assert not _alive(child.pid)
    assert not writer._thread.is_alive()


def test_a_killed_child_is_reported_its_rows_dropped_and_it_is_restarted(path: Path) -> None:
    writer = HistoryWriter(path, flush_interval=0.05, max_age_days=1e5)  # keep make_row's
    try:
        writer.submit([make_row(i) for i in range(10)])
        assert writer.flush(10)
        assert _wait_for(lambda: writer.child is not None)
        first = writer.child
        assert first is not None
        first.kill()
        assert _wait_for(lambda: writer.error is not None)
        assert "stopped unexpectedly" in (writer.error or "")
        writer.submit([make_row(i) for i in range(10, 20)])  # no child: dropped, not raised
        assert writer.flush(10)
        assert writer.dropped == 10
        assert _wait_for(lambda: writer.child is not None and writer.child is not first)
        writer.submit([make_row(i) for i in range(20, 30)])
        assert writer.flush(10)
        assert writer.error is None
        assert writer.written == 20
    finally:
        writer.close()
    assert not _alive(first.pid)
    with HistoryStore(path) as store:
        assert sorted(e.row.conn_id for e in store.iter_rows(HistoryFilter())) == [
            *range(10),
            *range(20, 30),
        ]


def test_the_child_is_restarted_at_most_three_times(path: Path) -> None:
    writer = HistoryWriter(path, flush_interval=0.02)
    writer.BACKOFF = 0.01
    try:
        seen: set[int] = set()
        for _ in range(4):
            assert _wait_for(lambda: writer.child is not None and writer.child.pid not in seen)
            child = writer.child
            assert child is not None
            seen.add(child.pid)
            child.kill()
            child.wait()
        assert _wait_for(lambda: "no longer saved" in (writer.error or ""))
        writer.submit([make_row(1)])
        assert writer.flush(10)
        assert writer.dropped == 1
        assert writer.child is None
    finally:
        writer.close()


def test_the_child_ends_with_a_killed_app(path: Path) -> None:
    path.parent.mkdir(parents=True)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tray_proxy.monitor.history import HistoryWriter\n"
        "w = HistoryWriter(Path(sys.argv[1]))\n"
        "while w.child is None: time.sleep(0.01)\n"
        "print(w.child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert _alive(pid)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert _wait_for(lambda: not _alive(pid), 5)


def test_exports_hold_every_field_and_no_secret(path: Path, store: HistoryStore) -> None:
    rows = [make_row(i) for i in range(12)]
    store.write(rows)
    entries = list(store.iter_rows(HistoryFilter()))
    text_csv = io.StringIO()
    assert export_rows(entries, text_csv, "csv") == 12
    records = list(csv.DictReader(io.StringIO(text_csv.getvalue())))
    assert list(records[0]) == list(EXPORT_FIELDS)
    assert (records[0]["host"], records[2]["host"]) == ("", "example.com")
    assert records[0]["original_destination"] == "93.184.216.34:443"
    assert records[-1]["close_reason"] == "upstream-auth-failed"
    assert "refused the password for alice" in records[-1]["words"]
    text_json = io.StringIO()
    assert export_rows(entries, text_json, "json") == 12
    objects = [json.loads(line) for line in text_json.getvalue().splitlines()]
    assert [o["id"] for o in objects] == [e.rowid for e in entries]
    assert objects[0]["process"] == "git" and objects[0]["pid"] == 111
    assert objects[0]["bytes_down"] == 1100 and objects[0]["handshake_ms"] == 10.0
    assert objects[0]["route"] == "proxy corp, lab (default)"  # row 11
    assert records[-1]["route"] == "block (rule[1]: proxy.corp -> block)"  # row 0
    assert EXPORT_FIELDS[-1] == "route"  # added last: CSV read by position keeps working

    out = path.parent / "export.csv"
    assert store.export(HistoryFilter(failed_only=True), out, "csv") == 3
    assert out.read_text().count("\n") == 4
    with pytest.raises(HistoryError, match="Cannot write the export"):
        store.export(HistoryFilter(), path.parent / "missing" / "x.json", "json")

    store.close()
    for blob in (text_csv.getvalue(), text_json.getvalue(), out.read_text()):
        assert KNOWN_PASSWORD not in blob
    for file in path.parent.iterdir():
        assert KNOWN_PASSWORD.encode() not in file.read_bytes()


@pytest.mark.parametrize(
    "flt",
    [
        HistoryFilter(text="corp"),
        HistoryFilter(text="FIREFOX"),
        HistoryFilter(text="lab", failed_only=True),
        HistoryFilter(text="refused the password"),
        HistoryFilter(text="93.184"),
        HistoryFilter(text="example", upstream="corp"),
        HistoryFilter(text="absent"),
        HistoryFilter(text="100%_"),
    ],
)
def test_a_text_search_gives_the_same_pages_by_scan_and_by_index(
    store: HistoryStore, flt: HistoryFilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tray_proxy.monitor.history as history

    store.write([make_row(i) for i in range(300)])
    monkeypatch.setattr(history, "SCAN_BUDGET", 60.0)
    scanned = _all(store, flt, limit=9)
    # Every page through the indexes: no time to scan, and a look at the clock every step.
    monkeypatch.setattr(history, "SCAN_BUDGET", 0.0)
    monkeypatch.setattr(history, "_PROGRESS_STEPS", 1)
    calls: list[str] = []
    candidates = history._Query.candidates

    def spy(self: history._Query, conn: sqlite3.Connection) -> tuple[str, list[object]]:
        calls.append(self.text or "")
        return candidates(self, conn)

    monkeypatch.setattr(history._Query, "candidates", spy)
    assert _all(store, flt, limit=9) == scanned
    assert calls


def test_opens_racing_on_a_missing_file_make_one_history(tmp_path: Path) -> None:
    """The app's writer and its Log tab's reader (or `tray-proxy log`) may open a history
    that does not exist yet at the same moment: neither may take the other's fresh file for
    another program's and move it aside."""
    for attempt in range(15):
        path = tmp_path / f"race-{attempt}" / "history.sqlite3"
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def open_it(
            where: Path = path,
            barrier: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                barrier.wait(timeout=10)
                HistoryStore(where).close()
            except BaseException as exc:  # handed to the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors
        assert sorted(p.name for p in path.parent.iterdir() if "corrupt" in p.name) == []
        with HistoryStore(path) as store:
            assert store.count() == 0
