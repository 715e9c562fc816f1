"""UI test fixtures: offscreen Qt, and a recording fake of the app's services.

QT_QPA_PLATFORM is set before pytest-qt creates the QApplication, so these tests need no
display. Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from collections.abc import Sequence  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402

from tray_proxy.controller import ErrorEntry, State, Status, UpstreamInfo  # noqa: E402
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowState  # noqa: E402
from tray_proxy.relay.records import CloseReason  # noqa: E402
from tray_proxy.ui.services import HistoryReader  # noqa: E402


def make_status(state: State = State.ON, **overrides: object) -> Status:
    values: dict[str, object] = {
        "state": state,
        "message": f"{state.label}: because a test said so.",
        "upstream": "corp",
        "upstreams": (
            UpstreamInfo("corp", "http://proxy.corp.example:8080", True, 0.0123, False),
            UpstreamInfo("backup", "socks5://127.0.0.1:1080", False, None, True),
        ),
        "active_connections": 3,
        "total_connections": 10,
        "last_errors": (ErrorEntry(1_700_000_000.0, "corp: connection refused"),),
    }
    values.update(overrides)
    return Status(**values)  # type: ignore[arg-type]


T0 = 1_700_000_000.0


def make_row(conn_id: int, **overrides: object) -> ConnectionRow:
    """An open connection from curl to example-<id>.test:443 through corp."""
    values: dict[str, object] = {
        "conn_id": conn_id,
        "started": T0 + conn_id,
        "client": ("10.0.0.2", 40_000 + conn_id),
        "original_dst": (f"192.0.2.{conn_id % 250 + 1}", 443),
        "host": f"example-{conn_id}.test",
        "upstream": "corp",
        "state": RowState.OPEN,
        "established": T0 + conn_id + 0.01,
        "handshake_latency": 0.012,
        "bytes_up": 100 * conn_id,
        "bytes_down": 1000 * conn_id,
        "process": ProcessInfo(pid=1000 + conn_id, name="curl", exe="/usr/bin/curl", user="alice"),
    }
    values.update(overrides)
    return ConnectionRow(**values)  # type: ignore[arg-type]


def closed(
    row: ConnectionRow, reason: CloseReason = CloseReason.DONE, **overrides: object
) -> ConnectionRow:
    """`row` ended 2 s after it started, for `reason` (a failure gets words)."""
    failed = reason not in (
        CloseReason.DONE,
        CloseReason.CLOSED_BY_USER,
        CloseReason.SHUTDOWN,
        CloseReason.IDLE_TIMEOUT,
    )
    values: dict[str, object] = {
        "state": RowState.FAILED if failed else RowState.CLOSED,
        "ended": row.started + 2.0,
        "close_reason": reason,
        "words": f"{row.destination}: failed ({reason.value}). Check the proxy." if failed else "",
    }
    values.update(overrides)
    return replace(row, **values)  # type: ignore[arg-type]


class FakeServices:
    """Records what the views asked for; `status` is whatever the test sets."""

    def __init__(self, status: Status | None = None) -> None:
        self.current = status or make_status()
        self.calls: list[tuple[str, object]] = []
        self.autostart = False
        self.autostart_error: OSError | None = None
        self.rows: list[ConnectionRow] = []  # what open_rows() answers
        self.reader: HistoryReader | None = None  # what history() answers

    def status(self) -> Status:
        return self.current

    def toggle(self) -> None:
        self.calls.append(("toggle", None))

    def enable(self) -> None:
        self.calls.append(("enable", None))

    def disable(self) -> None:
        self.calls.append(("disable", None))

    def select_upstream(self, name: str) -> None:
        self.calls.append(("select_upstream", name))

    def test_connection(self) -> None:
        self.calls.append(("test_connection", None))

    def diagnostics(self) -> str:
        self.calls.append(("diagnostics", None))
        return "tray-proxy diagnostics\nstate: on\n"

    def autostart_enabled(self) -> bool:
        return self.autostart

    def set_autostart(self, enabled: bool) -> None:
        self.calls.append(("set_autostart", enabled))
        if self.autostart_error is not None:
            raise self.autostart_error
        self.autostart = enabled

    def quit(self) -> None:
        self.calls.append(("quit", None))

    def close_connections(self, ids: Sequence[int]) -> None:
        self.calls.append(("close_connections", list(ids)))

    def test_upstream(self, name: str) -> None:
        self.calls.append(("test_upstream", name))

    def open_rows(self) -> Sequence[ConnectionRow]:
        return list(self.rows)

    def history(self) -> HistoryReader | None:
        return self.reader


@pytest.fixture
def services() -> FakeServices:
    return FakeServices()
