"""ConfigWatcher (tray_proxy/config_watch.py) with real files, real inotify and the real
settings writer (config.save_config): the ways editors save, touch, symlinks, the metadata
poll where inotify is not used, and shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from tray_proxy.config import load_config, save_config
from tray_proxy.config_watch import ConfigWatcher, parse_events

DEBOUNCE = 0.1
POLL = 0.2
CONTENT_A = b"[relay]\nport = 15001\n"
CONTENT_B = b"[relay]\nport = 15002\n"
CONTENT_C = b"[relay]\nport = 15003\n"


def run(
    path: Path,
    body: Callable[[ConfigWatcher, list[float]], Awaitable[None]],
    *,
    inotify: bool = True,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> ConfigWatcher:
    """Run `body(watcher, calls)` with a started watcher on a fresh loop; close it after."""
    calls: list[float] = []
    watcher = ConfigWatcher(
        path,
        lambda: calls.append(time.monotonic()),
        debounce=DEBOUNCE,
        poll_interval=POLL,
        inotify=inotify,
    )

    async def main() -> None:
        watcher.start()
        try:
            await body(watcher, calls)
        finally:
            watcher.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    return watcher


async def settle(calls: list[float], count: int, timeout: float = 3.0) -> None:
    """Wait (bounded) for `count` calls, then long enough for a stray one to show."""
    deadline = time.monotonic() + timeout
    while len(calls) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert len(calls) == count, f"{len(calls)} calls, expected {count}"
    await asyncio.sleep(max(DEBOUNCE, POLL) * 3)
    assert len(calls) == count, f"{len(calls)} calls, expected {count} (a stray one)"


def write_in_place(path: Path, data: bytes) -> None:
    """Truncate and write the same inode, as `vim` with backupcopy=yes or `echo >` does."""
    with open(path, "r+b") as handle:
        handle.truncate(0)
        handle.write(data)


def write_vim_rename(path: Path, data: bytes) -> None:
    """vim's backupcopy=no: rename the file to `name~`, write a new one, remove the backup."""
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    with open(path, "wb") as handle:
        handle.write(data)
    os.unlink(backup)


