"""The Connections tab: rows from the bridge move between Active and Closed, the filter
controls drive both tables, closing by hand calls the service with the right ids, the
details pane shows every field and the failure in words, copying gives text."""

from __future__ import annotations

import time
from dataclasses import replace

from PySide6.QtCore import QItemSelectionModel, QTimer
from PySide6.QtGui import QGuiApplication
from pytestqt.qtbot import QtBot

from tray_proxy.controller import ConnectionsChanged
from tray_proxy.monitor.rows import ProcessInfo, RowChanges, RowState
from tray_proxy.relay.records import CloseReason
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.dashboard.connections import ConnectionsTab
from tray_proxy.ui.dashboard.pace import CHUNK_ROWS
from tray_proxy.ui.models.columns import Column

from .conftest import FakeServices, closed, make_row, make_status


def _tab(qtbot: QtBot, services: FakeServices, **kwargs: object) -> ConnectionsTab:
    tab = ConnectionsTab(services, **kwargs)  # type: ignore[arg-type]
    qtbot.addWidget(tab)
    tab.resize(1000, 600)
    tab.show()  # a hidden tab only merges batches (see the test of that below)
    return tab


def _ids(tab: ConnectionsTab, *, active: bool = True) -> list[int]:
    proxy = tab.active_proxy if active else tab.closed_proxy
    return sorted(r.conn_id for r in proxy.visible_rows())


def _select(tab: ConnectionsTab, conn_ids: set[int]) -> None:
    view, proxy = tab.current_view, tab.current_proxy
    selection = view.selectionModel()
    selection.clearSelection()
    for i in range(proxy.rowCount()):
        if proxy.row_at(i).conn_id in conn_ids:
            selection.select(
                proxy.index(i, 0),
                QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows,
            )


def test_open_rows_seed_the_active_table(qtbot: QtBot, services: FakeServices) -> None:
    services.rows = [make_row(1), make_row(2)]
    tab = _tab(qtbot, services)
    assert _ids(tab) == [1, 2] and tab.show_active.text() == "Active (2)"


def test_rows_move_from_active_to_closed(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services)
    bridge = UiBridge(interval_ms=10)
    bridge.connectionsChanged.connect(tab.apply)
    bridge.post(ConnectionsChanged(RowChanges(opened=tuple(make_row(i) for i in range(1, 6)))))
    qtbot.waitUntil(lambda: tab.active.rowCount() == 5, timeout=2000)
    bridge.post(
        ConnectionsChanged(
            RowChanges(
                updated=(make_row(2, bytes_up=99),),
                closed=(closed(make_row(1)), closed(make_row(3), CloseReason.UPSTREAM_TIMEOUT)),
            )
        )
    )
    # Opened and closed within one flush: straight to Closed.
    bridge.post(ConnectionsChanged(RowChanges(opened=(make_row(6),))))
    bridge.post(ConnectionsChanged(RowChanges(closed=(closed(make_row(6)),))))
    qtbot.waitUntil(lambda: tab.closed.rowCount() == 3, timeout=2000)
    assert _ids(tab) == [2, 4, 5] and _ids(tab, active=False) == [1, 3, 6]
    assert tab.active.row_at(tab.active.position_of(2) or 0).bytes_up == 99
    assert tab.show_active.text() == "Active (3)" and tab.show_closed.text() == "Closed (3)"
    # A closed row arriving again (its words came later) replaces itself in Closed.
    tab.apply(RowChanges(closed=(closed(make_row(3), CloseReason.UPSTREAM_TIMEOUT, words="W"),)))
    assert tab.closed.rowCount() == 3
    assert tab.closed.row_at(tab.closed.position_of(3) or 0).words == "W"


def test_the_closed_table_is_capped(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services, closed_cap=50)
    for start in range(0, 200, 40):
        rows = [make_row(i) for i in range(start, start + 40)]
        tab.apply(RowChanges(opened=tuple(rows)))
        tab.apply(RowChanges(closed=tuple(closed(r) for r in rows)))
    assert tab.closed.rowCount() == 50 and tab.active.rowCount() == 0
    assert _ids(tab, active=False) == list(range(150, 200))


