"""The actions of the tray menu, built from a Status snapshot each time the menu opens.

Shared by the tray icon and the main window (its "Menu" button), so both offer the same
controls. Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtGui import QAction, QActionGroup, QGuiApplication
from PySide6.QtWidgets import QMenu

from tray_proxy.controller import State, Status, UpstreamInfo
from tray_proxy.ui.format import fmt_latency
from tray_proxy.ui.icons import state_icon
from tray_proxy.ui.services import AppServices


def toggle_text(state: State) -> str:
    if state is State.ENABLING:
        return "Cancel switching on"
    if state in (State.OFF, State.ERROR):
        return "Switch on"
    return "Switch off"


def upstream_text(u: UpstreamInfo) -> str:
    # With spare connections a handshake can take well under a millisecond: "0.4 ms", not "0 ms".
    latency = "no handshake yet" if u.latency is None else fmt_latency(u.latency)
    failing = ", failing" if u.failing else ""
    return f"{u.name} ({latency}{failing})"


def summary_text(status: Status) -> str:
    text = f"tray-proxy: {status.state.label}"
    if status.state.redirecting:
        n = status.active_connections
        text += f", {n} connection{'s' if n != 1 else ''}"
    return text


class MenuBuilder:
    """Fills a QMenu from the services' current Status (call `rebuild` on aboutToShow)."""

    def __init__(
        self,
        services: AppServices,
        *,
        show_window: Callable[[], None] | None,
        open_credentials: Callable[[], None],
        report_error: Callable[[str, str], None],
    ) -> None:
        self._services = services
        self._show_window = show_window
        self._open_credentials = open_credentials
        self._report_error = report_error

    def rebuild(self, menu: QMenu) -> None:
        # clear() deletes the actions the menu owns; submenus are QMenus owned by `menu`
        # and would pile up, so they are deleted explicitly.
        for sub in menu.findChildren(QMenu):
            sub.deleteLater()
        for group in menu.findChildren(QActionGroup):
            group.deleteLater()
        menu.clear()
        status = self._services.status()

        header = menu.addAction(state_icon(status.state), summary_text(status))
        header.setEnabled(False)
        header.setObjectName("summary")

        toggle = menu.addAction(toggle_text(status.state))
        toggle.setObjectName("toggle")
        toggle.setEnabled(status.state is not State.DISABLING)
        if status.state in (State.OFF, State.ERROR):
            toggle.triggered.connect(self._services.enable)
        else:
            toggle.triggered.connect(self._services.disable)

        upstreams = menu.addMenu("Proxy")
        upstreams.menuAction().setObjectName("upstreams")
        if not status.upstreams:
            none = upstreams.addAction("No proxy set up")
            none.setEnabled(False)
        group = QActionGroup(menu)
        group.setExclusive(True)
        for u in status.upstreams:
            action = QAction(upstream_text(u), group)
            action.setCheckable(True)
            action.setChecked(u.active)
            action.setObjectName(f"upstream:{u.name}")
            action.setToolTip(u.url)
            action.triggered.connect(lambda _=False, n=u.name: self._services.select_upstream(n))
            upstreams.addAction(action)

        menu.addSeparator()
        if self._show_window is not None:
            menu.addAction("Open window").triggered.connect(self._show_window)
        menu.addAction("Credentials…").triggered.connect(self._open_credentials)
        menu.addAction("Test connection").triggered.connect(self._services.test_connection)
        menu.addAction("Copy diagnostics").triggered.connect(self.copy_diagnostics)
        autostart = menu.addAction("Start at login")
        autostart.setObjectName("autostart")
        autostart.setCheckable(True)
        autostart.setChecked(self._services.autostart_enabled())
        autostart.toggled.connect(self.set_autostart)
        menu.addSeparator()
        menu.addAction("Quit").triggered.connect(self._services.quit)

    def copy_diagnostics(self) -> None:
        QGuiApplication.clipboard().setText(self._services.diagnostics())

    def set_autostart(self, enabled: bool) -> None:
        try:
            self._services.set_autostart(enabled)
        except OSError as exc:
            what = "turn on" if enabled else "turn off"
            self._report_error(
                "Start at login",
                f"Could not {what} start at login: {exc.strerror or exc} ({exc.filename}). "
                "Check that your ~/.config/autostart directory is writable.",
            )


def find_action(menu: QMenu, name: str) -> QAction | None:
    """The action named `name` in `menu` or its submenus (tests and accessibility)."""
    for action in menu.actions():
        if action.objectName() == name:
            return action
        sub = action.menu()
        if isinstance(sub, QMenu):
            found = find_action(sub, name)
            if found is not None:
                return found
    return None
