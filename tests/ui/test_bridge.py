"""The bridge coalesces controller events into at most ~10 Qt updates a second."""

from __future__ import annotations

import threading
from dataclasses import replace

from pytestqt.qtbot import QtBot

from tray_proxy.controller import (
    ConnectionsChanged,
    Notice,
    NoticeKind,
    State,
    StateChanged,
    StatusUpdated,
)
from tray_proxy.monitor.rows import RowChanges, RowState
from tray_proxy.ui.bridge import UiBridge

from .conftest import closed, make_row, make_status


def test_a_thousand_updates_become_a_few_signals(qtbot: QtBot) -> None:
    bridge = UiBridge(interval_ms=100)
    seen: list[object] = []
    bridge.statusChanged.connect(seen.append)
    statuses = [make_status(active_connections=i) for i in range(1000)]

    def publish() -> None:  # like the engine: from another thread
        for status in statuses:
            bridge.post(StatusUpdated(status))

    thread = threading.Thread(target=publish)
    thread.start()
    thread.join(10)
    qtbot.waitUntil(lambda: bridge.latest is statuses[-1], timeout=3000)
    assert 1 <= len(seen) <= 3, len(seen)
    assert seen[-1] is statuses[-1]  # the newest one always arrives
    assert bridge.flushes == len(seen)


def test_updates_are_spaced_by_the_interval(qtbot: QtBot) -> None:
    bridge = UiBridge(interval_ms=100)
    seen: list[object] = []
    bridge.statusChanged.connect(seen.append)
    for i in range(30):  # 30 posts over ~0.3 s: at most about 4 flushes
        bridge.post(StatusUpdated(make_status(active_connections=i)))
        qtbot.wait(10)
    qtbot.waitUntil(lambda: bridge.latest is not None and bridge.latest.active_connections == 29)
    assert len(seen) <= 5, len(seen)


def test_state_changes_and_notices_all_arrive_in_order(qtbot: QtBot) -> None:
    bridge = UiBridge(interval_ms=50)
    states: list[StateChanged] = []
    notices: list[Notice] = []
    bridge.stateChanged.connect(states.append)
    bridge.notice.connect(notices.append)
    bridge.post(StateChanged(State.OFF, State.ENABLING, "a"))
    bridge.post(StatusUpdated(make_status(State.ENABLING)))
    bridge.post(StateChanged(State.ENABLING, State.ON, "b"))
    bridge.post(Notice(NoticeKind.UPSTREAM_BACK, "t", "x"))
    qtbot.waitUntil(lambda: len(notices) == 1, timeout=2000)
    assert [(s.old, s.new) for s in states] == [
        (State.OFF, State.ENABLING),
        (State.ENABLING, State.ON),
    ]


def test_connection_changes_in_one_window_merge_into_one_signal(qtbot: QtBot) -> None:
    bridge = UiBridge(interval_ms=50)
    seen: list[RowChanges] = []
    bridge.connectionsChanged.connect(seen.append)
    one, two, three = make_row(1), make_row(2), make_row(3)
    bridge.post(ConnectionsChanged(RowChanges(opened=(one, two))))
    bridge.post(ConnectionsChanged(RowChanges(updated=(replace(one, bytes_up=5),))))
    bridge.post(StatusUpdated(make_status()))
    bridge.post(ConnectionsChanged(RowChanges(updated=(replace(three, bytes_up=1),))))
    bridge.post(ConnectionsChanged(RowChanges(closed=(closed(two),))))
    bridge.post(ConnectionsChanged(RowChanges(updated=(replace(three, bytes_up=9),))))
    # A late update of a closed row must not bring it back.
    bridge.post(ConnectionsChanged(RowChanges(updated=(replace(two, bytes_up=7),))))
    qtbot.waitUntil(lambda: len(seen) == 1, timeout=2000)
    merged = seen[0]
    # Opened then changed: still "opened", newest form. Opened then closed: only closed.
    assert [(r.conn_id, r.bytes_up) for r in merged.opened] == [(1, 5)]
    assert [(r.conn_id, r.bytes_up) for r in merged.updated] == [(3, 9)]
    assert [(r.conn_id, r.state) for r in merged.closed] == [(2, RowState.CLOSED)]
    qtbot.wait(120)  # nothing else queued: no second, empty signal
    assert len(seen) == 1


def test_a_flush_without_connection_changes_emits_none(qtbot: QtBot) -> None:
    bridge = UiBridge(interval_ms=10)
    seen: list[RowChanges] = []
    bridge.connectionsChanged.connect(seen.append)
    bridge.post(StatusUpdated(make_status()))
    bridge.post(ConnectionsChanged(RowChanges()))
    qtbot.waitUntil(lambda: bridge.latest is not None, timeout=2000)
    assert seen == []