def test_filter_controls_drive_both_tables(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services)
    tab.show_status(make_status())
    tab.apply(
        RowChanges(
            opened=(
                make_row(1),
                make_row(2, upstream="backup", process=ProcessInfo(pid=5, name="firefox")),
                make_row(3, state=RowState.OPENING),
            ),
            closed=(closed(make_row(4), CloseReason.UPSTREAM_AUTH_FAILED), closed(make_row(5))),
        )
    )
    tab.filter_edit.setText("example-[24]")
    assert _ids(tab) == [] and _ids(tab, active=False) == []
    tab.regex_box.setChecked(True)
    assert _ids(tab) == [2] and _ids(tab, active=False) == [4]
    tab.filter_edit.setText("example-[")
    assert tab.filter_error.isVisibleTo(tab) and "regular expression" in tab.filter_error.text()
    tab.filter_edit.clear()
    assert not tab.filter_error.isVisibleTo(tab)
    tab.state_combo.setCurrentIndex(tab.state_combo.findData(RowState.OPENING))
    assert _ids(tab) == [3] and _ids(tab, active=False) == []
    tab.state_combo.setCurrentIndex(0)
    tab.upstream_combo.setCurrentIndex(tab.upstream_combo.findData("backup"))
    assert _ids(tab) == [2]
    tab.upstream_combo.setCurrentIndex(0)
    tab.process_edit.setText("fire")
    assert _ids(tab) == [2]
    tab.process_edit.clear()
    tab.failed_box.setChecked(True)
    assert _ids(tab) == [] and _ids(tab, active=False) == [4]
    assert tab.count_label.text() == "0 of 3 shown"


def test_close_selected_and_close_all_filtered(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services)
    tab.apply(RowChanges(opened=tuple(make_row(i) for i in range(1, 8))))
    assert not tab.close_selected_button.isEnabled()
    _select(tab, {2, 5})
    assert tab.close_selected_button.isEnabled()
    tab.close_selected_button.click()
    tab.filter_edit.setText("example-1")  # example-1.test only
    tab.process_edit.setText("curl")
    assert tab.close_filtered_button.text() == "Close all filtered (1)"
    tab.close_filtered_button.click()
    tab.filter_edit.clear()
    tab.close_filtered_button.click()
    calls = [args for name, args in services.calls if name == "close_connections"]
    assert [sorted(c) for c in calls] == [[2, 5], [1], [1, 2, 3, 4, 5, 6, 7]]  # type: ignore[type-var]


def test_closed_rows_cannot_be_closed_again(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services)
    tab.apply(RowChanges(closed=(closed(make_row(1)),)))
    tab.show_closed.click()
    _select(tab, {1})
    assert not tab.close_selected_button.isEnabled()
    assert not tab.close_filtered_button.isEnabled()
    tab.close_selected()
    assert services.calls == []


def test_details_show_every_field_and_the_words(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services)
    row = closed(
        make_row(7, process=ProcessInfo(pid=77, name="curl", exe="/usr/bin/curl", user="alice")),
        CloseReason.UPSTREAM_AUTH_FAILED,
        words="proxy.corp:8080 refused the password for alice (407). Open Credentials to fix it.",
        detail="407 Proxy Authentication Required",
    )
    tab.apply(RowChanges(closed=(row,)))
    tab.show_closed.click()
    assert tab.details.toPlainText() == ""
    _select(tab, {7})
    text = tab.details.toPlainText()
    for expected in (
        "Connection:",
        "7",
        "failed",
        "example-7.test:443",
        "192.0.2.8",
        "10.0.0.2:40007",
        "curl (77)",
        "/usr/bin/curl",
        "alice",
        "corp",
        "12 ms",
        "700 B (700 bytes)",
        "7.0 KB (7000 bytes)",
        "2.0 s",
        "upstream-auth-failed",
        "407 Proxy Authentication Required",
        "Open Credentials to fix it.",
    ):
        assert expected in text, expected
    tab.copy_details_button.click()
    assert QGuiApplication.clipboard().text() == text


