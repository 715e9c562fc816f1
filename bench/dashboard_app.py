"""The dashboard under load, app side: run as a script in the lab's client namespace by
bench/dashboard.py.

It builds what the GUI app builds (app.GuiApp.main): a QApplication on a qasync loop, the
ProxyController with the real relay (its own EngineThread, uvloop), the [log] history
writer and process attribution, AppServices, the UiBridge and the MainWindow, and serves
the app's control socket. Two things differ: no redirect service (the lab's nft table sends
the traffic to the relay, as for `tray-proxy run --no-redirect`) and no tray (the window is
shown, on the Connections tab).

Inside it, a probe: a 16 ms precise QTimer notes how late each tick fires (the UI loop's
lateness as the loop itself sees it). The driver measures from outside too, through the
control socket.

Talks to the driver with one JSON object per line on stdout, and takes one command per line
on stdin: `show` / `hide` (the window), `view active|closed` (the Connections tab's table),
`reset` (the probe's samples), `report` (the probe's figures and the tables' row counts),
`quit`. Ends on `quit`, stdin's EOF, SIGTERM or SIGINT, through the app's shutdown order.

Imports PySide6 (like bench/qasync_relay.py). Must not import the lab modules.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROBE_INTERVAL_MS = 16
PROBE_KEEP = 200_000  # samples kept (an hour of 16 ms ticks): bounded whatever the run
CREDENTIALS_TIMEOUT = 15.0


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class GcPauses:
    """How long each garbage collection took, by generation: a collection holds the GIL,
    so the UI thread and the relay's both wait for it."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {}
        self._began = 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            kept = self.pauses.setdefault(info["generation"], [])
            if len(kept) < PROBE_KEEP:
                kept.append(time.perf_counter() - self._began)

    def reset(self) -> None:
        self.pauses.clear()

    def figures(self) -> dict[str, dict[str, float]]:
        return {
            str(gen): {"count": len(p), "max_ms": max(p) * 1000, "total_ms": sum(p) * 1000}
            for gen, p in sorted(self.pauses.items())
            if p
        }


def figures_ms(samples: collections.deque[float]) -> dict[str, float | int | None]:
    """p50 / p99 / max of samples in seconds, as milliseconds."""
    if not samples:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "count": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": ordered[-1] * 1000,
    }


