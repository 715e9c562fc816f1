"""Monitor: real engine events (RelayEngine on loopback against the proxy and origin stubs of
tests/relay/stubs.py) in; rows, words, health and history out.

The attributor and the history writer are stand-ins that record what they were asked (their
real versions, monitor/attribution.py and monitor/history.py, have their own tests); the
monotonic clock is the test's, so "2 s later" needs no sleep.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.relay.stubs import (
    ConnectProxy,
    Mode,
    Origin,
    echo,
    echo_once,
    http_upstream,
    running_relay,
)
from tray_proxy.monitor.health import ProbeRecord, UpstreamState
from tray_proxy.monitor.monitor import ATTRIBUTION_WAIT, MAX_HELD, Monitor
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowChanges, RowState
from tray_proxy.relay.events import ConnectionClosed, ConnectionOpened, ConnectionRouted, Event
from tray_proxy.relay.records import Address, CloseReason
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

CURL = ProcessInfo(pid=4242, name="curl", exe="/usr/bin/curl", user="alice")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Attributor:
    def __init__(self, fail: bool = False) -> None:
        self.requests: list[tuple[int, Address, Address | None]] = []
        self.calls = 0
        self.closed = False
        self.fail = fail

    def request_all(self, requests: Sequence[tuple[int, Address, Address | None]]) -> None:
        if self.fail:
            raise RuntimeError("attribution broke")
        self.calls += 1
        self.requests.extend(requests)

    def close(self) -> None:
        self.closed = True


class History:
    def __init__(self) -> None:
        self.rows: list[ConnectionRow] = []
        self.closed_with: float | None = None

    def submit(self, rows: Sequence[ConnectionRow]) -> None:
        self.rows.extend(rows)

    def close(self, timeout: float = 5.0) -> None:
        self.closed_with = timeout


def make(
    upstreams: Sequence[UpstreamProxy] = (), attributor: Any = None
) -> tuple[Monitor, History, Clock]:
    history, clock = History(), Clock()
    monitor = Monitor(lambda: {u.name: u for u in upstreams}, history, attributor, clock=clock)
    return monitor, history, clock


def gathered(parts: Sequence[RowChanges]) -> tuple[list[int], list[ConnectionRow]]:
    opened = [r.conn_id for c in parts for r in c.opened]
    closed = [r for c in parts for r in c.closed]
    return opened, closed


# -- through the real engine -------------------------------------------------------------------


def test_a_real_tunnel_becomes_one_row_with_its_process() -> None:
    async def main() -> None:
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
        ):
            upstream = http_upstream(proxy)
            attributor = Attributor()
            monitor, history, clock = make([upstream], attributor)
            async with running_relay([upstream], origin.address) as relay:
                assert await echo_once(relay.address, b"hello monitor") == b"hello monitor"
                await relay.wait_closed()
                parts = [monitor.feed(relay.events)]
            ((conn_id, client, dst),) = attributor.requests
            assert dst == origin.address and client[0] == "127.0.0.1"
            # Closed before attribution answered: held back from the UI and the history.
            assert gathered(parts) == ([], []) and history.rows == []
            parts.append(monitor.process_found([(conn_id, CURL)]))
            _, (row,) = gathered(parts)
            assert history.rows == [row]
            assert row.process == CURL and row.upstream == "corp"
            assert row.state is RowState.CLOSED and row.close_reason is CloseReason.DONE
            assert row.bytes_up == row.bytes_down == len(b"hello monitor")
            assert row.handshake_latency is not None and row.handshake_latency > 0
            assert row.words == ""
            snap = monitor.health(row.ended or 0.0)
            (corp,) = snap.upstreams
            assert corp.state is UpstreamState.UP and corp.successes == 1
            assert corp.p50_1m == row.handshake_latency
            assert snap.total_connections == 1 and snap.open_connections == 0
            monitor.close()
            assert attributor.closed and history.closed_with == 5.0
            assert clock.now == 1000.0

    asyncio.run(main())


def test_open_rows_and_a_failure_in_words_from_a_real_403() -> None:
    async def main() -> None:
        async with (
            Origin(echo) as origin,
            ConnectProxy(Mode.FORBIDDEN) as proxy,
        ):
            upstream = http_upstream(proxy)
            monitor, history, _clock = make([upstream], None)
            async with running_relay([upstream], origin.address) as relay:
                reader, writer = await relay.connect()
                await relay.wait_closed()
                writer.close()
                changes = monitor.feed(relay.events)
            (row,) = changes.closed
            assert history.rows == [row]
            assert row.state is RowState.FAILED
            assert row.close_reason is CloseReason.UPSTREAM_REFUSED
            assert row.words == (
                f"{row.destination}: the proxy forbids this destination (403). "
                "Only the proxy's administrators can allow it."
            )
            snap = monitor.health(row.ended or 0.0)
            assert [f.words for f in snap.failures] == [row.words]
            assert snap.upstreams[0].failures == {"upstream-refused": 1}
            assert snap.upstreams[0].last_failure_words == row.words

    asyncio.run(main())


def test_rows_while_open_then_closed_in_later_batches() -> None:
    async def main() -> None:
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            upstream = http_upstream(proxy)
            attributor = Attributor()
            monitor, history, _clock = make([upstream], attributor)
            async with running_relay([upstream], origin.address) as relay:
                reader, writer = await relay.connect()
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                first = monitor.feed(list(relay.events))
                seen = len(relay.events)
                (row,) = first.opened
                assert row.state is RowState.OPEN and row in monitor.open_rows()
                found = monitor.process_found([(row.conn_id, CURL)])
                assert found.updated[0].process == CURL and not found.closed
                traffic = monitor.traffic(row.started + 1, {row.conn_id: (4, 4)}, 4, 4)
                assert traffic.updated[0].bytes_up == 4
                writer.close()
                await relay.wait_closed()
                last = monitor.feed(relay.events[seen:])
            # Attribution had answered: the close goes out at once.
            (closed,) = last.closed
            assert closed.process == CURL and history.rows == [closed]
            assert monitor.open_rows() == []

    asyncio.run(main())


# -- holding rows for attribution ------------------------------------------------------------


def opened(cid: int) -> ConnectionOpened:
    return ConnectionOpened(cid, ("127.0.0.1", 50000 + cid), ("10.0.0.1", 443), 100.0)


def done(cid: int, reason: CloseReason = CloseReason.DONE) -> ConnectionClosed:
    return ConnectionClosed(cid, reason, "", 1, 1, 1.0, 101.0)


def test_a_batch_of_opened_connections_is_one_request_to_the_attributor() -> None:
    """Connections opened in one batch of events go to the attributor in one call (it hands
    them to its child in one write); a batch with none opened asks nothing."""
    attributor = Attributor()
    monitor, _history, _clock = make([], attributor)
    monitor.feed([opened(1), opened(2), done(1), opened(3)])
    assert attributor.calls == 1
    assert [r[0] for r in attributor.requests] == [1, 2, 3]
    monitor.feed([done(2), done(3)])
    assert attributor.calls == 1


def test_a_row_whose_process_never_comes_goes_on_after_the_wait() -> None:
    attributor = Attributor()
    monitor, history, clock = make([], attributor)
    assert not monitor.feed([opened(1), done(1)])
    clock.now += ATTRIBUTION_WAIT - 0.1
    assert not monitor.traffic(0.0, {}, 0, 0)
    clock.now += 0.2
    (row,) = monitor.traffic(1.0, {}, 0, 0).closed
    assert row.process is None and history.rows == [row]
    # A late answer for a released row changes nothing.
    assert not monitor.process_found([(1, CURL)])
    assert len(history.rows) == 1


def test_not_found_releases_the_row_without_a_process() -> None:
    monitor, history, _clock = make([], Attributor())
    monitor.feed([opened(1), opened(2), done(1), done(2)])
    (row,) = monitor.process_found([(2, None)]).closed
    assert row.conn_id == 2 and row.process is None
    assert [r.conn_id for r in history.rows] == [2]


def test_close_hands_held_rows_to_the_history() -> None:
    attributor = Attributor()
    monitor, history, _clock = make([], attributor)
    monitor.feed([opened(1), done(1, CloseReason.CLIENT_RESET)])
    monitor.close()
    monitor.close()  # twice is harmless
    (row,) = history.rows
    assert row.state is RowState.FAILED and row.words.startswith("The program reset")
    assert attributor.closed and history.closed_with is not None


def test_held_rows_are_bounded() -> None:
    monitor, history, _clock = make([], Attributor())
    events: list[Event] = []
    for cid in range(1, MAX_HELD + 11):
        events += [opened(cid), done(cid)]
    changes = monitor.feed(events)
    assert len(changes.closed) == 10 and len(history.rows) == 10
    assert [r.conn_id for r in changes.closed] == list(range(1, 11))


def test_a_broken_attributor_costs_the_process_names_only() -> None:
    monitor, history, _clock = make([], Attributor(fail=True))
    (row,) = monitor.feed([opened(1), done(1)]).closed
    assert history.rows == [row]
    (row,) = monitor.feed([opened(2), done(2)]).closed
    assert row.conn_id == 2


def test_without_history_or_attributor() -> None:
    monitor = Monitor(lambda: {}, None, None)
    (row,) = monitor.feed([opened(1), done(1, CloseReason.NO_UPSTREAM)]).closed
    assert row.words.startswith("No proxy is set up")
    monitor.close()


def test_health_lists_configured_upstreams_and_probes() -> None:
    corp = UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp", 8080)
    backup = UpstreamProxy("backup", UpstreamKind.HTTP, "backup.corp", 8080)
    monitor, _history, _clock = make([corp, backup], None)
    monitor.probe(ProbeRecord("backup", 5.0, True, 0.01, "OK in 10 ms", "ok"))
    snap = monitor.health(6.0)
    assert [(u.name, u.state) for u in snap.upstreams] == [
        ("corp", UpstreamState.UNKNOWN),
        ("backup", UpstreamState.UP),
    ]


def test_usernames_from_the_keyring_name_the_user() -> None:
    corp = UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp", 8080)
    monitor = Monitor(lambda: {"corp": corp}, None, None, usernames=lambda: {"corp": "alice"})
    (row,) = monitor.feed(
        [
            opened(1),
            ConnectionRouted(1, None, "corp"),
            ConnectionClosed(
                1,
                CloseReason.UPSTREAM_AUTH_FAILED,
                "proxy corp (http://proxy.corp:8080) rejected the credentials (proxy answered "
                "407 Proxy Authentication Required)",
                0,
                0,
                0.1,
                101.0,
            ),
        ]
    ).closed
    assert row.words == "proxy.corp:8080 refused the password for alice (407). " + (
        "Open Credentials to fix it."
    )


@pytest.mark.parametrize("batch", [1, 64])
def test_many_connections_in_batches(batch: int) -> None:
    attributor = Attributor()
    monitor, history, clock = make([], attributor)
    events: list[Event] = []
    for cid in range(1, 2001):
        events += [opened(cid), done(cid)]
    released = 0
    for start in range(0, len(events), batch):
        released += len(monitor.feed(events[start : start + batch]).closed)
        answered = [(cid, CURL) for cid, _c, _d in attributor.requests[-batch:]]
        released += len(monitor.process_found(answered).closed)
    clock.now += ATTRIBUTION_WAIT + 1
    released += len(monitor.traffic(0.0, {}, 0, 0).closed)
    assert released == 2000 == len(history.rows)
    assert len({r.conn_id for r in history.rows}) == 2000
    assert monitor.health(200.0).total_connections == 2000


_step = st.one_of(
    st.tuples(st.just("open"), st.integers(1, 8)),
    st.tuples(st.just("close"), st.integers(1, 8)),
    st.tuples(st.just("found"), st.integers(1, 8)),
    st.tuples(st.just("tick"), st.floats(0, 3)),
)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_step, max_size=40))
@example(steps=[("open", 1), ("close", 1), ("open", 1), ("close", 1)])  # found in CI
def test_random_orders_release_each_closed_row_once(steps: list[tuple[str, Any]]) -> None:
    attributor = Attributor()
    monitor, history, clock = make([], attributor)
    released: list[int] = []
    closes = 0
    open_now: set[int] = set()
    for kind, value in steps:
        if kind == "open":
            changes = monitor.feed([opened(value)])
            open_now.add(value)
        elif kind == "close":
            changes = monitor.feed([done(value)])
            if value in open_now:
                open_now.discard(value)
                closes += 1
        elif kind == "found":
            changes = monitor.process_found([(value, CURL)])
        else:
            clock.now += value
            changes = monitor.traffic(clock.now, {}, 0, 0)
        released += [r.conn_id for r in changes.closed]
    assert [r.conn_id for r in history.rows] == released
    monitor.close()
    assert len(history.rows) == closes


# -- coalescing (headless `tray-proxy run`) ----------------------------------------------------


class CountingHistory(History):
    def __init__(self) -> None:
        super().__init__()
        self.submits = 0

    def submit(self, rows: Sequence[ConnectionRow]) -> None:
        self.submits += 1
        super().submit(rows)


def coalescing(
    attributor: Any = None, coalesce: float = 0.1
) -> tuple[Monitor, CountingHistory, Clock]:
    history, clock = CountingHistory(), Clock()
    monitor = Monitor(lambda: {}, history, attributor, clock=clock, coalesce=coalesce)
    return monitor, history, clock


def routed(cid: int) -> ConnectionRouted:
    return ConnectionRouted(cid, "example.com", "corp")


def test_coalesced_events_are_reduced_together_once_due() -> None:
    attributor = Attributor()
    monitor, history, clock = coalescing(attributor)
    # A hundred connections, each event in its own batch (a relay at a sequential pace).
    parts: list[RowChanges] = []
    for cid in range(1, 101):
        for event in (opened(cid), routed(cid), done(cid)):
            parts.append(monitor.feed([event]))
        parts.append(monitor.process_found([(cid, CURL)]))
        clock.now += 0.0005
    # Asked at once (a short program's socket must still be there), reduced not yet.
    assert [r[0] for r in attributor.requests] == list(range(1, 101))
    assert not any(parts) and history.rows == [] and monitor.open_rows() == []
    assert monitor.health(200.0).total_connections == 0
    clock.now += 0.1
    changes = monitor.feed([opened(101)])
    # Opened and closed within the batch: one closed row each, with its process, written in
    # one submit; never shown as opened.
    assert [r.conn_id for r in changes.closed] == list(range(1, 101))
    assert {r.process for r in changes.closed} == {CURL}
    assert {r.host for r in changes.closed} == {"example.com"}
    assert [r.conn_id for r in changes.opened] == [101] and not changes.updated
    assert history.submits == 1 and history.rows == list(changes.closed)
    assert monitor.health(200.0).total_connections == 101


def test_an_answer_before_its_close_in_one_batch_still_names_the_row() -> None:
    monitor, history, clock = coalescing(Attributor())
    assert not monitor.feed([opened(1)])
    assert not monitor.process_found([(1, CURL)])  # the row is open when it is applied
    assert not monitor.feed([done(1)])
    assert not monitor.feed([opened(2), done(2)])
    assert not monitor.process_found([(2, None)])  # after the close: the held row goes on
    clock.now += 0.2
    (one, two) = monitor.traffic(clock.now, {}, 0, 0).closed
    assert (one.conn_id, one.process) == (1, CURL)
    assert (two.conn_id, two.process) == (2, None)
    assert history.rows == [one, two]


def test_traffic_and_close_reduce_what_waits() -> None:
    monitor, history, _clock = coalescing(None, coalesce=60.0)
    assert not monitor.feed([opened(1), routed(1), opened(2)])
    changes = monitor.traffic(100.0, {1: (10, 20)}, 10, 20)
    assert {r.conn_id: r.bytes_up for r in changes.opened} == {1: 10, 2: 0}
    assert not monitor.feed([done(1)])
    monitor.close()
    assert [r.conn_id for r in history.rows] == [1] and history.closed_with is not None


def test_coalescing_is_bounded() -> None:
    from tray_proxy.monitor.monitor import MAX_DEFERRED

    monitor, history, _clock = coalescing(None, coalesce=3600.0)
    released = 0
    for cid in range(1, MAX_DEFERRED // 2 + 1):
        released += len(monitor.feed([opened(cid), done(cid)]).closed)
    assert released == MAX_DEFERRED // 2 == len(history.rows)
    assert history.submits == 1


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_step, max_size=40))
def test_random_orders_coalesced_release_each_closed_row_once(
    steps: list[tuple[str, Any]],
) -> None:
    attributor = Attributor()
    monitor, history, clock = coalescing(attributor, coalesce=0.5)
    released: list[int] = []
    closes = 0
    open_now: set[int] = set()
    for kind, value in steps:
        if kind == "open":
            changes = monitor.feed([opened(value)])
            open_now.add(value)
        elif kind == "close":
            changes = monitor.feed([done(value)])
            if value in open_now:
                open_now.discard(value)
                closes += 1
        elif kind == "found":
            changes = monitor.process_found([(value, CURL)])
        else:
            clock.now += value
            changes = monitor.traffic(clock.now, {}, 0, 0)
        released += [r.conn_id for r in changes.closed]
    assert [r.conn_id for r in history.rows] == released
    monitor.close()
    assert len(history.rows) == closes


def test_a_blocked_row_keeps_its_route_through_the_words_and_the_process() -> None:
    # Issue 15: "BLOCK ... recorded with the rule that blocked it": the row the Monitor words
    # (and later names the process of) is the one the history writes.
    route = "block (rule[1]: *.ads.example -> block)"
    monitor, history, _clock = make([], Attributor())
    monitor.feed(
        [
            opened(1),
            ConnectionRouted(1, "x.ads.example", None, route, "rule[1]"),
            done(1, CloseReason.BLOCKED),
        ]
    )
    (row,) = monitor.process_found([(1, CURL)]).closed
    assert row.words and row.process == CURL
    assert row.route == route and history.rows == [row]
