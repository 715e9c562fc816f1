"""HealthReducer: a pure reducer over engine events, probes, traffic samples and closed rows.
Time comes with every input; no clock is read."""

from __future__ import annotations

import math
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.monitor.health import (
    BUCKET_SECONDS,
    MAX_FAILURE_ENTRIES,
    SAMPLES_PER_BUCKET,
    HealthReducer,
    ProbeRecord,
    UpstreamState,
    percentile,
)
from tray_proxy.monitor.rows import ConnectionRow, RowState
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    CredentialsRejected,
    Event,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.records import CloseReason

T0 = 1_700_000_000.0  # a bucket boundary (divisible by 10)
CLIENT = ("10.0.0.5", 40000)
DST = ("93.184.216.34", 443)


def tunnel(cid: int, at: float, latency: float, upstream: str = "corp") -> list[Event]:
    return [
        ConnectionOpened(cid, CLIENT, DST, at - latency),
        ConnectionRouted(cid, "example.com", upstream),
        TunnelEstablished(cid, upstream, latency, at),
    ]


def failure(cid: int, at: float, reason: CloseReason, upstream: str = "corp") -> list[Event]:
    return [
        ConnectionOpened(cid, CLIENT, DST, at),
        ConnectionRouted(cid, "example.com", upstream),
        UpstreamFailed(upstream, reason, "detail", at, cid),
        ConnectionClosed(cid, reason, "detail", 0, 0, 0.0, at),
    ]


def upstream(reducer: HealthReducer, now: float, name: str = "corp"):  # type: ignore[no-untyped-def]
    return next(u for u in reducer.snapshot(now).upstreams if u.name == name)


def test_nearest_rank_percentile() -> None:
    assert percentile([1.0], 0.5) == 1.0
    assert percentile([1.0, 2.0], 0.5) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0


def test_unknown_until_a_tunnel_then_up_with_latency() -> None:
    reducer = HealthReducer(["corp", "backup"])
    snap = reducer.snapshot(T0)
    assert [u.name for u in snap.upstreams] == ["corp", "backup"]
    assert all(u.state is UpstreamState.UNKNOWN and u.p50_1m is None for u in snap.upstreams)
    events: list[Event] = []
    for i, ms in enumerate([10, 20, 30, 40, 50]):
        events += tunnel(i, T0 + 1 + i, ms / 1000)
    reducer.apply(events)
    corp = upstream(reducer, T0 + 6)
    assert corp.state is UpstreamState.UP and corp.successes == 5
    assert (corp.p50_1m, corp.p95_1m) == (0.03, 0.05)
    assert (corp.p50_1h, corp.p95_1h) == (0.03, 0.05)
    assert corp.last_success == T0 + 5
    assert len(corp.series) == 1 and corp.series[0].count == 5
    snap = reducer.snapshot(T0 + 6)
    assert snap.open_connections == 5 and snap.total_connections == 5


def test_the_minute_and_the_hour_windows() -> None:
    reducer = HealthReducer()
    reducer.apply(tunnel(1, T0, 1.0))  # an old slow one
    reducer.apply(tunnel(2, T0 + 30 * 60, 0.01))
    corp = upstream(reducer, T0 + 30 * 60 + 1)
    assert corp.p50_1m == corp.p95_1m == 0.01
    assert corp.p95_1h == 1.0
    later = upstream(reducer, T0 + 3600 + 5)  # the first has left the hour
    assert later.p95_1h == 0.01 and later.p50_1m is None
    assert [p.count for p in later.series] == [1]
    assert upstream(reducer, T0 + 3 * 3600).p50_1h is None


def test_down_after_three_failures_in_a_row_and_up_again() -> None:
    reducer = HealthReducer()
    reducer.apply(failure(1, T0, CloseReason.UPSTREAM_TIMEOUT))
    reducer.apply(failure(2, T0 + 1, CloseReason.UPSTREAM_UNREACHABLE))
    assert upstream(reducer, T0 + 2).state is UpstreamState.UNKNOWN
    reducer.apply(failure(3, T0 + 2, CloseReason.UPSTREAM_REFUSED))  # the proxy answered
    reducer.apply(failure(4, T0 + 3, CloseReason.UPSTREAM_TIMEOUT))
    assert upstream(reducer, T0 + 4).state is UpstreamState.DOWN
    corp = upstream(reducer, T0 + 4)
    assert corp.failures == {
        "upstream-timeout": 2,
        "upstream-unreachable": 1,
        "upstream-refused": 1,
    }
    assert corp.last_failure == T0 + 3
    reducer.apply(tunnel(5, T0 + 5, 0.02))
    assert upstream(reducer, T0 + 6).state is UpstreamState.UP
    snap = reducer.snapshot(T0 + 6)
    assert snap.open_connections == 1 and snap.total_connections == 5


