"""spawn(): the reference is kept, an unretrieved failure is logged once, a cancellation and a
retrieved failure are not, on asyncio's loop and on uvloop; and nothing outside tasks.py
starts tasks another way."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tray_proxy import tasks
from tray_proxy.tasks import running, spawn

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
LOOPS: list[Any] = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(uvloop.new_event_loop, id="uvloop"),
]


def run(factory: LoopFactory, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


async def passes(count: int = 5) -> None:
    """A few passes of the loop: the done callbacks and the deferred report have run."""
    for _ in range(count):
        await asyncio.sleep(0)


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


class Boom(RuntimeError):
    pass


async def fail(after: asyncio.Event | None = None) -> None:
    if after is not None:
        await after.wait()
    raise Boom("it broke")


@pytest.mark.parametrize("factory", LOOPS)
def test_reference_kept_while_running(factory: LoopFactory) -> None:
    async def main() -> None:
        go = asyncio.Event()
        finished: list[str] = []

        async def work() -> None:
            await go.wait()
            finished.append("done")

        ref = weakref.ref(spawn(work(), name="test work"))
        gc.collect()
        task = ref()
        assert task is not None, "the task was collected while it ran"
        assert task in running()
        del task
        go.set()
        await passes()
        assert finished == ["done"]
        assert running() == frozenset()
        assert asyncio.get_running_loop() not in tasks._running

    run(factory, main)


@pytest.mark.parametrize("factory", LOOPS)
def test_unretrieved_failure_logged_once(
    factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        spawn(fail(), name="test failing work")
        await passes()
        gc.collect()  # asyncio's own "never retrieved" report would come now
        await passes()

    with caplog.at_level(logging.DEBUG):
        run(factory, main)
    records = failures(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].name == "tray_proxy.tasks"
    assert records[0].getMessage() == "test failing work failed"
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], Boom)


@pytest.mark.parametrize("factory", LOOPS)
def test_awaited_failure_not_logged(factory: LoopFactory, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        go = asyncio.Event()
        task = spawn(fail(go), name="test awaited work")
        await asyncio.sleep(0)
        go.set()
        with pytest.raises(Boom):
            await task
        await passes()

    with caplog.at_level(logging.DEBUG):
        run(factory, main)
    assert failures(caplog) == []


@pytest.mark.parametrize("factory", LOOPS)
def test_failure_retrieved_by_done_callback_not_logged(
    factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[BaseException | None] = []

    async def main() -> None:
        task = spawn(fail(), name="test watched work")
        task.add_done_callback(lambda t: seen.append(t.exception()))
        await passes()

    with caplog.at_level(logging.DEBUG):
        run(factory, main)
    assert len(seen) == 1 and isinstance(seen[0], Boom)
    assert failures(caplog) == []


@pytest.mark.parametrize("factory", LOOPS)
def test_cancel_is_silent(factory: LoopFactory, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        task = spawn(asyncio.sleep(3600), name="test sleeper")
        await asyncio.sleep(0)
        task.cancel()
        await passes()
        assert task.cancelled()
        assert running() == frozenset()

    with caplog.at_level(logging.DEBUG):
        run(factory, main)
    assert failures(caplog) == []


@pytest.mark.parametrize("factory", LOOPS)
def test_spawn_on_a_loop_not_yet_running(
    factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """app.py starts its main coroutine on the qasync loop before the loop runs."""

    async def answer() -> int:
        return 42

    loop = factory()
    try:
        task = spawn(answer(), name="test main", loop=loop)
        assert running(loop) == {task}
        assert loop.run_until_complete(task) == 42
        assert task.get_name() == "test main"
        assert running(loop) == frozenset()
    finally:
        loop.close()
    assert failures(caplog) == []


# -- one way to start background work -------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tray_proxy"
# `loop.create_task` cannot be banned by ruff (it does not know the type of `loop`), and ruff's
# TID251 is switched off for tray_proxy/ui and app.py (they import PySide6): this test covers
# every file.
STARTERS = re.compile(r"\.create_task\(|\bensure_future\(|\bcreate_task\(")
ALLOWED: dict[str, str] = {
    "tray_proxy/tasks.py": "the one place that creates tasks",
}


def test_tasks_start_only_through_spawn() -> None:
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if STARTERS.search(code):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == [], "start tasks with tray_proxy.tasks.spawn():\n" + "\n".join(found)


def test_allowed_files_still_need_it() -> None:
    """An entry that is no longer needed is removed, so the list only shrinks."""
    stale = [
        rel
        for rel in ALLOWED
        if rel != "tray_proxy/tasks.py"
        and not STARTERS.search((ROOT / rel).read_text(encoding="utf-8"))
    ]
    assert stale == []
