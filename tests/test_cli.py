"""The headless CLI: exit codes and messages a user sees, and a clean run/stop cycle."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tray_proxy.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_command_starts_the_tray_app(monkeypatch: pytest.MonkeyPatch) -> None:
    import tray_proxy.app

    calls: list[tuple[object, bool]] = []

    def fake_run_gui(config_path: object = None, no_tray: bool = False) -> int:
        calls.append((config_path, no_tray))
        return 0

    monkeypatch.setattr(tray_proxy.app, "run_gui", fake_run_gui)
    assert main(["--no-tray", "--config", "x.toml"]) == 0
    assert calls == [(Path("x.toml"), True)]


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_bad_config_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[relay]\nport = "abc"\n')
    assert main(["run", "--config", str(path), "--no-redirect"]) == 2
    err = capsys.readouterr().err
    assert "relay.port" in err
    assert "Traceback" not in err


def test_missing_config_file_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", str(tmp_path / "nope.toml"), "--no-redirect"]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_no_upstream_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "[relay]\nport = 12080\n")
    assert main(["run", "--config", str(path), "--no-redirect"]) == 2
    assert "no [[upstream]]" in capsys.readouterr().err


def test_port_in_use_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = _write(
            tmp_path,
            f'[relay]\nport = {port}\nlisten = ["127.0.0.1"]\nsource_ports = false\n'
            '[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:9"\n',
        )
        assert main(["run", "--config", str(path), "--no-redirect"]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "in use" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_listens_and_stops_cleanly_on_signal(tmp_path: Path, signum: int) -> None:
    port = _free_port()
    path = _write(
        tmp_path,
        f'[relay]\nport = {port}\nlisten = ["127.0.0.1"]\n'
        '[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:9"\n',
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tray_proxy", "run", "--config", str(path), "--no-redirect"],
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"relay listening on 127.0.0.1:{port}" in line
        # A connection straight to the relay port was not redirected: it must be closed.
        deadline = time.monotonic() + 10
        with socket.create_connection(("127.0.0.1", port), timeout=10) as direct:
            direct.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):  # closed with RST is fine too
                assert direct.recv(1) == b""
        proc.send_signal(signum)
        assert proc.wait(timeout=20) == 0
        rest = proc.stderr.read()
        assert "stopped" in rest
        assert "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_run_reads_passwords_from_the_keyring_and_says_when_one_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tray-proxy run` uses the keyring too (README: `credentials set` then `run`)."""
    import asyncio

    import tray_proxy.credentials as credentials_module
    from tray_proxy.cli import _credential_source
    from tray_proxy.config import parse_config
    from tray_proxy.relay.credentials import Credentials, Secret

    class FakeStore:
        async def get(self, name: str) -> Credentials | None:
            return Credentials("alice", Secret("from-keyring")) if name == "corp" else None

    monkeypatch.setattr(credentials_module, "CredentialStore", FakeStore)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    config = parse_config(
        '[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:9"\nusername = "alice"\n'
        '[[upstream]]\nname = "spare"\nurl = "http://127.0.0.1:9"\nusername = "bob"\n'
    )
    source = asyncio.run(_credential_source(config))
    found = source.get("corp", "alice")
    assert found is not None and found.password.reveal() == "from-keyring"
    assert source.get("spare", "bob") is None
    err = capsys.readouterr().err
    assert "no password for upstream spare (user bob)" in err
    assert "corp" not in err and "from-keyring" not in err
