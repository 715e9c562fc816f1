"""RowTracker: engine events in, row changes out (a pure reducer, tested as transcripts)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.monitor.rows import (
    FAILURE_REASONS,
    ConnectionRow,
    ProcessInfo,
    RowChanges,
    RowState,
    RowTracker,
)
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    Event,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.records import CloseReason

CLIENT = ("10.0.0.5", 40000)
DST = ("93.184.216.34", 443)
CURL = ProcessInfo(pid=4242, name="curl", exe="/usr/bin/curl", user="alice")


def opened(cid: int, at: float = 100.0) -> ConnectionOpened:
    return ConnectionOpened(cid, CLIENT, DST, at)


def closed(
    cid: int, reason: CloseReason = CloseReason.DONE, at: float = 101.0, detail: str = ""
) -> ConnectionClosed:
    return ConnectionClosed(cid, reason, detail, 10, 20, 1.0, at)


def test_a_whole_tunnel_in_one_batch_is_only_closed() -> None:
    tracker = RowTracker()
    changes = tracker.apply(
        [
            opened(1),
            ConnectionRouted(1, "example.com", "corp"),
            TunnelEstablished(1, "corp", 0.012, 100.02),
            closed(1),
        ]
    )
    assert changes.opened == () and changes.updated == ()
    (row,) = changes.closed
    assert row == ConnectionRow(
        conn_id=1,
        started=100.0,
        client=CLIENT,
        original_dst=DST,
        host="example.com",
        upstream="corp",
        state=RowState.CLOSED,
        established=100.02,
        handshake_latency=0.012,
        bytes_up=10,
        bytes_down=20,
        ended=101.0,
        close_reason=CloseReason.DONE,
    )
    assert row.duration == 1.0 and not row.failed
    assert tracker.open_rows == {}


def test_batches_report_opened_then_updated_then_closed() -> None:
    tracker = RowTracker()
    first = tracker.apply([opened(1), ConnectionRouted(1, None, "corp")])
    assert [r.conn_id for r in first.opened] == [1] and first.opened[0].upstream == "corp"
    assert first.opened[0].state is RowState.OPENING
    second = tracker.apply([TunnelEstablished(1, "corp", 0.01, 100.01)])
    assert second.opened == () and second.updated[0].state is RowState.OPEN
    assert not tracker.apply([])  # nothing changed: an empty (falsy) batch
    third = tracker.apply([closed(1, CloseReason.UPSTREAM_RESET, detail="upstream side: x")])
    assert third.closed[0].state is RowState.FAILED
    assert third.closed[0].detail == "upstream side: x"


def test_failure_reasons_fail_the_row_and_normal_ends_do_not() -> None:
    for reason in CloseReason:
        tracker = RowTracker()
        (row,) = tracker.apply([opened(1), closed(1, reason)]).closed
        assert row.failed is (reason in FAILURE_REASONS)


def test_process_before_the_row_after_and_traffic() -> None:
    tracker = RowTracker()
    tracker.set_process(1, CURL)  # attribution was quicker than the batch
    changes = tracker.apply([opened(1)])
    assert changes.opened[0].process == CURL
    tracker.apply([opened(2)])
    tracker.set_process(2, CURL)
    tracker.set_traffic({2: (5, 6), 99: (1, 1)})
    pending = tracker.pending()
    assert [(r.conn_id, r.process, r.bytes_up, r.bytes_down) for r in pending.updated] == [
        (2, CURL, 5, 6)
    ]
    tracker.set_traffic({2: (5, 6)})  # unchanged: no update
    assert not tracker.pending()


BLOCK_ROUTE = "block (rule[1]: *.ads.example -> block)"
DIRECT_ROUTE = "direct (rule[0]: .corp.example -> direct)"


def test_the_route_decision_reaches_the_open_and_the_closed_row() -> None:
    # Issue 15: every decision records what decided it, and a BLOCK the rule that blocked it.
    tracker = RowTracker()
    first = tracker.apply(
        [opened(1), ConnectionRouted(1, "wiki.corp.example", None, DIRECT_ROUTE, "rule[0]")]
    )
    (row,) = first.opened
    assert row.route == DIRECT_ROUTE and row.route_action == "direct" and row.upstream is None
    established = tracker.apply([TunnelEstablished(1, None, 0.002, 100.01)])
    assert established.updated[0].route == DIRECT_ROUTE  # the tunnel does not forget it
    assert tracker.open_rows[1].route == DIRECT_ROUTE
    (closed_row,) = tracker.apply([closed(1)]).closed
    assert closed_row.route == DIRECT_ROUTE

    blocked = tracker.apply(
        [
            opened(2),
            ConnectionRouted(2, "x.ads.example", None, BLOCK_ROUTE, "rule[1]"),
            closed(2, CloseReason.BLOCKED),
        ]
    ).closed[0]
    assert blocked.route == BLOCK_ROUTE and blocked.route_action == "block" and blocked.failed
    offnet = ConnectionRow(3, 0.0, CLIENT, DST, route="direct: proxy unreachable (default)")
    assert offnet.route_action == "direct"


def test_without_a_router_the_route_is_empty() -> None:
    tracker = RowTracker()
    (row,) = tracker.apply([opened(1), ConnectionRouted(1, "example.com", "corp")]).opened
    assert row.route == "" and row.route_action == ""
    assert ConnectionRow(1, 0.0, CLIENT, DST).route == ""


def test_close_of_an_unknown_connection_is_ignored() -> None:
    tracker = RowTracker()
    assert not tracker.apply([closed(5), UpstreamFailed("corp", CloseReason.LOOP, "x", 1.0, 5)])


def test_early_process_info_is_bounded() -> None:
    tracker = RowTracker()
    for cid in range(10_050):
        tracker.set_process(cid, CURL)
    assert len(tracker._early_process) <= 10_000


def test_destination_label() -> None:
    row = ConnectionRow(1, 0.0, CLIENT, ("2001:db8::1", 443))
    assert row.destination == "[2001:db8::1]:443"
    assert ConnectionRow(1, 0.0, CLIENT, None).destination == "?"
    assert ProcessInfo(None, "?").label == "?"
    assert ProcessInfo(1, "curl", exited=True).label == "curl (1), exited"
    assert ProcessInfo(None, "?", container="web").label == "container web"
    assert ProcessInfo(None, "?", remote=True).label == "(from another address)"


_events = st.lists(
    st.one_of(
        st.builds(opened, st.integers(1, 6), st.floats(0, 1e9)),
        st.builds(
            ConnectionRouted,
            st.integers(1, 6),
            st.none() | st.just("h"),
            st.none() | st.just("u"),
            st.sampled_from(["", BLOCK_ROUTE, DIRECT_ROUTE]),
        ),
        st.builds(
            TunnelEstablished,
            st.integers(1, 6),
            st.none() | st.just("u"),
            st.floats(0, 10),
            st.floats(0, 1e9),
        ),
        st.builds(closed, st.integers(1, 6), st.sampled_from(list(CloseReason))),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(_events, max_size=5))
def test_random_event_orders_keep_the_bookkeeping_straight(batches: list[list[Event]]) -> None:
    tracker = RowTracker()
    shown: set[int] = set()
    for batch in batches:
        changes: RowChanges = tracker.apply(batch)
        ids = [r.conn_id for r in (*changes.opened, *changes.updated)]
        assert len(ids) == len(set(ids))
        for row in changes.opened:
            shown.add(row.conn_id)
        for row in changes.updated:
            assert row.conn_id in tracker.open_rows
        for row in changes.closed:
            assert row.state in (RowState.CLOSED, RowState.FAILED)
            shown.discard(row.conn_id)
        for row in (*changes.opened, *changes.updated):
            assert tracker.open_rows[row.conn_id] == row
