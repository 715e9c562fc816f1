"""tray_proxy/offnet.py: the state machine as transcripts and under Hypothesis (against a
plain reference reading of its rules), the probe on real sockets (refused, timed out,
unreachable, a name that does not resolve, the reserved source ports past a real nft
redirect), and the driver on a loop.

Probes that need a network run in a namespace made by the test, on a loop whose thread (and
so its resolver threads) joined that namespace: no packet leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lab.netns import Namespace, run_tag, thread_in_namespace
from tray_proxy.offnet import (
    DIRECT_WORDS,
    Offnet,
    OffnetChange,
    OffnetPolicy,
    OffnetProber,
    ProbeResult,
    ProbeStatus,
    Reachability,
    probe_upstreams,
)
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy
from tray_proxy.routing.settings import parse_routing

T = TypeVar("T")
ON, DIRECT = Reachability.ON_PROXY, Reachability.DIRECT_UNREACHABLE


def ok(name: str = "corp") -> ProbeResult:
    return ProbeResult(name, ProbeStatus.OK, f"{name}: reachable")


def bad(name: str = "corp", status: ProbeStatus = ProbeStatus.REFUSED) -> ProbeResult:
    return ProbeResult(name, status, f"{name}:8080: connection refused")


# transcripts ---------------------------------------------------------------------------------


def test_two_failed_rounds_go_direct_and_one_good_round_comes_back() -> None:
    offnet = Offnet(OffnetPolicy(), now=100.0)
    assert offnet.next_probe_in(100.0) == 0  # probes at start-up like after a change
    token = offnet.probe_started(100.0)
    assert offnet.probed(token, [bad("corp"), bad("backup")], 100.1) is None  # one: not yet
    assert offnet.state is ON and not offnet.unreachable
    assert offnet.next_probe_in(100.1) == 0.5  # the fast series goes on
    token = offnet.probe_started(100.6)
    change = offnet.probed(token, [bad("corp"), bad("backup", ProbeStatus.NO_NAME)], 100.6)
    assert change == OffnetChange(
        DIRECT, True, DIRECT_WORDS, "corp:8080: connection refused; backup:8080: connection refused"
    )
    assert offnet.words == "direct: proxy unreachable"
    token = offnet.probe_started(101.6)
    assert offnet.probed(token, [bad("corp"), bad("backup")], 101.6) is None  # still direct
    token = offnet.probe_started(103.6)
    change = offnet.probed(token, [bad("corp"), ok("backup")], 103.6)  # one is enough
    assert change == OffnetChange(ON, False, "through the proxy", "")
    assert offnet.reason == ""


def test_a_failure_between_successes_never_goes_direct() -> None:
    offnet = Offnet(OffnetPolicy(fast=(0.0,)), now=0.0)
    now, waits = 0.0, []
    for results in ([ok()], [bad()], [ok()], [bad()], [ok()], [bad()]):
        assert offnet.probed(offnet.probe_started(now), results, now) is None
        assert offnet.state is ON
        waits.append(offnet.next_probe_in(now))
        now += waits[-1]
    # A failure asks for confirmation soon instead of waiting the whole interval.
    assert waits == [30.0, 0.5, 30.0, 0.5, 30.0, 0.5]


def test_when_unreachable_fail_never_goes_direct_but_says_unreachable() -> None:
    routing = parse_routing({"when_unreachable": "fail"}, [], [], [])
    policy = OffnetPolicy.from_routing(routing)
    assert policy.go_direct is False
    offnet = Offnet(policy, now=0.0)
    offnet.probed(offnet.probe_started(0.0), [bad()], 0.0)
    change = offnet.probed(offnet.probe_started(0.5), [bad()], 0.5)
    assert change is not None and change.state is ON and change.unreachable
    assert "proxy unreachable" in change.words and "fail" in change.words
    assert offnet.state is ON
    change = offnet.probed(offnet.probe_started(1.0), [ok()], 1.0)
    assert change == OffnetChange(ON, False, "through the proxy", "")


def test_from_routing_keeps_the_timings_given() -> None:
    timings = OffnetPolicy(interval=5.0, fast=(0.0, 0.1))
    direct = OffnetPolicy.from_routing(parse_routing({}, [], [], []), timings)
    assert direct.go_direct and direct.interval == 5.0 and direct.fast == (0.0, 0.1)


def test_a_round_from_before_a_network_change_cannot_send_us_direct() -> None:
    offnet = Offnet(OffnetPolicy(), now=0.0)
    offnet.probed(offnet.probe_started(0.0), [bad()], 0.0)
    stale = offnet.probe_started(0.5)
    offnet.network_changed(0.7)  # e.g. the VPN came up while the round was running
    assert offnet.next_probe_in(0.7) == 0
    assert offnet.probed(stale, [bad()], 1.5) is None
    assert offnet.state is ON and not offnet.unreachable
    # Its successes count, though: a reachable proxy is reachable.
    stale = offnet.probe_started(2.0)
    offnet.network_changed(2.1)
    assert offnet.probed(stale, [ok()], 2.2) is None
    offnet.probed(offnet.probe_started(2.2), [bad()], 2.2)
    assert offnet.state is ON  # the success in between reset the count


def test_probe_schedule_fast_after_a_change_then_periodic() -> None:
    policy = OffnetPolicy(interval=30.0, interval_direct=10.0)
    offnet = Offnet(policy, now=0.0)
    now, waits = 0.0, []
    for _ in range(8):
        wait = offnet.next_probe_in(now)
        waits.append(wait)
        now += wait
        offnet.probed(offnet.probe_started(now), [ok()], now)
    assert waits == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 30.0, 30.0]
    offnet.network_changed(now + 3)
    assert offnet.next_probe_in(now + 3) == 0.0
    # Direct: periodic probes every interval_direct to come back sooner.
    for _ in range(8):
        now += offnet.next_probe_in(now)
        offnet.probed(offnet.probe_started(now), [bad()], now)
    assert offnet.state is DIRECT
    assert offnet.next_probe_in(now) == 10.0
    assert offnet.next_probe_in(now + 25) == 0.0  # overdue: now, never negative


def test_no_upstreams_is_no_evidence() -> None:
    offnet = Offnet(OffnetPolicy(), now=0.0)
    for now in (0.0, 1.0, 2.0):
        assert offnet.probed(offnet.probe_started(now), [], now) is None
    assert offnet.state is ON and not offnet.unreachable


def test_set_policy_on_reload() -> None:
    offnet = Offnet(OffnetPolicy(), now=0.0)
    offnet.probed(offnet.probe_started(0.0), [bad()], 0.0)
    offnet.probed(offnet.probe_started(0.5), [bad()], 0.5)
    assert offnet.state is DIRECT
    change = offnet.set_policy(OffnetPolicy(go_direct=False), 1.0)
    assert change is not None and change.state is ON and change.unreachable
    change = offnet.set_policy(OffnetPolicy(go_direct=True, interval_direct=1.0), 1.0)
    assert change is not None and change.state is DIRECT
    assert offnet.next_probe_in(1.0) <= 1.0  # the new timings apply now
    assert offnet.set_policy(OffnetPolicy(go_direct=True, fast=(0.0,)), 1.0) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failures_to_direct": 0},
        {"successes_to_return": 0},
        {"interval": -1.0},
        {"fast": ()},
        {"confirm": float("nan")},
        {"interval_direct": float("inf")},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        OffnetPolicy(**kwargs)  # type: ignore[arg-type]


# Hypothesis: the machine against a plain reading of its rules --------------------------------


@dataclass
class Reference:
    go_direct: bool
    failures_to_direct: int
    successes_to_return: int
    generation: int = 0
    failed: int = 0
    good: int = 0
    state: Reachability = ON
    unreachable: bool = False

    def round(self, token: int, results: list[bool]) -> None:
        if any(results):
            self.failed, self.good = 0, self.good + 1
            if self.good >= self.successes_to_return:
                self.state, self.unreachable = ON, False
        elif results and token == self.generation:
            self.failed, self.good = self.failed + 1, 0
            if self.failed >= self.failures_to_direct:
                self.unreachable = True
                if self.go_direct:
                    self.state = DIRECT


step = st.one_of(
    st.tuples(st.just("change"), st.floats(0, 100)),
    st.tuples(
        st.just("round"),
        st.floats(0, 100),
        st.lists(st.booleans(), max_size=3),
        st.booleans(),  # a change while the round ran (stale token)
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    go_direct=st.booleans(),
    failures_to_direct=st.integers(1, 4),
    successes_to_return=st.integers(1, 3),
    steps=st.lists(step, max_size=40),
)
def test_the_machine_follows_its_rules(
    go_direct: bool,
    failures_to_direct: int,
    successes_to_return: int,
    steps: list[tuple[object, ...]],
) -> None:
    policy = OffnetPolicy(
        go_direct=go_direct,
        failures_to_direct=failures_to_direct,
        successes_to_return=successes_to_return,
    )
    offnet = Offnet(policy, now=0.0)
    model = Reference(go_direct, failures_to_direct, successes_to_return)
    now = 0.0
    for item in steps:
        now += float(item[1])  # type: ignore[arg-type]
        if item[0] == "change":
            offnet.network_changed(now)
            model.generation += 1
            assert offnet.next_probe_in(now) == policy.fast[0]
            continue
        _kind, _dt, outcomes, interrupted = item
        assert isinstance(outcomes, list)
        token = offnet.probe_started(now)
        if interrupted:
            offnet.network_changed(now)
            model.generation += 1
        before = (offnet.state, offnet.unreachable)
        results = [ok(f"u{i}") if good else bad(f"u{i}") for i, good in enumerate(outcomes)]
        change = offnet.probed(token, results, now)
        model.round(token, outcomes)
        assert (offnet.state, offnet.unreachable) == (model.state, model.unreachable)
        if (offnet.state, offnet.unreachable) == before:
            assert change is None
        else:
            assert change is not None and change.state is offnet.state
            assert change.words == offnet.words
            assert (change.reason != "") == offnet.unreachable
        assert offnet.state is ON or go_direct
        assert 0 <= offnet.next_probe_in(now) <= policy.longest_wait
        if offnet.state is DIRECT:
            assert offnet.words == DIRECT_WORDS


# probing real sockets ----------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[Namespace]:
    """A namespace with only `lo` (10.213.0.1 on it too) and no route anywhere else."""
    namespace = Namespace(f"{run_tag()}-off", "offnet")
    try:
        namespace.create()
        namespace.run(["ip", "addr", "add", "10.213.0.1/32", "dev", "lo"])
        yield namespace
    finally:
        namespace.close()


def in_namespace(ns: Namespace, coro: Callable[[], Awaitable[T]]) -> T:
    """Run `coro()` on a fresh loop in a thread that joined `ns` (its resolver threads too)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            with thread_in_namespace(ns.name):
                box["value"] = asyncio.run(coro())  # type: ignore[arg-type]
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="offnet-test")
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def upstream(name: str, host: str, port: int) -> UpstreamProxy:
    return UpstreamProxy(name, UpstreamKind.HTTP, host, port)