def test_auth_failure_and_credentials_rejected() -> None:
    reducer = HealthReducer()
    reducer.apply(failure(1, T0, CloseReason.UPSTREAM_AUTH_FAILED))
    assert upstream(reducer, T0).state is UpstreamState.AUTH_FAILED
    for i in range(2, 6):  # timeouts do not hide the password problem
        reducer.apply(failure(i, T0 + i, CloseReason.UPSTREAM_TIMEOUT))
    assert upstream(reducer, T0 + 6).state is UpstreamState.AUTH_FAILED
    reducer.apply(tunnel(9, T0 + 7, 0.01))
    assert upstream(reducer, T0 + 8).state is UpstreamState.UP
    reducer.apply([CredentialsRejected("corp", "alice")])
    assert upstream(reducer, T0 + 8).state is UpstreamState.AUTH_FAILED


def test_a_reset_mid_tunnel_counts_once_and_does_not_mark_down() -> None:
    reducer = HealthReducer()
    for i in range(4):
        reducer.apply(tunnel(i, T0 + i, 0.01))
        reducer.apply([ConnectionClosed(i, CloseReason.UPSTREAM_RESET, "x", 1, 1, 1.0, T0 + i)])
    corp = upstream(reducer, T0 + 5)
    assert corp.state is UpstreamState.UP
    assert corp.failures == {"upstream-reset": 4}
    # A handshake failure: UpstreamFailed and ConnectionClosed together count once.
    reducer.apply(failure(10, T0 + 6, CloseReason.UPSTREAM_PROTOCOL_ERROR))
    assert upstream(reducer, T0 + 7).failures["upstream-protocol-error"] == 1
    # The engine's "?" (no upstream chosen) is no upstream.
    reducer.apply([UpstreamFailed("?", CloseReason.CONFIG_ERROR, "x", T0, None)])
    assert [u.name for u in reducer.snapshot(T0 + 8).upstreams] == ["corp"]


def test_probes() -> None:
    reducer = HealthReducer(["corp"])
    ok = ProbeRecord("corp", T0, True, 0.02, "OK in 20 ms", "ok")
    reducer.apply_probe(ok)
    corp = upstream(reducer, T0 + 1)
    assert corp.state is UpstreamState.UP and corp.last_probe == ok
    reducer.apply_probe(ProbeRecord("corp", T0 + 2, False, None, "timed out after 5 s", "timeout"))
    assert upstream(reducer, T0 + 3).state is UpstreamState.DOWN
    reducer.apply_probe(ok)  # a late answer of an older probe changes nothing
    assert upstream(reducer, T0 + 3).state is UpstreamState.DOWN
    reducer.apply_probe(ProbeRecord("corp", T0 + 4, False, None, "forbidden", "forbidden"))
    assert upstream(reducer, T0 + 5).state is UpstreamState.DOWN  # unchanged by a 403
    reducer.apply_probe(ProbeRecord("corp", T0 + 6, False, None, "407", "auth-failed"))
    assert upstream(reducer, T0 + 7).state is UpstreamState.AUTH_FAILED


def test_traffic_rates() -> None:
    reducer = HealthReducer()
    reducer.apply_traffic(T0, 0, 0)
    reducer.apply(tunnel(1, T0 + 0.5, 0.01) + tunnel(2, T0 + 0.6, 0.01))
    reducer.apply_traffic(T0 + 2, 2000, 10_000)
    reducer.apply_traffic(T0 + 2, 9999, 9999)  # no time passed: no point
    reducer.apply_traffic(T0 + 3, 3000, 10_000)
    snap = reducer.snapshot(T0 + 3)
    assert [(p.at, p.up, p.down, p.new_connections) for p in snap.traffic] == [
        (T0 + 2, 1000.0, 5000.0, 1.0),
        (T0 + 3, 1000.0, 0.0, 0.0),
    ]
    assert snap.rate_now == snap.traffic[-1]
    for second in range(4, 1000):
        reducer.apply_traffic(T0 + second, 3000, 10_000)
    points = reducer.snapshot(T0 + 999).traffic
    assert len(points) <= 301 and points[0].at >= T0 + 999 - 300


def row(cid: int, at: float, words: str, upstream: str | None = "corp") -> ConnectionRow:
    return ConnectionRow(
        cid,
        at,
        CLIENT,
        DST,
        upstream=upstream,
        state=RowState.FAILED,
        ended=at,
        close_reason=CloseReason.UPSTREAM_TIMEOUT,
        words=words,
    )


def test_failures_in_words_are_counted_and_age_out() -> None:
    reducer = HealthReducer()
    reducer.apply_rows(
        [
            row(1, T0, "No answer from a:1 within 10 s."),
            row(2, T0 + 1, "No answer from a:1 within 10 s."),
            row(3, T0 + 2, "Other."),
            row(4, T0 + 3, "No answer from a:1 within 10 s."),
            ConnectionRow(5, T0, CLIENT, DST, state=RowState.CLOSED, ended=T0),  # no failure
        ]
    )
    snap = reducer.snapshot(T0 + 4)
    assert [(f.words, f.count, f.at) for f in snap.failures] == [
        ("Other.", 1, T0 + 2),
        ("No answer from a:1 within 10 s.", 3, T0 + 3),
    ]
    assert snap.failures[-1].display == "No answer from a:1 within 10 s. (3 times)"
    assert snap.failures[-1].reason == "upstream-timeout"
    assert upstream(reducer, T0 + 4).last_failure_words == "No answer from a:1 within 10 s."
    assert reducer.snapshot(T0 + 3600 + 2.5).failures[0].words == "No answer from a:1 within 10 s."
    assert reducer.snapshot(T0 + 3600 + 3.5).failures == ()


