"""Issue 14 bug 5: a settings file that cannot be read is said at start, where the user looks:
the tray icon and its tooltip, the window's Overview (state, message, errors) and the status
the control socket gives (`tray-proxy status`). Real widgets on a real ProxyController with a
real settings file; only the relay is the controller tests' in-memory one (nothing is
switched on here)."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

from pytestqt.qtbot import QtBot

from tests.controller.fakes import FakeRelayFactory, Log
from tests.ui.fakes import fake_credentials
from tray_proxy.app import AppServices, Autostart
from tray_proxy.controller import ProxyController, State
from tray_proxy.controller.commands import INSTANCE_TRAY, answer_command
from tray_proxy.controller.services import ConfigFile
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.icons import state_icon
from tray_proxy.ui.main_window import CloseChoice, MainWindow
from tray_proxy.ui.tray import Tray

BROKEN = '[relay]\nport = "abc"\n[[upstream]]\nname = "corp"\nurl = "http://proxy:8080"\n'


def test_a_broken_settings_file_shows_at_start_in_tray_window_and_status(
    qtbot: QtBot, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BROKEN, encoding="utf-8")
    controller = ProxyController(ConfigFile(path), FakeRelayFactory(Log()), None)
    services = AppServices(controller, Autostart(config_home=tmp_path), asyncio.Event())
    bridge = UiBridge(interval_ms=10)
    window = MainWindow(services, bridge, tray_available=True, credentials=fake_credentials())
    qtbot.addWidget(window)
    tray = Tray(
        services,
        bridge,
        show_window=window.show_and_raise,
        open_credentials=window.open_credentials,
        report_error=window.report_error,
    )
    bridge.attach(controller)

    # The tray, from its first paint.
    assert tray.shown_state is State.ERROR
    assert tray.icon.icon().cacheKey() == state_icon(State.ERROR).cacheKey()
    tip = tray.icon.toolTip()
    assert "tray-proxy: Error" in tip and "relay.port" in tip, tip
    # The window's Overview.
    qtbot.waitUntil(lambda: window.state_label.text() == "Error", timeout=2000)
    message = window.message_label.text()
    assert str(path) in message and "relay.port" in message
    assert "Switch on" in message  # what to do, named as the menu and the button name it
    errors = window.overview.errors
    assert any("relay.port" in errors.item(i).text() for i in range(errors.count()))
    # `tray-proxy status` (the control socket's answer).
    answer = asyncio.run(
        answer_command(controller, "status", instance=INSTANCE_TRAY, quit=lambda: None)
    )
    status = answer["status"]
    assert status["state"] == "error"
    assert [e["text"] for e in status["last_errors"]] == [message]
    # And once, as a desktop notification from the tray.
    shown: list[str] = []
    tray.icon.showMessage = lambda title, *_rest: shown.append(title)  # type: ignore[method-assign]
    controller.report_start_problems()
    controller.report_start_problems()
    qtbot.waitUntil(lambda: shown == ["Settings file not usable"], timeout=2000)
    tray.hide()


def test_without_a_tray_the_window_says_it(qtbot: QtBot, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BROKEN, encoding="utf-8")
    controller = ProxyController(ConfigFile(path), FakeRelayFactory(Log()), None)
    services = AppServices(controller, Autostart(config_home=tmp_path), asyncio.Event())
    bridge = UiBridge(interval_ms=10)
    # Closing it at the test's end must not ask whether to keep running.
    window = MainWindow(
        services,
        bridge,
        tray_available=False,
        ask_close=lambda _w: CloseChoice.BACKGROUND,
        credentials=fake_credentials(),
    )
    qtbot.addWidget(window)
    bridge.attach(controller)
    controller.report_start_problems()
    qtbot.waitUntil(lambda: "relay.port" in window.notice_label.text(), timeout=2000)
    assert window.notice_label.text().startswith("Settings file not usable: ")


def test_switching_on_after_the_file_was_fixed_works(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BROKEN, encoding="utf-8")
    controller = ProxyController(ConfigFile(path), FakeRelayFactory(Log()), None)
    assert controller.state is State.ERROR
    path.write_text(BROKEN.replace('"abc"', "12080"), encoding="utf-8")

    async def scenario() -> State:
        status = await controller.enable()
        await controller.shutdown()
        return status.state

    assert asyncio.run(scenario()) is State.ON


# --------------------------------------------------------------------------- bug 6

SOURCES = Path(__file__).resolve().parents[2] / "tray_proxy"
# "Open Credentials", "choose Switch on", "its menu's Quit", "in Settings", "use Test now":
# a verb the user acts on, then a capitalised name.
_REFERENCE = re.compile(
    r"\b(?:[Oo]pen|[Cc]hoose|[Cc]lick|[Pp]ress|[Uu]se|menu's|[Ii]n|on the) "
    r"([A-Z][\w…]*(?: (?:on|off|connection|diagnostics|at login|window|now|selected|rows|"
    r"details|all filtered))?)"
)
_COMMAND = re.compile(r"`tray-proxy ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")
# Capitalised words after those verbs that are not controls of ours: other programs, their
# settings, protocols, places.
NOT_CONTROLS = frozenset(
    {
        "CONNECT", "Windows", "WSL", "Docker", "KeePassXC", "Secret", "GNOME", "D-Bus",
        "JSON", "HTTP", "HTTPS", "SOCKS5", "TLS", "PAC", "NAT", "CA", "TOML", "SQLite",
        "Kerberos", "NTLM", "Digest", "Negotiate", "IPv6", "IPv4", "Qt", "GUI", "CLI", "UI",
        "KDC", "API", "RFC", "UTF", "X", "X11", "C", "I", "D", "SQL", "TCP", "DNS", "WHERE",
        "TIME_WAIT", "SYN", "CPU", "GIL", "XDG", "Task", "Linux", "Debian", "Ubuntu",
        "Squid", "Dante", "PySide6", "Python", "Settings > Resources",
    }
)  # fmt: skip


def _messages() -> list[tuple[str, int, str]]:
    """Every string literal in tray_proxy that is not a docstring (f-strings joined, with
    "{}" for what is filled in): what the user may read."""
    found: list[tuple[str, int, str]] = []
    for path in sorted(SOURCES.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip: set[int] = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                first = body[0] if body else None
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    skip.add(id(first.value))
            if isinstance(node, ast.JoinedStr):
                skip.update(id(v) for v in node.values)
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(
                    str(v.value) if isinstance(v, ast.Constant) else "{}" for v in node.values
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) in skip:
                    continue
                text = node.value
            else:
                continue
            found.append((str(path.relative_to(SOURCES.parent)), node.lineno, text))
    return found


def _control_names(qtbot: QtBot, tmp_path: Path) -> set[str]:
    """What the user can find: the tray menu's entries in every state, the window's tabs,
    buttons and group titles, the credentials dialog's buttons and choices."""
    from PySide6.QtWidgets import QGroupBox, QMenu, QPushButton

    from tests.ui.conftest import FakeServices, make_status
    from tray_proxy.ui.credentials_dialog import KINDS, NEW_PROXY, SCHEMES, CredentialsDialog
    from tray_proxy.ui.menu import MenuBuilder

    names: set[str] = set()

    def add(text: str) -> None:
        text = text.replace("&", "").removesuffix("…").strip()
        names.add(re.sub(r" \(\d+\)$", "", text))  # "Active (3)"

    services = FakeServices()
    for state in State:
        services.current = make_status(state)
        menu = QMenu()
        MenuBuilder(
            services, show_window=lambda: None, open_credentials=lambda: None,
            report_error=lambda _t, _x: None,
        ).rebuild(menu)  # fmt: skip
        stack = [menu]
        while stack:
            current = stack.pop()
            for action in current.actions():
                add(action.text())
                sub = action.menu()
                if isinstance(sub, QMenu):
                    stack.append(sub)
        menu.deleteLater()
    window = MainWindow(
        services, UiBridge(interval_ms=10), tray_available=True, credentials=fake_credentials()
    )
    qtbot.addWidget(window)
    add("Menu")
    for i in range(window.tabs.count()):
        add(window.tabs.tabText(i))
    for button in window.findChildren(QPushButton):
        add(button.text())
    for box in window.findChildren(QGroupBox):
        add(box.title())
    add(CredentialsDialog.__name__.removesuffix("Dialog"))  # its window: "Credentials…"
    for _value, text in (*KINDS, *SCHEMES):
        add(text)
    add(NEW_PROXY)
    for text in ("&Test", "&Save", "Cancel"):  # the dialog's buttons
        add(text)
    return names


