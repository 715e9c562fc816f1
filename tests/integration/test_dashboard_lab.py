"""The dashboard against the real engine in the lab, through its widgets (pytest-qt).

The GUI app's composition runs in this process (dashboard_support.DashboardRig: the real
ProxyController with the engine relay on its own thread, the process attributor, the SQLite
history writer and reader, the UiBridge, the MainWindow) on a qasync loop, with the test's
main thread moved into the lab's client namespace. Real curl (no proxy settings) -> the
lab's nft redirect -> the relay -> real Squid with Basic auth -> the lab origin.

The tests read what the user reads: the Connections tab's tables (their rows through the
models' row role, and the cells' text), its filters, sorting, details and Close buttons
clicked with the mouse; the Overview's errors and open count; the Upstreams cards and their
Test now through real Squid; and the Log tab (filters, Export…) over the history file after
the connections closed. Qt's model checks stay attached to the live models throughout.
"""

from __future__ import annotations

import asyncio
import csv
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import qasync
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QImage
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QTableView

from tests.integration.dashboard_support import (
    DENIED_PORT,
    SPARE,
    UPSTREAM,
    WRONG_PASSWORD,
    Curl,
    DashboardRig,
    check_models,
    main_thread_in,
    rows_of,
    texts_of,
    until,
)
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess
from tests.lab.origins import ALT_HOSTNAME, HOSTNAME
from tray_proxy.monitor.rows import ConnectionRow, RowState
from tray_proxy.relay.records import CloseReason
from tray_proxy.ui.dashboard.connections import ConnectionsTab
from tray_proxy.ui.dashboard.upstreams import UpstreamCard
from tray_proxy.ui.format import fmt_bytes
from tray_proxy.ui.main_window import MainWindow
from tray_proxy.ui.models.columns import Column
from tray_proxy.ui.models.connections import ConnectionFilter

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

Scenario = Callable[[DashboardRig], Awaitable[None]]
SCENARIO_LIMIT = 150.0
# curl at this rate holds its connection for over a second: long enough to be attributed
# also on a loaded machine (at 1M/s a 0.7 s transfer once came back as an exited program
# with two busy loops on the two CPUs).
RATE = "limit-rate = 300K"
SLOW = "limit-rate = 100K"
SLOW_BODY = 20_000_000  # at SLOW: over three minutes; every slow curl here is ended by the test


@pytest.fixture
def run(qapp: QApplication, lab: Lab, tmp_path: Path) -> Iterator[Callable[[Scenario], None]]:
    """Run a scenario on a fresh qasync loop (as the app does) with the main thread in
    the lab's client namespace and the rig torn down after it, bounded in time."""
    qapp.setQuitOnLastWindowClosed(False)

    def runner(scenario: Scenario) -> None:
        rig = DashboardRig(lab, tmp_path)

        async def bounded() -> None:
            try:
                await rig.start()
                await asyncio.wait_for(scenario(rig), SCENARIO_LIMIT)
            finally:
                await rig.close()

        with (
            main_thread_in(lab.client.name),
            asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(qapp)) as r,
        ):
            r.run(bounded())

    yield runner


def _click_row(view: QTableView, row: int, *, extend: bool) -> None:
    index = view.model().index(row, Column.DESTINATION)
    view.scrollTo(index)
    modifier = Qt.KeyboardModifier.ControlModifier if extend else Qt.KeyboardModifier.NoModifier
    QTest.mouseClick(
        view.viewport(), Qt.MouseButton.LeftButton, modifier, view.visualRect(index).center()
    )