def test_failures_in_words_are_bounded() -> None:
    reducer = HealthReducer()
    reducer.apply_rows(row(i, T0 + i, f"Failure {i}.") for i in range(MAX_FAILURE_ENTRIES + 50))
    failures = reducer.snapshot(T0 + 300).failures
    assert len(failures) == MAX_FAILURE_ENTRIES
    assert failures[-1].words == f"Failure {MAX_FAILURE_ENTRIES + 49}."


def test_an_hour_at_a_thousand_handshakes_a_second_stays_small() -> None:
    reducer = HealthReducer()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        cid = 0
        for second in range(3600):
            batch: list[Event] = []
            for i in range(1000 if second % 60 == 0 else 30):  # full rate in bursts, to be quick
                cid += 1
                at = T0 + second + i / 1000
                batch.append(TunnelEstablished(cid, "corp", 0.001 * (1 + i % 50), at))
            reducer.apply(batch)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert used < 3 * 1024 * 1024, used
    corp = upstream(reducer, T0 + 3600)
    assert corp.successes == cid
    assert len(corp.series) <= 360
    # The buckets past SAMPLES_PER_BUCKET keep a sample: within a millisecond of exact.
    values = sorted(
        0.001 * (1 + i % 50)
        for second in range(1, 3600)  # the hour before T0 + 3600 (bucket 0 has left)
        for i in range(1000 if second % 60 == 0 else 30)
        if second >= 10
    )
    assert corp.p95_1h is not None and corp.p50_1h is not None
    assert abs(corp.p95_1h - percentile(values, 0.95)) <= 0.0015
    assert abs(corp.p50_1h - percentile(values, 0.5)) <= 0.0015


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0001, 30.0), min_size=1, max_size=SAMPLES_PER_BUCKET))
def test_percentiles_equal_a_sorted_list_reference(latencies: list[float]) -> None:
    reducer = HealthReducer()
    events: list[Event] = []
    for i, value in enumerate(latencies):
        # All within one minute, spread over buckets.
        events.append(TunnelEstablished(i, "corp", value, T0 + (i % 6) * BUCKET_SECONDS))
    reducer.apply(events)
    corp = upstream(reducer, T0 + 59)
    ordered = sorted(latencies)
    expected = (
        ordered[max(1, math.ceil(0.5 * len(ordered))) - 1],
        ordered[max(1, math.ceil(0.95 * len(ordered))) - 1],
    )
    assert (corp.p50_1m, corp.p95_1m) == expected
    assert (corp.p50_1h, corp.p95_1h) == expected
    assert sum(p.count for p in corp.series) == len(latencies)


_names = st.sampled_from(["corp", "backup", "?"])
_any_event = st.one_of(
    st.builds(ConnectionOpened, st.integers(0, 5), st.just(CLIENT), st.just(DST), st.floats()),
    st.builds(ConnectionRouted, st.integers(0, 5), st.none(), st.none() | _names),
    st.builds(TunnelEstablished, st.integers(0, 5), st.none() | _names, st.floats(), st.floats()),
    st.builds(
        ConnectionClosed,
        st.integers(0, 5),
        st.sampled_from(list(CloseReason)),
        st.just(""),
        st.integers(0, 10),
        st.integers(0, 10),
        st.floats(0, 10),
        st.floats(),
    ),
    st.builds(
        UpstreamFailed,
        _names,
        st.sampled_from(list(CloseReason)),
        st.just("x"),
        st.floats(),
        st.none() | st.integers(0, 5),
    ),
    st.builds(CredentialsRejected, _names, st.just("alice")),
)


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.lists(_any_event, max_size=20), max_size=5),
    now=st.floats(-1e12, 1e12),
    samples=st.lists(st.tuples(st.floats(), st.integers(0, 10**12), st.integers(0, 10**12))),
)
def test_random_inputs_never_raise(
    batches: list[list[Event]], now: float, samples: list[tuple[float, int, int]]
) -> None:
    reducer = HealthReducer(["corp"])
    for batch in batches:
        reducer.apply(batch)
    for at, up, down in samples:
        reducer.apply_traffic(at, up, down)
    snap = reducer.snapshot(now)
    assert snap.open_connections >= 0
    assert snap.upstreams[0].name == "corp"


def test_absurd_latencies_land_in_the_end_bins() -> None:
    reducer = HealthReducer()
    reducer.apply(
        [TunnelEstablished(1, "corp", 1.8e303, T0), TunnelEstablished(2, "corp", 0.0, T0)]
    )
    corp = upstream(reducer, T0 + 1)
    assert (corp.p50_1m, corp.p95_1m) == (0.0, 1.8e303)
