"""Engine events from the relay's thread to the controller's loop, in bursts.

The relay runs on its own loop in its own thread; its observer must be quick and never
block on the UI. Events are queued and handed over with one `call_soon_threadsafe` per
burst, not one per event, because each callback costs more on qasync than on plain asyncio
(shared/BENCHMARKS.md). Each event is tagged with the generation of the relay that sent it,
so the late events of a relay that was stopped can be told apart.

Must not import PySide6 or qasync.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable

from tray_proxy.relay.events import Event

__all__ = ["EngineInbox"]


class EngineInbox:
    """`post(generation, event)` on any thread; `drain(batch)` runs on `loop`, per burst."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        drain: Callable[[list[tuple[int, Event]]], None],
    ) -> None:
        self._loop = loop
        self._drain = drain
        self._queue: collections.deque[tuple[int, Event]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        # Made on the loop's thread. A relay on that same loop (headless run) posts from it:
        # then call_soon does, without call_soon_threadsafe's write to the loop's self-pipe.
        self._loop_thread = threading.get_ident()

    def post(self, generation: int, event: Event) -> None:
        """Called on the relay thread: must be quick and never block on the UI."""
        self._queue.append((generation, event))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the app loop is closed: nobody listens
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._run)
            else:
                self._loop.call_soon_threadsafe(self._run)

    def flush(self) -> None:
        """Hand over what is queued now (on the loop; before the owner stops listening)."""
        self._run()

    def _run(self) -> None:
        with self._lock:
            self._scheduled = False
        batch: list[tuple[int, Event]] = []
        queue = self._queue
        while queue:
            batch.append(queue.popleft())
        if batch:
            self._drain(batch)
