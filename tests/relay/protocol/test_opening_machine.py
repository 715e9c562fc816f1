"""The opening machine (relay/protocol/opening_machine.py) as transcripts: inputs in, commands out.

Must not import asyncio, socket or PySide6.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.relay.protocol.errors import UsageError
from tray_proxy.relay.protocol.opening_machine import (
    Ask,
    Dial,
    Established,
    EvaluatePac,
    Failed,
    Forward,
    OpeningMachine,
    Phase,
    Report,
    StepAuth,
    moves_on,
)
from tray_proxy.relay.records import CloseReason
from tray_proxy.routing.router import Decision, DecisionKind

PROXY_AB = Decision(DecisionKind.PROXY, ("a", "b"))
UNREACHABLE = CloseReason.UPSTREAM_UNREACHABLE


def test_one_upstream_that_opens_at_once() -> None:
    m = OpeningMachine()
    assert m.start(pac_pending=False) == []
    assert m.decided(Decision(DecisionKind.PROXY, ("a",)), 10.0) == [Dial("a")]
    assert m.phase is Phase.DIAL
    assert m.dialed() == [Ask("a")]
    assert m.opened(10.25) == [Report("a", True, latency=0.25), Established("a", 0.25)]
    assert m.phase is Phase.OPEN
    assert m.tried == ["a"]


def test_a_pending_pac_answer_is_evaluated_off_the_loop_first() -> None:
    m = OpeningMachine()
    assert m.start(pac_pending=True) == [EvaluatePac()]
    assert m.phase is Phase.ROUTE
    assert m.decided(Decision(DecisionKind.DIRECT, decided_by="pac"), 0.0) == [Dial(None)]


def test_direct_opens_once_dialed_without_a_handshake_and_no_health() -> None:
    m = OpeningMachine()
    m.start(False)
    assert m.decided(Decision(DecisionKind.DIRECT), 1.0) == [Dial(None)]
    assert m.dialed() == [Established(None, 0.0)]
    assert m.current is None


def test_block_fails_at_once_with_the_rule_that_blocked() -> None:
    m = OpeningMachine()
    m.start(False)
    rule = Decision(DecisionKind.BLOCK, decided_by="rule[2]", rule_text="ads.example -> block")
    assert m.decided(rule, 0.0) == [
        Failed(CloseReason.BLOCKED, "blocked by rule[2] (ads.example -> block)")
    ]
    assert m.phase is Phase.FAILED
    default = OpeningMachine()
    default.start(False)
    assert default.decided(Decision(DecisionKind.BLOCK), 0.0) == [
        Failed(CloseReason.BLOCKED, "blocked by default")
    ]


def test_no_upstream_at_all() -> None:
    m = OpeningMachine()
    m.start(False)
    assert m.decided(Decision(DecisionKind.PROXY, ()), 0.0) == [
        Failed(CloseReason.NO_UPSTREAM, "no upstream proxy is set up")
    ]


def test_challenge_steps_off_the_loop_then_opens() -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    m.dialed()
    assert m.challenged() == [StepAuth("a")]
    assert m.phase is Phase.CHALLENGED
    assert m.stepped() == []
    assert m.phase is Phase.ASK
    assert m.challenged() == [StepAuth("a")]
    assert m.opened(0.5) == [Report("a", True, latency=0.5), Established("a", 0.5)]


def test_opened_straight_from_a_challenge_step() -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    m.dialed()
    m.challenged()
    assert m.opened(0.1)[-1] == Established("a", 0.1)


def test_unreachable_first_upstream_moves_to_the_next_once() -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(Decision(DecisionKind.PROXY, ("a", "b", "c")), 0.0)
    assert m.failed(UNREACHABLE, "cannot connect to a", 2.0) == [
        Report("a", False, words="cannot connect to a"),
        Dial("b"),
    ]
    assert m.dialed_at == 2.0
    m.dialed()
    assert m.failed(CloseReason.UPSTREAM_TIMEOUT, "b took too long", 3.0) == [
        Report("b", False, words="b took too long"),
        Failed(CloseReason.UPSTREAM_TIMEOUT, "b took too long (tried first: cannot connect to a)"),
    ]
    assert m.tried == ["a", "b"]


def test_the_second_upstream_opens_and_its_latency_counts_from_its_own_dial() -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    m.failed(UNREACHABLE, "x", 1.0)
    m.dialed()
    assert m.opened(1.5) == [Report("b", True, latency=0.5), Established("b", 0.5)]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_5xx_to_the_connect_moves_on(status: int) -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    m.dialed()
    out = m.failed(CloseReason.UPSTREAM_REFUSED, f"proxy a: {status}", 0.1, status=status)
    assert out == [Report("a", False, words=f"proxy a: {status}"), Dial("b")]


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (CloseReason.UPSTREAM_REFUSED, 403),
        (CloseReason.UPSTREAM_REFUSED, None),
        (CloseReason.UPSTREAM_AUTH_FAILED, 407),
        (CloseReason.CONFIG_ERROR, None),
    ],
)
def test_a_decision_of_the_proxy_is_final_and_not_its_trouble(
    reason: CloseReason, status: int | None
) -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    m.dialed()
    assert m.failed(reason, "no", 0.1, status=status, rejected=status == 407) == [
        Failed(reason, "no", status, status == 407)
    ]
    assert m.phase is Phase.FAILED


def test_a_refused_connect_to_port_80_is_forwarded_instead() -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    m.dialed()
    out = m.failed(CloseReason.UPSTREAM_REFUSED, "403", 0.1, status=403, forward=True)
    assert out == [Forward("a")]
    assert m.phase is Phase.FORWARD


def test_an_upstream_known_to_refuse_port_80_forwards_without_asking() -> None:
    m = OpeningMachine(forwarding=frozenset({"a"}))
    m.start(False)
    assert m.decided(PROXY_AB, 0.0) == [Forward("a")]


def test_then_direct_after_the_proxies_failed() -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(Decision(DecisionKind.PROXY, ("a",), then_direct=True), 0.0)
    assert m.failed(UNREACHABLE, "down", 0.0) == [Report("a", False, words="down"), Dial(None)]
    assert m.dialed() == [Established(None, 0.0)]


def test_direct_that_fails_is_not_reported_to_health() -> None:
    m = OpeningMachine()
    m.start(False)
    m.decided(Decision(DecisionKind.DIRECT), 0.0)
    assert m.failed(UNREACHABLE, "cannot connect to 192.0.2.1:443", 0.0) == [
        Failed(UNREACHABLE, "cannot connect to 192.0.2.1:443")
    ]


def test_no_retry_left() -> None:
    m = OpeningMachine(retries=0)
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    assert m.failed(UNREACHABLE, "down", 0.0) == [
        Report("a", False, words="down"),
        Failed(UNREACHABLE, "down"),
    ]


def test_inputs_out_of_turn_are_our_bug() -> None:
    m = OpeningMachine()
    with pytest.raises(UsageError):
        m.dialed()
    with pytest.raises(UsageError):
        m.opened(0.0)
    with pytest.raises(UsageError):
        m.failed(UNREACHABLE, "x", 0.0)
    with pytest.raises(UsageError):
        m.challenged()
    with pytest.raises(UsageError):
        m.stepped()
    m.start(False)
    m.decided(PROXY_AB, 0.0)
    with pytest.raises(UsageError):
        m.start(False)
    with pytest.raises(UsageError):
        m.decided(PROXY_AB, 0.0)


def test_moves_on() -> None:
    assert moves_on(CloseReason.UPSTREAM_RESET, None)
    assert moves_on(CloseReason.UPSTREAM_PROTOCOL_ERROR, None)
    assert not moves_on(CloseReason.UPSTREAM_REFUSED, 499)
    assert not moves_on(CloseReason.UPSTREAM_REFUSED, 600)
    assert not moves_on(CloseReason.CLIENT_RESET, None)


_REASONS = st.sampled_from(list(CloseReason))
_STATUS = st.one_of(st.none(), st.integers(100, 599))


@settings(max_examples=300, deadline=None)
@given(
    upstreams=st.lists(st.sampled_from("abcd"), min_size=0, max_size=4, unique=True),
    then_direct=st.booleans(),
    retries=st.integers(0, 3),
    outcomes=st.lists(st.tuples(_REASONS, _STATUS, st.booleans()), max_size=6),
)
def test_every_sequence_of_failures_ends_in_one_failure_or_goes_on_bounded(
    upstreams: list[str],
    then_direct: bool,
    retries: int,
    outcomes: list[tuple[CloseReason, int | None, bool]],
) -> None:
    """Whatever fails how: at most 1 + retries ways are tried, each upstream at most once, a
    Failed comes once and last, and a health report names only the way that just failed."""
    m = OpeningMachine(retries=retries)
    m.start(False)
    out = m.decided(Decision(DecisionKind.PROXY, tuple(upstreams), then_direct=then_direct), 0.0)
    commands = list(out)
    for reason, status, forward in outcomes:
        if m.phase not in (Phase.DIAL, Phase.ASK):
            break
        current = m.current
        out = m.failed(reason, f"w{len(commands)}", 1.0, status=status, forward=forward)
        for command in out:
            if isinstance(command, Report):
                assert command.upstream == current and not command.ok
        commands += out
    failed = [c for c in commands if isinstance(c, Failed)]
    assert len(failed) <= 1
    if failed:
        assert commands[-1] is failed[0]
        assert m.phase is Phase.FAILED
    assert len(m.tried) <= 1 + retries
    named = [t for t in m.tried if t is not None]
    assert len(named) == len(set(named))