def test_details_follow_a_live_row(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services)
    tab.apply(RowChanges(opened=(make_row(1),)))
    _select(tab, {1})
    assert "100 B (100 bytes)" in tab.details.toPlainText()
    tab.apply(RowChanges(updated=(make_row(1, bytes_up=4321),)))
    assert "4.3 KB (4321 bytes)" in tab.details.toPlainText()
    tab.apply(RowChanges(closed=(closed(make_row(1, bytes_up=5000)),)))
    assert "Ended normally." in tab.details.toPlainText()


def test_copy_rows_as_text(qtbot: QtBot, services: FakeServices) -> None:
    tab = _tab(qtbot, services)
    tab.apply(RowChanges(opened=(make_row(1), make_row(2, host=None))))
    _select(tab, {1, 2})
    tab.copy_button.click()
    lines = QGuiApplication.clipboard().text().splitlines()
    assert lines[0].startswith("Time\tProcess\tDestination\tIP\tProxy")
    assert len(lines) == 3
    assert any("example-1.test:443\t192.0.2.2\tcorp\topen" in line for line in lines)
    assert any("\t192.0.2.3:443\t192.0.2.3\t" in line for line in lines)  # no host: the IP
    assert replace(make_row(1)).conn_id == 1


def test_a_hidden_tab_merges_batches_and_applies_them_when_shown(
    qtbot: QtBot, services: FakeServices
) -> None:
    tab = _tab(qtbot, services, closed_cap=30)
    tab.apply(RowChanges(opened=(make_row(1), make_row(2))))
    tab.hide()
    inserted: list[int] = []
    tab.active.rowsInserted.connect(lambda _p, a, b: inserted.append(b - a + 1))
    tab.apply(RowChanges(opened=(make_row(3),), closed=(closed(make_row(1)),)))
    for start in range(100, 200, 20):  # 100 rows that open and close while hidden
        rows = [make_row(i) for i in range(start, start + 20)]
        tab.apply(RowChanges(opened=tuple(rows)))
        tab.apply(RowChanges(updated=(make_row(2, bytes_up=start),)))
        tab.apply(RowChanges(closed=tuple(closed(r) for r in rows)))
    assert _ids(tab) == [1, 2] and tab.closed.rowCount() == 0  # nothing applied yet
    tab.show()
    assert _ids(tab) == [2, 3] and inserted == [1]  # one insert for all of it
    assert tab.active.row_at(tab.active.position_of(2) or 0).bytes_up == 180
    # Only the newest 30 closed rows were kept while hidden (the cap), 1 among the dropped.
    assert _ids(tab, active=False) == list(range(170, 200))


def test_a_large_batch_is_applied_in_steps_with_the_loop_between(
    qtbot: QtBot, services: FakeServices
) -> None:
    tab = _tab(qtbot, services, closed_cap=1000)
    inserted: list[tuple[int, int]] = []
    tab.closed.rowsInserted.connect(lambda _p, a, b: inserted.append((a, b)))
    passes: list[int] = []  # a timer of the UI loop: does the loop run between steps?
    ticker = QTimer()
    ticker.timeout.connect(lambda: passes.append(tab.closed.rowCount()))
    ticker.start(0)
    rows = [closed(make_row(i)) for i in range(1, 351)]
    tab.apply(RowChanges(opened=(make_row(500),), closed=tuple(rows)))
    assert tab.applying and tab.closed.rowCount() == CHUNK_ROWS  # the first step, at once
    assert not tab.closed_view.updatesEnabled()  # one repaint, after the last step
    qtbot.waitUntil(lambda: not tab.applying, timeout=2000)
    ticker.stop()
    steps = range(0, 350, CHUNK_ROWS)
    assert inserted == [(first, min(first + CHUNK_ROWS, 350) - 1) for first in steps]
    assert [r.conn_id for r in tab.closed.rows()] == list(range(1, 351))
    assert _ids(tab) == [500] and tab.closed_view.updatesEnabled()
    assert set(steps[1:]) <= set(passes)  # the loop ran after each step
    assert tab.show_closed.text() == "Closed (350)"