def _cli_commands() -> dict[str, set[str]]:
    import argparse

    from tray_proxy.cli import build_parser

    def choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {name: set(choices(sub)) for name, sub in choices(build_parser()).items()}


def test_messages_name_only_controls_and_commands_that_exist(qtbot: QtBot, tmp_path: Path) -> None:
    """Issue 14 bug 6: "Check the proxy name in Settings" named a window that does not
    exist. Every control or command a message tells the user to use must be there."""
    controls = _control_names(qtbot, tmp_path)
    commands = _cli_commands()
    wrong: list[str] = []
    for where, line, text in _messages():
        for match in _REFERENCE.finditer(text):
            name = match.group(1).removesuffix("…")
            if name in NOT_CONTROLS or name.split()[0] in NOT_CONTROLS:
                continue
            if not any(c == name or c.startswith(name + " ") for c in controls):
                wrong.append(f"{where}:{line}: {name!r} in {text!r}")
        for match in _COMMAND.finditer(text):
            command, action = match.group(1), match.group(2)
            if command not in commands:
                wrong.append(f"{where}:{line}: `tray-proxy {command}` in {text!r}")
            elif commands[command] and action and action not in commands[command]:
                wrong.append(f"{where}:{line}: `tray-proxy {command} {action}` in {text!r}")
    assert not wrong, "messages name controls or commands that do not exist:\n" + "\n".join(wrong)
