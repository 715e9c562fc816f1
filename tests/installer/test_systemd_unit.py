"""The systemd user unit (installer/systemd/tray-proxy.service) and the credential it hands over.

What runs here without a systemd user session: `systemd-analyze --user verify` checks the
unit as systemd itself parses it (unknown keys, a bad Type=, an ExecStart that does not
exist); and the real `tray-proxy run`, given the environment systemd gives a service with
`LoadCredentialEncrypted=corp:...` ($CREDENTIALS_DIRECTORY holding the decrypted file `corp`,
INVOCATION_ID), takes the password from there with no keyring at all: the relay starts and
the proxy sees the right login. Without the file it refuses to switch anything on.

Debian package: systemd (systemd-analyze). Must not import PySide6.
"""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "installer" / "systemd" / "tray-proxy.service"
SYSTEM_UNIT = REPO / "installer" / "systemd" / "tray-proxy@.service"


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd", pytrace=False)
    return tool


def _home_with_launcher(tmp_path: Path) -> Path:
    """A HOME where the unit's %h/.local/bin/tray-proxy exists (as install.sh makes it)."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "tray-proxy").symlink_to(Path(sys.executable).parent / "tray-proxy")
    (home / ".config" / "systemd" / "user").mkdir(parents=True)
    return home


def _verify(unit: Path, home: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"}  # fmt: skip
    return subprocess.run(
        [_analyze(), "--user", "verify", str(unit)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    home = _home_with_launcher(tmp_path)
    placed = home / ".config" / "systemd" / "user" / "tray-proxy.service"
    shutil.copy(UNIT, placed)
    done = _verify(placed, home, tmp_path)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # The check above is worth something only if verify fails on what we could get wrong.
    home = _home_with_launcher(tmp_path)
    broken = home / ".config" / "systemd" / "user" / "tray-proxy.service"
    text = UNIT.read_text().replace("%h/.local/bin/tray-proxy", "%h/.local/bin/tray-proxi")
    broken.write_text(text.replace("Type=exec", "Type=execc"))
    done = _verify(broken, home, tmp_path)
    assert done.returncode != 0
    assert "tray-proxi is not executable" in done.stderr and "execc" in done.stderr


def test_system_template_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # For systemd before 256 (docs/headless.md): the system manager decrypts, the relay runs
    # as the user. Verified as an instance for the user running the test.
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    instance = tmp_path / f"tray-proxy@{user}.service"
    shutil.copy(SYSTEM_UNIT, instance)
    done = subprocess.run(
        [_analyze(), "verify", str(instance)],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SYSTEMD_LOG_LEVEL": "notice"},
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(SYSTEM_UNIT.read_text())
    assert unit["Service"]["User"] == "%i"
    assert unit["Service"]["LoadCredentialEncrypted"].startswith("corp:/etc/credstore.encrypted/")


def test_unit_runs_the_headless_relay_with_the_credential() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["ExecStart"] == "%h/.local/bin/tray-proxy run"
    name, _, source = service["LoadCredentialEncrypted"].partition(":")
    assert name == "corp" and source.endswith(".cred")
    assert "LoadCredential" not in service  # never a plaintext file
    assert service["KillSignal"] == "SIGTERM" and service["RestartPreventExitStatus"] == "2"


# --------------------------------------------------------------------------- the credential


_DENIED = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b'Proxy-Authenticate: Basic realm="t"\r\nContent-Length: 0\r\n\r\n'
)


class _LoginCheckingProxy:
    """A loopback HTTP proxy that records the Proxy-Authorization of each CONNECT and
    answers 407 (the relay's start-up does not need a tunnel; the test needs the login)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.logins: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                for line in data.decode("latin-1").split("\r\n"):
                    if line.lower().startswith("proxy-authorization:"):
                        self.logins.append(line.split(":", 1)[1].strip())
                conn.sendall(_DENIED)

    def close(self) -> None:
        self.sock.close()


def _run(tmp_path: Path, credentials: Path, port: int) -> subprocess.Popen[str]:
    config = tmp_path / "config.toml"
    relay_port = _free_port()
    config.write_text(
        f'[relay]\nport = {relay_port}\n\n[[upstream]]\nname = "corp"\n'
        f'url = "http://127.0.0.1:{port}"\nusername = "alice"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)  # no keyring: the credential must do
    env.update(CREDENTIALS_DIRECTORY=str(credentials), INVOCATION_ID="0123456789abcdef",
               HOME=str(tmp_path), PYTHONUNBUFFERED="1")  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "tray_proxy", "run", "--no-redirect", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_run_takes_the_password_from_credentials_directory(tmp_path: Path) -> None:
    import base64

    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    secret = "s3cr:et-from-systemd"
    fd = os.open(credentials / "corp", os.O_WRONLY | os.O_CREAT, 0o400)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")  # systemd-creds decrypt keeps a trailing newline
    proxy = _LoginCheckingProxy()
    proc = _run(tmp_path, credentials, proxy.port)
    lines: list[str] = []
    try:
        _read_until(proc, "relay listening", lines)
        assert not any("no password" in line for line in lines), lines
        # `credentials test` is what a user runs to check it, with the same source order.
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        env.update(CREDENTIALS_DIRECTORY=str(credentials), INVOCATION_ID="x", HOME=str(tmp_path))
        subprocess.run(
            [sys.executable, "-m", "tray_proxy", "credentials", "test", "corp", "--config",
             str(tmp_path / "config.toml"), "--target", "example.test:443"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        expected = "Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()
        assert proxy.logins and set(proxy.logins) == {expected}, proxy.logins
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        proxy.close()
    assert proc.returncode == 0, lines


def _read_until(proc: subprocess.Popen[str], text: str, lines: list[str]) -> str:
    """stderr lines of `proc` into `lines` until one contains `text` (or it ends: fail).
    readline blocks, so the bound is the process itself: it logs or exits within its own
    start-up timeouts (keyring 15 s), and the test's timeout covers the rest."""
    assert proc.stderr is not None
    for _ in range(200):
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if text in line:
            return line
    raise AssertionError(f"no {text!r} from tray-proxy run: {lines}")


def test_run_without_the_credential_names_it(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    proxy = _LoginCheckingProxy()
    proc = _run(tmp_path, credentials, proxy.port)
    lines: list[str] = []
    try:
        line = _read_until(proc, "no password", lines)
        assert "corp" in line and "tray-proxy credentials set corp" in line, line
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        proxy.close()
    assert proxy.logins == []
