"""The tray icon: one icon per state, a tooltip, a left click that toggles, and the menu.

The menu is rebuilt each time it opens (aboutToShow), from the newest Status, so it never
shows stale latencies. Notifications are rate-limited by the controller. Must not import
keyring, socket or subprocess.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from tray_proxy.controller import Notice, NoticeKind, State, Status
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.icons import state_icon
from tray_proxy.ui.menu import MenuBuilder
from tray_proxy.ui.services import AppServices

NOTICE_MS = 8000
_WARNINGS = frozenset(
    {
        NoticeKind.CREDENTIALS_REJECTED,
        NoticeKind.UPSTREAM_DOWN,
        NoticeKind.HELPER_REFUSED,
        NoticeKind.HELPER_STOPPED,
        NoticeKind.KEYRING_UNAVAILABLE,
        NoticeKind.HISTORY_FAILED,
        NoticeKind.SETTINGS_INVALID,
        NoticeKind.OFF_NETWORK,
        NoticeKind.ROUTING_FAILED,
    }
)


TOOLTIP_ERROR_CHARS = 400


def tooltip_text(status: Status) -> str:
    lines = [f"tray-proxy: {status.state.label}"]
    if status.upstream is not None:
        lines.append(f"Proxy: {status.upstream}")
    else:
        lines.append("Proxy: none set up")
    if status.routing:
        # Off the corporate network: say so before anything else (issue 15 section 5).
        lines.append(f"Routing: {status.routing}")
    if status.state.redirecting:
        n = status.active_connections
        lines.append(f"{n} open connection{'s' if n != 1 else ''}")
    if status.last_error:
        # Long enough for a settings file's path, its field and what is wrong (issue 14
        # bug 5), wrapped: a tooltip does not wrap by itself.
        error = status.last_error
        if len(error) > TOOLTIP_ERROR_CHARS:
            error = error[: TOOLTIP_ERROR_CHARS - 3] + "..."
        lines.append(textwrap.fill(f"Last error: {error}", 80, break_long_words=False))
    return "\n".join(lines)


class Tray(QObject):
    def __init__(
        self,
        services: AppServices,
        bridge: UiBridge,
        *,
        show_window: Callable[[], None],
        open_credentials: Callable[[], None],
        report_error: Callable[[str, str], None],
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._services = services
        self.icon = QSystemTrayIcon(state_icon(State.OFF), self)
        self.menu = QMenu()
        self.menu.setObjectName("tray-menu")
        self.builder = MenuBuilder(
            services,
            show_window=show_window,
            open_credentials=open_credentials,
            report_error=report_error,
        )
        self.menu.aboutToShow.connect(self.rebuild_menu)
        self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._activated)
        bridge.statusChanged.connect(self.show_status)
        bridge.notice.connect(self.show_notice)
        self.shown_state: State | None = None
        self.show_status(services.status())
        # Some tray hosts never emit aboutToShow before the first popup; build it now too.
        self.rebuild_menu()

    def show(self) -> None:
        self.icon.show()

    def hide(self) -> None:
        self.icon.hide()

    def rebuild_menu(self) -> None:
        self.builder.rebuild(self.menu)

    def show_status(self, status: Status) -> None:
        if status.state is not self.shown_state:
            self.icon.setIcon(state_icon(status.state))
            self.shown_state = status.state
        self.icon.setToolTip(tooltip_text(status))

    def show_notice(self, notice: Notice) -> None:
        if not QSystemTrayIcon.supportsMessages():
            return
        kind = (
            QSystemTrayIcon.MessageIcon.Warning
            if notice.kind in _WARNINGS
            else QSystemTrayIcon.MessageIcon.Information
        )
        self.icon.showMessage(notice.title, notice.text, kind, NOTICE_MS)

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason == QSystemTrayIcon.ActivationReason.Trigger:
            self._services.toggle()
