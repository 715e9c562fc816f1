"""The setup window: the first-run steps of `tray-proxy setup` in a window, opened by the app
on its first start (no settings file, or no upstream in it) instead of a bare "No proxy set
up".

It shows what was found and where (environment, Windows' settings on WSL) before anything is
used, prefills the proxy URL, a name from its host, the user name and the test target; the
user adds the password, presses Test (a real CONNECT through the proxy, reported in words
that name the target and tell "the proxy answered (407) in 3 ms" from "no answer from the
target") and Save (the password into the keyring, then the settings file).

The work is done by an injected `SetupSteps` (setup_flow.SetupService in the app): this
module does no keyring, file or socket I/O itself. Slow steps run as tasks on the app's
asyncio loop (qasync); the buttons say what runs and cannot start it twice.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from tray_proxy.errors import UserError
from tray_proxy.relay.secrets import Secret
from tray_proxy.setup_flow import (
    CheckedAnswers,
    Prefill,
    SetupAnswers,
    TestReport,
    advice,
    describe_discovery,
)
from tray_proxy.tasks import spawn
from tray_proxy.ui.credentials_dialog import ResultBox

log = logging.getLogger(__name__)

__all__ = ["SetupSteps", "SetupWindow"]

TARGET_CONTROL = "Test target"
NOTE_STYLE = "color: palette(mid);"
ERROR_STYLE = "color: #b3261e;"


class SetupSteps(Protocol):
    """What the window asks of the app (setup_flow.SetupService)."""

    @property
    def config_path(self) -> Path: ...

    async def prefill(self) -> Prefill:
        """Look for the proxy (off the UI thread) and return the starting values."""
        ...

    def check(self, answers: SetupAnswers) -> CheckedAnswers:
        """Raises setup_flow.SetupError, whose text is for the user."""
        ...

    async def test(self, checked: CheckedAnswers) -> TestReport: ...

    async def save(self, checked: CheckedAnswers) -> list[str]:
        """Raises setup_flow.SetupFailed (keyring, settings file), text for the user."""
        ...


class SetupWindow(QDialog):
    """Set up the proxy: found settings, the form, Test and Save. `saved(name)` is emitted
    after a successful Save; the window then says what to do next and stays until closed.

    Needs a running asyncio loop when created: it starts looking for the proxy at once.
    """

    saved = Signal(str)

    def __init__(self, steps: SetupSteps, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._steps = steps
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running: str | None = None  # "look", "test" or "save"
        self._broken = False  # the settings file cannot be read: Save stays off
        self.prefilled: Prefill | None = None
        self.last_report: TestReport | None = None
        self.done_lines: list[str] = []

        self.setWindowTitle("Set up tray-proxy")
        self.setObjectName("setup-window")
        self.setMinimumWidth(560)

        intro = QLabel(
            "tray-proxy sends every program's web traffic through your company's proxy. "
            "Tell it which proxy and your login: <b>Test</b> tries them for real, <b>Save</b> "
            "keeps the password in the keyring and the rest in the settings file."
        )
        intro.setWordWrap(True)
        self.found_label = QLabel("Looking for proxy settings…")
        self.found_label.setObjectName("found")
        self.found_label.setWordWrap(True)
        self.found_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        found_box = QFrame()
        found_box.setFrameShape(QFrame.Shape.StyledPanel)
        found_layout = QVBoxLayout(found_box)
        found_layout.addWidget(QLabel("<b>Found on this machine</b>"))
        found_layout.addWidget(self.found_label)

        self.proxy_edit = self._edit("proxy", "http://proxy.corp.example:8080")
        self.name_edit = self._edit("name", "a short name, like corp")
        self.user_edit = self._edit("username", "leave empty if the proxy needs no login")
        self.password_edit = self._edit("password", "")
        self.password_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.target_edit = self._edit("target", "a site the proxy allows, HOST:443")
        self.pac_label = QLabel()
        self.pac_label.setObjectName("pac")
        self.pac_label.setWordWrap(True)
        self.pac_label.setStyleSheet(NOTE_STYLE)
        self.pac_label.hide()

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for text, edit in (
            ("&Proxy URL:", self.proxy_edit),
            ("&Name:", self.name_edit),
            ("&User name:", self.user_edit),
            ("Pass&word:", self.password_edit),
            ("Test tar&get:", self.target_edit),
        ):
            label = QLabel(text)
            label.setBuddy(edit)
            form.addRow(label, edit)
        form.addRow("", self.pac_label)

        self.result_box = ResultBox()
        self.result_icon = self.result_box.icon
        self.result_label = self.result_box.label

        self.where_label = QLabel(f"Settings file: {steps.config_path}")
        self.where_label.setObjectName("settings-file")
        self.where_label.setStyleSheet(NOTE_STYLE)
        self.where_label.setWordWrap(True)

        self.test_button = QPushButton("&Test")
        self.test_button.setObjectName("test")
        self.test_button.clicked.connect(self.start_test)
        self.save_button = QPushButton("&Save")
        self.save_button.setObjectName("save")
        self.save_button.setDefault(True)
        self.save_button.clicked.connect(self.start_save)
        self.close_button = QPushButton("&Close")
        self.close_button.setObjectName("close")
        self.close_button.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.test_button)
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.close_button)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(found_box)
        layout.addLayout(form)
        layout.addWidget(self.result_box)
        layout.addWidget(self.where_label)
        layout.addLayout(buttons)

        self.proxy_edit.textEdited.connect(self._proxy_edited)
        self._name_from_user = False
        self.name_edit.textEdited.connect(self._name_edited)
        self._run("look", self._look())

    def _edit(self, name: str, placeholder: str) -> QLineEdit:
        edit = QLineEdit()
        edit.setObjectName(name)
        edit.setPlaceholderText(placeholder)
        return edit

    # -- tasks ----------------------------------------------------------------------------

    def _run(self, what: str, coro: Coroutine[Any, Any, None]) -> None:
        self._running = what
        task = spawn(coro, name=f"setup window: {what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        self._update_buttons()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._running = None
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())
            self.show_message(f"That failed unexpectedly ({task.exception()}); see the log.")
        self._update_buttons()

    def done(self, result: int) -> None:  # closing in any way (Close, Esc, the X)
        for task in list(self._tasks):
            task.cancel()
        super().done(result)

    @property
    def busy(self) -> bool:
        """Is a step still running (tests wait for this to become False)?"""
        return any(not t.done() for t in self._tasks)

    def _update_buttons(self) -> None:
        idle = self._running is None
        self.test_button.setEnabled(idle)
        self.save_button.setEnabled(idle and not self._broken)
        self.test_button.setText("Testing…" if self._running == "test" else "&Test")
        self.save_button.setText("Saving…" if self._running == "save" else "&Save")

    # -- 1. what was found ----------------------------------------------------------------

    async def _look(self) -> None:
        try:
            prefill = await self._steps.prefill()
        except UserError as exc:  # a broken settings file: say so, change nothing
            self.found_label.setText("")
            self.show_message(str(exc), error=True)
            self._broken = True
            return
        self.fill(prefill)

    def fill(self, prefill: Prefill) -> None:
        self.prefilled = prefill
        lines = [line.strip() for line in describe_discovery(prefill.discovery)]
        self.found_label.setText("\n".join(lines))
        # Only empty fields: what the user typed while we looked stays.
        for edit, value in (
            (self.proxy_edit, prefill.proxy_url),
            (self.name_edit, prefill.name),
            (self.user_edit, prefill.username),
            (self.target_edit, prefill.target),
        ):
            if not edit.text():
                edit.setText(value)
        if prefill.pac_url:
            self.pac_label.setText(
                f"A proxy auto-config (PAC) script was found: {prefill.pac_url}. It is kept "
                "in the settings for host-name routing."
            )
            self.pac_label.show()

    def _proxy_edited(self, text: str) -> None:
        if self._name_from_user:
            return
        from tray_proxy.setup_flow import host_of, suggest_name

        url = text.strip()
        if url:
            self.name_edit.setText(suggest_name(host_of(url if "://" in url else f"http://{url}")))

    def _name_edited(self, _text: str) -> None:
        self._name_from_user = True

    # -- 2. Test --------------------------------------------------------------------------

    def answers(self) -> SetupAnswers:
        password = self.password_edit.text()
        return SetupAnswers(
            proxy_url=self.proxy_edit.text(),
            name=self.name_edit.text(),
            username=self.user_edit.text(),
            password=Secret(password) if password else None,
            target=self.target_edit.text(),
            pac_url=self.prefilled.pac_url if self.prefilled is not None else None,
        )

    def _checked(self) -> CheckedAnswers | None:
        try:
            return self._steps.check(self.answers())
        except UserError as exc:
            self.show_message(_sentence(str(exc)), error=True)
            return None

    def start_test(self) -> None:
        """The Test button: one real handshake through the proxy to the test target."""
        if self._running is not None:
            return
        checked = self._checked()
        if checked is not None:
            self.result_box.hide()
            self._run("test", self._test(checked))

    async def _test(self, checked: CheckedAnswers) -> None:
        self.show_report(await self._steps.test(checked))

    def show_report(self, report: TestReport) -> None:
        self.last_report = report
        text = report.text
        if not report.ok:
            text += " " + advice(report.result, TARGET_CONTROL)
        self.show_message(text, error=not report.ok, ok=report.ok)

    # -- 3. Save --------------------------------------------------------------------------

    def start_save(self) -> None:
        """The Save button (and Enter): test, and only when the test worked, save."""
        if self._running is not None:
            return
        checked = self._checked()
        if checked is not None:
            self._run("save", self._save(checked))

    async def _save(self, checked: CheckedAnswers) -> None:
        report = await self._steps.test(checked)
        if not report.ok:
            self.show_report(report)
            return
        try:
            self.done_lines = await self._steps.save(checked)
        except UserError as exc:
            self.show_message(_sentence(f"Not saved: {exc}"), error=True)
            return
        self.password_edit.clear()
        name = checked.upstream.name
        self.show_message(
            f"{report.text} Saved: proxy {name} is set up. Choose Switch on (in the tray menu, "
            "or on the Overview tab of the window) to send traffic through it.",
            ok=True,
        )
        self.close_button.setText("&Close")
        self.saved.emit(name)

    # -- messages -------------------------------------------------------------------------

    def show_message(self, text: str, *, error: bool = False, ok: bool = False) -> None:
        self.result_label.setStyleSheet(ERROR_STYLE if error else "")
        icon = (
            QStyle.StandardPixmap.SP_DialogApplyButton
            if ok
            else QStyle.StandardPixmap.SP_MessageBoxWarning
        )
        self.result_box.say(text, icon)


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
