"""Running the engine on its own event loop in a dedicated thread.

Must not import PySide6. The GUI's loop is qasync, which costs about twice the CPU per
event and slows down with thousands of open sockets (shared/BENCHMARKS.md); the relay
therefore gets its own asyncio loop (uvloop when installed) in a thread. Events reach other
threads through the observer the caller subscribes; it is called on the engine thread and
must hand off (e.g. `call_soon_threadsafe` or a queued Qt signal).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, TypeVarTuple, Unpack

from tray_proxy.relay.engine import RelayEngine

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def new_fast_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class EngineThread:
    """Owns a thread with its own loop; starts and stops a RelayEngine on it."""

    def __init__(
        self,
        engine: RelayEngine,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = new_fast_loop,
    ) -> None:
        self.engine = engine
        self._loop_factory = loop_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "EngineThread not started"
        return self._loop

    def _main(self) -> None:
        loop = self._loop_factory()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the engine loop and wait for its result (from another thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the engine loop; await the result with asyncio.wrap_future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[[Unpack[Ts]], object], *args: Unpack[Ts]) -> None:
        """Call `fn(*args)` on the engine loop, from any thread; no answer comes back.

        Raises RuntimeError when the loop has stopped (the relay is off)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def run(self, fn: Callable[[Unpack[Ts]], T], *args: Unpack[Ts]) -> concurrent.futures.Future[T]:
        """Call `fn(*args)` on the engine loop, from any thread; the future has its result
        or its exception (`future.result(timeout)`, or `asyncio.wrap_future` on another
        loop). A plain function, not a coroutine: one callback, no Task.

        Raises RuntimeError when the loop has stopped (the relay is off)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up meanwhile
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, whatever it is
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return future

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread and the engine; raises what engine.start() raises."""
        self._thread = threading.Thread(target=self._main, name="tray-proxy relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):  # pragma: no cover - thread start is immediate
            raise RuntimeError("relay thread did not start")
        try:
            self.call(self.engine.start(), timeout)
        except BaseException:
            self._stop_loop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Drain and stop the engine, then end the thread."""
        if self._thread is None:
            return
        try:
            self.call(self.engine.stop(), timeout)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
