"""The credentials dialog with in-memory fakes of the keyring and the upstream editor: inline
validation, keyboard use, the password toggle, Test's words for each outcome, Save's calls and
errors; and the app side of Save (controller: settings, keyring refresh, retry).

Each test runs as a coroutine on a qasync loop (as in the app), driving widgets with QTest.
Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import qasync
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QDialog, QLineEdit, QWidget
from pytestqt.qtbot import QtBot

from tray_proxy.config import Config, ConfigError
from tray_proxy.controller import NoticeKind, ProxyController
from tray_proxy.controller.services import RelayHandle, Traffic
from tray_proxy.keyring_store import KeyringLockedError, PlaintextKeyringError
from tray_proxy.relay.events import Observer
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import AuthScheme, RelaySettings, UpstreamKind, UpstreamProxy
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.credentials_dialog import NEW_PROXY, CredentialsDialog
from tray_proxy.ui.main_window import MainWindow
from tray_proxy.ui.services import CredentialsServices

from .conftest import FakeServices
from .fakes import FakeEditor, FakeStore

PASSWORD = "correct horse battery staple"
DEADLINE = 5.0

CORP = UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp.example", 8080, "alice")
BACKUP = UpstreamProxy("backup", UpstreamKind.SOCKS5, "10.1.2.3", 1080)


Scenario = Callable[[], Awaitable[None]]


@pytest.fixture
def run(qapp: QApplication) -> Callable[[Scenario], None]:
    """Run a test coroutine on a fresh qasync loop, as the app does, bounded in time."""

    # As in the app: a dialog closing as the last window must not end the loop.
    qapp.setQuitOnLastWindowClosed(False)

    def runner(scenario: Scenario) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(scenario(), 30.0)

        with asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(qapp)) as r:
            r.run(bounded())

    return runner


async def until(predicate: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def opened(
    qtbot: QtBot, store: FakeStore, editor: FakeEditor, **kwargs: Any
) -> CredentialsDialog:
    dialog = CredentialsDialog(store, editor, **kwargs)
    qtbot.addWidget(dialog)
    dialog.show()
    await until(lambda: not dialog.busy, "the dialog's keyring lookups")
    return dialog


def type_into(edit: QLineEdit, text: str) -> None:
    edit.setFocus()
    edit.selectAll()
    if not text:
        QTest.keyClick(edit, Qt.Key.Key_Delete)
    elif text.isascii():
        QTest.keyClicks(edit, text)
    else:  # QTest aborts on keys it has no code for; this is what an input method does
        edit.insert(text)
        edit.textEdited.emit(edit.text())


def message(dialog: CredentialsDialog, field: str) -> str:
    label = dialog.fields[field].message
    return label.text() if not label.isHidden() else ""


async def fill_new(dialog: CredentialsDialog, password: str = PASSWORD) -> None:
    type_into(dialog.host_edit, "proxy.corp.example")
    type_into(dialog.port_edit, "3128")
    type_into(dialog.user_edit, "alice")
    type_into(dialog.password_edit, password)


# --------------------------------------------------------------------------- validation


def test_new_proxy_validation_states(qtbot: QtBot, run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        dialog = await opened(qtbot, FakeStore(), FakeEditor())
        assert dialog.proxy_combo.currentText() == NEW_PROXY
        # Never "proxy" (messages would read "through proxy proxy"); it follows the host.
        assert dialog.name_edit.isEnabled() and dialog.name_edit.text() == "corp"
        assert dialog.port_edit.text() == "8080"
        assert not dialog.save_button.isEnabled() and not dialog.test_button.isEnabled()
        assert message(dialog, "host") == ""  # not reached yet: no scolding

        type_into(dialog.host_edit, "proxy corp")
        assert message(dialog, "host") == "The host must not contain spaces or control characters."
        type_into(dialog.host_edit, "proxy_corp!")
        assert "DNS name" in message(dialog, "host")
        type_into(dialog.host_edit, "proxy.corp.example")
        assert message(dialog, "host") == ""
        assert dialog.save_button.isEnabled() and dialog.test_button.isEnabled()

        type_into(dialog.port_edit, "70000")
        assert message(dialog, "port") == "The port must be a number 1-65535."
        assert not dialog.save_button.isEnabled()
        type_into(dialog.port_edit, "3128")

        type_into(dialog.user_edit, "corp:alice")
        assert 'must not contain ":"' in message(dialog, "username")
        type_into(dialog.user_edit, "alice")
        assert "Enter the password" in message(dialog, "password")
        assert not dialog.save_button.isEnabled()
        type_into(dialog.password_edit, PASSWORD)
        assert message(dialog, "password") == "" and dialog.save_button.isEnabled()

        type_into(dialog.user_edit, "")
        assert "user name that goes with" in message(dialog, "username")

        type_into(dialog.name_edit, "no spaces")
        assert message(dialog, "name").startswith("The name must be 1-64 characters")
        assert not dialog.save_button.isEnabled()
        dialog.reject()

    run(scenario)


def test_a_new_proxys_name_follows_its_host_until_typed(
    qtbot: QtBot, run: Callable[[Scenario], None]
) -> None:
    async def scenario() -> None:
        dialog = await opened(qtbot, FakeStore(), FakeEditor([CORP]))
        dialog.proxy_combo.setCurrentIndex(dialog.proxy_combo.findText(NEW_PROXY))
        type_into(dialog.host_edit, "webproxy.eu.acme.com")
        assert dialog.name_edit.text() == "acme"
        type_into(dialog.host_edit, "proxy.corp.example")
        assert dialog.name_edit.text() == "corp-2"  # "corp" is taken
        type_into(dialog.name_edit, "office")
        type_into(dialog.host_edit, "proxy.acme.com")
        assert dialog.name_edit.text() == "office"  # the user's choice stays
        dialog.reject()

    run(scenario)


@pytest.mark.parametrize(
    ("host", "problem", "stored"),
    [
        ("proxy.corp.example", None, "proxy.corp.example"),
        ("10.0.0.7", None, "10.0.0.7"),
        ("2001:db8::1", None, "2001:db8::1"),
        ("[2001:db8::1]", None, "2001:db8::1"),
        ("10.0.0.300", "not a valid IPv4 address", None),
        ("http://proxy.corp.example", "Enter only the host name", None),
        ("bücher.example", "must be ASCII", None),
        ("alice@proxy", "user name or password", None),
    ],
)
def test_host_follows_the_settings_file_rules(
    qtbot: QtBot,
    run: Callable[[Scenario], None],
    host: str,
    problem: str | None,
    stored: str | None,
) -> None:
    async def scenario() -> None:
        dialog = await opened(qtbot, FakeStore(), FakeEditor())
        type_into(dialog.host_edit, host)
        if problem is None:
            assert message(dialog, "host") == ""
            assert dialog.upstream is not None and dialog.upstream.host == stored
        else:
            assert problem in message(dialog, "host")
            assert dialog.upstream is None
        dialog.reject()

    run(scenario)


def test_socks5_has_no_scheme_choice_and_its_own_port(
    qtbot: QtBot, run: Callable[[Scenario], None]
) -> None:
    async def scenario() -> None:
        dialog = await opened(qtbot, FakeStore(), FakeEditor())
        dialog.auth_combo.setCurrentIndex(dialog.auth_combo.findData(AuthScheme.NTLM))
        dialog.kind_combo.setCurrentIndex(dialog.kind_combo.findData(UpstreamKind.SOCKS5))
        assert dialog.port_edit.text() == "1080"
        assert not dialog.auth_combo.isEnabled()
        assert dialog.auth_combo.currentData() is AuthScheme.AUTO
        type_into(dialog.host_edit, "socks.corp.example")
        assert dialog.upstream is not None
        assert dialog.upstream.kind is UpstreamKind.SOCKS5 and dialog.upstream.port == 1080
        dialog.reject()

    run(scenario)


# --------------------------------------------------------------------------- keyboard


def test_enter_saves_only_when_valid_and_esc_cancels(
    qtbot: QtBot, run: Callable[[Scenario], None]
) -> None:
    async def scenario() -> None:
        store, editor = FakeStore(), FakeEditor()
        dialog = await opened(qtbot, store, editor)
        type_into(dialog.host_edit, "proxy.corp.example")
        type_into(dialog.user_edit, "alice")
        QTest.keyClick(dialog.user_edit, Qt.Key.Key_Return)  # no password yet: invalid
        await asyncio.sleep(0.05)
        assert dialog.isVisible() and not store.set_calls and not editor.saved

        type_into(dialog.password_edit, PASSWORD)
        QTest.keyClick(dialog.password_edit, Qt.Key.Key_Return)
        await until(lambda: not dialog.isVisible(), "Enter to save and close the dialog")
        assert dialog.result() == QDialog.DialogCode.Accepted
        assert [u.name for u in editor.saved] == ["corp"]  # from proxy.corp.example

        dialog2 = await opened(qtbot, store, FakeEditor())
        type_into(dialog2.host_edit, "other.example")
        QTest.keyClick(dialog2.host_edit, Qt.Key.Key_Escape)
        assert not dialog2.isVisible()
        assert dialog2.result() == QDialog.DialogCode.Rejected
        assert len(store.set_calls) == 1

    run(scenario)


def test_tab_order_and_mnemonics(qtbot: QtBot, run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        dialog = await opened(qtbot, FakeStore(), FakeEditor())
        chain: list[QWidget] = [dialog.name_edit]
        widget: QWidget = dialog.name_edit
        for _ in range(9):
            # The next widget Tab reaches: skip labels and containers in the chain.
            for _ in range(50):
                following = widget.nextInFocusChain()
                assert following is not None
                widget = following
                if widget.focusPolicy() & Qt.FocusPolicy.TabFocus:
                    break
            chain.append(widget)
        assert chain == [
            dialog.name_edit,
            dialog.kind_combo,
            dialog.host_edit,
            dialog.port_edit,
            dialog.user_edit,
            dialog.password_edit,
            dialog.show_password,
            dialog.auth_combo,
            dialog.test_button,
            dialog.save_button,
        ]
        buddies = {
            label.text(): label.buddy() for label in dialog.findChildren(type(dialog.result_label))
        }
        assert buddies["&Host:"] is dialog.host_edit
        assert buddies["Pass&word:"] is dialog.password_edit
        assert dialog.save_button.text() == "&Save" and dialog.test_button.text() == "&Test"
        texts = [label.text() for label in dialog.findChildren(type(dialog.result_label))]
        texts += [b.text() for b in (dialog.test_button, dialog.save_button, dialog.show_password)]
        keys = [t[t.index("&") + 1].lower() for t in texts if "&" in t]
        assert len(keys) == 11 and len(set(keys)) == len(keys), keys  # Alt+key is unambiguous
        dialog.reject()

    run(scenario)


def test_show_password_toggle(qtbot: QtBot, run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        dialog = await opened(qtbot, FakeStore(), FakeEditor())
        assert dialog.password_edit.echoMode() is QLineEdit.EchoMode.Password
        QTest.mouseClick(dialog.show_password, Qt.MouseButton.LeftButton)
        assert dialog.password_edit.echoMode() is QLineEdit.EchoMode.Normal
        dialog.show_password.setFocus()
        QTest.keyClick(dialog.show_password, Qt.Key.Key_Space)
        assert dialog.password_edit.echoMode() is QLineEdit.EchoMode.Password
        dialog.reject()

    run(scenario)


# --------------------------------------------------------------------------- Test


OUTCOMES = [
    (ProbeResult(ProbeOutcome.OK, 0.012, None, "OK in 12 ms"), "The proxy works: OK in 12 ms"),
    (
        ProbeResult(
            ProbeOutcome.AUTH_FAILED,
            None,
            407,
            "proxy.corp.example:3128 rejected the password for alice (407)",
        ),
        "Wrong user name or password: proxy.corp.example:3128 rejected the password for alice "
        "(407)",
    ),
    (
        ProbeResult(ProbeOutcome.FORBIDDEN, None, 403, "forbidden by the proxy (403 Blocked)"),
        "Forbidden by the proxy: forbidden by the proxy (403 Blocked)",
    ),
    (
        ProbeResult(ProbeOutcome.TIMEOUT, None, None, "timed out after 10 s"),
        "No answer: timed out after 10 s",
    ),
    (
        ProbeResult(
            ProbeOutcome.REFUSED, None, None, "connection refused by proxy.corp.example:3128"
        ),
        "Connection refused: connection refused by proxy.corp.example:3128. Check the host",
    ),
    (
        ProbeResult(ProbeOutcome.PROTOCOL_ERROR, None, None, "the proxy's answer is not HTTP"),
        "a TLS port",
    ),
]


@pytest.mark.parametrize(("result", "words"), OUTCOMES, ids=[r.outcome.value for r, _ in OUTCOMES])
def test_test_shows_the_outcome_in_words(
    qtbot: QtBot, run: Callable[[Scenario], None], result: ProbeResult, words: str
) -> None:
    async def scenario() -> None:
        editor = FakeEditor()
        editor.results.append(result)
        dialog = await opened(qtbot, FakeStore(), editor)
        await fill_new(dialog)
        QTest.mouseClick(dialog.test_button, Qt.MouseButton.LeftButton)
        await until(lambda: dialog.last_result is not None, "the test result")
        assert words in dialog.result_label.text()
        assert dialog.result_box.isVisible()
        assert dialog.test_button.isEnabled() and dialog.test_button.text() == "&Test"
        dialog.reject()

    run(scenario)


def test_test_runs_once_shows_progress_and_sends_a_secret(
    qtbot: QtBot, run: Callable[[Scenario], None]
) -> None:
    async def scenario() -> None:
        editor = FakeEditor()
        editor.gate = asyncio.Event()
        editor.results.append(ProbeResult(ProbeOutcome.OK, 0.02, None, "OK in 20 ms"))
        dialog = await opened(qtbot, FakeStore(), editor)
        await fill_new(dialog)
        QTest.mouseClick(dialog.test_button, Qt.MouseButton.LeftButton)
        QTest.mouseClick(dialog.test_button, Qt.MouseButton.LeftButton)  # ignored
        dialog.start_test()  # ignored too, however it is reached
        await until(lambda: len(editor.probes) == 1, "the probe to start")
        assert dialog.test_button.text().startswith("Testing…")
        assert not dialog.test_button.isEnabled()
        # The UI keeps working while the probe runs.
        QTest.mouseClick(dialog.show_password, Qt.MouseButton.LeftButton)
        assert dialog.password_edit.echoMode() is QLineEdit.EchoMode.Normal
        await asyncio.sleep(0.3)
        assert not dialog.test_button.isEnabled() and dialog.last_result is None
        editor.gate.set()
        await until(lambda: dialog.last_result is not None, "the test result")
        assert len(editor.probes) == 1
        upstream, credentials = editor.probes[0]
        assert (upstream.host, upstream.port, upstream.username) == (
            "proxy.corp.example",
            3128,
            "alice",
        )
        assert credentials is not None and isinstance(credentials.password, Secret)
        assert credentials.password.reveal() == PASSWORD
        assert PASSWORD not in repr(credentials)
        dialog.reject()

    run(scenario)


def test_editing_during_a_test_cancels_it(qtbot: QtBot, run: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        editor = FakeEditor()
        editor.gate = asyncio.Event()
        editor.results.append(ProbeResult(ProbeOutcome.OK, 0.02, None, "OK in 20 ms"))
        dialog = await opened(qtbot, FakeStore(), editor)
        await fill_new(dialog)
        dialog.start_test()
        await until(lambda: len(editor.probes) == 1, "the probe to start")
        type_into(dialog.port_edit, "3129")
        await until(lambda: not dialog.busy, "the cancelled probe to end")
        assert dialog.last_result is None and not dialog.result_box.isVisible()
        assert dialog.test_button.isEnabled() and dialog.test_button.text() == "&Test"
        dialog.reject()

    run(scenario)


# --------------------------------------------------------------------------- Save


def test_save_stores_a_secret_and_the_upstream(
    qtbot: QtBot, run: Callable[[Scenario], None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        store, editor = FakeStore(), FakeEditor()
        dialog = await opened(qtbot, store, editor)
        saved: list[str] = []
        dialog.saved.connect(saved.append)
        await fill_new(dialog)
        dialog.auth_combo.setCurrentIndex(dialog.auth_combo.findData(AuthScheme.DIGEST))
        QTest.mouseClick(dialog.save_button, Qt.MouseButton.LeftButton)
        await until(lambda: not dialog.isVisible(), "Save to close the dialog")
        assert saved == ["corp"]
        assert len(store.set_calls) == 1
        name, username, password = store.set_calls[0]
        assert (name, username) == ("corp", "alice")
        assert type(password) is Secret and password.reveal() == PASSWORD
        assert editor.saved == [
            UpstreamProxy(
                "corp", UpstreamKind.HTTP, "proxy.corp.example", 3128, "alice", AuthScheme.DIGEST
            )
        ]
        for text in (repr(store.set_calls), repr(editor.saved), repr(dialog.values())):
            assert PASSWORD not in text

    run(scenario)
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize(
    ("where", "error", "shown"),
    [
        (
            "store",
            PlaintextKeyringError("the keyring backend PlaintextKeyring is refused: it stores "),
            "The password was not saved: the keyring backend PlaintextKeyring is refused",
        ),
        (
            "store",
            KeyringLockedError("the keyring (GNOME Keyring) is locked and was not unlocked"),
            "The password was not saved: the keyring (GNOME Keyring) is locked",
        ),
        (
            "editor",
            ConfigError("/home/a/.config/tray-proxy/config.toml", "", "cannot save it: No space"),
            "The settings were not saved: /home/a/.config/tray-proxy/config.toml: cannot save it",
        ),
    ],
)
def test_save_errors_are_shown_in_the_dialog(
    qtbot: QtBot, run: Callable[[Scenario], None], where: str, error: Exception, shown: str
) -> None:
    async def scenario() -> None:
        store, editor = FakeStore(), FakeEditor()
        if where == "store":
            store.fail_set = error
        else:
            editor.save_error = error
        dialog = await opened(qtbot, store, editor)
        await fill_new(dialog)
        dialog.start_save()
        assert not dialog.save_button.isEnabled() and dialog.save_button.text() == "Saving…"
        await until(lambda: dialog.save_button.isEnabled(), "Save to fail")
        assert dialog.isVisible() and dialog.result() == 0
        assert shown in dialog.result_label.text()
        assert dialog.save_button.text() == "&Save"
        assert editor.saved == []
        dialog.reject()

    run(scenario)


def test_existing_upstream_keeps_its_stored_password(
    qtbot: QtBot, run: Callable[[Scenario], None]
) -> None:
    async def scenario() -> None:
        stored = Credentials("alice", Secret(PASSWORD))
        store = FakeStore({"corp": stored})
        editor = FakeEditor([BACKUP, CORP], active="corp")
        editor.results.append(ProbeResult(ProbeOutcome.OK, 0.01, None, "OK in 10 ms"))
        dialog = await opened(qtbot, store, editor)
        assert dialog.proxy_combo.currentText() == "corp" and not dialog.name_edit.isEnabled()
        assert dialog.host_edit.text() == "proxy.corp.example"
        assert dialog.password_edit.text() == ""
        assert "holds the password of alice" in message(dialog, "password")
        assert dialog.save_button.isEnabled()

        dialog.start_test()
        await until(lambda: dialog.last_result is not None, "the test result")
        assert editor.probes[0][1] is stored

        # Another user name needs its own password.
        type_into(dialog.user_edit, "bob")
        assert "Enter the password" in message(dialog, "password")
        type_into(dialog.user_edit, "alice")

        type_into(dialog.port_edit, "3128")
        dialog.start_save()
        await until(lambda: not dialog.isVisible(), "Save to close the dialog")
        assert store.set_calls == []  # the stored password stays as it is
        assert editor.saved == [
            UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp.example", 3128, "alice")
        ]

    run(scenario)


def test_switching_proxies_and_keyring_display(
    qtbot: QtBot, run: Callable[[Scenario], None]
) -> None:
    async def scenario() -> None:
        store = FakeStore()
        store.fail_get = KeyringLockedError("the keyring (GNOME Keyring) is locked")
        editor = FakeEditor([CORP, BACKUP], active="corp")
        dialog = await opened(qtbot, store, editor)
        assert dialog.backend_label.text() == "Secret Service (GNOME Keyring)"
        assert "could not be read: the keyring (GNOME Keyring) is locked" in message(
            dialog, "password"
        )
        dialog.proxy_combo.setCurrentIndex(dialog.proxy_combo.findData("backup"))
        await until(lambda: not dialog.busy, "the lookup")
        assert dialog.kind_combo.currentData() is UpstreamKind.SOCKS5
        assert dialog.host_edit.text() == "10.1.2.3" and dialog.user_edit.text() == ""
        dialog.proxy_combo.setCurrentIndex(dialog.proxy_combo.findText(NEW_PROXY))
        assert dialog.name_edit.isEnabled() and dialog.name_edit.text() == "corp-2"
        type_into(dialog.name_edit, "corp")
        assert "already is a proxy named corp" in message(dialog, "name")
        dialog.reject()

    run(scenario)


# --------------------------------------------------------------------------- main window


def test_main_window_opens_one_dialog(
    qtbot: QtBot, run: Callable[[Scenario], None], services: FakeServices
) -> None:
    async def scenario() -> None:
        store, editor = FakeStore(), FakeEditor([CORP], active="corp")
        window = MainWindow(
            services,
            UiBridge(interval_ms=10),
            tray_available=True,
            credentials=CredentialsServices(store, editor),
        )
        qtbot.addWidget(window)
        QTest.mouseClick(window.credentials_button, Qt.MouseButton.LeftButton)
        dialog = window.credentials_dialog
        assert dialog is not None and dialog.isVisible()
        window.open_credentials()
        assert window.credentials_dialog is dialog  # raised, not a second one
        await until(lambda: not dialog.busy, "the lookups")
        dialog.reject()
        assert window.credentials_dialog is None

    run(scenario)


# --------------------------------------------------------------------------- the app side


class MemoryConfig:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.saved: list[Config] = []
        self.fail: ConfigError | None = None

    def load(self) -> Config:
        return self.config

    def save(self, config: Config) -> None:
        if self.fail is not None:
            raise self.fail
        self.saved.append(config)
        self.config = config


class RecordingRefresher:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.error: Exception | None = None

    async def refresh(self, names: Iterable[str]) -> None:
        self.calls.append(list(names))
        if self.error is not None:
            raise self.error


class RetryRelay:
    addresses = (("127.0.0.1", 12080),)

    def __init__(self) -> None:
        self.retried: list[str] = []
        self.reloaded: list[Config] = []

    def stop(self, timeout: float) -> None:
        pass

    def retry_credentials(self, upstream: str) -> None:
        self.retried.append(upstream)

    # The rest of RelayHandle, so the fake stays one (services.py).
    def update_credentials(self, upstream: str, credentials: Credentials | None) -> None:
        self.retried.append(f"update {upstream}")

    def set_extra_listen(self, addresses: Sequence[str]) -> tuple[tuple[str, int], ...]:
        return tuple((a, self.addresses[0][1]) for a in addresses)

    def close_connections(self, ids: Iterable[int]) -> int:
        return 0

    def traffic(self) -> Traffic:
        return ({}, 0, 0)

    def reload_routing(self, config: Config) -> None:
        self.reloaded.append(config)

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None:
        pass


def _controller(config: MemoryConfig, refresher: RecordingRefresher) -> ProxyController:
    def no_relay(_config: Config, _observer: Observer) -> RetryRelay:
        raise AssertionError("the relay is not started in these tests")

    return ProxyController(config, no_relay, object(), credentials=refresher)  # type: ignore[arg-type]


def test_controller_save_upstream_writes_refreshes_and_retries(tmp_path: Path) -> None:
    memory = MemoryConfig(Config(RelaySettings(), (CORP,), tmp_path / "config.toml"))
    refresher = RecordingRefresher()
    controller = _controller(memory, refresher)
    relay = RetryRelay()
    handle: RelayHandle = relay  # the fake is a whole RelayHandle (mypy checks it)
    controller._relay = handle  # a relay that runs while the redirect is off (as after Save)
    new = UpstreamProxy("second", UpstreamKind.HTTP, "10.9.9.9", 3128, "bob")
    edited = UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp.example", 8080, "carol")

    async def scenario() -> None:
        assert await controller.save_upstream(new) is None
        assert await controller.save_upstream(edited) is None

    asyncio.run(scenario())
    assert memory.config.upstreams == (edited, new)
    assert controller.config is memory.config
    assert refresher.calls == [["corp", "second"], ["corp", "second"]]
    assert relay.retried == ["second", "corp"]


def test_controller_keyring_failure_is_an_error_and_a_notice(tmp_path: Path) -> None:
    memory = MemoryConfig(Config(RelaySettings(), (CORP,), tmp_path / "config.toml"))
    refresher = RecordingRefresher()
    refresher.error = PlaintextKeyringError("the keyring backend X is refused: plaintext")
    controller = _controller(memory, refresher)
    events: list[Any] = []
    controller.subscribe(events.append)

    async def scenario() -> str | None:
        controller.request_refresh_credentials()
        controller.request_refresh_credentials()  # once at start, not twice
        await controller._credentials_once()
        return await controller.save_upstream(CORP)

    warning = asyncio.run(scenario())
    assert warning is not None and "the keyring backend X is refused" in warning
    assert refresher.calls == [["corp"], ["corp"]]
    assert controller.status().last_errors[-1].count == 2
    assert "could not be read from the keyring" in (controller.status().last_error or "")
    kinds = [e.kind for e in events if hasattr(e, "kind")]
    assert kinds == [NoticeKind.KEYRING_UNAVAILABLE]  # the second one is rate-limited


def test_controller_save_error_reaches_the_caller(tmp_path: Path) -> None:
    memory = MemoryConfig(Config(RelaySettings(), (), tmp_path / "config.toml"))
    memory.fail = ConfigError(str(tmp_path / "config.toml"), "", "cannot save it: read-only")
    controller = _controller(memory, RecordingRefresher())
    with pytest.raises(ConfigError, match="read-only"):
        asyncio.run(controller.save_upstream(CORP))
    assert controller.config is not None and controller.config.upstreams == ()
