"""The dashboard window: tabs Overview (state, on/off, proxy, traffic, errors in words,
actions), Connections (live tables), Upstreams (health and latency per proxy) and Log (the
connection history), with Start at login, the menu and Quit below them.

It is also the whole UI when there is no system tray. Closing it then asks whether to keep
running in the background (the redirect stays as it is; `tray-proxy` brings the window back)
or to quit. The question goes through `ask_close`, so tests can answer it.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QMenu,
    QMessageBox,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from tray_proxy.controller import Notice, Status
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.credentials_dialog import CredentialsDialog
from tray_proxy.ui.dashboard.connections import ConnectionsTab
from tray_proxy.ui.dashboard.log import ChooseExportPath, LogTab, ask_export_path
from tray_proxy.ui.dashboard.overview import OverviewTab
from tray_proxy.ui.dashboard.upstreams import UpstreamsTab
from tray_proxy.ui.icons import app_icon
from tray_proxy.ui.menu import MenuBuilder
from tray_proxy.ui.models.connections import DEFAULT_CLOSED_CAP
from tray_proxy.ui.services import AppServices, CredentialsServices


class CloseChoice(enum.Enum):
    BACKGROUND = "background"
    QUIT = "quit"
    CANCEL = "cancel"


def ask_close_dialog(parent: QWidget) -> CloseChoice:
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Close tray-proxy")
    box.setText("No system tray is available. Keep tray-proxy running in the background?")
    box.setInformativeText(
        "In the background the redirect stays as it is; run tray-proxy again to bring this "
        "window back. Quit switches the redirect off."
    )
    keep = box.addButton("Keep running", QMessageBox.ButtonRole.AcceptRole)
    quit_button = box.addButton("Quit", QMessageBox.ButtonRole.DestructiveRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(keep)
    box.exec()
    clicked = box.clickedButton()
    if clicked is keep:
        return CloseChoice.BACKGROUND
    if clicked is quit_button:
        return CloseChoice.QUIT
    return CloseChoice.CANCEL


class MainWindow(QWidget):
    def __init__(
        self,
        services: AppServices,
        bridge: UiBridge,
        *,
        tray_available: bool,
        credentials: CredentialsServices,
        ask_close: Callable[[QWidget], CloseChoice] = ask_close_dialog,
        closed_cap: int = DEFAULT_CLOSED_CAP,
        choose_export_path: ChooseExportPath = ask_export_path,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._services = services
        self._credentials = credentials
        self.credentials_dialog: CredentialsDialog | None = None
        self._tray_available = tray_available
        self._ask_close = ask_close
        self._quitting = False
        self.setWindowTitle("tray-proxy")
        self.setWindowIcon(app_icon())
        self.setObjectName("main-window")

        self.builder = MenuBuilder(
            services,
            show_window=None,
            open_credentials=self.open_credentials,
            report_error=self.report_error,
        )
        self.overview = OverviewTab(
            services,
            copy_diagnostics=self.builder.copy_diagnostics,
            open_credentials=self.open_credentials,
        )
        self.connections = ConnectionsTab(services, closed_cap=closed_cap)
        self.upstreams = UpstreamsTab(services)
        self.log = LogTab(services, choose_export_path=choose_export_path)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("tabs")
        self.tabs.addTab(self.overview, "Overview")
        self.tabs.addTab(self.connections, "Connections")
        self.tabs.addTab(self.upstreams, "Upstreams")
        self.tabs.addTab(self.log, "Log")

        # The overview's controls under the names the window always had (tests, app.py).
        self.state_icon = self.overview.state_icon
        self.state_label = self.overview.state_label
        self.message_label = self.overview.message_label
        self.toggle_button = self.overview.toggle_button
        self.upstream_combo = self.overview.upstream_combo
        self.address_label = self.overview.address_label
        self.connections_label = self.overview.connections_label
        self.errors = self.overview.errors
        self.test_button = self.overview.test_button
        self.copy_button = self.overview.copy_button
        self.credentials_button = self.overview.credentials_button

        self.notice_label = QLabel()
        self.notice_label.setObjectName("notice")
        self.notice_label.setWordWrap(True)
        self.notice_label.hide()

        self.autostart_box = QCheckBox("Start at login")
        self.autostart_box.setObjectName("autostart")
        self.autostart_box.setChecked(services.autostart_enabled())
        self.autostart_box.toggled.connect(self._autostart_toggled)
        self.menu = QMenu(self)
        self.menu.aboutToShow.connect(lambda: self.builder.rebuild(self.menu))
        self.menu_button = QPushButton("Menu")
        self.menu_button.setObjectName("menu")
        self.menu_button.setMenu(self.menu)
        self.quit_button = QPushButton("Quit")
        self.quit_button.setObjectName("quit")
        self.quit_button.clicked.connect(services.quit)
        bottom = QHBoxLayout()
        bottom.addWidget(self.autostart_box)
        bottom.addStretch(1)
        bottom.addWidget(self.menu_button)
        bottom.addWidget(self.quit_button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.notice_label)
        layout.addLayout(bottom)
        self.resize(1000, 700)

        bridge.statusChanged.connect(self.show_status)
        bridge.notice.connect(self.show_notice)
        bridge.connectionsChanged.connect(self.connections.apply)
        self.show_status(services.status())

    # -- showing state --------------------------------------------------------------------

    def show_status(self, status: Status) -> None:
        self.overview.show_status(status)
        self.connections.show_status(status)
        self.upstreams.show_status(status)
        self.log.show_status(status)

    def show_notice(self, notice: Notice) -> None:
        # With a tray the tray shows notices as desktop notifications; without one, here.
        if self._tray_available:
            return
        self.notice_label.setText(f"{notice.title}: {notice.text}")
        self.notice_label.show()

    def show_and_raise(self) -> None:
        self.show()
        self.setWindowState(self.windowState() & ~Qt.WindowState.WindowMinimized)
        self.raise_()
        self.activateWindow()

    # -- actions --------------------------------------------------------------------------

    def _autostart_toggled(self, enabled: bool) -> None:
        self.builder.set_autostart(enabled)
        self.autostart_box.blockSignals(True)
        self.autostart_box.setChecked(self._services.autostart_enabled())
        self.autostart_box.blockSignals(False)

    def open_credentials(self) -> None:
        dialog = self.credentials_dialog
        if dialog is None:
            dialog = CredentialsDialog(
                self._credentials.store, self._credentials.editor, parent=self
            )
            # A window of its own: the main window may be hidden (tray mode).
            dialog.setWindowFlag(Qt.WindowType.Window, True)
            dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
            dialog.finished.connect(self._credentials_closed)
            self.credentials_dialog = dialog
        dialog.show()
        dialog.raise_()
        dialog.activateWindow()

    def _credentials_closed(self, _result: int) -> None:
        self.credentials_dialog = None

    def report_error(self, title: str, text: str) -> None:
        QMessageBox.warning(self, title, text)

    # -- closing --------------------------------------------------------------------------

    def close_for_quit(self) -> None:
        """Close without asking (the app is quitting)."""
        self._quitting = True
        self.close()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt's name
        if self._quitting or self._tray_available:
            # With a tray, closing only hides: the app lives on in the tray.
            event.accept()
            return
        choice = self._ask_close(self)
        if choice is CloseChoice.QUIT:
            event.accept()
            self._services.quit()
        elif choice is CloseChoice.BACKGROUND:
            event.accept()
        else:
            event.ignore()
