"""The Log tab over a real SQLite history (monitor/history.py's HistoryStore): lazy paging,
the filters, export to CSV and JSON off the UI thread, and what it says when the history is
off or cannot be read."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QModelIndex, Qt, QThreadPool
from pytestqt.modeltest import ModelTester
from pytestqt.qtbot import QtBot

from tray_proxy.monitor.history import HistoryError, HistoryStore
from tray_proxy.monitor.query import HistoryCursor, HistoryFilter, HistoryPage
from tray_proxy.monitor.rows import ProcessInfo
from tray_proxy.relay.records import CloseReason
from tray_proxy.ui.dashboard.log import HISTORY_OFF, LogTab
from tray_proxy.ui.models.columns import Column
from tray_proxy.ui.models.log import PAGE_SIZE, LogModel

from .conftest import FakeServices, closed, make_row, make_status

NOW = 1_800_000_000.0
ROWS = 5_000
SPACING = 30.0  # seconds between rows: 5,000 rows span about 42 hours


def _row(i: int) -> object:
    started = NOW - 15 - i * SPACING  # never on a range's edge
    base = make_row(
        i + 1,
        started=started,
        established=started + 0.01,
        host=f"example-{i % 50}.test",
        upstream="corp" if i % 2 else "backup",
        process=ProcessInfo(pid=100 + i, name="firefox" if i % 3 == 0 else "curl"),
    )
    if i % 10 == 0:
        return closed(base, CloseReason.UPSTREAM_AUTH_FAILED)
    return closed(base)


@pytest.fixture(scope="module")
def history_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("history") / "history.sqlite3"
    store = HistoryStore(path)
    try:
        rows = [_row(i) for i in range(ROWS)]
        for start in range(0, ROWS, 1000):
            store.write(rows[start : start + 1000])  # type: ignore[arg-type]
    finally:
        store.close()
    return path


@pytest.fixture
def store(history_file: Path) -> Iterator[HistoryStore]:
    store = HistoryStore(history_file)
    yield store
    store.close()


def _tab(qtbot: QtBot, services: FakeServices, **kwargs: object) -> LogTab:
    tab = LogTab(services, clock=lambda: NOW, **kwargs)  # type: ignore[arg-type]
    qtbot.addWidget(tab)
    return tab


def _fetch_all(model: LogModel) -> None:
    for _ in range(ROWS // PAGE_SIZE + 2):  # bounded: one more than the pages there are
        if not model.canFetchMore(QModelIndex()):
            return
        model.fetchMore(QModelIndex())
    raise AssertionError("the model kept offering more pages")


def test_the_log_model_passes_qts_model_checks(
    qtmodeltester: ModelTester, store: HistoryStore
) -> None:
    model = LogModel(store)
    model.set_filter(HistoryFilter(failed_only=True))
    # The tester calls fetchMore from its own slots (reset, insert): the model must not
    # start an insert inside another change.
    qtmodeltester.check(model, force_py=True)
    model.fetchMore(QModelIndex())
    model.set_filter(HistoryFilter(host="example-3.test"))
    _fetch_all(model)
    assert model.rowCount() == ROWS // 50


def test_pages_are_read_only_as_the_view_asks(store: HistoryStore) -> None:
    model = LogModel(store)
    model.set_filter(HistoryFilter())
    assert model.rowCount() == PAGE_SIZE and model.pages_read == 1
    assert model.canFetchMore(QModelIndex())
    _fetch_all(model)
    assert model.rowCount() == ROWS and model.pages_read == ROWS // PAGE_SIZE
    starts = [model.entry_at(i).row.started for i in range(model.rowCount())]
    assert starts == sorted(starts, reverse=True)  # newest first, no gap, no repeat
    assert len({model.entry_at(i).rowid for i in range(ROWS)}) == ROWS


def test_the_tab_opens_on_the_last_24_hours_and_scrolling_reads_more(
    qtbot: QtBot, services: FakeServices, store: HistoryStore
) -> None:
    services.reader = store
    tab = _tab(qtbot, services)
    assert tab.model is not None
    assert tab.model.rowCount() == PAGE_SIZE
    assert "Newest 200 shown, scroll for older ones" in tab.log_status_text()
    tab.resize(900, 500)
    tab.show()
    qtbot.waitExposed(tab)
    bar = tab.view.verticalScrollBar()
    for _ in range(50):  # bounded: the last 24 hours are 2,880 rows, 15 pages
        if not tab.model.canFetchMore(QModelIndex()):
            break
        bar.setValue(bar.maximum())
        qtbot.wait(5)
    assert tab.model.rowCount() == int(86_400 // SPACING)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda t: t.range_combo.setCurrentIndex(0), 120),  # last hour
        (lambda t: t.range_combo.setCurrentIndex(3), ROWS),  # all
        (lambda t: t.level_combo.setCurrentIndex(1), 288),  # failures, last 24 h
        (lambda t: t.host_edit.setText("example-7.test"), 58),
        (lambda t: t.host_edit.setText("*.test"), 2880),
        (lambda t: t.process_edit.setText("FIREFOX"), 960),
        (lambda t: t.upstream_combo.setCurrentIndex(t.upstream_combo.findData("backup")), 1440),
        (lambda t: t.search_edit.setText("example-49"), 57),
    ],
    ids=["hour", "all", "failed", "host", "host-glob", "process", "upstream", "text"],
)
def test_filters(
    qtbot: QtBot, services: FakeServices, store: HistoryStore, setup: object, expected: int
) -> None:
    services.reader = store
    tab = _tab(qtbot, services)
    tab.show_status(make_status())  # the proxies' names for the upstream filter
    setup(tab)  # type: ignore[operator]
    tab.apply_filter()  # what the debounce timer would do after typing
    assert tab.model is not None
    _fetch_all(tab.model)
    assert tab.model.rowCount() == expected


def test_custom_range(qtbot: QtBot, services: FakeServices, store: HistoryStore) -> None:
    services.reader = store
    tab = _tab(qtbot, services)
    tab.range_combo.setCurrentIndex(4)
    assert tab.from_edit.isVisibleTo(tab) and tab.to_edit.isVisibleTo(tab)
    flt = tab.build_filter()
    assert flt.since is not None and flt.until is not None and flt.since < flt.until


def test_export_writes_csv_and_json_off_the_ui_thread(
    qtbot: QtBot, services: FakeServices, store: HistoryStore, tmp_path: Path
) -> None:
    services.reader = store
    target: list[tuple[Path, str]] = []
    tab = _tab(qtbot, services, choose_export_path=lambda _parent: target[-1])
    tab.level_combo.setCurrentIndex(1)  # failures of the last 24 hours: 288 rows

    target.append((tmp_path / "log.csv", "csv"))
    tab.export_button.click()
    assert tab.exporting and not tab.export_button.isEnabled()
    qtbot.waitUntil(lambda: not tab.exporting, timeout=10_000)
    assert tab.log_status_text() == f"Exported 288 connections to {tmp_path / 'log.csv'}."
    with open(tmp_path / "log.csv", newline="") as fp:
        records = list(csv.DictReader(fp))
    assert len(records) == 288
    assert {r["close_reason"] for r in records} == {"upstream-auth-failed"}

    target.append((tmp_path / "log.json", "json"))
    tab.export_button.click()
    qtbot.waitUntil(lambda: not tab.exporting, timeout=10_000)
    lines = (tmp_path / "log.json").read_text().splitlines()
    assert len(lines) == 288 and json.loads(lines[0])["state"] == "failed"
    assert tab.export_button.isEnabled()


def test_an_export_that_cannot_be_written_says_so(
    qtbot: QtBot, services: FakeServices, store: HistoryStore, tmp_path: Path
) -> None:
    services.reader = store
    missing = tmp_path / "no such folder" / "log.csv"
    tab = _tab(qtbot, services, choose_export_path=lambda _parent: (missing, "csv"))
    tab.export_button.click()
    qtbot.waitUntil(lambda: not tab.exporting, timeout=10_000)
    assert str(missing) in tab.log_status_text()
    assert "Choose another file or folder" in tab.log_status_text()


def test_cancelling_the_export_dialog_does_nothing(
    qtbot: QtBot, services: FakeServices, store: HistoryStore
) -> None:
    services.reader = store
    tab = _tab(qtbot, services, choose_export_path=lambda _parent: None)
    before = tab.log_status_text()
    tab.export_button.click()
    assert not tab.exporting and tab.log_status_text() == before


def test_selecting_a_row_shows_its_details(
    qtbot: QtBot, services: FakeServices, store: HistoryStore
) -> None:
    services.reader = store
    tab = _tab(qtbot, services)
    tab.view.selectRow(0)
    text = tab.details.toPlainText()
    assert "Destination:" in text and "example-0.test:443" in text
    assert "upstream-auth-failed" in text  # row 0 is a failure


def test_without_a_history_it_says_why(qtbot: QtBot, services: FakeServices) -> None:
    services.reader = None
    tab = _tab(qtbot, services)
    tab.show()
    qtbot.waitExposed(tab)
    assert tab.off_label.isVisible() and tab.off_label.text() == HISTORY_OFF
    assert "[log] enabled = false" in HISTORY_OFF
    assert not tab.view.isVisible() and not tab.export_button.isVisible()


class BrokenReader:
    def page(
        self, filter: HistoryFilter, *, after: HistoryCursor | None = None, limit: int = 200
    ) -> HistoryPage:
        raise HistoryError("Cannot read the connection history /x: disk I/O error. Quit …")

    def export(self, filter: HistoryFilter, path: Path, fmt: str) -> int:
        raise AssertionError("not called")


def test_a_history_that_cannot_be_read_says_so(qtbot: QtBot, services: FakeServices) -> None:
    services.reader = BrokenReader()
    tab = _tab(qtbot, services)
    assert tab.log_status_text().startswith("Cannot read the connection history /x")
    assert tab.model is not None and tab.model.rowCount() == 0
    assert not tab.model.canFetchMore(QModelIndex())


@pytest.fixture(autouse=True)
def _no_export_left_running() -> Iterator[None]:
    yield
    QThreadPool.globalInstance().waitForDone(10_000)


def test_showing_the_tab_again_reads_the_newest_rows(
    qtbot: QtBot, services: FakeServices, store: HistoryStore
) -> None:
    services.reader = store
    tab = _tab(qtbot, services)
    assert tab.model is not None
    tab.show()
    qtbot.waitExposed(tab)
    pages = tab.model.pages_read
    tab.hide()
    tab.show()  # just read: not again
    assert tab.model.pages_read == pages
    tab._queried_at -= 60  # as if a minute had passed
    tab.hide()
    tab.show()
    assert tab.model.pages_read == pages + 1 and tab.model.rowCount() == PAGE_SIZE


def test_the_log_shows_why_a_connection_went_direct_or_was_blocked(
    qtbot: QtBot, services: FakeServices, tmp_path: Path
) -> None:
    # Issue 15: the history keeps each decision with what made it; the Log tab shows it.
    block = "block (rule[1]: *.ads.example -> block)"
    direct = "direct (rule[0]: .corp.example -> direct)"
    with HistoryStore(tmp_path / "history.sqlite3") as history:
        history.write(
            [
                closed(
                    make_row(1, started=NOW - 60, upstream=None, route=block),
                    CloseReason.BLOCKED,
                ),
                closed(make_row(2, started=NOW - 30, upstream=None, route=direct)),
            ]
        )
        services.reader = history
        tab = _tab(qtbot, services)
        assert tab.model is not None and tab.model.rowCount() == 2
        assert tab.view.isColumnHidden(Column.ROUTE)
        # Newest first: the DIRECT row, then the blocked one; Proxy says which way.
        assert [tab.model.index(i, Column.UPSTREAM).data() for i in range(2)] == [
            "direct",
            "block",
        ]
        assert tab.model.index(1, Column.ROUTE).data() == block
        assert tab.model.index(1, Column.ROUTE).data(Qt.ItemDataRole.ToolTipRole) == block
        tab.view.selectRow(1)
        (line,) = [s for s in tab.details.toPlainText().splitlines() if s.startswith("Route:")]
        assert line.endswith(block)
        tab.view.selectRow(0)
        assert direct in tab.details.toPlainText()