class Sampler:
    """Where each thread spends its time, by sampling every thread's stack (`--profile`):
    per thread, how often each function was on top (self) and anywhere on the stack
    (inclusive). A sample waits for the GIL like any Python code, so a thread that holds it
    long is seen less often than it runs: read the figures as shares, not as times."""

    def __init__(
        self, path: Path, stalled: Callable[[], bool] | None = None, every: float = 0.002
    ) -> None:
        self.path = path
        self.every = every
        # Stacks of the UI thread while `stalled()` says the UI loop is late: what it is busy
        # with when it does not answer.
        self.stalled = stalled
        self.stalls: collections.Counter[str] = collections.Counter()
        self.main = threading.main_thread().ident
        self.stop = threading.Event()
        self.own: collections.Counter[tuple[str, str]] = collections.Counter()
        self.inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
        self.samples: collections.Counter[str] = collections.Counter()
        self.thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        me = threading.get_ident()
        limit = time.monotonic() + 3600  # bounded, whatever the driver does
        while not self.stop.wait(self.every) and time.monotonic() < limit:
            names = {t.ident: t.name for t in threading.enumerate()}
            frames = sys._current_frames()
            if self.stalled is not None and self.main in frames and self.stalled():
                stack = []
                f: Any = frames[self.main]
                for _ in range(12):
                    if f is None:
                        break
                    stack.append(f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}")
                    f = f.f_back
                self.stalls[" < ".join(stack)] += 1
            for ident, frame in frames.items():
                if ident == me:
                    continue
                name = names.get(ident, "?")
                self.samples[name] += 1
                seen = set()
                top = True
                f = frame
                for _ in range(200):  # bounded depth
                    if f is None:
                        break
                    code = f.f_code
                    where = f"{Path(code.co_filename).name}:{code.co_name}"
                    if top:
                        self.own[(name, where)] += 1
                        top = False
                    if where not in seen:
                        seen.add(where)
                        self.inclusive[(name, where)] += 1
                    f = f.f_back

    def start(self) -> None:
        self.thread.start()

    def write(self) -> None:
        self.stop.set()
        self.thread.join(5)
        out: dict[str, Any] = {"stalls": self.stalls.most_common(25)}
        for name, count in self.samples.most_common():
            out[name] = {
                "samples": count,
                "self": [
                    [w, n, round(n / count, 3)] for (t, w), n in self.own.most_common() if t == name
                ][:30],
                "inclusive": [
                    [w, n, round(n / count, 3)]
                    for (t, w), n in self.inclusive.most_common()
                    if t == name
                ][:60],
            }
        self.path.write_text(json.dumps(out, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--view", choices=["active", "closed"], default="closed")
    parser.add_argument("--profile", type=Path, help="write where each thread spent its time")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval (seconds) for this run: how long a thread may keep the GIL "
        "while another waits for it (Python's default 0.005)",
    )
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    try:
        import qasync
        from PySide6 import __version__ as pyside_version
        from PySide6.QtCore import Qt, QTimer, qVersion
        from PySide6.QtWidgets import QApplication

        from tray_proxy.app import AppServices, Autostart, UpstreamEditorService
        from tray_proxy.controller import ProxyController, engine_relay_factory
        from tray_proxy.controller.commands import INSTANCE_TRAY, answer_command, immediate_answer
        from tray_proxy.controller.history import HistoryFile, history_path, open_history_writer
        from tray_proxy.controller.services import ConfigFile
        from tray_proxy.controller.status import State
        from tray_proxy.instance import ControlServer, runtime_dir
        from tray_proxy.keyring_store import CredentialStore, default_credential_source
        from tray_proxy.ui.bridge import UiBridge
        from tray_proxy.ui.main_window import MainWindow
        from tray_proxy.ui.services import CredentialsServices
    except ImportError as exc:
        say(event="error", message=f"the app's parts cannot be imported: {exc}")
        return 3

    qapp = QApplication(["tray-proxy"])
    qapp.setApplicationName("tray-proxy")
    qapp.setQuitOnLastWindowClosed(False)

    class Probe:
        """A 16 ms precise timer on the UI loop; each tick notes how late it came."""

        def __init__(self) -> None:
            self.samples: collections.deque[float] = collections.deque(maxlen=PROBE_KEEP)
            self.interval = PROBE_INTERVAL_MS / 1000
            self._last = time.perf_counter()
            self.timer = QTimer()
            self.timer.setTimerType(Qt.TimerType.PreciseTimer)
            self.timer.setInterval(PROBE_INTERVAL_MS)
            self.timer.timeout.connect(self._tick)

        def start(self) -> None:
            self._last = time.perf_counter()
            self.timer.start()

        def reset(self) -> None:
            self.samples.clear()

        def stalled(self) -> bool:
            """The UI loop is late: no tick for more than 40 ms (read from any thread)."""
            return time.perf_counter() - self._last > 0.04

        def _tick(self) -> None:
            now = time.perf_counter()
            self.samples.append(max(0.0, now - self._last - self.interval))
            self._last = now

    async def run() -> int:
        loop = asyncio.get_running_loop()
        quit_event = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, quit_event.set)

        config_file = ConfigFile(args.config)
        settings = config_file.load()
        source = default_credential_source(settings)
        with contextlib.suppress(Exception):  # a missing keyring: $CREDENTIALS_DIRECTORY has it
            await asyncio.wait_for(source.refresh(), CREDENTIALS_TIMEOUT)
        where = history_path(settings.log)
        reader = HistoryFile(where) if where is not None else None
        controller = ProxyController(
            config_file,
            engine_relay_factory(source),
            None,  # the lab's nft table redirects
            credential_source=source,
            history=open_history_writer(settings.log),
            attribution=True,
        )
        services = AppServices(
            controller,
            Autostart(config_home=args.config.parent),
            quit_event,
            {"qt": qVersion(), "pyside6": pyside_version},
            history=reader,
        )
        bridge = UiBridge()
        window = MainWindow(
            services,
            bridge,
            tray_available=False,
            credentials=CredentialsServices(CredentialStore(), UpstreamEditorService(controller)),
        )
        tab = window.connections

        def show_view(view: str) -> None:
            button = tab.show_active if view == "active" else tab.show_closed
            button.click()

        window.show()
        window.tabs.setCurrentWidget(tab)
        show_view(args.view)
        bridge.attach(controller)

        async def handle(command: str) -> dict[str, Any]:
            return await answer_command(
                controller,
                command,
                instance=INSTANCE_TRAY,
                quit=quit_event.set,
                raise_window=window.show_and_raise,
            )

        server = ControlServer(
            handle,
            runtime_dir(),
            immediate=lambda command: immediate_answer(controller, command, instance=INSTANCE_TRAY),
        )
        if not server.claim():
            say(event="error", message=f"another instance holds {server.path}")
            return 3
        probe = Probe()
        gc_pauses = GcPauses()
        samplers: list[Sampler] = []

        def command(line: str) -> None:
            word, _, rest = line.strip().partition(" ")
            if word == "show":
                window.show_and_raise()
                window.tabs.setCurrentWidget(tab)
            elif word == "hide":
                window.hide()
            elif word == "view":
                show_view(rest.strip())
            elif word == "reset":
                probe.reset()
                gc_pauses.reset()
            elif word == "profile" and args.profile is not None:
                sampler = Sampler(args.profile, probe.stalled)
                samplers.append(sampler)
                sampler.start()
            elif word == "report":
                say(
                    event="report",
                    probe=figures_ms(probe.samples),
                    gc=gc_pauses.figures(),
                    visible=window.isVisible(),
                    active_rows=tab.active.rowCount(),
                    closed_rows=tab.closed.rowCount(),
                    state=controller.status().state.name,
                    threads={t.name: t.native_id for t in threading.enumerate()},
                )
                return
            elif word in ("quit", ""):
                quit_event.set()
                return
            else:
                say(event="error", message=f"unknown command {line.strip()!r}")
                return
            say(event="done", command=word)

        def read_stdin() -> None:
            for line in sys.stdin:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(command, line)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(quit_event.set)  # EOF: the driver went away

        try:
            await server.start()
            status = await controller.enable()
            if status.state is not State.ON:
                say(event="error", message=f"the relay did not switch on: {status.message}")
                return 3
            probe.start()
            threading.Thread(target=read_stdin, name="driver commands", daemon=True).start()
            say(
                event="ready",
                pid=os.getpid(),
                socket=str(server.path),
                relay=[list(a) for a in status.relay_addresses],
                history=str(where) if where is not None else None,
            )
            await quit_event.wait()
        finally:
            for sampler in samplers:
                sampler.write()
            probe.timer.stop()
            await server.close()
            await controller.shutdown()
            window.close_for_quit()
            if reader is not None:
                reader.close()
            server.release()
        say(event="stopped")
        return 0

    with asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(qapp)) as runner:
        return runner.run(run())


if __name__ == "__main__":
    sys.exit(main())
