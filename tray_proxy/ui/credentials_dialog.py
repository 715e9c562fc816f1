"""The credentials dialog: one upstream proxy's address, login and password, tested and saved.

The user picks the upstream (or a new one), enters type, host, port, user name, password and
authentication scheme, presses Test (a real handshake through the proxy, reported in words)
and Save (the password into the keyring, the rest into the settings file). Validation is
inline, per field; the rules and the save order are the form model's (upstream_form.py), so
the dialog can never save something the settings file would refuse on the next start.

Everything slow runs as a task on the app's asyncio loop (qasync in the app) through the
injected services: the keyring in the store's worker thread, the probe as non-blocking
socket I/O, the settings file in an executor. The UI stays responsive; the buttons show
what is running and cannot start it twice. Failures are shown in the dialog in words, never
raised. The password lives in the line edit and, once read, only in a `Secret`.

Must not import keyring, socket or subprocess, nor the settings file's code (config, TOML).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
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
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy
from tray_proxy.setup_flow import suggest_name
from tray_proxy.tasks import spawn
from tray_proxy.ui.services import KeyringService, UpstreamEditor
from tray_proxy.upstream_form import FieldValues, full_stop, save_upstream, validate

log = logging.getLogger(__name__)

__all__ = ["CredentialsDialog", "FieldValues", "validate"]

NEW_PROXY = "New proxy…"
DEFAULT_PORTS = {UpstreamKind.HTTP: 8080, UpstreamKind.SOCKS5: 1080}
KINDS = ((UpstreamKind.HTTP, "HTTP (CONNECT)"), (UpstreamKind.SOCKS5, "SOCKS5"))
SCHEMES = (
    (AuthScheme.AUTO, "Automatic (the strongest the proxy offers)"),
    (AuthScheme.BASIC, "Basic"),
    (AuthScheme.DIGEST, "Digest"),
    (AuthScheme.NTLM, "NTLM"),
    (AuthScheme.NEGOTIATE, "Negotiate (Kerberos)"),
)
ERROR_STYLE = "color: #b3261e;"
NOTE_STYLE = "color: palette(mid);"

_HEADINGS = {
    ProbeOutcome.OK: ("The proxy works", ""),
    ProbeOutcome.AUTH_FAILED: ("Wrong user name or password", " Check both and test again."),
    ProbeOutcome.FORBIDDEN: ("Forbidden by the proxy", ""),
    ProbeOutcome.TIMEOUT: ("No answer", " Check the host, the port and your network."),
    ProbeOutcome.REFUSED: ("Connection refused", " Check the host and the port."),
    ProbeOutcome.UNREACHABLE: ("Not reachable", " Check the host and your network."),
    ProbeOutcome.PROTOCOL_ERROR: (
        "Not a working proxy",
        " Check the type and the port: tray-proxy speaks plain HTTP CONNECT or SOCKS5 to the "
        "proxy (a TLS port, https://, is not supported).",
    ),
}


# --------------------------------------------------------------------------- the dialog


class _Field(QWidget):
    """An input with its message line below it."""

    def __init__(self, editor: QWidget, extra: QWidget | None = None) -> None:
        super().__init__()
        self.editor = editor
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.hide()
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(editor)
        if extra is not None:
            row.addWidget(extra)
        if editor.maximumWidth() < 1000:
            row.addStretch(1)  # a narrow input (the port) stays at the left edge
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(row)
        layout.addWidget(self.message)

    def show_message(self, text: str | None, *, error: bool = True) -> None:
        if not text:
            self.message.clear()
            self.message.hide()
            return
        self.message.setStyleSheet(ERROR_STYLE if error else NOTE_STYLE)
        self.message.setText(text)
        self.message.show()


class ResultBox(QFrame):
    """The framed line under a form that says how a test or a save went: an icon beside
    text the user can select (and paste into a ticket). Hidden until it has something to
    say; the credentials dialog and the setup window both use it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.icon = QLabel()
        self.label = QLabel()
        self.label.setObjectName("result")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QHBoxLayout(self)
        layout.addWidget(self.icon, 0, Qt.AlignmentFlag.AlignTop)
        layout.addWidget(self.label, 1)
        self.hide()

    def say(self, text: str, icon: QStyle.StandardPixmap) -> None:
        self.label.setText(text)
        self.icon.setPixmap(self.style().standardIcon(icon).pixmap(24, 24))
        self.show()


