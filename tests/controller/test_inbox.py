"""EngineInbox: engine events to the controller's loop, one hand-over per burst, in order.

A burst is handed over HANDOVER_DELAY after its first event, on a timer, not at once: at once
is a new connection's opening moments, where the hand-over's work cost the relay's added
latency (docs/benchmarks.md). The timer is the posting thread's loop's: the controller's own
(headless `tray-proxy run`) or the relay thread's (the app). Real loops (asyncio's and
uvloop's), no fakes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from tray_proxy.controller.inbox import HANDOVER_DELAY, EngineInbox
from tray_proxy.relay.events import ConnectionOpened, EngineStopped, Event

DEADLINE = 5.0  # seconds any hand-over may take at most, on a loaded CI machine

Batch = list[tuple[int, Event]]


def _event(n: int) -> ConnectionOpened:
    return ConnectionOpened(n, ("127.0.0.1", 40000 + n), ("192.0.2.1", 443))


def _run(loop_kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.001)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_same_thread_without_delay_is_handed_over_at_the_next_turn(loop_kind: str) -> None:
    batches: list[Batch] = []

    async def main() -> None:
        inbox = EngineInbox(asyncio.get_running_loop(), batches.append)
        for n in range(1, 4):
            inbox.post(7, _event(n))
        assert batches == []  # never inside post
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert batches == [[(7, _event(1)), (7, _event(2)), (7, _event(3))]]

    _run(loop_kind, main)


def test_same_thread_with_the_headless_delay_waits_out_the_opening_moments(
    loop_kind: str,
) -> None:
    """A burst posted on the loop's thread is handed over in one batch, not at the next few
    turns (a connection's opening moments) but after the delay."""
    batches: list[Batch] = []
    handed: list[float] = []

    def drain(batch: Batch) -> None:
        handed.append(time.monotonic())
        batches.append(batch)

    async def main() -> None:
        inbox = EngineInbox(asyncio.get_running_loop(), drain, delay=HANDOVER_DELAY)
        posted = time.monotonic()
        inbox.post(1, _event(1))
        for _ in range(5):  # turns of the loop, as a relay's callbacks would take them
            await asyncio.sleep(0)
            inbox.post(1, _event(2))
        if time.monotonic() - posted < HANDOVER_DELAY / 2:  # else the machine stalled us
            assert batches == [], "handed over at the loop's next turn"
        await _until(lambda: bool(batches), "the burst handed over")
        assert batches[0][:2] == [(1, _event(1)), (1, _event(2))]
        assert sum(len(b) for b in batches) == 6
        # uvloop's timers count whole milliseconds: at least one tick after the post.
        assert handed[0] - posted >= 0.0005
        # A burst after the hand-over gets a hand-over of its own.
        inbox.post(2, _event(3))
        await _until(lambda: batches[-1] == [(2, _event(3))], "the next burst")

    _run(loop_kind, main)


def test_a_relay_threads_burst_crosses_after_the_delay_on_its_own_loop(loop_kind: str) -> None:
    """The app: the relay thread's loop keeps the timer, so neither the UI's loop nor its
    thread is woken in the connection's opening moments; EngineStopped, the relay thread's
    last word, crosses at once with what waits before it."""
    batches: list[Batch] = []
    crossed: list[float] = []

    def drain(batch: Batch) -> None:
        crossed.append(time.monotonic())
        batches.append(batch)

    async def main() -> None:
        inbox = EngineInbox(asyncio.get_running_loop(), drain, delay=HANDOVER_DELAY)
        posted: list[float] = []
        quiet: list[bool] = []

        async def relay() -> None:  # the relay thread's loop
            posted.append(time.monotonic())
            inbox.post(1, _event(1))
            inbox.post(1, _event(2))
            for _ in range(5):
                await asyncio.sleep(0)
            quiet.append(time.monotonic() - posted[0] < HANDOVER_DELAY / 2)
            await asyncio.sleep(0.2)  # the timer fires: the burst crosses
            inbox.post(1, _event(3))
            inbox.post(1, EngineStopped())  # at once, and 3 with it

        def relay_thread() -> None:
            factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(relay())

        thread = threading.Thread(target=relay_thread)
        thread.start()
        try:
            await _until(lambda: bool(quiet), "the relay's first turns")
            if quiet[0]:  # else the machine stalled the relay thread
                assert batches == [], "crossed at once, in the opening moments"
            await _until(lambda: len(batches) >= 1, "the burst crossing")
            assert batches[0] == [(1, _event(1)), (1, _event(2))]
            assert crossed[0] - posted[0] >= 0.0005
            await _until(lambda: len(batches) >= 2, "the relay's last word")
        finally:
            thread.join(DEADLINE)
        assert batches[1] == [(1, _event(3)), (1, EngineStopped())]
        assert not thread.is_alive()

    _run(loop_kind, main)


def test_another_threads_events_come_at_the_next_turn_in_order(loop_kind: str) -> None:
    """A thread with no loop of its own: no delay, even with one set; one batch per burst,
    in order."""
    batches: list[Batch] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        inbox = EngineInbox(loop, batches.append, delay=10.0)
        ready = threading.Event()

        def relay_thread() -> None:
            ready.wait(DEADLINE)
            for n in range(1, 101):
                inbox.post(3, _event(n))

        thread = threading.Thread(target=relay_thread)
        thread.start()
        try:
            ready.set()
            await _until(lambda: sum(len(b) for b in batches) == 100, "100 events")
        finally:
            thread.join(DEADLINE)
        ids = []
        for batch in batches:
            for _, event in batch:
                assert isinstance(event, ConnectionOpened)
                ids.append(event.conn_id)
        assert ids == list(range(1, 101))
        assert len(batches) < 100  # handed over in bursts, not one by one

    _run(loop_kind, main)


def test_flush_hands_over_at_once_and_the_timer_then_finds_nothing(loop_kind: str) -> None:
    batches: list[Batch] = []

    async def main() -> None:
        inbox = EngineInbox(asyncio.get_running_loop(), batches.append, delay=0.01)
        inbox.post(1, _event(1))
        inbox.flush()
        assert batches == [[(1, _event(1))]]
        await asyncio.sleep(0.05)  # the timer has fired: nothing more to hand over
        assert batches == [[(1, _event(1))]]
        inbox.post(1, _event(2))  # and the next post is handed over again
        await _until(lambda: len(batches) == 2, "the next post")

    _run(loop_kind, main)
