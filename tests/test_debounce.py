"""Debounce (in tray_proxy/netwatch.py, shared with config_watch.py) on a real asyncio loop:
one call per burst after the quiet time, a burst that never goes quiet still fires every
max_delay, cancel drops a pending burst. Times are measured on the loop's own clock."""

from __future__ import annotations

import asyncio

from tray_proxy.netwatch import Debounce

QUIET = 0.1


async def _notes(debounce: Debounce, count: int, gap: float) -> None:
    for _ in range(count):
        debounce.note()
        await asyncio.sleep(gap)


def test_a_burst_fires_once_after_the_quiet_time() -> None:
    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        debounce = Debounce(loop, lambda: fired.append(loop.time()), quiet=QUIET, max_delay=5)
        await _notes(debounce, 5, QUIET / 5)
        last_note = loop.time() - QUIET / 5
        await asyncio.sleep(QUIET * 4)
        return fired, last_note

    fired, last_note = asyncio.run(main())
    assert len(fired) == 1
    assert fired[0] >= last_note + QUIET - 0.002


def test_a_burst_that_never_goes_quiet_fires_every_max_delay() -> None:
    quiet, max_delay = 0.2, 0.5  # notes every 20 ms: a late wake-up does not end the burst

    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        debounce = Debounce(
            loop, lambda: fired.append(loop.time()), quiet=quiet, max_delay=max_delay
        )
        start = loop.time()
        for _ in range(500):  # bounded; ends after a bit more than two max_delays
            if loop.time() - start >= max_delay * 2.2:
                break
            debounce.note()
            await asyncio.sleep(0.02)
        debounce.cancel()
        return fired, start

    fired, start = asyncio.run(main())
    assert len(fired) == 2, fired
    assert max_delay - 0.002 <= fired[0] - start < max_delay + quiet
    assert fired[1] - fired[0] >= max_delay - 0.002


def test_cancel_drops_a_pending_burst_and_the_next_note_starts_a_new_one() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        debounce = Debounce(loop, lambda: fired.append(loop.time()), quiet=QUIET, max_delay=5)
        debounce.note()
        debounce.cancel()
        await asyncio.sleep(QUIET * 3)
        assert fired == []
        debounce.note()
        await asyncio.sleep(QUIET * 3)
        return fired

    assert len(asyncio.run(main())) == 1


def test_max_delay_below_the_quiet_time_means_the_quiet_time() -> None:
    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        debounce = Debounce(loop, lambda: fired.append(loop.time()), quiet=QUIET, max_delay=0)
        start = loop.time()
        debounce.note()
        await asyncio.sleep(QUIET * 3)
        return fired, start

    fired, start = asyncio.run(main())
    assert len(fired) == 1
    assert fired[0] - start >= QUIET - 0.002
