"""The credentials dialog for real: a real gnome-keyring in a private D-Bus session, the real
probe against the lab's Squid (Basic auth), the real settings file, the app's own services.

The lab's addresses exist only inside its namespaces, so the dialog runs in a child process
inside the lab's client namespace (`ip netns exec`), under `dbus-run-session` with
gnome-keyring (tests/integration/keyring_env.py), offscreen. That child is this module run as
a script: it drives the dialog with QTest on a qasync loop (no pytest-qt), and answers with one
JSON line that holds no secret. Passwords reach it on stdin only. Afterwards `secret-tool`, in
a fresh session, must find the password in the keyring; Squid's access log must show the
wrong password refused and the right one let through. The dialog, with the working result,
is saved (to docs/credentials-dialog.png with TRAY_PROXY_SCREENSHOTS=1).

Must not import PySide6 at module level (the pytest side never opens Qt).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.keyring_env import KeyringSandbox
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME
from tests.lab.squid import AccessLogEntry, BasicAuth

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
# The test always takes the screenshot; it replaces the README's copy in docs/ only when
# asked (TRAY_PROXY_SCREENSHOTS=1), so a test run leaves the work tree as it was.
DOCS_SCREENSHOT = REPO / "docs" / "credentials-dialog.png"
STEP_DEADLINE = 30.0


# --------------------------------------------------------------------------- the pytest side


def test_dialog_tests_and_saves_against_the_lab_squid_and_a_real_keyring(
    lab: Lab, tmp_path: Path
) -> None:
    auth = lab.squid.auth
    assert isinstance(auth, BasicAuth), f"the lab's Squid should use Basic auth, has {auth}"
    creds = auth.credentials
    assert creds is not None, "the lab's Squid has no user"
    wrong = creds.wrong()
    sandbox = KeyringSandbox(tmp_path)
    name = "corp"  # the keyring and settings are this test's own (tmp_path)
    config = sandbox.home / ".config" / "tray-proxy" / "config.toml"
    screenshot = tmp_path / "credentials-dialog.png"
    job = {
        "name": name,
        "host": lab.squid.host,
        "port": lab.squid.port,
        "username": creds.username,
        "right": creds.password,
        "wrong": wrong.password,
        "target": [HOSTNAME, 443],
        "config": str(config),
        "screenshot": str(screenshot),
    }
    started = time.time()
    result = sandbox.run(
        [sys.executable, "-m", "tests.integration.test_credentials_dialog_real"],
        input=json.dumps(job).encode(),
        env={"QT_QPA_PLATFORM": "offscreen"},
        prefix=["ip", "netns", "exec", lab.client.name],
        timeout=150.0,
    )
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    for secret in (creds.password, wrong.password):
        assert secret not in result.stdout and secret not in result.stderr, (
            "a password reached the driver's output"
        )
    assert result.returncode == 0 and lines, (
        f"the dialog driver exited {result.returncode}; stderr:\n{result.stderr[-4000:]}"
    )
    report: dict[str, Any] = json.loads(lines[-1])

    assert "GNOME Keyring" in report["backend"] or "Secret Service" in report["backend"], report
    assert report["wrong"]["outcome"] == "auth-failed", report
    assert report["wrong"]["status"] == 407, report
    assert "Wrong user name or password" in report["wrong"]["text"], report
    assert f"rejected the password for {creds.username} (407)" in report["wrong"]["text"]
    assert report["right"]["outcome"] == "ok", report
    assert report["right"]["text"].startswith("The proxy works: OK in "), report
    assert report["right"]["latency_ms"] is not None, report
    assert report["saved"] == name and report["accepted"], report
    assert report["config_upstream"] == {
        "name": name,
        "url": f"http://{lab.squid.host}:{lab.squid.port}",
        "username": creds.username,
        "auth": "auto",
    }, report
    assert report["relay_source_has_password"] is True, report
    assert creds.password not in config.read_text()
    assert screenshot.is_file() and screenshot.stat().st_size > 5_000
    if os.environ.get("TRAY_PROXY_SCREENSHOTS") == "1":
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)

    # The keyring itself, read by another program in a new session.
    found = sandbox.run(
        ["secret-tool", "lookup", "service", "tray-proxy", "username", name], timeout=60.0
    )
    assert found.returncode == 0, f"secret-tool found nothing: {found.stderr[-2000:]}"
    entry = json.loads(found.stdout)
    assert entry["username"] == creds.username
    assert entry["password"] == creds.password, "the keyring holds another password"

    # Squid saw both tests: the wrong password refused, the right one let through.
    def ours(e: AccessLogEntry) -> bool:
        return e.method == "CONNECT" and e.time >= started - 1 and HOSTNAME in e.uri

    lab.squid.wait_for_entry(lambda e: ours(e) and e.status == 200, timeout=15.0)
    entries = [e for e in lab.squid.entries() if ours(e)]
    assert any(e.status == 407 for e in entries), entries
    assert any(e.status == 200 and e.user == creds.username for e in entries), entries


# --------------------------------------------------------------------------- the driver


async def _until(predicate: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_DEADLINE
    while not predicate():
        if loop.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _drive(job: dict[str, Any]) -> dict[str, Any]:
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    from tray_proxy.app import ConfigFile, UpstreamEditorService
    from tray_proxy.config import load_config
    from tray_proxy.controller import ProxyController, engine_relay_factory
    from tray_proxy.firewall.client import RedirectController
    from tray_proxy.keyring_store import CredentialStore, default_credential_source
    from tray_proxy.ui.credentials_dialog import NEW_PROXY, CredentialsDialog

    config_file = ConfigFile(Path(job["config"]))
    store = CredentialStore()
    source = default_credential_source(config_file.load(), store=store)
    controller = ProxyController(
        config_file,
        engine_relay_factory(source),
        RedirectController(),  # never started: the redirect stays off
        credentials=source.keyring,
    )
    editor = UpstreamEditorService(controller, target=tuple(job["target"]), timeout=10.0)
    dialog = CredentialsDialog(store, editor)
    dialog.show()
    await _until(lambda: not dialog.busy, "the keyring backend")
    assert dialog.proxy_combo.currentText() == NEW_PROXY

    def type_into(edit: Any, text: str) -> None:
        edit.setFocus()
        edit.selectAll()
        QTest.keyClicks(edit, text)

    type_into(dialog.name_edit, job["name"])
    type_into(dialog.host_edit, job["host"])
    type_into(dialog.port_edit, str(job["port"]))
    type_into(dialog.user_edit, job["username"])

    async def test_with(password: str) -> dict[str, Any]:
        type_into(dialog.password_edit, password)
        QTest.mouseClick(dialog.test_button, Qt.MouseButton.LeftButton)
        await _until(lambda: dialog.last_result is not None, "the test result")
        result = dialog.last_result
        assert result is not None
        return {
            "outcome": result.outcome.value,
            "status": result.status,
            "latency_ms": None if result.latency_s is None else result.latency_s * 1000,
            "text": dialog.result_label.text(),
        }

    report: dict[str, Any] = {"backend": dialog.backend_label.text()}
    report["wrong"] = await test_with(job["wrong"])
    report["right"] = await test_with(job["right"])
    await asyncio.sleep(0.1)  # let the result's layout settle before the picture
    dialog.grab().save(job["screenshot"], "PNG")

    saved: list[str] = []
    dialog.saved.connect(saved.append)
    QTest.keyClick(dialog.password_edit, Qt.Key.Key_Return)  # Enter = Save
    await _until(lambda: not dialog.isVisible(), "Save to close the dialog")
    report["saved"] = saved[0] if saved else None
    report["accepted"] = dialog.result() == 1

    upstream = load_config(Path(job["config"])).upstreams[0]
    report["config_upstream"] = {
        "name": upstream.name,
        "url": upstream.url,
        "username": upstream.username,
        "auth": upstream.auth.value,
    }
    found = source.get(job["name"], job["username"])
    report["relay_source_has_password"] = (
        found is not None and found.password.reveal() == job["right"]
    )
    await controller.shutdown()
    return report


def main() -> int:
    import qasync
    from PySide6.QtWidgets import QApplication

    job = json.loads(sys.stdin.read())
    app = QApplication(["tray-proxy-dialog-test"])
    app.setQuitOnLastWindowClosed(False)
    with asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(app)) as runner:
        report = runner.run(asyncio.wait_for(_drive(job), 120.0))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
