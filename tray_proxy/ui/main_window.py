"""The small main window: state, on/off, proxy, open connections, last errors, actions.

It is also the whole UI when there is no system tray. Closing it then asks whether to keep
running in the background (the redirect stays as it is; `tray-proxy` brings the window back)
or to quit. The question goes through `ask_close`, so tests can answer it.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMenu,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from tray_proxy.controller import Notice, State, Status
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.credentials_dialog import CredentialsDialog
from tray_proxy.ui.icons import app_icon, state_icon
from tray_proxy.ui.menu import MenuBuilder, toggle_text, upstream_text
from tray_proxy.ui.services import AppServices, CredentialsServices

CREDENTIALS_PLACEHOLDER = (
    "Entering proxy passwords in the app arrives in a later version of tray-proxy.\n\n"
    "Until then the relay uses passwords given as systemd credentials "
    "($CREDENTIALS_DIRECTORY/<proxy name>), as `tray-proxy run` does."
)


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
        ask_close: Callable[[QWidget], CloseChoice] = ask_close_dialog,
        credentials: CredentialsServices | None = None,
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

        self.state_icon = QLabel()
        self.state_label = QLabel()
        self.state_label.setObjectName("state")
        font = self.state_label.font()
        font.setPointSizeF(font.pointSizeF() * 1.4)
        font.setBold(True)
        self.state_label.setFont(font)
        self.message_label = QLabel()
        self.message_label.setWordWrap(True)
        self.message_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.toggle_button = QPushButton()
        self.toggle_button.setObjectName("toggle")
        self.toggle_button.clicked.connect(self._toggle)

        head_text = QVBoxLayout()
        head_text.addWidget(self.state_label)
        head_text.addWidget(self.message_label)
        head = QHBoxLayout()
        head.addWidget(self.state_icon, 0, Qt.AlignmentFlag.AlignTop)
        head.addLayout(head_text, 1)
        head.addWidget(self.toggle_button, 0, Qt.AlignmentFlag.AlignTop)

        self.upstream_combo = QComboBox()
        self.upstream_combo.setObjectName("upstream")
        self.upstream_combo.activated.connect(self._upstream_chosen)
        self.address_label = QLabel()
        self.address_label.setObjectName("address")
        self.address_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.connections_label = QLabel("0")
        self.connections_label.setObjectName("connections")
        form = QFormLayout()
        form.addRow("Proxy:", self.upstream_combo)
        form.addRow("Proxy address:", self.address_label)
        form.addRow("Open connections:", self.connections_label)

        self.errors = QListWidget()
        self.errors.setObjectName("errors")
        self.errors.setWordWrap(True)
        self.errors.setMinimumHeight(70)
        errors_box = QGroupBox("Last errors")
        errors_layout = QVBoxLayout(errors_box)
        errors_layout.addWidget(self.errors)

        self.notice_label = QLabel()
        self.notice_label.setObjectName("notice")
        self.notice_label.setWordWrap(True)
        self.notice_label.hide()

        self.builder = MenuBuilder(
            services,
            show_window=None,
            open_credentials=self.open_credentials,
            report_error=self.report_error,
        )
        self.test_button = QPushButton("Test connection")
        self.test_button.clicked.connect(services.test_connection)
        self.copy_button = QPushButton("Copy diagnostics")
        self.copy_button.clicked.connect(self.builder.copy_diagnostics)
        self.credentials_button = QPushButton("Credentials…")
        self.credentials_button.clicked.connect(self.open_credentials)
        actions = QHBoxLayout()
        actions.addWidget(self.test_button)
        actions.addWidget(self.copy_button)
        actions.addWidget(self.credentials_button)
        actions.addStretch(1)

        self.autostart_box = QCheckBox("Start at login")
        self.autostart_box.setObjectName("autostart")
        self.autostart_box.setChecked(services.autostart_enabled())
        self.autostart_box.toggled.connect(self._autostart_toggled)
        self.menu = QMenu(self)
        self.menu.aboutToShow.connect(lambda: self.builder.rebuild(self.menu))
        self.menu_button = QPushButton("Menu")
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
        layout.addLayout(head)
        layout.addLayout(form)
        layout.addWidget(errors_box, 1)
        layout.addWidget(self.notice_label)
        layout.addLayout(actions)
        layout.addLayout(bottom)
        self.resize(500, 340)

        bridge.statusChanged.connect(self.show_status)
        bridge.notice.connect(self.show_notice)
        self.show_status(services.status())

    # -- showing state --------------------------------------------------------------------

    def show_status(self, status: Status) -> None:
        self.state_icon.setPixmap(state_icon(status.state).pixmap(48, 48))
        self.state_label.setText(status.state.label)
        self.message_label.setText(status.message)
        self.toggle_button.setText(toggle_text(status.state))
        self.toggle_button.setEnabled(status.state is not State.DISABLING)
        self.connections_label.setText(str(status.active_connections))

        combo = self.upstream_combo
        combo.blockSignals(True)
        combo.clear()
        for u in status.upstreams:
            combo.addItem(upstream_text(u), u.name)
            combo.setItemData(combo.count() - 1, u.url, Qt.ItemDataRole.ToolTipRole)
            if u.active:
                combo.setCurrentIndex(combo.count() - 1)
        active = next((u for u in status.upstreams if u.active), None)
        self.address_label.setText(active.url if active is not None else "-")
        if not status.upstreams:
            combo.addItem("No proxy set up (see docs/config.md)")
        combo.setEnabled(bool(status.upstreams) and status.state is not State.DISABLING)
        combo.blockSignals(False)

        self.errors.clear()
        for entry in reversed(status.last_errors):
            stamp = time.strftime("%H:%M:%S", time.localtime(entry.at))
            self.errors.addItem(f"{stamp}  {entry.display}")
        if not status.last_errors:
            self.errors.addItem("No errors.")

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

    def _toggle(self) -> None:
        self._services.toggle()

    def _upstream_chosen(self, index: int) -> None:
        name = self.upstream_combo.itemData(index)
        if isinstance(name, str):
            self._services.select_upstream(name)

    def _autostart_toggled(self, enabled: bool) -> None:
        self.builder.set_autostart(enabled)
        self.autostart_box.blockSignals(True)
        self.autostart_box.setChecked(self._services.autostart_enabled())
        self.autostart_box.blockSignals(False)

    def open_credentials(self) -> None:
        if self._credentials is None:
            QMessageBox.information(self, "Credentials", CREDENTIALS_PLACEHOLDER)
            return
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
