"""The one way to start background work: `spawn()`.

A task that nobody references can be garbage-collected while it runs (the loop keeps only a
weak reference), and a task whose failure nobody asks about fails in silence until the garbage
collector, at an unknown time, prints "Task exception was never retrieved". `spawn()` keeps a
strong reference until the task ends and logs a failure that nobody retrieved, once, with the
task's name. `asyncio.create_task` and `asyncio.ensure_future` are banned elsewhere (ruff
TID251; `tests/test_tasks.py` greps for `loop.create_task`, which ruff cannot see).

Stdlib only, so that every layer may import it (the relay included); it must not import
anything of tray_proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["running", "spawn"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Per loop: the relay's loop runs in its own thread beside the app's. Each set is touched
# only from its loop's thread; an empty set is removed, so a closed loop leaves nothing.
_running: dict[asyncio.AbstractEventLoop, set[asyncio.Task[Any]]] = {}


def spawn(
    coro: Coroutine[Any, Any, T],
    *,
    name: str,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[T]:
    """Run `coro` as a task named `name` on `loop` (default: the running loop).

    The task is referenced until it ends. A failure (not a cancellation) that neither an
    awaiter nor a done callback has retrieved by the next pass of the loop is logged with the
    task's name and the exception, as the rest of the code base logs failures.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    task = loop.create_task(coro, name=name)
    _running.setdefault(loop, set()).add(task)
    task.add_done_callback(_done)
    return task


def running(loop: asyncio.AbstractEventLoop | None = None) -> frozenset[asyncio.Task[Any]]:
    """The spawned tasks on `loop` (default: the running loop) that have not ended."""
    if loop is None:
        loop = asyncio.get_running_loop()
    return frozenset(_running.get(loop, ()))


def _done(task: asyncio.Task[Any]) -> None:
    loop = task.get_loop()
    tasks = _running.get(loop)
    if tasks is not None:
        tasks.discard(task)
        if not tasks:
            del _running[loop]
    if task.cancelled() or not _unretrieved(task):  # ended well, or already asked about
        return
    # Done callbacks run in the order they were added and ours is the first, so an awaiter's
    # wake-up and the caller's own callbacks are already queued: look once they have run.
    loop.call_soon(_report, task)


def _report(task: asyncio.Task[Any]) -> None:
    if not _unretrieved(task):
        return
    exc = task.exception()  # marks it retrieved: no second report from the garbage collector
    if exc is not None:
        log.error("%s failed", task.get_name(), exc_info=exc)


def _unretrieved(task: asyncio.Task[Any]) -> bool:
    """Whether nobody has asked for the task's exception yet. asyncio's own flag for its
    "Task exception was never retrieved" report (Future._log_traceback, in the C and the Python
    implementation alike; uvloop and qasync use asyncio's Task); if a future Python drops it,
    every failure is logged."""
    return bool(getattr(task, "_log_traceback", True))