class CredentialsDialog(QDialog):
    """Edit, test and save one upstream proxy and its password.

    Needs a running asyncio loop (qasync in the app) when created: it starts looking up the
    keyring backend at once. `saved(name)` is emitted after a successful Save.
    """

    saved = Signal(str)

    def __init__(
        self,
        store: KeyringService,
        editor: UpstreamEditor,
        *,
        upstream: str | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._store = store
        self._editor = editor
        self._tasks: set[asyncio.Task[Any]] = set()
        self._upstreams = {u.name: u for u in editor.upstreams()}
        self._stored: Credentials | None = None
        self._stored_for: str | None = None  # which upstream `_stored` belongs to
        self._lookup_generation = 0
        self._touched: set[str] = set()
        self._test_task: asyncio.Task[Any] | None = None
        self._test_started = 0.0
        self._saving = False
        self.errors: dict[str, str] = {}
        self.upstream: UpstreamProxy | None = None
        self.last_result: ProbeResult | None = None

        self.setWindowTitle("Proxy credentials")
        self.setObjectName("credentials-dialog")
        self.setMinimumWidth(480)

        self.proxy_combo = QComboBox()
        self.proxy_combo.setObjectName("proxy")
        for name in self._upstreams:
            self.proxy_combo.addItem(name, name)
        self.proxy_combo.addItem(NEW_PROXY, None)
        self.name_edit = QLineEdit()
        self.name_edit.setObjectName("name")
        self.name_edit.setPlaceholderText("a short name, like corp")
        self.kind_combo = QComboBox()
        self.kind_combo.setObjectName("kind")
        for kind, text in KINDS:
            self.kind_combo.addItem(text, kind)
        self.host_edit = QLineEdit()
        self.host_edit.setObjectName("host")
        self.host_edit.setPlaceholderText("proxy.example.com")
        self.port_edit = QLineEdit()
        self.port_edit.setObjectName("port")
        self.port_edit.setMaxLength(5)
        self.port_edit.setMaximumWidth(90)
        self.user_edit = QLineEdit()
        self.user_edit.setObjectName("username")
        self.user_edit.setPlaceholderText("leave empty if the proxy needs no login")
        self.password_edit = QLineEdit()
        self.password_edit.setObjectName("password")
        self.password_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.show_password = QCheckBox("Sh&ow")
        self.show_password.setObjectName("show-password")
        self.show_password.setToolTip("Show the password while typing it")
        self.auth_combo = QComboBox()
        self.auth_combo.setObjectName("auth")
        for scheme, text in SCHEMES:
            self.auth_combo.addItem(text, scheme)
        self.backend_label = QLabel("looking for the keyring…")
        self.backend_label.setObjectName("backend")
        self.backend_label.setWordWrap(True)
        self.backend_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.fields = {
            "name": _Field(self.name_edit),
            "host": _Field(self.host_edit),
            "port": _Field(self.port_edit),
            "username": _Field(self.user_edit),
            "password": _Field(self.password_edit, self.show_password),
        }
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self._add_row(form, "P&roxy:", self.proxy_combo, self.proxy_combo)
        self._add_row(form, "&Name:", self.fields["name"], self.name_edit)
        self._add_row(form, "T&ype:", self.kind_combo, self.kind_combo)
        self._add_row(form, "&Host:", self.fields["host"], self.host_edit)
        self._add_row(form, "&Port:", self.fields["port"], self.port_edit)
        self._add_row(form, "&User name:", self.fields["username"], self.user_edit)
        self._add_row(form, "Pass&word:", self.fields["password"], self.password_edit)
        self._add_row(form, "&Authentication:", self.auth_combo, self.auth_combo)
        self._add_row(form, "Keyring:", self.backend_label, None)

        self.result_box = ResultBox()
        self.result_icon = self.result_box.icon
        self.result_label = self.result_box.label

        self.test_button = QPushButton("&Test")
        self.test_button.setObjectName("test")
        self.test_button.setToolTip("Connect through the proxy once with these settings")
        self.save_button = QPushButton("&Save")
        self.save_button.setObjectName("save")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("cancel")
        # Enter must mean Save (and only when Save is enabled): a focused autoDefault
        # button would otherwise take Enter for itself.
        for button in (self.test_button, self.cancel_button):
            button.setAutoDefault(False)
        self.save_button.setAutoDefault(False)
        self.save_button.setDefault(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.test_button)
        buttons.addStretch(1)
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.cancel_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.result_box)
        layout.addStretch(1)
        layout.addLayout(buttons)

        order = [
            self.proxy_combo,
            self.name_edit,
            self.kind_combo,
            self.host_edit,
            self.port_edit,
            self.user_edit,
            self.password_edit,
            self.show_password,
            self.auth_combo,
            self.test_button,
            self.save_button,
            self.cancel_button,
        ]
        for first, second in zip(order, order[1:], strict=False):
            QWidget.setTabOrder(first, second)

        self._tick = QTimer(self)
        self._tick.setInterval(250)
        self._tick.timeout.connect(self._show_test_progress)

        self.proxy_combo.currentIndexChanged.connect(self._proxy_chosen)
        self.kind_combo.currentIndexChanged.connect(self._kind_changed)
        self.auth_combo.currentIndexChanged.connect(self._changed)
        for key, edit in (
            ("name", self.name_edit),
            ("host", self.host_edit),
            ("port", self.port_edit),
            ("username", self.user_edit),
            ("password", self.password_edit),
        ):
            edit.textEdited.connect(lambda _text, key=key: self._edited(key))
        self.show_password.toggled.connect(self._toggle_password)
        self.test_button.clicked.connect(self.start_test)
        self.save_button.clicked.connect(self.start_save)
        self.cancel_button.clicked.connect(self.reject)

        wanted = upstream if upstream in self._upstreams else editor.active_upstream()
        index = self.proxy_combo.findData(wanted) if wanted in self._upstreams else 0
        self.proxy_combo.setCurrentIndex(max(index, 0))
        self._load(self.proxy_combo.currentData())
        self._spawn(self._show_backend(), "keyring backend")

    @staticmethod
    def _add_row(form: QFormLayout, text: str, field: QWidget, buddy: QWidget | None) -> None:
        label = QLabel(text)
        if buddy is not None:
            label.setBuddy(buddy)
        form.addRow(label, field)

    # -- tasks ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = spawn(coro, name=f"credentials dialog: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    def done(self, result: int) -> None:  # closing in any way (Save, Cancel, Esc, the X)
        for task in list(self._tasks):
            task.cancel()
        self._tick.stop()
        super().done(result)

    @property
    def busy(self) -> bool:
        """Is anything still running (tests wait for this to become False)?"""
        return any(not t.done() for t in self._tasks)

    # -- filling in -----------------------------------------------------------------------

    def _load(self, name: str | None) -> None:
        """Show upstream `name` (None: a new one, with defaults)."""
        upstream = self._upstreams.get(name) if name is not None else None
        self._touched.clear()
        self._stored = None
        self._stored_for = None
        self.name_edit.setEnabled(upstream is None)
        if upstream is None:
            self.name_edit.setText(self._free_name())
            kind = UpstreamKind.HTTP
            self.host_edit.clear()
            self.port_edit.setText(str(DEFAULT_PORTS[kind]))
            self.user_edit.clear()
            auth = AuthScheme.AUTO
        else:
            self.name_edit.setText(upstream.name)
            kind = upstream.kind
            self.host_edit.setText(upstream.host)
            self.port_edit.setText(str(upstream.port))
            self.user_edit.setText(upstream.username or "")
            auth = upstream.auth
        self.kind_combo.blockSignals(True)
        self.kind_combo.setCurrentIndex(self.kind_combo.findData(kind))
        self.kind_combo.blockSignals(False)
        self.auth_combo.blockSignals(True)
        self.auth_combo.setCurrentIndex(self.auth_combo.findData(auth))
        self.auth_combo.blockSignals(False)
        self.password_edit.clear()
        self.password_edit.setPlaceholderText("")
        self._lookup_generation += 1
        if upstream is not None:
            self._spawn(self._lookup(upstream.name, self._lookup_generation), "stored password")
        self._changed()

    def _free_name(self, host: str = "") -> str:
        """A new proxy's name from its host ("corp" for proxy.corp.example), free in the
        settings; never "proxy" (messages would read "through proxy proxy", issue 14)."""
        base = suggest_name(host)
        name, n = base, 1
        while name in self._upstreams:
            n += 1
            name = f"{base}-{n}"
        return name

    def _proxy_chosen(self, _index: int) -> None:
        self._load(self.proxy_combo.currentData())

    def _kind_changed(self, _index: int) -> None:
        kind = self.kind_combo.currentData()
        # Follow the type with the port while the user has not chosen one.
        if self.port_edit.text() in {str(p) for p in DEFAULT_PORTS.values()} | {""}:
            self.port_edit.setText(str(DEFAULT_PORTS[kind]))
        self._changed()

    def _edited(self, key: str) -> None:
        self._touched.add(key)
        if key == "host" and "name" not in self._touched and self.name_edit.isEnabled():
            # A new proxy's name follows its host until the user types one.
            self.name_edit.setText(self._free_name(self.host_edit.text().strip()))
        self._changed()

    def _toggle_password(self, show: bool) -> None:
        mode = QLineEdit.EchoMode.Normal if show else QLineEdit.EchoMode.Password
        self.password_edit.setEchoMode(mode)

    def values(self) -> FieldValues:
        stored = self._stored
        return FieldValues(
            name=self.name_edit.text().strip(),
            kind=self.kind_combo.currentData(),
            host=self.host_edit.text().strip().removeprefix("[").removesuffix("]"),
            port=self.port_edit.text().strip(),
            username=self.user_edit.text().strip(),
            auth=self.auth_combo.currentData(),
            has_password=bool(self.password_edit.text()),
            new=self.proxy_combo.currentData() is None,
            taken_names=frozenset(self._upstreams),
            stored_username=stored.username if stored is not None else None,
        )

    def _changed(self, by_user: bool = True) -> None:
        """Re-validate after any change; after the user's, drop a test that no longer applies."""
        values = self.values()
        http = values.kind is UpstreamKind.HTTP
        self.auth_combo.setEnabled(http)
        if not http:
            self.auth_combo.blockSignals(True)
            self.auth_combo.setCurrentIndex(0)
            self.auth_combo.blockSignals(False)
        self.errors, self.upstream = validate(values)
        for key, field in self.fields.items():
            # A message for a field the user has not reached yet would only scold.
            shown = key in self._touched or bool(_text_of(field.editor))
            if key == "password":
                shown = shown or bool(values.username)
            field.show_message(self.errors.get(key) if shown else None)
        if "password" not in self.errors:
            self.fields["password"].show_message(self._password_note(values), error=False)
        if by_user:
            if self._test_task is not None and not self._test_task.done():
                self._test_task.cancel()
                self._test_finished()
            self.result_box.hide()
            self.last_result = None
        self._update_buttons()

    def _password_note(self, values: FieldValues) -> str | None:
        if values.has_password or self._stored is None:
            return None
        if values.username == self._stored.username:
            return (
                f"The keyring holds the password of {self._stored.username}; "
                "leave this empty to keep it."
            )
        return None

    def _update_buttons(self) -> None:
        testing = self._test_task is not None and not self._test_task.done()
        test_ok = not (set(self.errors) - {"name"})
        self.test_button.setEnabled(test_ok and not testing and not self._saving)
        self.save_button.setEnabled(self.upstream is not None and not self._saving)

    # -- keyring lookups ------------------------------------------------------------------

    async def _show_backend(self) -> None:
        try:
            text = await self._store.backend_description()
        except UserError as exc:  # the protocol allows it; the real store does not
            text = str(exc)
        except Exception as exc:
            log.exception("asking for the keyring backend failed")
            text = f"unknown ({type(exc).__name__})"
        self.backend_label.setText(text)

    async def _lookup(self, name: str, generation: int) -> None:
        try:
            found = await self._store.get(name)
        except UserError as exc:  # CredentialStoreError: what happened and what to do
            if generation == self._lookup_generation:
                self.fields["password"].show_message(
                    f"The stored password could not be read: {exc}", error=True
                )
            return
        if generation != self._lookup_generation:
            return  # the user moved on to another proxy meanwhile
        self._stored = found
        self._stored_for = name
        if found is not None:
            self.password_edit.setPlaceholderText("stored in the keyring")
        self._changed(by_user=False)

    # -- Test -----------------------------------------------------------------------------

    def _credentials(self) -> Credentials | None:
        values = self.values()
        if not values.username:
            return None
        if self.password_edit.text():
            return Credentials(values.username, Secret(self.password_edit.text()))
        stored = self._stored
        if stored is not None and stored.username == values.username:
            return stored
        return Credentials(values.username, Secret(""))

    def start_test(self) -> None:
        """The Test button: one real handshake, off the UI thread; a second click is ignored."""
        if self._test_task is not None and not self._test_task.done():
            return
        upstream = self._test_upstream()
        if upstream is None:
            return
        self.result_box.hide()
        self.last_result = None
        self._test_started = time.monotonic()
        self._test_task = self._spawn(self._run_test(upstream, self._credentials()), "test")
        self._tick.start()
        self._show_test_progress()
        self._update_buttons()

    def _test_upstream(self) -> UpstreamProxy | None:
        if self.upstream is not None:
            return self.upstream
        if set(self.errors) - {"name"}:
            return None
        # Only the name is wrong (a new proxy not named yet): test under a stand-in name.
        values = self.values()
        _errors, upstream = validate(
            FieldValues(**{**values.__dict__, "name": "test", "taken_names": frozenset()})
        )
        return upstream

    def _show_test_progress(self) -> None:
        seconds = int(time.monotonic() - self._test_started)
        self.test_button.setText(f"Testing… {seconds} s" if seconds else "Testing…")

    async def _run_test(self, upstream: UpstreamProxy, credentials: Credentials | None) -> None:
        try:
            result = await self._editor.probe(upstream, credentials)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("testing %s failed", upstream)
            result = ProbeResult(
                ProbeOutcome.PROTOCOL_ERROR,
                None,
                None,
                f"the test itself failed ({type(exc).__name__}: {exc}); see the log",
            )
        self._test_finished()
        self.show_result(result)

    def _test_finished(self) -> None:
        self._tick.stop()
        self.test_button.setText("&Test")
        self._test_task = None
        self._update_buttons()

    def show_result(self, result: ProbeResult) -> None:
        self.last_result = result
        heading, hint = _HEADINGS[result.outcome]
        icon = (
            QStyle.StandardPixmap.SP_DialogApplyButton
            if result.ok
            else QStyle.StandardPixmap.SP_MessageBoxWarning
        )
        self.result_box.say(full_stop(f"{heading}: {result.words}") + hint, icon)

    # -- Save -----------------------------------------------------------------------------

    def start_save(self) -> None:
        """The Save button (and Enter): keyring first, then the settings file."""
        upstream = self.upstream
        if upstream is None or self._saving:
            return
        password = self.password_edit.text()
        secret = Secret(password) if password else None
        self._saving = True
        self.save_button.setText("Saving…")
        self._update_buttons()
        self._spawn(self._save(upstream, secret), "save")

    def show_error(self, text: str) -> None:
        self.result_box.say(text, QStyle.StandardPixmap.SP_MessageBoxCritical)

    async def _save(self, upstream: UpstreamProxy, secret: Secret | None) -> None:
        outcome = await save_upstream(self._store, self._editor, upstream, secret)
        if outcome.error is not None:
            self._save_failed(outcome.error)
            return
        if outcome.warning:
            log.warning("%s", outcome.warning)
        self._saving = False
        self.saved.emit(upstream.name)
        self.accept()

    def _save_failed(self, text: str) -> None:
        self._saving = False
        self.save_button.setText("&Save")
        self._update_buttons()
        self.show_error(text)


def _text_of(widget: QWidget) -> str:
    return widget.text() if isinstance(widget, QLineEdit) else ""