def _click_header(view: QTableView, column: Column) -> None:
    header = view.horizontalHeader()
    x = header.sectionViewportPosition(column) + header.sectionSize(column) // 2
    QTest.mouseClick(
        header.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(x, header.height() // 2)
    )


def _row_by_port(proxy: ConnectionFilter, port: int) -> ConnectionRow | None:
    return next((r for r in rows_of(proxy) if r.client[1] == port), None)


def _row_by_pid(proxy: ConnectionFilter, pid: int) -> ConnectionRow | None:
    return next((r for r in rows_of(proxy) if r.process is not None and r.process.pid == pid), None)


def test_finished_transfers_in_the_tables_filters_sorting_and_the_log(
    run: Callable[[Scenario], None], lab: Lab
) -> None:
    async def scenario(rig: DashboardRig) -> None:
        window = rig.window
        assert window is not None
        tab = window.connections
        check_models(tab.active, tab.closed, tab.active_proxy, tab.closed_proxy)
        origins = lab.origins
        # Each attributed transfer lasts over 3 s at RATE. In the app the attribution request
        # leaves from the UI thread's loop, which the model tester attached here can hold up
        # for a second or more on a slow CI machine: with 400 kB (1.3 s) the shortest one,
        # "alt", was looked up once its socket had closed (TIME_WAIT: exited, no pid) in two
        # CI runs of 2026-12-06. A program that ends before the lookup shows as exited by
        # design ("denied" below); these must not, so they outlive such a stall.
        sizes = {"plain": 1_200_000, "alt": 1_000_000, "tls": 1_100_000}
        curls = {
            "plain": Curl(
                lab, origins.url("http", origins.bytes_path(sizes["plain"], "d1")), options=[RATE]
            ),
            "alt": Curl(
                lab,
                origins.url("http", origins.bytes_path(sizes["alt"], "d2"), ALT_HOSTNAME),
                options=[RATE],
            ),
            "tls": Curl(
                lab, origins.url("https", origins.bytes_path(sizes["tls"], "d3")), options=[RATE]
            ),
            # Squid answers a CONNECT to this port with 403: a failed row.
            "denied": Curl(lab, f"http://{HOSTNAME}:{DENIED_PORT}/", max_time=15),
        }
        try:
            for curl in curls.values():
                await curl.finished(45)
        finally:
            for curl in curls.values():
                curl.stop()
        for name in ("plain", "alt", "tls"):
            got = curls[name]
            assert got.returncode == 0 and got.info["http_code"] == 200, got
            assert got.info["size_download"] == sizes[name], got
        assert curls["denied"].returncode != 0, curls["denied"]
        ports = {name: int(c.info["local_port"]) for name, c in curls.items()}

        # -- the Closed table: each transfer's row, attributed, with its bytes and end -----
        await until(
            lambda: all(_row_by_port(tab.closed_proxy, p) for p in ports.values()),
            "the four connections in the Closed table",
        )
        assert tab.active.rowCount() == 0
        rows = {name: _row_by_port(tab.closed_proxy, port) for name, port in ports.items()}
        for name, row in rows.items():
            assert row is not None
            curl = curls[name]
            if name == "denied" and (row.process is None or row.process.exited):
                # Squid's 403 comes back within milliseconds, and curl may exit before the
                # attributor's pass (20 ms after the accept): not found, or found exited.
                pass
            else:
                assert row.process is not None, (name, row)
                assert (row.process.name, row.process.pid) == ("curl", curl.pid), (name, row)
            assert row.upstream == UPSTREAM
            assert row.ended is not None
        hosts = {name: row.host for name, row in rows.items() if row is not None}
        assert hosts == {
            "plain": HOSTNAME,
            "alt": ALT_HOSTNAME,
            "tls": HOSTNAME,
            "denied": HOSTNAME,
        }
        for name in ("plain", "alt"):  # plain HTTP: the relay's counts are curl's exactly
            row, info = rows[name], curls[name].info
            assert row is not None
            assert row.bytes_up == info["size_request"], (name, row, info)
            assert row.bytes_down == info["size_header"] + info["size_download"], (name, row, info)
            assert (row.state, row.close_reason) == (RowState.CLOSED, CloseReason.DONE)
        tls = rows["tls"]
        assert tls is not None and tls.bytes_down > sizes["tls"] and tls.bytes_up > 0
        denied = rows["denied"]
        assert denied is not None
        assert (denied.state, denied.close_reason) == (
            RowState.FAILED,
            CloseReason.UPSTREAM_REFUSED,
        )
        assert "forbids this destination (403)" in denied.words

        # The cells say the same (the Closed view, as the user switches to it).
        QTest.mouseClick(tab.show_closed, Qt.MouseButton.LeftButton)
        assert tab.current_view is tab.closed_view
        proxy = tab.closed_proxy
        by_id = {r.conn_id: i for i, r in enumerate(rows_of(proxy))}
        plain = rows["plain"]
        assert plain is not None
        at = by_id[plain.conn_id]
        cell = {c: proxy.index(at, c).data() for c in Column}
        assert cell[Column.PROCESS] == f"curl ({curls['plain'].pid})"
        assert cell[Column.DESTINATION] == f"{HOSTNAME}:80"
        assert cell[Column.UPSTREAM] == UPSTREAM
        assert cell[Column.DOWN] == fmt_bytes(plain.bytes_down)
        assert cell[Column.UP] == fmt_bytes(plain.bytes_up)
        assert cell[Column.OUTCOME] == "done"
        assert proxy.index(by_id[denied.conn_id], Column.OUTCOME).data() == denied.words
        # Clicking the row shows everything about it in the details pane.
        _click_row(tab.closed_view, at, extend=False)
        details = tab.details.toPlainText()
        for line in (
            f"Process:           curl ({curls['plain'].pid})",
            "Executable:        /usr/bin/curl",
            f"Host name:         {HOSTNAME}",
            f"Proxy:             {UPSTREAM}",
            f"Received:          {fmt_bytes(plain.bytes_down)} ({plain.bytes_down} bytes)",
            "Close reason:      done",
        ):
            assert line in details.splitlines(), (line, details)

        # -- the 403 in words on the Overview, and the proxy's health on Upstreams -------
        def overview_says() -> bool:
            items = [window.errors.item(i).text() for i in range(window.errors.count())]
            return any(denied.words in text for text in items)

        await until(overview_says, "the Overview's errors to say the 403 in words")
        card = window.upstreams.cards[UPSTREAM]
        await until(
            lambda: card.successes_label.text() == "3", "the Upstreams card to count 3 tunnels"
        )
        assert card.failures_label.text() == "upstream-refused 1"
        assert card.last_failure_label.text().endswith(denied.words)
        assert card.minute_label.text().startswith("p50 ")
        assert window.upstreams.cards[SPARE].successes_label.text() == "0"

        # -- filters ---------------------------------------------------------------------
        def shown() -> set[str]:
            names = {row.conn_id: name for name, row in rows.items() if row is not None}
            return {names[r.conn_id] for r in rows_of(proxy) if r.conn_id in names}

        everything = set(rows)
        assert shown() == everything
        QTest.keyClicks(tab.filter_edit, "www.lab")
        assert shown() == {"alt"}
        assert tab.count_label.text() == f"1 of {proxy.source.rowCount()} shown"
        tab.filter_edit.clear()
        # A regular expression: the 403's words, or the alternative host.
        QTest.mouseClick(tab.regex_box, Qt.MouseButton.LeftButton)
        QTest.keyClicks(tab.filter_edit, r"\(403\)|^www\.")
        assert shown() == {"denied", "alt"}
        tab.filter_edit.clear()
        QTest.keyClicks(tab.filter_edit, "(")
        assert (
            tab.filter_error.isVisible() and "Not a regular expression" in tab.filter_error.text()
        )
        tab.filter_edit.clear()
        QTest.mouseClick(tab.regex_box, Qt.MouseButton.LeftButton)
        assert shown() == everything and not tab.filter_error.isVisible()

        tab.state_combo.setCurrentIndex(tab.state_combo.findData(RowState.FAILED))
        assert shown() == {"denied"}
        tab.state_combo.setCurrentIndex(tab.state_combo.findData(RowState.CLOSED))
        assert shown() == {"plain", "alt", "tls"}
        tab.state_combo.setCurrentIndex(0)

        tab.upstream_combo.setCurrentIndex(tab.upstream_combo.findData(SPARE))
        assert shown() == set()
        tab.upstream_combo.setCurrentIndex(tab.upstream_combo.findData(UPSTREAM))
        assert shown() == everything
        tab.upstream_combo.setCurrentIndex(0)

        QTest.keyClicks(tab.process_edit, "python")
        assert shown() == set()
        tab.process_edit.clear()
        QTest.keyClicks(tab.process_edit, "cur")
        attributed = {
            n for n, r in rows.items() if r is not None and r.process and r.process.name == "curl"
        }
        assert shown() == attributed and {"plain", "alt", "tls"} <= attributed
        tab.process_edit.clear()

        QTest.mouseClick(tab.failed_box, Qt.MouseButton.LeftButton)
        assert shown() == {"denied"}
        QTest.mouseClick(tab.failed_box, Qt.MouseButton.LeftButton)
        assert shown() == everything

        # -- sorting by a header click: Received as numbers, both ways -------------------
        mine = {row.conn_id for row in rows.values() if row is not None}

        def received() -> list[int]:
            return [r.bytes_down for r in rows_of(proxy) if r.conn_id in mine]

        _click_header(tab.closed_view, Column.DOWN)
        first = received()
        assert first in (sorted(first), sorted(first, reverse=True)) and len(set(first)) == 4
        _click_header(tab.closed_view, Column.DOWN)
        assert received() == first[::-1]
        texts = [
            t
            for t, r in zip(texts_of(proxy, Column.DOWN), rows_of(proxy), strict=True)
            if r.conn_id in mine
        ]
        assert texts == [fmt_bytes(n) for n in received()]

        # -- the Log tab: the same connections from SQLite, then a host filter -----------
        await _the_log_shows(window, mine, rows)
        alt = rows["alt"]
        assert alt is not None
        await _the_export_holds(rig, lab, alt)

    run(scenario)


async def _the_log_shows(
    window: MainWindow, mine: set[int], rows: dict[str, ConnectionRow | None]
) -> None:
    log = window.log
    window.tabs.setCurrentWidget(log)
    model = log.model
    assert model is not None
    check_models(model)  # through each refresh and filter

    def logged() -> dict[int, ConnectionRow]:
        return {
            model.entry_at(i).row.conn_id: model.entry_at(i).row
            for i in range(model.rowCount())
            if model.entry_at(i).row.conn_id in mine
        }

    def refreshed() -> bool:
        QTest.mouseClick(log.refresh_button, Qt.MouseButton.LeftButton)
        return set(logged()) == mine

    await until(refreshed, "the Log tab to show the four connections from the history")
    stored = logged()
    for name, live in rows.items():
        assert live is not None
        row = stored[live.conn_id]
        assert row.process == live.process, name
        assert (row.host, row.upstream, row.state) == (live.host, live.upstream, live.state), name
        assert (row.bytes_up, row.bytes_down, row.close_reason) == (
            live.bytes_up,
            live.bytes_down,
            live.close_reason,
        ), name
        assert row.words == live.words, name
    QTest.keyClicks(log.host_edit, ALT_HOSTNAME)
    alt = rows["alt"]
    assert alt is not None
    await until(lambda: set(logged()) == {alt.conn_id}, "the host filter to narrow the log")
    assert model.filter.host == ALT_HOSTNAME
    at = next(i for i in range(model.rowCount()) if model.entry_at(i).row.conn_id == alt.conn_id)
    assert (
        model.index(at, Column.PROCESS).data()
        == f"curl ({alt.process.pid if alt.process else '?'})"
    )
    assert model.index(at, Column.DESTINATION).data() == f"{ALT_HOSTNAME}:80"


async def _the_export_holds(rig: DashboardRig, lab: Lab, alt: ConnectionRow) -> None:
    """Export… writes what the Log tab's filter shows to CSV, in a worker, without secrets."""
    window = rig.window
    assert window is not None
    log = window.log
    QTest.mouseClick(log.export_button, Qt.MouseButton.LeftButton)
    await until(lambda: not log.exporting, "the export to finish")
    assert log.status_label.text() == f"Exported 1 connection to {rig.export_path}."
    with rig.export_path.open(newline="", encoding="utf-8") as f:
        (record,) = list(csv.DictReader(f))
    assert alt.process is not None
    assert str(alt.process.pid) in record.values() and "curl" in record.values(), record
    assert ALT_HOSTNAME in record.values(), record
    text = rig.export_path.read_text(encoding="utf-8")
    squid = lab.squid
    assert squid.credentials is not None and squid.credentials.password not in text


def test_close_selected_and_close_all_filtered_end_real_tunnels(
    run: Callable[[Scenario], None], lab: Lab
) -> None:
    async def scenario(rig: DashboardRig) -> None:
        window = rig.window
        assert window is not None
        tab = window.connections
        # Qt's model checks stay attached to the live models while real traffic changes
        # them (rows inserted, bytes updated every second, rows moved to Closed).
        check_models(tab.active, tab.closed, tab.active_proxy, tab.closed_proxy)
        origins = lab.origins

        # Slow uploads: a slow *download* would not do, as the kernel holds megabytes
        # the relay already passed on in curl's receive buffer, which a rate-limited curl
        # reads for a minute before it meets the reset. An upload meets it at its next send.
        body = rig.workdir / "upload"
        with body.open("wb") as f:
            f.truncate(SLOW_BODY)

        def slow(host: str | None = None) -> Curl:
            url = origins.url("http", "/echo", host)
            return Curl(lab, url, options=[SLOW], max_time=90, upload=body)

        curls = {
            "a1": slow(),
            "a2": slow(),
            "www": slow(ALT_HOSTNAME),
            "ip": slow("v4"),
        }
        try:
            assert lab.origin.v4 is not None
            await _close_by_hand(window, curls, lab.origin.v4)
        finally:
            for curl in curls.values():
                curl.stop()

    run(scenario)


async def _close_by_hand(window: MainWindow, curls: dict[str, Curl], origin_v4: str) -> None:
    tab = window.connections
    active, closed = tab.active_proxy, tab.closed_proxy

    def live(name: str) -> ConnectionRow | None:
        return _row_by_pid(active, curls[name].pid)

    await until(
        lambda: all((r := live(n)) is not None and r.bytes_up > 0 for n in curls),
        "each slow curl in the Active table, attributed, its bytes counted",
    )
    assert tab.showing_active and active.rowCount() == 4
    assert tab.show_active.text() == "Active (4)"
    await until(lambda: window.connections_label.text() == "4", "the Overview's open count")
    rows = {name: live(name) for name in curls}
    assert {n: r.host for n, r in rows.items() if r is not None} == {
        "a1": HOSTNAME,
        "a2": HOSTNAME,
        "www": ALT_HOSTNAME,
        "ip": None,
    }
    ip_row = rows["ip"]
    assert ip_row is not None and ip_row.destination == f"{origin_v4}:80"

    # -- sorting a live table: by Sent, re-sorted as the counters move every second --------
    _click_header(tab.active_view, Column.UP)
    order = active.sortOrder()

    def sorted_by_sent() -> bool:
        sent = [r.bytes_up for r in rows_of(active)]
        return sent == sorted(sent, reverse=order == Qt.SortOrder.DescendingOrder)

    assert active.sortColumn() == Column.UP and sorted_by_sent()
    for _ in range(3):  # three ticks of new counters, each re-sorted
        before = [r.bytes_up for r in rows_of(active)]

        def moved(before: list[int] = before) -> bool:
            return [r.bytes_up for r in rows_of(active)] != before

        await until(moved, "new counters")
        assert sorted_by_sent(), [r.bytes_up for r in rows_of(active)]

    # -- Close selected: click a1's row, Ctrl+click a2's, click the button ----------------
    assert not tab.close_selected_button.isEnabled()
    for i, name in enumerate(("a1", "a2")):
        pos = next(
            p
            for p, r in enumerate(rows_of(active))
            if r.process and r.process.pid == curls[name].pid
        )
        _click_row(tab.active_view, pos, extend=i > 0)
    wanted = {row.conn_id for name, row in rows.items() if row is not None and name in ("a1", "a2")}
    assert {r.conn_id for r in tab.selected_rows()} == wanted and len(wanted) == 2
    assert tab.close_selected_button.isEnabled()
    loop = asyncio.get_running_loop()
    clicked = loop.time()
    QTest.mouseClick(tab.close_selected_button, Qt.MouseButton.LeftButton)
    for name in ("a1", "a2"):
        curl = await curls[name].finished(10)
        assert curl.returncode in (55, 56), curl  # failed sending / connection reset
    assert loop.time() - clicked < 5.0, "curl did not end at once"
    assert curls["www"].running() and curls["ip"].running()

    def closed_row(name: str) -> ConnectionRow | None:
        row = _row_by_pid(closed, curls[name].pid)
        return row if row is not None and row.close_reason is not None else None

    await until(lambda: closed_row("a1") and closed_row("a2"), "a1 and a2 in the Closed table")
    for name in ("a1", "a2"):
        row = closed_row(name)
        assert row is not None
        assert (row.state, row.close_reason) == (RowState.CLOSED, CloseReason.CLOSED_BY_USER)
        assert row.detail == "closed from the dashboard"
        assert 0 < row.bytes_up < SLOW_BODY
        assert live(name) is None
        at = rows_of(closed).index(row)
        assert closed.index(at, Column.OUTCOME).data() == "closed-by-user"
    # The selection left with its rows; the counts follow (the Overview's with the status).
    assert not tab.close_selected_button.isEnabled()
    assert tab.show_active.text() == "Active (2)" and tab.show_closed.text() == "Closed (2)"
    await until(lambda: window.connections_label.text() == "2", "the Overview's open count")
    await _still_flowing(tab, curls, ("www", "ip"))

    # -- Close all filtered: the text filter leaves www's tunnel alone in Active -----------
    QTest.keyClicks(tab.filter_edit, ALT_HOSTNAME)
    assert [r.process.pid for r in rows_of(active) if r.process] == [curls["www"].pid]
    assert tab.close_filtered_button.text() == "Close all filtered (1)"
    QTest.mouseClick(tab.close_filtered_button, Qt.MouseButton.LeftButton)
    curl = await curls["www"].finished(10)
    assert curl.returncode in (55, 56), curl
    await until(lambda: closed_row("www"), "www in the Closed table")
    www = closed_row("www")
    assert www is not None and www.close_reason is CloseReason.CLOSED_BY_USER
    assert not tab.close_filtered_button.isEnabled()
    tab.filter_edit.clear()
    assert [r.process.pid for r in rows_of(active) if r.process] == [curls["ip"].pid]
    await _still_flowing(tab, curls, ("ip",))

    # The program itself ends the last one: a different outcome in the same table.
    curls["ip"].stop()
    await until(lambda: closed_row("ip"), "the last tunnel in the Closed table")
    last = closed_row("ip")
    assert last is not None and last.close_reason is not CloseReason.CLOSED_BY_USER
    assert active.rowCount() == 0

    # -- the Log tab: the same four from SQLite, by process, then by host ------------------
    log = window.log
    window.tabs.setCurrentWidget(log)
    model = log.model
    assert model is not None
    QTest.keyClicks(log.process_edit, "curl")
    pids = {curls[name].pid: name for name in curls}

    def logged() -> dict[str, tuple[str, str]]:
        out = {}
        for i in range(model.rowCount()):
            row = model.entry_at(i).row
            if row.process is not None and row.process.pid in pids:
                out[pids[row.process.pid]] = (
                    str(model.index(i, Column.PROCESS).data()),
                    str(model.index(i, Column.OUTCOME).data()),
                )
        return out

    def refreshed() -> bool:
        QTest.mouseClick(log.refresh_button, Qt.MouseButton.LeftButton)
        return len(logged()) == 4

    await until(refreshed, "the four closed tunnels in the Log tab")
    assert model.filter.process == "curl"
    found = logged()
    for name in ("a1", "a2", "www"):
        assert found[name] == (f"curl ({curls[name].pid})", "closed-by-user"), found
    assert found["ip"][1] != "closed-by-user"
    QTest.keyClicks(log.host_edit, ALT_HOSTNAME)
    await until(lambda: set(logged()) == {"www"}, "the host filter to leave www alone")
    log.level_combo.setCurrentIndex(1)  # failures only: a user's close is not a failure
    assert model.rowCount() == 0


async def _still_flowing(
    tab: ConnectionsTab, curls: dict[str, Curl], names: tuple[str, ...]
) -> None:
    """The tunnels of `names` keep moving bytes (their rows' counters grow)."""
    before = {}
    for name in names:
        row = _row_by_pid(tab.active_proxy, curls[name].pid)
        assert row is not None and curls[name].running(), name
        before[name] = row.bytes_up

    def grown() -> bool:
        now = {n: _row_by_pid(tab.active_proxy, curls[n].pid) for n in names}
        return all(r is not None and r.bytes_up > before[n] for n, r in now.items())

    await until(grown, f"{', '.join(names)} to keep sending", timeout=10)


async def _test_now_with_a_wrong_password(rig: DashboardRig) -> UpstreamCard:
    """Click "Test now" on the card of the proxy whose password is wrong; its card once the
    real probe through Squid has answered."""
    window = rig.window
    assert window is not None
    window.tabs.setCurrentWidget(window.upstreams)
    card = window.upstreams.cards[WRONG_PASSWORD]
    assert card.probe_label.text() == "never (use Test now)"
    QTest.mouseClick(card.test_button, Qt.MouseButton.LeftButton)
    await until(lambda: "failed" in card.probe_label.text(), "the probe's answer on the card")
    return card


def test_test_now_through_a_real_407_says_so_on_the_card_and_as_a_notice(
    run: Callable[[Scenario], None], lab: Lab
) -> None:
    squid = lab.squid
    assert squid.credentials is not None
    user, password = squid.credentials.username, squid.credentials.password

    async def scenario(rig: DashboardRig) -> None:
        window = rig.window
        assert window is not None
        card = await _test_now_with_a_wrong_password(rig)
        words = f"{squid.host}:{squid.port} rejected the password for {user} (407)"
        assert card.probe_label.text().endswith(f": failed, {words}")
        # No tray here: the notice shows in the window.
        await until(window.notice_label.isVisible, "the test's notice in the window")
        notice = window.notice_label.text()
        assert words in notice and "Open Credentials" in notice, notice
        for text in (notice, card.probe_label.text(), card.last_failure_label.text()):
            assert password not in text

    run(scenario)


def test_test_now_through_a_real_407_marks_the_proxy_password_refused(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(rig: DashboardRig) -> None:
        card = await _test_now_with_a_wrong_password(rig)
        await until(lambda: "password refused" in card.state_label.text(), "the state", 3)

    run(scenario)


SHOTS_ENV = "TRAY_PROXY_SCREENSHOTS"  # =1: the tabs' pictures go to docs/ (README's screenshots)
DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_tab_with_real_traffic_as_the_readme_shows_it(
    run: Callable[[Scenario], None], lab: Lab
) -> None:
    """The four tabs after real traffic: finished downloads by curl and python, a 403, two
    uploads still running, a Test now through a proxy entry with a wrong password. Each tab
    shows that traffic; with TRAY_PROXY_SCREENSHOTS=1 (under Xvfb) it is saved to docs/."""

    async def scenario(rig: DashboardRig) -> None:
        window = rig.window
        assert window is not None
        window.resize(1000, 700)
        tab = window.connections
        origins = lab.origins
        body = rig.workdir / "upload"
        with body.open("wb") as f:
            f.truncate(SLOW_BODY)
        running = [
            Curl(lab, origins.url("http", "/echo"), options=[SLOW], max_time=90, upload=body),
            Curl(
                lab,
                origins.url("http", "/echo", ALT_HOSTNAME),
                options=["limit-rate = 300K"],
                max_time=90,
                upload=body,
            ),
        ]
        finished: list[Curl] = []
        python: NsProcess | None = None
        try:
            # Squid's password helper starts cold (1-2 s for the first CONNECT): warm it up
            # first, so the latency the pictures show is the proxy's, not its start-up.
            running.append(Curl(lab, origins.url("https", "/health")))
            await running[-1].finished(30)
            for i in range(8):
                if i == 4:
                    await asyncio.sleep(1.5)  # two waves: the traffic graph has a shape
                host = (HOSTNAME, ALT_HOSTNAME)[i % 2]
                scheme = ("https", "http", "https", "https")[i % 4]
                path = origins.bytes_path(300_000 * (i + 1), f"shot{i}")
                finished.append(Curl(lab, origins.url(scheme, path, host), options=[RATE]))
            finished.append(Curl(lab, f"http://{HOSTNAME}:{DENIED_PORT}/", max_time=15))
            fetch = (
                "import urllib.request,sys; "
                "sys.exit(0 if len(urllib.request.urlopen(sys.argv[1], timeout=30).read()) "
                "== 2000000 else 1)"
            )
            python = lab.client.popen(
                ["python3", "-c", fetch, origins.url("http", origins.bytes_path(2_000_000, "py"))]
            )
            for curl in finished:
                await curl.finished(60)
            py = python
            await until(lambda: py.poll() is not None, "python's download", 60)
            assert python.returncode == 0
            await until(
                lambda: _row_by_pid(tab.closed_proxy, py.pid) is not None,
                "python's row among the closed connections",
            )
            await _test_now_with_a_wrong_password(rig)
            # (The Connections tab, hidden behind Upstreams now, applies its rows when shown.)
            await until(lambda: window.connections_label.text() == "2", "the two uploads open")
            await asyncio.sleep(3)  # a few seconds of traffic on the Overview's graph

            shots: dict[str, QImage] = {}
            window.tabs.setCurrentWidget(window.overview)
            assert window.connections_label.text() == "2"
            assert "forbids this destination (403)" in "\n".join(
                window.errors.item(i).text() for i in range(window.errors.count())
            )
            shots["overview"] = await _shot(window)

            window.tabs.setCurrentWidget(tab)
            QTest.mouseClick(tab.show_closed, Qt.MouseButton.LeftButton)
            closed = rows_of(tab.closed_proxy)
            assert {r.process.name for r in closed if r.process and not r.process.exited} >= {
                "curl",
                "python3",
            }
            denied = next(i for i, r in enumerate(closed) if r.state is RowState.FAILED)
            _click_row(tab.closed_view, denied, extend=False)
            assert "forbids this destination (403)" in tab.details.toPlainText()
            shots["connections"] = await _shot(window)

            window.tabs.setCurrentWidget(window.upstreams)
            assert "password refused" in window.upstreams.cards[WRONG_PASSWORD].state_label.text()
            shots["upstreams"] = await _shot(window)

            window.tabs.setCurrentWidget(window.log)
            await until(lambda: window.log.model.rowCount() >= len(finished) + 1, "the Log")
            shots["log"] = await _shot(window)
        finally:
            for curl in running + finished:
                curl.stop()
            if python is not None:
                python.stop(grace=1.0)
                lab.client.forget(python)
        for name, image in shots.items():
            assert not image.isNull() and image.width() >= 900, name
            if os.environ.get(SHOTS_ENV) == "1":
                assert image.save(str(DOCS / f"dashboard-{name}.png")), name

    run(scenario)


async def _shot(window: MainWindow) -> QImage:
    """The window as it is painted once the tab's pending updates are shown."""
    await asyncio.sleep(0.5)
    QApplication.processEvents()
    return window.grab().toImage()