@contextlib.contextmanager
def accepting(ns: Namespace, address: str, port: int) -> Iterator[list[tuple[str, int]]]:
    """A listener in `ns`; yields the peers (address, source port) it accepted."""
    listener = ns.listen(address, port)
    listener.settimeout(0.1)
    peers: list[tuple[str, int]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peers.append((peer[0], peer[1]))
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield peers
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.mark.lab
def test_probe_outcomes_on_real_sockets(ns: Namespace) -> None:
    # SYNs to port 9 vanish: the probe times out.
    ruleset = "table inet offnet_test {\n chain out {\n  type filter hook output priority 0;\n"
    ns.run(["nft", "-f", "-"], input=(ruleset + "  tcp dport 9 drop\n }\n}\n").encode())
    with accepting(ns, "10.213.0.1", 3128):
        proxies = [
            upstream("listening", "10.213.0.1", 3128),
            upstream("closed", "10.213.0.1", 3129),
            upstream("dropped", "10.213.0.1", 9),
            upstream("no-route", "10.99.0.1", 3128),
            upstream("no-name", "proxy.tray-proxy-test.invalid", 3128),
        ]
        started = time.monotonic()
        results = in_namespace(ns, lambda: probe_upstreams(proxies, 0.8))
        took = time.monotonic() - started
    statuses = {r.upstream: r.status for r in results}
    assert statuses == {
        "listening": ProbeStatus.OK,
        "closed": ProbeStatus.REFUSED,
        "dropped": ProbeStatus.TIMEOUT,
        "no-route": ProbeStatus.UNREACHABLE,
        "no-name": ProbeStatus.NO_NAME,
    }
    assert [r.upstream for r in results] == [p.name for p in proxies]  # in their order
    assert took < 0.8 + 0.7  # all at once, each within the timeout
    words = {r.upstream: r.words for r in results}
    assert words["closed"] == "10.213.0.1:3129: connection refused"
    assert words["no-name"].startswith("proxy.tray-proxy-test.invalid:3128: the name does not")
    assert words["dropped"] == "10.213.0.1:9: no connection within 0.8 s"
    assert "ENETUNREACH" in words["no-route"]


@pytest.mark.lab
def test_the_probe_is_not_caught_by_the_redirect(ns: Namespace) -> None:
    """An upstream on 443 that the ruleset does not exclude by address: the probe, bound to
    the reserved source ports, reaches it; one without them would be redirected (to the
    relay, which here is a trap listener)."""
    ruleset = (
        "table inet offnet_redirect {\n chain output {\n"
        "  type nat hook output priority -100; policy accept;\n"
        "  tcp sport 61000-64999 return\n"  # as the product ruleset (firewall/helper.py)
        "  tcp dport 443 redirect to :12999\n }\n}\n"
    )
    ns.run(["nft", "-f", "-"], input=ruleset.encode())
    proxies = [upstream("corp", "10.213.0.1", 443)]
    with accepting(ns, "10.213.0.1", 443) as proxy, accepting(ns, "0.0.0.0", 12999) as trap:
        reserved = in_namespace(ns, lambda: probe_upstreams(proxies, 2.0))
        plain = in_namespace(ns, lambda: probe_upstreams(proxies, 2.0, source_ports=None))
        deadline = time.monotonic() + 3
        while (not proxy or not trap) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert reserved[0].ok and plain[0].ok
    assert len(proxy) == 1 and 61000 <= proxy[0][1] <= 64999
    assert len(trap) == 1  # without the reserved ports the redirect took it


@pytest.mark.lab
def test_the_driver_goes_direct_and_back(ns: Namespace) -> None:
    """OffnetProber on a loop, without netlink: the proxy stops listening → direct after two
    rounds; it listens again and the caller reports a network change → back at once."""
    # While direct the next periodic probe is 30 s away: only the reported network change
    # can explain coming back quickly.
    policy = OffnetPolicy(fast=(0.0, 0.1), confirm=0.1, interval=0.2, interval_direct=30.0)
    changes: list[tuple[float, OffnetChange]] = []

    async def main() -> list[tuple[float, OffnetChange]]:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("10.213.0.1", 3128))
        listener.listen()
        prober = OffnetProber(
            policy,
            [upstream("corp", "10.213.0.1", 3128)],
            lambda change: changes.append((time.monotonic(), change)),
            probe_timeout=0.5,
            watch_network=False,
        )
        prober.start()
        try:
            await until(lambda: prober.rounds >= 1)
            assert prober.state is ON and prober.last_results[0].ok
            listener.close()
            stopped = time.monotonic()
            await until(lambda: prober.state is DIRECT)
            took_direct = time.monotonic() - stopped
            assert took_direct < 1.0
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("10.213.0.1", 3128))
            listener.listen()
            back = time.monotonic()
            prober.network_changed()
            await until(lambda: prober.state is ON)
            assert time.monotonic() - back < 1.0
            prober.set_policy(OffnetPolicy(go_direct=False, fast=(0.0,)))
            rounds = prober.rounds
            prober.set_upstreams([upstream("other", "10.213.0.1", 3129)])  # probed at once
            await until(lambda: prober.rounds > rounds and prober.offnet.unreachable)
            assert prober.state is ON  # going direct is off now
            assert prober.last_results[0].upstream == "other"
        finally:
            await prober.stop()
            await prober.stop()
            listener.close()
        return changes

    seen = in_namespace(ns, main)
    assert [(c.state, c.unreachable) for _t, c in seen] == [
        (DIRECT, True),
        (ON, False),
        (ON, True),
    ]
    assert "connection refused" in seen[0][1].reason


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.mark.lab
def test_a_network_change_cuts_the_running_round_short(ns: Namespace) -> None:
    """A round waiting for a timeout on the old network is abandoned when the network
    changes: the new network is probed at once, and stop() does not wait for the timeout."""
    ruleset = "table inet offnet_test {\n chain out {\n  type filter hook output priority 0;\n"
    ns.run(["nft", "-f", "-"], input=(ruleset + "  tcp dport 9 drop\n }\n}\n").encode())

    async def main() -> tuple[int, int, float]:
        prober = OffnetProber(
            OffnetPolicy(),
            [upstream("dropped", "10.213.0.1", 9)],
            lambda change: None,
            probe_timeout=5.0,
            watch_network=False,
        )
        prober.start()
        await asyncio.sleep(0.2)  # the first round is waiting for its SYN's answer
        assert prober.rounds == 0
        prober.network_changed()
        await until(lambda: prober.abandoned == 1, timeout=1.0)
        started = time.monotonic()
        await prober.stop()
        return prober.rounds, prober.abandoned, time.monotonic() - started

    rounds, abandoned, stopping = in_namespace(ns, main)
    assert (rounds, abandoned) == (0, 1)
    assert stopping < 0.5
