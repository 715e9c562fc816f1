"""The D-Bus and keyring checks in real sessions (tests/integration/keyring_env.py): a real
gnome-keyring Secret Service in a private D-Bus session, the same keyring locked, no session
bus at all, and a plaintext backend selected with PYTHON_KEYRING_BACKEND. The doctor runs as
the real CLI inside each; it never asks the keyring to unlock (no prompt).

Must not import PySide6.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.doctor.support import check_schema, one, write_config
from tests.integration.keyring_env import KeyringSandbox

CHECKS = ["--check", "dbus", "--check", "keyring"]


@pytest.fixture
def sandbox(tmp_path: Path) -> KeyringSandbox:
    try:
        return KeyringSandbox(tmp_path)
    except RuntimeError as exc:
        pytest.fail(str(exc))


def config(sandbox: KeyringSandbox) -> Path:
    return write_config(
        sandbox.home / "config.toml",
        [{"name": "corp", "url": "http://127.0.0.1:9", "username": "alice"}],
    )


def doctor(
    sandbox: KeyringSandbox, *, session: bool = True, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    argv = [sys.executable, "-m", "tray_proxy", "doctor", "--json", "--config",
            str(config(sandbox)), *CHECKS]  # fmt: skip
    result = sandbox.run(argv, session=session, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    doc = json.loads(result.stdout)
    check_schema(doc)
    return result.returncode, doc


def test_real_secret_service_unlocked(sandbox: KeyringSandbox) -> None:
    code, doc = doctor(sandbox)
    dbus = one(doc, "dbus")
    assert dbus["status"] == "ok" and "a Secret Service is on it" in dbus["summary"]
    keyring = one(doc, "keyring")
    assert keyring["status"] == "ok", keyring
    assert "Secret Service" in keyring["summary"] and "unlocked" in keyring["summary"]
    assert code == 0


def test_locked_keyring_is_reported_without_a_prompt(sandbox: KeyringSandbox) -> None:
    lock = shlex.quote(json.dumps({"op": "lock"}))
    doctor_argv = " ".join(
        shlex.quote(a)
        for a in [
            sys.executable,
            "-m",
            "tray_proxy",
            "doctor",
            "--json",
            "--config",
            str(config(sandbox)),
            *CHECKS,
        ]  # fmt: skip
    )
    script = (
        f"echo {lock} | {shlex.quote(sys.executable)} -m tests.integration.keyring_env store "
        f">/dev/null && exec {doctor_argv}"
    )
    result = sandbox.run(["sh", "-c", script], timeout=60)
    doc = json.loads(result.stdout)
    check_schema(doc)
    keyring = one(doc, "keyring")
    assert keyring["status"] == "fail", keyring
    assert "is locked" in keyring["summary"]
    assert "unlock it" in keyring["fix"]
    assert result.returncode == 1


def test_no_dbus_session(sandbox: KeyringSandbox) -> None:
    code, doc = doctor(sandbox, session=False)
    dbus = one(doc, "dbus")
    assert dbus["status"] == "fail"
    assert "DBUS_SESSION_BUS_ADDRESS is not set" in dbus["summary"]
    assert "tray-proxy unlock" in dbus["fix"]
    keyring = one(doc, "keyring")
    assert keyring["status"] == "fail"
    assert "no secure keyring" in keyring["summary"]
    assert code == 1


def test_no_dbus_session_is_a_warning_when_credentials_directory_has_the_password(
    sandbox: KeyringSandbox,
) -> None:
    creds = sandbox.home / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "corp").write_text("not-a-real-password\n")
    code, doc = doctor(sandbox, session=False, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert one(doc, "dbus")["status"] == "warn"
    assert one(doc, "keyring")["status"] == "warn"
    assert code == 0
    assert "not-a-real-password" not in json.dumps(doc)


@pytest.mark.parametrize("backend", ["PlaintextTestKeyring", "DiskNotesKeyring"])
def test_plaintext_backend_is_refused(sandbox: KeyringSandbox, backend: str) -> None:
    code, doc = doctor(
        sandbox, env={"PYTHON_KEYRING_BACKEND": f"tests.integration.keyring_env.{backend}"}
    )
    keyring = one(doc, "keyring")
    assert keyring["status"] == "fail", keyring
    assert "unencrypted" in keyring["summary"] or "does not recommend" in keyring["summary"]
    assert "PYTHON_KEYRING_BACKEND" in keyring["fix"]
    assert code == 1


def test_dead_session_bus(tmp_path: Path) -> None:
    """DBUS_SESSION_BUS_ADDRESS names a bus that is gone (a stale shell after logout)."""
    import asyncio

    from tray_proxy.doctor.checks_session import check_dbus
    from tray_proxy.doctor.context import DoctorEnv
    from tray_proxy.doctor.model import CheckStatus

    config = write_config(
        tmp_path / "config.toml",
        [{"name": "corp", "url": "http://127.0.0.1:9", "username": "alice"}],
    )
    address = f"unix:path={tmp_path / 'gone-bus'}"
    env = DoctorEnv(config, environ={"DBUS_SESSION_BUS_ADDRESS": address})
    result = asyncio.run(check_dbus(env))
    assert result.status is CheckStatus.FAIL
    assert f"the session bus at {address} does not answer" in result.summary


def test_unexported_systemd_user_bus_is_pointed_at(sandbox: KeyringSandbox) -> None:
    """A real bus socket at $XDG_RUNTIME_DIR/bus (as systemd --user or `tray-proxy unlock`
    makes it) that the shell did not export: the doctor adopts it as the app and `run` do
    (credentials.adopt_session_bus), so the check passes instead of sending the user to export
    it by hand."""
    doctor_argv = [sys.executable, "-m", "tray_proxy", "doctor", "--json", "--config",
                   str(config(sandbox)), "--check", "dbus"]  # fmt: skip
    script = (
        'dbus-daemon --session --nofork --address="unix:path=$XDG_RUNTIME_DIR/bus" '
        "</dev/null >/dev/null 2>&1 & bus=$!; "
        'for i in $(seq 100); do [ -S "$XDG_RUNTIME_DIR/bus" ] && break; sleep 0.05; done; '
        + " ".join(shlex.quote(a) for a in doctor_argv)
        + '; code=$?; kill "$bus"; exit $code'
    )
    result = sandbox.run(["sh", "-c", script], session=False)
    doc = json.loads(result.stdout)
    check_schema(doc)
    dbus = one(doc, "dbus")
    assert dbus["status"] == "ok", dbus
    assert dbus["summary"].startswith("D-Bus session bus reachable"), dbus
