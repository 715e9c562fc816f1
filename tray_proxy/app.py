"""Composition root of the GUI app: the one start-up path and the one shutdown path.

Start-up: take the single-instance lock (a second `tray-proxy` asks the first one to raise
its window and exits), create the QApplication, run one main coroutine on a qasync loop.
That coroutine wires config -> controller (relay on its own EngineThread, redirect through
the root helper, the connection monitor and history) -> bridge -> tray / window, serves the
control socket, and waits for one asyncio.Event that Quit, aboutToQuit, SIGTERM, SIGINT and
SIGHUP all set.

Shutdown, in that coroutine: the control socket closes, the redirect goes off first (helper
`remove`), then the relay drains (bounded), then the helper stops and the loop ends. When the
X display goes away (logout, WSLg restart, xkill) Qt ends its own loop: the same coroutine
still runs the same path to its end (`_run_to_end`). The relay never runs on the qasync loop
(shared/BENCHMARKS.md, lesson 2).

Must not be imported by the core (relay, firewall, config, monitor, controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tray_proxy.config import Config, ConfigError, ProbeSettings, default_config_path
from tray_proxy.config_watch import ConfigWatcher
from tray_proxy.controller import (
    ProxyController,
    Status,
    engine_relay_factory,
)
from tray_proxy.controller.commands import (
    INSTANCE_RUN,
    INSTANCE_TRAY,
    answer_command,
    immediate_answer,
)
from tray_proxy.controller.history import HistoryFile, history_path, open_history_writer
from tray_proxy.controller.services import ConfigFile
from tray_proxy.errors import UserError
from tray_proxy.instance import ControlError, ControlServer, runtime_dir, send_command
from tray_proxy.keyring_store import CredentialStore, default_credential_source
from tray_proxy.monitor.rows import ConnectionRow
from tray_proxy.relay.probe import ProbeResult, probe_upstream
from tray_proxy.relay.secrets import Credentials
from tray_proxy.relay.settings import RelaySettings, UpstreamProxy
from tray_proxy.setup_flow import needs_setup
from tray_proxy.tasks import spawn

if TYPE_CHECKING:
    from tray_proxy.ui.services import HistoryReader

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
TRAY_WAIT_SECONDS = 3.0  # at login the panel may start after us
# After the display went away: how long the Quit path may take (it has its own timeouts:
# the drain, the helper), then how long the cancelled rest may take.
DISPLAY_LOSS_LIMIT = 60.0
DISPLAY_LOSS_CANCEL_LIMIT = 10.0
DESKTOP_TEMPLATE = Path(__file__).resolve().parents[1] / "resources" / "tray-proxy.desktop"


class Autostart:
    """Start at login: the XDG autostart entry ~/.config/autostart/tray-proxy.desktop."""

    def __init__(self, config_home: Path | None = None, command: str | None = None) -> None:
        if config_home is None:
            xdg = os.environ.get("XDG_CONFIG_HOME")
            config_home = Path(xdg) if xdg else Path.home() / ".config"
        self.path = config_home / "autostart" / "tray-proxy.desktop"
        self._command = command

    def enabled(self) -> bool:
        return self.path.is_file()

    def command(self) -> str:
        if self._command is not None:
            return self._command
        found = shutil.which("tray-proxy")
        if found:
            return shlex.quote(found)
        return f"{shlex.quote(sys.executable)} -m tray_proxy"

    def entry(self) -> str:
        try:
            template = DESKTOP_TEMPLATE.read_text(encoding="utf-8")
        except OSError:
            template = "[Desktop Entry]\nType=Application\nName=tray-proxy\nExec=tray-proxy\n"
        lines = [
            f"Exec={self.command()}" if line.startswith("Exec=") else line
            for line in template.splitlines()
        ]
        return "\n".join(lines) + "\n"

    def set_enabled(self, enabled: bool) -> None:
        """Raises OSError when the entry cannot be written or removed."""
        if not enabled:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(self.entry(), encoding="utf-8")
        os.replace(tmp, self.path)


class AppServices:
    """What the views may do (ui.services.AppServices), on top of the controller."""

    def __init__(
        self,
        controller: ProxyController,
        autostart: Autostart,
        quit_event: asyncio.Event,
        extra_diagnostics: dict[str, str] | None = None,
        history: HistoryReader | None = None,
    ) -> None:
        self._controller = controller
        self._autostart = autostart
        self._quit = quit_event
        self._extra = extra_diagnostics or {}
        self._history = history

    def status(self) -> Status:
        return self._controller.status()

    def toggle(self) -> None:
        self._controller.request_toggle()

    def enable(self) -> None:
        self._controller.request_enable()

    def disable(self) -> None:
        self._controller.request_disable()

    def select_upstream(self, name: str) -> None:
        self._controller.request_upstream(name)

    def test_connection(self) -> None:
        self._controller.request_test()

    def diagnostics(self) -> str:
        return self._controller.diagnostics(self._extra)

    def autostart_enabled(self) -> bool:
        return self._autostart.enabled()

    def set_autostart(self, enabled: bool) -> None:
        self._autostart.set_enabled(enabled)

    def quit(self) -> None:
        self._quit.set()

    def close_connections(self, ids: Sequence[int]) -> None:
        self._controller.request_close_connections(ids)

    def test_upstream(self, name: str) -> None:
        self._controller.request_test_upstream(name)

    def open_rows(self) -> Sequence[ConnectionRow]:
        return self._controller.open_rows()

    def history(self) -> HistoryReader | None:
        return self._history


class UpstreamEditorService:
    """What the credentials dialog may do (ui.services.UpstreamEditor): read the upstreams,
    probe one for real on this loop, save one through the controller. The probe goes to
    `target` when given, else to the settings' [probe] target."""

    def __init__(
        self,
        controller: ProxyController,
        target: tuple[str, int] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._controller = controller
        self.target = target
        self.timeout = timeout

    def upstreams(self) -> tuple[UpstreamProxy, ...]:
        config = self._controller.config
        return config.upstreams if config is not None else ()

    def active_upstream(self) -> str | None:
        return self._controller.status().upstream

    async def probe(self, upstream: UpstreamProxy, credentials: Credentials | None) -> ProbeResult:
        config = self._controller.config
        probe = config.probe if config is not None else ProbeSettings()
        target = self.target or probe.target
        return await probe_upstream(upstream, credentials, target, self.timeout or probe.timeout)

    async def save_upstream(self, upstream: UpstreamProxy) -> str | None:
        return await self._controller.save_upstream(upstream)


class GuiApp:
    """Everything the main coroutine builds, so the control socket can reach it."""

    def __init__(self, config_path: Path, no_tray: bool, server: ControlServer) -> None:
        self.config_path = config_path
        self.no_tray = no_tray
        self.server = server
        self.quit_event: asyncio.Event | None = None
        self.controller: ProxyController | None = None
        self.window: Any = None
        self.setup_window: Any = None

    async def handle(self, command: str) -> dict[str, Any]:
        """One control-socket command (see tray_proxy.instance)."""
        controller = self.controller
        quit_event = self.quit_event
        assert controller is not None and quit_event is not None
        return await answer_command(
            controller,
            command,
            instance=INSTANCE_TRAY,
            quit=quit_event.set,
            raise_window=self._raise_window,
        )

    def _raise_window(self) -> None:
        if self.window is not None:
            # Logged so a user (or a test) can tell the second start reached us.
            log.info("another start of tray-proxy asked for the window; showing it")
            self.window.show_and_raise()

    async def main(self) -> int:
        from PySide6 import __version__ as pyside_version
        from PySide6.QtCore import qVersion
        from PySide6.QtWidgets import QApplication, QSystemTrayIcon

        from tray_proxy.firewall.client import RedirectController
        from tray_proxy.ui.bridge import UiBridge
        from tray_proxy.ui.main_window import MainWindow
        from tray_proxy.ui.services import CredentialsServices
        from tray_proxy.ui.tray import Tray

        qapp = QApplication.instance()
        assert isinstance(qapp, QApplication)
        loop = asyncio.get_running_loop()
        quit_event = self.quit_event = asyncio.Event()
        qapp.aboutToQuit.connect(quit_event.set)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # SIGHUP too (the terminal closed, or the session ended): the same drained Quit.
            loop.add_signal_handler(signum, _quit_on_signal, quit_event, signum)

        config_file = ConfigFile(self.config_path)
        store = CredentialStore()
        # The keyring first, then $CREDENTIALS_DIRECTORY; the names come from the settings
        # at each refresh, so a proxy added in the dialog is read too.
        settings = _config_or_empty(config_file)
        source = default_credential_source(settings, store=store)
        # The connection history ([log]): written by its own thread, read by the Log tab.
        where = history_path(settings.log)
        reader = HistoryFile(where) if where is not None else None
        controller = self.controller = ProxyController(
            config_file,
            engine_relay_factory(source),
            RedirectController(),
            credentials=source.keyring,
            credential_source=source,
            history=open_history_writer(settings.log),
            attribution=True,
            # Health probes and the off-network fallback (issue 15 sections 2 and 5).
            probes=True,
        )
        services = AppServices(
            controller,
            Autostart(),
            quit_event,
            {"qt": qVersion(), "pyside6": pyside_version},
            history=reader,
        )
        bridge = UiBridge()
        tray_available = not self.no_tray and await _wait_for_tray(QSystemTrayIcon)
        window = self.window = MainWindow(
            services,
            bridge,
            tray_available=tray_available,
            credentials=CredentialsServices(store, UpstreamEditorService(controller)),
        )
        tray: Tray | None = None
        if tray_available:
            tray = Tray(
                services,
                bridge,
                show_window=window.show_and_raise,
                open_credentials=window.open_credentials,
                report_error=window.report_error,
            )
            tray.show()
        else:
            if not self.no_tray:
                log.warning("no system tray found; showing the window instead")
            window.show()
        bridge.attach(controller)
        controller.report_start_problems()  # a broken settings file, now that views listen
        # Off the UI thread (the keyring's worker); a broken keyring becomes an error entry
        # and a notice, and switching on waits for this first read.
        controller.request_refresh_credentials()
        if needs_setup(self.config_path):
            # First start (issue 14): the setup steps, not a bare "No proxy set up".
            self.setup_window = open_setup_window(self.config_path, store, controller)
        await self.server.start()
        settings_watch = watch_settings(self.config_path, controller)
        try:
            await quit_event.wait()
        finally:
            settings_watch.close()
            # The one shutdown path: redirect off, relay drained, then the loop may end.
            log.info("quitting")
            await self.server.close()
            await controller.shutdown()
            if tray is not None:
                tray.hide()
            window.close_for_quit()
            if self.setup_window is not None:
                self.setup_window.close()
            if reader is not None:
                reader.close()
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        return EXIT_OK


def watch_settings(path: Path, controller: ProxyController) -> ConfigWatcher:
    """Edits of the settings file apply while running, open connections stay (issue 15
    section 6). SIGHUP quits like SIGTERM (issue 16 item 8), so this file watch, the
    Credentials dialog's Save and `tray-proxy reload` are the ways to reload."""

    async def reload() -> None:
        try:
            answer = await controller.reload()
        except UserError as exc:
            log.warning("%s", exc)  # an error entry already; the running settings stay
            return
        log.info("settings file changed: %s", answer.get("message"))

    def changed() -> None:
        controller.spawn(reload(), "reload settings")

    watcher = ConfigWatcher(path, changed)
    try:
        content: bytes | None = path.read_bytes()
    except OSError:
        content = None
    watcher.start(content=content)
    return watcher


def open_setup_window(path: Path, store: CredentialStore, controller: ProxyController) -> Any:
    """Show the setup window (ui/setup_window.py) over the setup steps; after Save the
    controller re-reads the settings and the password (as the credentials dialog's Save)."""
    from tray_proxy.setup_flow import SetupFlow, SetupService
    from tray_proxy.ui.setup_window import SetupWindow

    log.info("no proxy is set up in %s yet: opening the setup window", path)
    steps = SetupService(SetupFlow(path, store=store), after_save=controller.save_upstream)
    window = SetupWindow(steps)
    window.show()
    window.raise_()
    return window


def _quit_on_signal(quit_event: asyncio.Event, signum: int) -> None:
    if not quit_event.is_set():
        log.info("%s: quitting as Quit does", signal.Signals(signum).name)
    quit_event.set()


def _config_or_empty(config_file: ConfigFile) -> Config:
    try:
        return config_file.load()
    except ConfigError:
        # The controller reports the broken file; the relay just has no names yet.
        return Config(relay=RelaySettings(), upstreams=())


async def _wait_for_tray(tray_class: Any) -> bool:
    deadline = asyncio.get_running_loop().time() + TRAY_WAIT_SECONDS
    while not tray_class.isSystemTrayAvailable():
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.25)
    return True


