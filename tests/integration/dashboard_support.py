"""The real dashboard in-process against the real engine in the lab, for pytest-qt tests.

- `main_thread_in(ns_name)`: moves the calling (main) thread into a lab namespace with
  setns(2) and back in `finally`. Threads started meanwhile (the engine's EngineThread, the
  process attributor's worker, the history writer, qasync's executor) and subprocesses
  inherit it, so the relay listens and dials there and attribution reads its sockets.
- `DashboardRig`: built as app.py builds the GUI: ProxyController with the engine relay
  factory (no redirect service: the lab's own nft redirect points at the relay's port), the
  history writer and reader from `[log]`, the process attributor, app.AppServices, the
  UiBridge attached, and the MainWindow shown. The password reaches the relay only through
  a StaticCredentialSource (never argv, env or a file).
- `Curl`: a real curl in the client namespace (no proxy settings: the redirect carries it),
  whose end the test awaits without blocking the Qt loop.
- `until`: bounded polling on the running (qasync) loop, so Qt keeps painting and the
  bridge keeps flushing while a test waits.

Must not be imported by tray_proxy. Imports PySide6 (through tray_proxy.ui).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from PySide6.QtCore import QAbstractItemModel
from PySide6.QtWidgets import QWidget
from pytestqt.modeltest import ModelTester

from tests.integration.relay import allocate_port
from tests.lab.curl import curl_config
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess, Redirect, thread_in_namespace
from tests.ui.fakes import fake_credentials
from tray_proxy.app import AppServices, Autostart
from tray_proxy.controller import ProxyController, State, engine_relay_factory
from tray_proxy.controller.history import HistoryFile, history_path, open_history_writer
from tray_proxy.controller.services import ConfigFile
from tray_proxy.monitor.rows import ConnectionRow
from tray_proxy.relay.secrets import Credentials, Secret, StaticCredentialSource
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.main_window import CloseChoice, MainWindow
from tray_proxy.ui.models.columns import ROW_ROLE
from tray_proxy.ui.models.connections import ConnectionFilter

UPSTREAM = "squid"
SPARE = "spare"  # a second proxy in the settings that no connection uses
WRONG_PASSWORD = "wrong-password"  # the lab Squid again, with a password it refuses
DENIED_PORT = 5002  # not in the lab Squid's SSL_ports: a CONNECT there is answered 403
REDIRECT_PORTS = (80, 443, DENIED_PORT)

# The dashboard tests move the main thread itself (see the module docstring).
main_thread_in = thread_in_namespace


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Await `predicate()` truthy (polled every 20 ms on the running loop); its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


def check_models(*models: QAbstractItemModel) -> None:
    """pytest-qt's model checks (the Python tester, whose failures raise), attached to each
    model for as long as it lives: every later insert, change, removal and reset is checked."""
    for model in models:
        tester = ModelTester(None)  # type: ignore[no-untyped-call]
        tester.check(model, force_py=True)  # type: ignore[no-untyped-call]


def rows_of(proxy: ConnectionFilter) -> list[ConnectionRow]:
    """The rows a table shows, in its order, read through the model's row role."""
    out: list[ConnectionRow] = []
    for i in range(proxy.rowCount()):
        row = proxy.data(proxy.index(i, 0), ROW_ROLE)
        assert isinstance(row, ConnectionRow)
        out.append(row)
    return out


def texts_of(proxy: ConnectionFilter, column: int) -> list[str]:
    """What one column of a table displays, top to bottom."""
    return [str(proxy.index(i, column).data()) for i in range(proxy.rowCount())]


