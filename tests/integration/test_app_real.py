"""The tray app for real: Xvfb, a real XEmbed tray host (trayer), the GUI process as root in
the lab's client namespace, its root helper's nft table, real curl with no proxy settings, the
real Squid with Basic auth, the real origin.

Each test proves what the user would see and what the machine is left with: the icon embedded
in the tray (X's own window tree), the window mapped, the state the control CLI reports, the
CONNECT in Squid's log and the proxy as the origin's peer, and no `inet tray_proxy` table after
every way of ending the app (quit, SIGTERM, SIGKILL).

Must not import tray_proxy (the app runs as a separate process) or PySide6.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.app_support import (
    GuiProcess,
    TrayHost,
    Window,
    XServer,
    has_table,
    poll,
)
from tests.integration.relay import UpstreamSpec
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME

pytestmark = pytest.mark.lab

# Loopback stays local; everything else, the lab's 10.200.x and fd00:200: included, goes to
# the relay (the defaults exclude private networks, which the lab is made of).
REDIRECT = {"exclude": ["127.0.0.0/8", "::1/128"]}
TOGGLE_INSET = (92, 56)  # px from the window's top-right corner into Overview's Switch on
StartGui = Callable[..., GuiProcess]


@pytest.fixture
def xserver() -> Iterator[XServer]:
    server = XServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def tray_host(xserver: XServer) -> Iterator[TrayHost]:
    host = TrayHost(xserver)
    try:
        yield host.start()
    finally:
        host.stop()


@pytest.fixture
def start_gui(lab: Lab, xserver: XServer) -> Iterator[StartGui]:
    """`start_gui(*args)`: the app in lab.client on this test's X server; stopped afterwards."""
    with contextlib.ExitStack() as stack:

        def start(*args: str) -> GuiProcess:
            upstream = UpstreamSpec.for_squid(lab.squid)
            gui = GuiProcess(lab, xserver, upstream, args=args, redirect=REDIRECT)
            stack.callback(gui.stop)
            return gui.start()

        yield start


def _check_through_squid(lab: Lab) -> None:
    """curl in lab.client, no proxy settings, https by name: it must go through Squid."""
    seed = secrets.token_hex(6)
    size = 20_000
    path = lab.origins.bytes_path(size, seed)
    t0 = time.time()
    result = lab.curl(
        lab.origins.url("https", path),
        resolve=[f"{HOSTNAME}:443:{lab.origins.v4}"],
        max_time=20,
    )
    assert result.returncode == 0 and result.http_code == 200, result
    assert result.connect_code == 0, "curl itself must not have used a proxy"
    assert result.sha256 == lab.origins.expected_sha256(size, seed)
    creds = lab.squid.credentials
    assert creds is not None
    # The relay may first be challenged (407) before it answers with the credentials.
    entry = lab.squid.wait_for_entry(
        lambda e: (
            e.method == "CONNECT"
            and e.uri == f"{HOSTNAME}:443"
            and e.status == 200
            and e.time >= t0 - 0.002
        )
    )
    assert entry.user == creds.username, "the relay did not authenticate with the password file"
    event = lab.origins.wait_for_event(lambda e: seed in e.get("path", ""))
    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6), "the origin must see the proxy"


def _embedded_icon(gui: GuiProcess) -> Window | None:
    for w in gui.own_windows():
        if any(a.wm_class == ("panel", "trayer") for a in w.ancestors()):
            return w
    return None


def test_tray_icon_enable_curl_quit(lab: Lab, tray_host: TrayHost, start_gui: StartGui) -> None:
    assert not has_table(lab), "a tray_proxy table is already in lab.client"
    gui = start_gui()
    icon = poll(lambda: _embedded_icon(gui), 15, "trayer embedding a window of the app")
    assert icon.width <= 64 and icon.height <= 64, f"not an icon: {icon}"
    assert gui.main_window() is None, "with a tray the window must start hidden"
    assert "no system tray found" not in "\n".join(gui.lines)

    status = gui.enable()
    assert status["upstream"] == "squid" and status["relay_addresses"], status
    assert has_table(lab), "state On but no nft table in lab.client"
    _check_through_squid(lab)
    status = gui.status()
    assert status["total_connections"] >= 1, status
    assert status["upstreams"][0]["latency_ms"] is not None, status

    result = gui.ctl("quit", timeout=20)
    assert result.returncode == 0, result.stderr
    assert gui.wait_exit(20) == 0, gui.tail()
    assert not has_table(lab), "the table outlived the app"


