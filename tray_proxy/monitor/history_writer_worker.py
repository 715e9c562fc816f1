"""The child process that writes the connection history for `HistoryWriter`
(monitor/history.py), so that the SQL work never takes the relay's GIL.

    python -I -m tray_proxy.monitor.history_writer_worker --path FILE --max-age-days D
        --max-bytes N --retention-interval S

Rows on stdin, one frame each (`encode_row`: the row's plain fields, nothing else).
Reports on stdout, one a line: `W n` (n rows written), `E n "text"` (n rows not written, and
why, for the user; n may be 0), `X n` (n rows discarded: the history could not be opened).
Whatever is available is written in one transaction; retention runs at start and every
`retention-interval`. It runs at a lower priority than the relay and the UI, writes what
it got and ends at stdin's end-of-file, and ends when its parent ends (PR_SET_PDEATHSIG).

Must not import PySide6 or asyncio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import marshal
import os
import select
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tray_proxy.monitor.rows import ConnectionRow, RowState
from tray_proxy.relay.records import CloseReason

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_BATCH = 20_000  # rows per transaction at most
# A frame's state and close reason are checked against these (enum lookups cost more).
_STATES = frozenset(state.value for state in RowState)
_REASONS = frozenset(reason.value for reason in CloseReason)
_FAILED = RowState.FAILED.value


def encode_row(row: ConnectionRow) -> bytes:
    """One row as one frame: a 4-byte little-endian length, then `marshal` of the tuple of its
    plain fields in order (the caller's thread, the relay's loop: about 1.5 µs a row)."""
    p = row.process
    dst = row.original_dst
    data = marshal.dumps(
        (
            row.conn_id,
            row.started,
            row.client[0],
            row.client[1],
            None if dst is None else dst[0],
            None if dst is None else dst[1],
            row.host,
            row.upstream,
            row.state.value,
            row.established,
            row.handshake_latency,
            row.bytes_up,
            row.bytes_down,
            row.ended,
            None if row.close_reason is None else row.close_reason.value,
            row.detail,
            row.words,
            None if p is None else (p.pid, p.name, p.exe, p.user, p.exited, p.container, p.remote),
            row.route,
        )
    )
    return len(data).to_bytes(4, "little") + data


def decode_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete frames' payloads in `buffer`, and the incomplete rest."""
    frames = []
    at = 0
    end = len(buffer)
    while end - at >= 4:
        size = int.from_bytes(buffer[at : at + 4], "little")
        if end - at - 4 < size:
            break
        frames.append(buffer[at + 4 : at + 4 + size])
        at += 4 + size
    return frames, buffer[at:]


def decode_values(payload: bytes) -> tuple[str | None, list[object]]:
    """`encode_row`'s payload straight to what the history stores: (host name, the column
    values of history._row_values with the host id None), without a ConnectionRow on the way
    (2.6 µs a row; through a ConnectionRow and back it was 7.3 µs: at thousands of
    connections a second, CPU the relay's machine has better uses for). A malformed payload
    raises ValueError, TypeError or EOFError."""
    (
        conn_id,
        started,
        client_ip,
        client_port,
        dst_ip,
        dst_port,
        host,
        upstream,
        state,
        established,
        handshake_latency,
        bytes_up,
        bytes_down,
        ended,
        close_reason,
        detail,
        words,
        process,
        # An app started before an upgrade sends frames without the route (the child is
        # started from the files on disk): those rows keep "" rather than being skipped.
        *route,
    ) = marshal.loads(payload)
    if state not in _STATES or (close_reason is not None and close_reason not in _REASONS):
        raise ValueError(f"not a row state or close reason: {state!r}, {close_reason!r}")
    failed = 1 if state == _FAILED else 0
    if dst_ip is None:
        dst_port = None
    if process is None:
        pid = name = exe = user = container = None
        exited = remote = 0
    else:
        pid, name, exe, user, exited, container, remote = process
        exited = 1 if exited else 0
        remote = 1 if remote else 0
    return host, [
        conn_id,
        started,
        established,
        ended,
        client_ip,
        client_port,
        dst_ip,
        dst_port,
        None,  # the host's id: the store finds or makes it
        upstream,
        state,
        failed,
        handshake_latency,
        bytes_up,
        bytes_down,
        close_reason,
        detail,
        words,
        name,
        pid,
        exe,
        user,
        container,
        exited,
        remote,
        route[0] if route else "",
    ]


