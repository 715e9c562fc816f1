"""The dashboard's data as the controller produces it: engine events become rows
(ConnectionsChanged), the relay's byte counters become row bytes and traffic rates, closed
rows reach the real SQLite history, "Test now" reaches the upstream's health, "Close
selected" reaches the relay, and a history that cannot be written is said, not a crash.

No Qt. The relay is the in-memory fake (its events are published from another thread as the
engine does); the history is the real HistoryWriter on a file in the test's directory.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.controller.fakes import Rig, run, until
from tray_proxy.controller import ConnectionsChanged, NoticeKind, Status, StatusUpdated
from tray_proxy.monitor.history import HistoryStore, HistoryWriter
from tray_proxy.monitor.query import HistoryFilter
from tray_proxy.monitor.rows import ConnectionRow, RowState
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    TunnelEstablished,
)
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.settings import UpstreamProxy

TICK = 0.05


def _rows(rig: Rig) -> tuple[list[ConnectionRow], list[ConnectionRow], list[ConnectionRow]]:
    opened: list[ConnectionRow] = []
    updated: list[ConnectionRow] = []
    closed: list[ConnectionRow] = []
    for event in rig.events:
        if isinstance(event, ConnectionsChanged):
            opened += event.changes.opened
            updated += event.changes.updated
            closed += event.changes.closed
    return opened, updated, closed


def _last_status(rig: Rig) -> Status:
    return [e.status for e in rig.events if isinstance(e, StatusUpdated)][-1]


def test_rows_bytes_rates_and_history_from_a_relay(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    writer = HistoryWriter(path, flush_interval=0.05)
    rig = Rig(history=writer, traffic_interval=TICK)
    now = time.time()

    async def scenario() -> None:
        await rig.controller.enable()
        rig.from_engine(
            ConnectionOpened(1, ("127.0.0.1", 40001), ("192.0.2.1", 443), at=now),
            ConnectionRouted(1, "example.com", "corp"),
            TunnelEstablished(1, "corp", 0.012, at=now + 0.01),
            ConnectionOpened(2, ("127.0.0.1", 40002), ("192.0.2.2", 443), at=now),
        )
        await until(lambda: len(rig.controller.open_rows()) == 2, "two open rows")
        # The relay's counters reach the rows and the rates within a tick or two.
        relay = rig.relays.relays[-1]
        relay.counters = ({1: (100, 2000), 2: (0, 0)}, 100, 2000)
        await until(lambda: any(r.bytes_down == 2000 for r in _rows(rig)[1]), "the row's bytes", 5)
        relay.counters = ({1: (200, 4000), 2: (0, 0)}, 200, 4000)
        await until(lambda: bool(_last_status(rig).health.traffic), "a traffic rate", 5)
        rig.from_engine(
            ConnectionClosed(1, CloseReason.DONE, "", 200, 4000, 1.0, at=now + 1),
            ConnectionClosed(
                2, CloseReason.UPSTREAM_TIMEOUT, "no answer within 10 s", 0, 0, 10, at=now + 10
            ),
        )
        await until(lambda: len(_rows(rig)[2]) == 2, "two closed rows")
        await rig.controller.shutdown()  # the history writes what it has

    run(scenario())
    opened, _updated, closed = _rows(rig)
    assert {r.conn_id for r in opened} == {1, 2}
    done, failed = sorted(closed, key=lambda r: r.conn_id)
    assert done.host == "example.com" and done.upstream == "corp"
    assert done.state is RowState.CLOSED and done.words == ""
    assert (done.bytes_up, done.bytes_down) == (200, 4000)
    assert failed.state is RowState.FAILED and failed.words  # the failure in words
    assert rig.controller.status().health.total_connections == 2
    store = HistoryStore(path)
    try:
        entries = store.page(HistoryFilter()).entries
    finally:
        store.close()
    assert sorted(e.row.conn_id for e in entries) == [1, 2]
    assert {e.row.conn_id: e.row.words for e in entries}[2] == failed.words


def test_close_selected_reaches_the_relay() -> None:
    rig = Rig()

    async def scenario() -> None:
        assert await rig.controller.close_connections([1]) == 0  # no relay: nothing to close
        await rig.controller.enable()
        rig.relays.relays[-1].counters = ({1: (0, 0), 2: (0, 0)}, 0, 0)
        assert await rig.controller.close_connections([1, 2, 99]) == 2
        await rig.controller.shutdown()

    run(scenario())
    assert rig.relays.relays[-1].closed_ids == [(1, 2, 99)]


def test_test_now_reaches_the_upstream_health_and_says_the_result() -> None:
    async def refused(upstream: UpstreamProxy, _credentials: object) -> ProbeResult:
        return ProbeResult(ProbeOutcome.UNREACHABLE, None, None, "connection refused")

    rig = Rig(probe=refused)

    async def scenario() -> None:
        text = await rig.controller.test_upstream("backup")
        assert "Proxy backup" in text and "connection refused" in text
        assert "no upstream named 'nope'" in await rig.controller.test_upstream("nope")

    run(scenario())
    health = {u.name: u for u in rig.controller.status().health.upstreams}
    probe = health["backup"].last_probe
    assert probe is not None and not probe.ok and probe.words == "connection refused"
    assert [n.kind for n in rig.notices()] == [NoticeKind.TEST_RESULT] * 2


def test_a_history_that_cannot_be_written_is_an_error_and_a_notice(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    writer = HistoryWriter(blocker / "history.sqlite3", flush_interval=0.05)
    rig = Rig(history=writer, traffic_interval=TICK)

    async def scenario() -> None:
        await rig.controller.enable()
        await until(lambda: bool(rig.notices()), "the notice", 5)
        await rig.controller.shutdown()

    run(scenario())
    (notice,) = rig.notices()
    assert notice.kind is NoticeKind.HISTORY_FAILED
    assert str(blocker) in notice.text
    assert rig.controller.status().last_error == notice.text
    assert rig.controller.state.value == "off"  # the relay ran on; Quit switched it off


def test_open_rows_are_empty_before_the_first_switch_on() -> None:
    rig = Rig()
    assert rig.controller.open_rows() == []
    assert asyncio.run(rig.controller.close_connections([1])) == 0