def test_no_tray_host_window_toggle_curl(
    lab: Lab, xserver: XServer, start_gui: StartGui, tmp_path: Path
) -> None:
    gui = start_gui()  # no tray host on this display: the app must fall back to its window
    window = poll(gui.main_window, 15, f"the main window mapped; log:\n{gui.tail()}")
    gui.wait_for_line("no system tray found; showing the window instead")
    assert gui.status()["state"] == "off"

    # Click "Switch on": the toggle sits in the window's top-right corner (no window manager,
    # so the window's geometry is its client area).
    x, y = window.width - TOGGLE_INSET[0], TOGGLE_INSET[1]
    xserver.x(["xdotool", "mousemove", "--window", window.id, str(x), str(y), "click", "1"])
    gui.wait_for_state("on")
    assert has_table(lab)
    _check_through_squid(lab)

    shot = tmp_path / "screen.png"
    xserver.x(["import", "-window", "root", str(shot)], timeout=20)
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert gui.ctl("quit", timeout=20).returncode == 0
    assert gui.wait_exit(20) == 0, gui.tail()
    assert not has_table(lab)


def test_sigterm_while_on_exits_clean(lab: Lab, start_gui: StartGui) -> None:
    gui = start_gui("--no-tray")
    gui.enable()
    assert has_table(lab)
    os.kill(gui.pid, signal.SIGTERM)  # the app alone, not its group: the helper must be told
    assert gui.wait_exit(20) == 0, gui.tail()
    assert not has_table(lab), "SIGTERM left the redirect in place"


def test_sigkill_while_on_helper_removes_table(lab: Lab, start_gui: StartGui) -> None:
    gui = start_gui("--no-tray")
    gui.enable()
    assert has_table(lab)
    os.kill(gui.pid, signal.SIGKILL)
    assert gui.wait_exit(5) == -signal.SIGKILL
    # The helper sees EOF on its stdin and deletes its table.
    poll(lambda: not has_table(lab), 2.0, "the helper removing the table after the app died")


def test_second_instance_raises_first_window(
    lab: Lab, tray_host: TrayHost, start_gui: StartGui
) -> None:
    gui = start_gui()
    poll(lambda: _embedded_icon(gui), 15, "trayer embedding a window of the app")
    assert gui.main_window() is None, "with a tray the window must start hidden"
    mark = len(gui.lines)

    started = time.monotonic()
    second = gui.ctl("--config", str(gui.config_path), timeout=20)
    took = time.monotonic() - started
    assert second.returncode == 0, second.stderr
    assert "already running" in second.stderr, second.stderr
    assert took < 10, f"the second start took {took:.1f}s"

    gui.wait_for_line("asked for the window; showing it", since=mark)
    poll(gui.main_window, 10, "the first instance's window mapped after the second start")
    assert gui.alive(), "the first instance must keep running"


@pytest.mark.parametrize("tray", [True, False], ids=["tray", "window"])
def test_display_loss_while_on_takes_the_quit_path(
    lab: Lab, xserver: XServer, start_gui: StartGui, tray: bool
) -> None:
    """The X server goes away under the app (logout, WSLg restart): it must shut down as
    Quit does: redirect off, relay drained, exit 0, no traceback, no table left."""
    host = TrayHost(xserver).start() if tray else None
    try:
        gui = start_gui() if tray else start_gui("--no-tray")
        if host is not None:
            poll(lambda: _embedded_icon(gui), 15, "trayer embedding a window of the app")
        else:
            poll(gui.main_window, 15, f"the main window mapped; log:\n{gui.tail()}")
        gui.enable()
        assert has_table(lab)
        assert xserver.process is not None
        xserver.process.kill()  # as a crash of the X server: no goodbye to its clients
        assert gui.wait_exit(30) == 0, gui.tail()
    finally:
        if host is not None:
            host.stop()
    log = "\n".join(gui.lines)
    assert "Traceback" not in log, gui.tail(80)
    assert "the display went away" in log, gui.tail()
    assert not has_table(lab), "the display loss left the redirect in place"