def write_atomic(path: Path, data: bytes) -> None:
    """A temp file in the same directory renamed over (what most editors and tools do)."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def settings(tmp_path: Path) -> Path:
    path = tmp_path / "tray-proxy" / "config.toml"
    path.parent.mkdir()
    path.write_bytes(CONTENT_A)
    return path


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
def test_the_apps_own_atomic_writer_is_noticed(settings: Path, inotify: bool) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        assert watcher.mode == ("inotify" if inotify else "poll")
        config = load_config(settings)
        changed = dataclasses.replace(
            config, relay=dataclasses.replace(config.relay, port=config.relay.port + 1)
        )
        started = time.monotonic()
        save_config(changed, settings)  # temp file + fsync + rename, as the app saves
        await settle(calls, 1)
        latency = calls[0] - started
        assert latency < (DEBOUNCE + 0.3 if inotify else POLL + DEBOUNCE + 0.3)
        assert load_config(settings).relay.port == config.relay.port + 1

    run(settings, body, inotify=inotify)


@pytest.mark.parametrize(
    "write", [write_in_place, write_vim_rename, write_atomic], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
def test_each_way_of_saving_is_one_call(
    settings: Path, write: Callable[..., None], inotify: bool
) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        write(settings, CONTENT_B)
        await settle(calls, 1)
        write(settings, CONTENT_C)
        await settle(calls, 2)
        write(settings, CONTENT_C)  # saved again without a change
        await settle(calls, 2)

    run(settings, body, inotify=inotify)


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
def test_touch_calls_nothing(settings: Path, inotify: bool) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        checks = watcher.checks
        subprocess.run(["touch", str(settings)], check=True, timeout=10)
        await settle(calls, 0)
        assert watcher.checks > checks  # the file was looked at, and found unchanged
        future = time.time() + 100
        os.utime(settings, (future, future))
        await settle(calls, 0)

    run(settings, body, inotify=inotify)


def test_a_burst_of_saves_is_one_call(settings: Path) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        for i in range(20):
            write_atomic(settings, CONTENT_A + f"# {i}\n".encode())
        await settle(calls, 1)
        assert watcher.checks == 1

    run(settings, body)


def test_other_files_in_the_directory_call_nothing(settings: Path) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        for i in range(5):
            write_atomic(settings.with_name(f"other{i}.toml"), CONTENT_B)
        await settle(calls, 0)
        assert watcher.checks == 0  # filtered by name: never even read

    run(settings, body)


def test_symlinked_settings_follow_the_link(tmp_path: Path, settings: Path) -> None:
    """A dotfile manager: the settings path is a symlink into another directory. Editing
    the target, and pointing the link at another file, are changes; after the link moved,
    the old target no longer matters."""
    dotfiles, other = tmp_path / "dotfiles", tmp_path / "elsewhere"
    dotfiles.mkdir()
    other.mkdir()
    first, second = dotfiles / "tray-proxy.toml", other / "tray-proxy.toml"
    first.write_bytes(CONTENT_A)
    second.write_bytes(CONTENT_B)
    settings.unlink()
    settings.symlink_to(first)

    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        write_in_place(first, CONTENT_C)
        await settle(calls, 1)
        write_atomic(first, CONTENT_A)
        await settle(calls, 2)
        # `ln -sfn`: the link now points elsewhere (different content: a change).
        subprocess.run(["ln", "-sfn", str(second), str(settings)], check=True, timeout=10)
        await settle(calls, 3)
        write_atomic(second, CONTENT_C)  # a directory watched only since the link moved
        await settle(calls, 4)
        write_atomic(first, CONTENT_B)  # the old target: no longer the settings
        await settle(calls, 4)

    run(settings, body)


def test_the_apps_own_save_is_acknowledged(settings: Path) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        write_atomic(settings, CONTENT_B)
        watcher.acknowledge()  # the app saved it (from the UI) and knows the content
        await settle(calls, 0)
        write_atomic(settings, CONTENT_C)  # someone else's edit still counts
        await settle(calls, 1)

    run(settings, body)


def test_a_change_between_load_and_start_is_reported(settings: Path) -> None:
    calls: list[int] = []

    async def main() -> None:
        loaded = settings.read_bytes()
        write_atomic(settings, CONTENT_B)  # before the watcher started
        watcher = ConfigWatcher(settings, lambda: calls.append(1), debounce=DEBOUNCE)
        watcher.start(content=loaded)
        try:
            deadline = time.monotonic() + 2.0
            while not calls and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            watcher.close()

    asyncio.run(main())
    assert calls == [1]


def test_a_deleted_file_calls_nothing_until_it_returns_changed(settings: Path) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        settings.unlink()
        await settle(calls, 0)
        settings.write_bytes(CONTENT_A)  # back as it was: no change
        await settle(calls, 0)
        settings.unlink()
        await asyncio.sleep(DEBOUNCE * 3)
        settings.write_bytes(CONTENT_B)
        await settle(calls, 1)

    run(settings, body)


def test_the_directory_removed_and_made_again_falls_back_to_polling(settings: Path) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        shutil.rmtree(settings.parent)
        deadline = time.monotonic() + 3.0
        while watcher.mode != "poll" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert watcher.mode == "poll"
        settings.parent.mkdir()
        settings.write_bytes(CONTENT_B)
        await settle(calls, 1)

    run(settings, body)


def test_runs_on_uvloop(settings: Path) -> None:
    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        write_vim_rename(settings, CONTENT_B)
        await settle(calls, 1)

    run(settings, body, loop_factory=uvloop.new_event_loop)


def test_close_stops_calls_and_is_idempotent(settings: Path) -> None:
    calls: list[int] = []

    async def main() -> None:
        watcher = ConfigWatcher(settings, lambda: calls.append(1), debounce=DEBOUNCE)
        watcher.start()
        write_atomic(settings, CONTENT_B)
        await asyncio.sleep(0.02)  # the event is read, its debounce pending
        watcher.close()
        watcher.close()
        assert watcher.mode == "stopped"
        write_atomic(settings, CONTENT_C)
        await asyncio.sleep(DEBOUNCE * 4)

    asyncio.run(main())
    assert calls == []


def test_a_watch_on_a_missing_directory_polls(tmp_path: Path) -> None:
    """First run: no settings directory yet. The watcher polls, and sees the first save."""
    path = tmp_path / "not-yet" / "config.toml"

    async def body(watcher: ConfigWatcher, calls: list[float]) -> None:
        assert watcher.mode == "poll"
        path.parent.mkdir()
        write_atomic(path, CONTENT_A)
        await settle(calls, 1)

    run(path, body)


@given(st.binary(max_size=300))
def test_parse_events_never_raises(data: bytes) -> None:
    for wd, mask, name in parse_events(data):
        assert isinstance(wd, int) and isinstance(mask, int) and isinstance(name, str)