def run_gui(config_path: Path | None = None, no_tray: bool = False) -> int:
    """`tray-proxy` with no subcommand. Returns the exit code."""
    try:
        server = ControlServer(
            lambda command: app.handle(command),
            runtime_dir(),
            immediate=lambda command: immediate_answer(
                app.controller, command, instance=INSTANCE_TRAY
            ),
        )
        first = server.claim()
    except (ControlError, OSError) as exc:
        print(f"tray-proxy: cannot set up the control socket: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not first:
        # Another instance runs: bring its window up instead of starting a second one.
        try:
            answer = send_command("raise", server.path)
        except ControlError as exc:
            print(f"tray-proxy: another instance holds the lock but {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if answer.get("instance") == INSTANCE_RUN:
            print(
                "tray-proxy is already running headless (`tray-proxy run`), and one redirect "
                "at a time can work. Stop it (`tray-proxy quit`, or Ctrl+C where it runs) and "
                "start the tray app again.",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        print("tray-proxy is already running; its window was brought up.", file=sys.stderr)
        return EXIT_OK

    import qasync
    from PySide6.QtWidgets import QApplication

    from tray_proxy.ui.icons import app_icon

    app = GuiApp(config_path or default_config_path(), no_tray, server)
    # argv[0] becomes the X11 WM_CLASS; with `python -m` it would be "__main__.py".
    qapp = QApplication.instance() or QApplication(["tray-proxy"])
    assert isinstance(qapp, QApplication)
    qapp.setApplicationName("tray-proxy")
    qapp.setDesktopFileName("tray-proxy")
    qapp.setQuitOnLastWindowClosed(False)  # the tray (or the background) keeps it alive
    qapp.setWindowIcon(app_icon())
    loop = qasync.QEventLoop(qapp)
    try:
        return _run_to_end(loop, app.main())
    finally:
        try:
            _finish_loop(loop)
        finally:
            server.release()


def _run_to_end(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, int]) -> int:
    """Run the main coroutine on the qasync loop until it has returned, also when Qt's own
    loop ends without us asking.

    That happens when the X display goes away (logout, a WSLg restart, xkill): from then on
    Qt's xcb plugin ends every pass of Qt's loop at once ("The X11 connection broke"), and
    aboutToQuit has set the quit event. The main coroutine then takes the Quit path, and the
    loop is run again pass by pass (each exec() still runs one pass of timers, sockets and
    posted events) until that has finished: redirect off, relay drained, socket closed.
    """
    task = spawn(main, name="tray-proxy main", loop=loop)
    task.add_done_callback(lambda _task: loop.stop())
    _drive(loop, task, "the display went away (or the session ended)")
    if not task.done():
        log.error("quitting took longer than %.0f s; giving up", DISPLAY_LOSS_LIMIT)
        return EXIT_FAILURE
    return task.result()


def _drive(loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any], why: str) -> None:
    """Run `loop` until `task` is done; bounded once Qt's loop has ended by itself."""
    deadline: float | None = None
    cancelled = False
    while not task.done():
        loop.run_forever()
        if task.done():
            return
        now = time.monotonic()
        if deadline is None:
            log.warning("%s: switching the redirect off and quitting, as Quit does", why)
            _quiet_lost_display()
            deadline = now + DISPLAY_LOSS_LIMIT
        elif now >= deadline and not cancelled:
            task.cancel()
            cancelled = True
            deadline = now + DISPLAY_LOSS_CANCEL_LIMIT
        elif now >= deadline:
            return


def _finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.Runner does at the end: cancel what is left, then close the loop."""
    try:
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in left:
            t.cancel()
        if left:
            gathered = asyncio.gather(*left, return_exceptions=True)
            gathered.add_done_callback(lambda _f: loop.stop())
            _drive(loop, gathered, "Qt's event loop ended while tasks were cancelled")
        shutdown = spawn(loop.shutdown_asyncgens(), name="tray-proxy shutdown asyncgens", loop=loop)
        shutdown.add_done_callback(lambda _t: loop.stop())
        _drive(loop, shutdown, "Qt's event loop ended at the end")
    finally:
        loop.close()


_display_lost = False


def _quiet_lost_display() -> None:
    """After the first "X11 connection broke", Qt says it again at every pass: once is
    enough. Other Qt messages still reach stderr."""
    global _display_lost
    if _display_lost:
        return
    _display_lost = True
    from PySide6.QtCore import qInstallMessageHandler

    def handler(_mode: Any, _context: Any, message: str) -> None:
        if "X11 connection broke" not in message:
            print(message, file=sys.stderr)

    qInstallMessageHandler(handler)