def test_costly_applications_are_spaced_and_nothing_is_lost(
    qtbot: QtBot, services: FakeServices
) -> None:
    tab = _tab(qtbot, services)
    tab.apply(RowChanges(opened=(make_row(1),)))
    assert _ids(tab) == [1]
    # As if applying and repainting had cost 30 ms each time: 0.3 s between applications.
    for _ in range(8):
        tab.pace.applied(time.monotonic(), 0.012)
        tab.pace.painted(0.018)
    assert tab.pace.spacing > 0.2
    tab.apply(RowChanges(opened=(make_row(2),)))
    tab.apply(RowChanges(closed=(closed(make_row(1)),), opened=(make_row(3),)))
    assert _ids(tab) == [1] and not tab.applying  # held back, merged
    qtbot.waitUntil(lambda: _ids(tab) == [2, 3], timeout=2000)
    assert _ids(tab, active=False) == [1]
    # Cheap again: each batch is applied when it comes.
    for _ in range(12):
        tab.pace.applied(0.0, 0.0005)
        tab.pace.painted(0.001)
    tab.apply(RowChanges(opened=(make_row(4),)))
    assert _ids(tab) == [2, 3, 4]


def test_showing_the_tab_finishes_an_application_under_way(
    qtbot: QtBot, services: FakeServices
) -> None:
    tab = _tab(qtbot, services, closed_cap=1000)
    tab.apply(RowChanges(closed=tuple(closed(make_row(i)) for i in range(1, 301))))
    assert tab.applying
    tab.flush_pending()
    assert not tab.applying and tab.closed.rowCount() == 300
    assert tab.closed_view.updatesEnabled()


def test_rows_merged_while_hidden_are_applied_in_steps_when_shown(
    qtbot: QtBot, services: FakeServices
) -> None:
    tab = _tab(qtbot, services, closed_cap=1000)
    tab.hide()
    tab.apply(RowChanges(closed=tuple(closed(make_row(i)) for i in range(1, 301))))
    assert tab.closed.rowCount() == 0
    tab.show()
    assert tab.applying and tab.closed.rowCount() == CHUNK_ROWS
    qtbot.waitUntil(lambda: not tab.applying, timeout=2000)
    assert [r.conn_id for r in tab.closed.rows()] == list(range(1, 301))


def test_the_route_column_starts_hidden_and_the_details_show_the_decision(
    qtbot: QtBot, services: FakeServices
) -> None:
    # Issue 15: a BLOCK is recorded with the rule that blocked it, and the dashboard shows it.
    route = "block (rule[1]: *.ads.example -> block)"
    tab = _tab(qtbot, services)
    for view in (tab.active_view, tab.closed_view):
        assert view.isColumnHidden(Column.ROUTE)  # crowded tables: in the header's menu
    tab.apply(
        RowChanges(
            opened=(make_row(1, upstream=None, route="direct (default)"),),
            closed=(closed(make_row(2, upstream=None, route=route), CloseReason.BLOCKED),),
        )
    )
    assert tab.active_view.model().index(0, Column.UPSTREAM).data() == "direct"
    _select(tab, {1})
    assert "\nRoute:" in tab.details.toPlainText()
    assert "direct (default)" in tab.details.toPlainText()
    tab.show_closed.click()
    _select(tab, {2})
    text = tab.details.toPlainText()
    (line,) = [line for line in text.splitlines() if line.startswith("Route:")]
    assert line.endswith(route)
    tab.copy_details_button.click()
    assert route in QGuiApplication.clipboard().text()
    tab.closed_view.setColumnHidden(Column.ROUTE, False)  # what the header's menu does
    rect = tab.closed_view.visualRect(tab.closed_view.model().index(0, Column.ROUTE))
    assert rect.width() > 0
    assert tab.closed_view.model().index(0, Column.ROUTE).data() == route