class Curl:
    """`curl` (from the client namespace, no proxy settings) fetching `url` to /dev/null
    (POSTing the file `upload`, if given).

    `await finished()` waits for it to exit without blocking the loop; `.info` is curl's
    `-w %{json}`, `.returncode` its exit code. `stop()` ends it (idempotent)."""

    def __init__(
        self,
        lab: Lab,
        url: str,
        *,
        options: Sequence[str] = (),
        max_time: float = 60,
        upload: Path | None = None,
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        config = curl_config(
            url,
            cacert=lab.ca_path,
            output=Path(os.devnull),
            data_file=upload,
            max_time=max_time,
            options=list(options),
        )
        self.lab = lab
        self.url = url
        self.info: dict[str, Any] = {}
        self.stderr = ""
        self.process: NsProcess | None = lab.client.popen(
            ["curl", "--disable", "--config", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.pid = self.process.pid  # `ip netns exec` execs curl: the same pid
        assert self.process.stdin is not None
        self.process.stdin.write(config.encode())
        self.process.stdin.close()
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<Curl pid={self.pid} {self.url} rc={self.returncode} {self.stderr.strip()!r}>"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def finished(self, timeout: float) -> Curl:
        proc = self.process
        assert proc is not None
        await until(lambda: proc.poll() is not None, f"curl {self.url} to end", timeout)
        self._collect()
        return self

    def _collect(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        self.returncode = proc.stop(grace=1.0)
        self.lab.client.forget(proc)
        proc.stdout.close()
        proc.stderr.close()
        self.stderr = err.decode(errors="replace")
        with contextlib.suppress(json.JSONDecodeError):
            self.info = json.loads(out or b"{}")

    def stop(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.stop(grace=1.0)
        self._collect()


class DashboardRig:
    """The GUI app's composition against the lab (see the module docstring).

    `async start()` builds, shows and switches on; `async close()` (always) quits as the
    app does: controller shutdown (relay drained, history flushed), window closed, reader
    closed, lab redirect removed.
    """

    def __init__(self, lab: Lab, workdir: Path) -> None:
        squid = lab.squid
        assert squid.credentials is not None
        self.lab = lab
        self.workdir = workdir
        self.port = allocate_port(lab)
        self.history_file = workdir / "history.sqlite3"
        self.config_path = workdir / "config.toml"
        self.export_path = workdir / "export.csv"  # where the Log tab's Export… writes
        upstreams: list[dict[str, Any]] = [
            {
                "name": UPSTREAM,
                "url": f"http://{squid.host}:{squid.port}",
                "username": squid.credentials.username,
            },
            # Never dialled: it makes the proxy filter a real choice.
            {"name": SPARE, "url": f"http://{squid.host}:3999"},
            # The same Squid with a wrong password: for "Test now".
            {
                "name": WRONG_PASSWORD,
                "url": f"http://{squid.host}:{squid.port}",
                "username": squid.credentials.username,
            },
        ]
        doc = {
            "relay": {
                "port": self.port,
                "listen": ["127.0.0.1", "::1"],
                "redirect_ports": list(REDIRECT_PORTS),
                "upstream": UPSTREAM,
                "drain_timeout": 1.0,
            },
            "upstream": upstreams,
            "log": {"enabled": True, "path": str(self.history_file)},
        }
        self.config_path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        user = squid.credentials.username
        self.source = StaticCredentialSource(
            {
                UPSTREAM: Credentials(user, Secret(squid.credentials.password)),
                WRONG_PASSWORD: Credentials(user, Secret("not-" + squid.credentials.password)),
            }
        )
        self.controller: ProxyController | None = None
        self.reader: HistoryFile | None = None
        self.window: MainWindow | None = None
        self.bridge: UiBridge | None = None
        self._detach: Callable[[], None] | None = None
        self._redirect: Redirect | None = None

    async def start(self) -> MainWindow:
        config_file = ConfigFile(self.config_path)
        settings = config_file.load()
        where = history_path(settings.log)
        assert where == self.history_file
        self.reader = HistoryFile(where)
        controller = self.controller = ProxyController(
            config_file,
            engine_relay_factory(self.source),
            None,  # the lab's nft table redirects (as `tray-proxy run --no-redirect`)
            credential_source=self.source,
            history=open_history_writer(settings.log),
            attribution=True,
        )
        services = AppServices(
            controller,
            Autostart(config_home=self.workdir / "config"),
            asyncio.Event(),
            {},
            history=self.reader,
        )
        self.bridge = UiBridge()
        window = self.window = MainWindow(
            services,
            self.bridge,
            tray_available=False,
            ask_close=self._never_asked,
            credentials=fake_credentials(),
            choose_export_path=lambda _parent: (self.export_path, "csv"),
        )
        window.show()
        window.tabs.setCurrentWidget(window.connections)
        self._detach = self.bridge.attach(controller)
        self._redirect = self.lab.redirect(self.port, REDIRECT_PORTS)
        status = await controller.enable()
        assert status.state is State.ON, status.message
        return window

    @staticmethod
    def _never_asked(_parent: QWidget) -> CloseChoice:
        raise AssertionError("the window asked how to close during a test")

    async def close(self) -> None:
        try:
            if self.controller is not None:
                await self.controller.shutdown()
        finally:
            if self._detach is not None:
                self._detach()
            if self.window is not None:
                self.window.close_for_quit()
            if self.reader is not None:
                self.reader.close()
            if self._redirect is not None:
                self._redirect.remove()