def _send(fd: int, text: str) -> None:
    view = memoryview((text + "\n").encode())
    while view:
        view = view[os.write(fd, view) :]


class _Serve:
    def __init__(self, args: argparse.Namespace, out: int) -> None:
        from tray_proxy.monitor.history import HistoryError, HistoryStore

        self.args = args
        self.path = Path(args.path)
        self.out = out
        self.store: HistoryStore | None = None
        try:
            self.store = HistoryStore(self.path, check=True)
        except HistoryError as exc:
            self.report_error(0, str(exc))
        except Exception:  # noqa: BLE001 - say it, keep reading (the queue stays bounded)
            log.exception("The connection history could not be opened")
            self.report_error(0, f"The connection history {self.path} could not be opened.")

    def report_error(self, n: int, message: str) -> None:
        _send(self.out, f"E {n} {json.dumps(message)}")

    def retention(self) -> None:
        if self.store is None:
            return
        try:
            removed = self.store.retention(
                time.time(), max_age_days=self.args.max_age_days, max_bytes=self.args.max_bytes
            )
        except sqlite3.Error as exc:
            self.report_error(
                0, f"Could not remove old connections from the history {self.path}: {exc}."
            )
            return
        if removed:
            log.info("Connection history: removed %d old connections", removed)

    def write(self, lines: Sequence[bytes]) -> None:
        if self.store is None:
            _send(self.out, f"X {len(lines)}")
            return
        rows = []
        for line in lines:
            try:
                rows.append(decode_values(line))
            except (ValueError, TypeError, EOFError):
                log.warning("The connection history writer skipped a malformed row")
        try:
            self.store.write_values(rows)
        except sqlite3.Error as exc:
            self.report_error(
                len(lines),
                f"Could not write {len(lines)} connections to the history {self.path}: {exc}. "
                "Check the free disk space.",
            )
            return
        except Exception:  # noqa: BLE001 - keep the writer alive
            log.exception("The connection history could not write a batch")
            _send(self.out, f"X {len(lines)}")
            return
        _send(self.out, f"W {len(lines)}")

    def run(self, inp: int) -> None:
        buffer = b""
        lines: list[bytes] = []
        next_retention = 0.0
        eof = False
        while not eof:
            now = time.monotonic()
            if now >= next_retention:
                self.retention()
                next_retention = time.monotonic() + self.args.retention_interval
            wait = max(0.0, next_retention - time.monotonic())
            readable, _, _ = select.select([inp], [], [], 0 if lines else wait)
            if readable:
                chunk = os.read(inp, 1 << 20)
                if not chunk:
                    eof = True
                else:
                    frames, buffer = decode_frames(buffer + chunk)
                    lines.extend(frames)
                    if len(lines) < _MAX_BATCH:
                        continue  # gather what is already in the pipe into one transaction
            while lines:
                batch, lines = lines[:_MAX_BATCH], lines[_MAX_BATCH:]
                self.write(batch)
        if self.store is not None:
            self.store.close()


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tray_proxy.monitor.history_writer_worker")
    parser.add_argument("--path", required=True)
    parser.add_argument("--max-age-days", type=float, required=True)
    parser.add_argument("--max-bytes", type=int, required=True)
    parser.add_argument("--retention-interval", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="tray-proxy history: %(levelname)s %(message)s"
    )
    _die_with_parent(os.getppid())
    with contextlib.suppress(OSError):
        os.nice(5)  # the relay and the UI first
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the app closes stdin; then all is written
    with contextlib.suppress(BrokenPipeError):  # the app stopped reading: it has gone
        _Serve(args, sys.stdout.fileno()).run(sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
