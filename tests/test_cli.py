"""The headless CLI: exit codes and messages a user sees, a clean run/stop cycle, and the
control socket a headless run answers (`tray-proxy status --json`, `quit`).

Every run gets its own XDG_RUNTIME_DIR (control socket) and XDG_STATE_HOME (history)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_instance import ServerThread
from tray_proxy.cli import main
from tray_proxy.instance import SOCKET_NAME, NotRunningError, send_command
from tray_proxy.monitor.history import HistoryStore
from tray_proxy.monitor.query import HistoryEntry, HistoryFilter
from tray_proxy.relay.records import CloseReason

START_DEADLINE = 20.0


@pytest.fixture(autouse=True)
def private_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run in this process must not meet the control socket of a real instance."""
    directory = tmp_path / "xdg-run"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(directory))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return directory


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
        env=_env(),
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

    import tray_proxy.keyring_store as credentials_module
    from tray_proxy.cli import _credential_source
    from tray_proxy.config import parse_config
    from tray_proxy.relay.secrets import Credentials, Secret

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
    source, problem = asyncio.run(_credential_source(config))
    assert problem == ""
    found = source.get("corp", "alice")
    assert found is not None and found.password.reveal() == "from-keyring"
    assert source.get("spare", "bob") is None
    err = capsys.readouterr().err
    assert "no password for upstream spare (user bob)" in err
    assert "corp" not in err and "from-keyring" not in err


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}


def _wait_until_on(proc: subprocess.Popen[str], sock: Path) -> dict[str, Any]:
    """The run's status once it has switched on (it answers from the start: "enabling")."""
    deadline = time.monotonic() + START_DEADLINE
    while True:
        with contextlib.suppress(NotRunningError):
            answer = send_command("status", sock, timeout=5)
            if answer["status"]["state"] not in ("off", "enabling"):
                return answer
        assert proc.poll() is None, f"tray-proxy run exited with {proc.returncode}"
        assert time.monotonic() < deadline, "tray-proxy run did not answer on its socket"
        time.sleep(0.05)


def test_headless_run_answers_status_and_quit_over_the_control_socket(
    tmp_path: Path, private_runtime: Path
) -> None:
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
        env=_env(),
    )
    sock = private_runtime / SOCKET_NAME
    try:
        answer = _wait_until_on(proc, sock)
        assert answer["instance"] == "run"
        status = answer["status"]
        assert isinstance(status, dict)
        assert status["state"] == "on"
        assert "--no-redirect" in status["message"]
        assert status["relay_addresses"] == [["127.0.0.1", port]]
        # The CLI itself, as a user types it.
        shown = subprocess.run(
            [sys.executable, "-m", "tray_proxy", "status", "--json"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert '"state": "on"' in shown.stdout
        # A connection straight to the relay was not redirected: it fails, and is kept. The
        # socket stays open (the relay closed its side) until the row is in the history, so
        # the attribution finds this process.
        history = tmp_path / "state" / "tray-proxy" / "history.sqlite3"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as direct:
            direct.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert direct.recv(1) == b""
            entries = _wait_for_history(history)
        assert send_command("quit", sock) == {"ok": True}
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "relay listening on" in err and "stopped" in err
        assert "Traceback" not in err
        assert not sock.exists()
        # The headless run writes the same history as the app (`tray-proxy log` reads it).
        assert len(entries) == 1
        row = entries[0].row
        # Which of the two depends on whether the kernel has conntrack state for it.
        assert row.close_reason in (CloseReason.NOT_REDIRECTED, CloseReason.NO_ORIGINAL_DST)
        assert row.failed and row.words
        assert row.process is not None and row.process.pid == os.getpid()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_for_history(path: Path) -> tuple[HistoryEntry, ...]:
    deadline = time.monotonic() + START_DEADLINE
    while True:
        if path.exists():
            store = HistoryStore(path)
            try:
                entries = store.page(HistoryFilter()).entries
            finally:
                store.close()
            if entries:
                return entries
        assert time.monotonic() < deadline, "the connection never reached the history"
        time.sleep(0.05)


class TrayAppThread(ServerThread):
    """A control socket answering as the tray app does."""

    async def handle(self, command: str) -> dict[str, object]:
        self.commands.append(command)
        return {"status": {"state": "on", "message": "Redirecting."}, "instance": "tray"}


def test_headless_run_refuses_to_start_beside_the_tray_app(
    tmp_path: Path, private_runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tray = TrayAppThread(private_runtime)
    tray.start()
    try:
        # The settings file does not exist: refusing comes before anything is read.
        code = main(["run", "--config", str(tmp_path / "nope.toml"), "--no-redirect"])
    finally:
        tray.stop()
    assert code == 2
    err = capsys.readouterr().err
    assert "tray-proxy is already running (the tray app" in err
    assert "tray-proxy quit" in err
    assert "nope.toml" not in err
    assert tray.commands == ["status"]


def test_a_second_headless_run_goes_on_without_the_socket(
    tmp_path: Path, private_runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class OtherRun(ServerThread):
        async def handle(self, command: str) -> dict[str, object]:
            self.commands.append(command)
            return {"status": {"state": "on", "message": "x"}, "instance": "run"}

    other = OtherRun(private_runtime)
    other.start()
    try:
        code = main(["run", "--config", str(tmp_path / "nope.toml"), "--no-redirect"])
    finally:
        other.stop()
    assert code == 2  # then it read the (missing) settings file like any run
    err = capsys.readouterr().err
    assert "another `tray-proxy run` holds" in err
    assert "nope.toml" in err


# --------------------------------------------------------------------------- issue 14, bug 8


def _run_into_closed_pipe(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `tray-proxy ARGV | head -1` where head has already gone: the read end of a real
    pipe is closed before the command writes its first byte."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tray_proxy", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=env,
        )
    finally:
        os.close(write_end)
    _out, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode("utf-8", "replace")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, private_runtime: Path) -> None:
    """`tray-proxy status | head -1` (and --help, log) end with no BrokenPipeError."""
    import tests.test_cli_log as log_rows

    env = _env()
    state = tmp_path / "state"
    store = HistoryStore(state / "tray-proxy" / "history.sqlite3")
    try:
        store.write([log_rows.row(i) for i in range(10)])
    finally:
        store.close()
    server = ServerThread(private_runtime)
    server.start()
    try:
        for argv in (["status"], ["status", "--json"], ["--help"], ["log"]):
            code, err = _run_into_closed_pipe(argv, env)
            assert (code, err) == (0, ""), f"tray-proxy {' '.join(argv)}: {err}"
    finally:
        server.stop()
    assert server.commands == ["status", "status"]


# --------------------------------------------------------------------------- issue 14, bug 4


def test_run_without_the_active_upstreams_password_switches_nothing_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No password for the proxy's `username`: exit 2, one line with the command that sets
    it, and no relay (test_new_user_bugs_lab checks that no nft table appears)."""
    port = _free_port()
    path = _write(
        tmp_path,
        f'[relay]\nport = {port}\nlisten = ["127.0.0.1"]\n'
        '[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:9"\nusername = "alice"\n',
    )
    empty = tmp_path / "credentials"
    empty.mkdir(mode=0o700)
    # No keyring reachable here (no D-Bus session), and nothing in $CREDENTIALS_DIRECTORY.
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(empty))
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path / 'no-bus'}")
    # --no-redirect only: on the old code the run went on and switched the redirect on,
    # which a test may do only in a namespace of its own (test_new_user_bugs_lab does).
    assert main(["run", "--config", str(path), "--no-redirect"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "no password for alice at proxy corp" in lines[0]
    assert "the relay was not started" in lines[0]
    assert "`tray-proxy credentials set corp`" in lines[0]
    # Under systemd the file it would read is named too (followups: H8).
    assert f"or as the service credential {empty / 'corp'} and start again" in lines[0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # nothing listens: the relay never started


# --------------------------------------------------------------------------- first start


def test_run_and_credentials_set_without_a_config_point_at_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's first commands say what to run, not "file not found" (issue 14)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    nope = tmp_path / "nope.toml"
    cases = [
        (["run"], "`tray-proxy setup`"),
        (["run", "--config", str(nope), "--no-redirect"], f"`tray-proxy setup --config {nope}`"),
        (["credentials", "set", "corp"], "`tray-proxy setup`"),
        (["credentials", "test", "corp"], "`tray-proxy setup`"),
    ]
    for argv, command in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, (argv, lines)
        assert "no proxy is set up yet" in lines[0] and command in lines[0], (argv, lines)
        assert "not found" not in lines[0]
    assert not (tmp_path / "config-home").exists()  # nothing was written on the way


def _status_when(sock: Path, test: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + START_DEADLINE
    while True:
        status: dict[str, Any] = send_command("status", sock, timeout=5)["status"]
        if test(status):
            return status
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {status}"
        time.sleep(0.05)


def test_headless_run_goes_direct_when_no_proxy_answers_and_reloads_its_settings(
    tmp_path: Path, private_runtime: Path
) -> None:
    """Nothing listens on the proxy's port: the off-network probe says "direct: proxy
    unreachable" in `tray-proxy status`. An edit of the settings file applies while running
    (file watch); `tray-proxy reload` says what needs a switch off and on."""
    port, dead = _free_port(), _free_port()
    head = f'[relay]\nport = {port}\nlisten = ["127.0.0.1"]\n'
    corp = f'[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:{dead}"\n'
    path = _write(tmp_path, head + corp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tray_proxy", "run", "--config", str(path), "--no-redirect"],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    sock = private_runtime / SOCKET_NAME
    try:
        _wait_until_on(proc, sock)
        status = _status_when(sock, lambda s: s["routing"], "going direct")
        assert status["routing"] == "direct: proxy unreachable"
        shown = subprocess.run(
            [sys.executable, "-m", "tray_proxy", "status"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
        assert "routing: direct: proxy unreachable" in shown.stdout.splitlines()
        # The file watch: a second upstream appears in the running instance's status.
        second = '[[upstream]]\nname = "second"\nurl = "http://127.0.0.1:9"\n'
        path.write_text(head + corp + second, encoding="utf-8")
        _status_when(
            sock, lambda s: [u["name"] for u in s["upstreams"]] == ["corp", "second"], "reload"
        )
        # `tray-proxy reload`: a new relay port needs a switch off and on.
        path.write_text(head.replace(str(port), str(_free_port())) + corp, encoding="utf-8")
        said = subprocess.run(
            [sys.executable, "-m", "tray_proxy", "reload"],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
        assert said.returncode == 0, said.stderr
        assert said.stdout == (
            "tray-proxy: The settings were reloaded: new connections follow them; open "
            "connections stay. Changed, and used after a switch off and on: the relay's port.\n"
        )
        assert send_command("quit", sock) == {"ok": True}
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "Proxy unreachable: going direct" in err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


class ConnectRecorder:
    """A loopback 'proxy' in a thread: records each CONNECT head and answers 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.heads.append(head)
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def __enter__(self) -> ConnectRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        self.listener.close()


def test_credentials_test_goes_to_the_probe_target_setting(tmp_path: Path) -> None:
    """Without --target, `credentials test` asks the proxy for the settings' [probe] target,
    the one the app's Test connection uses (followups: H6)."""
    with ConnectRecorder() as proxy:
        path = _write(
            tmp_path,
            '[probe]\ntarget = "intranet.corp.example:8443"\n'
            f'[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:{proxy.port}"\n',
        )
        done = subprocess.run(
            [sys.executable, "-m", "tray_proxy", "credentials", "test", "corp"]
            + ["--config", str(path)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert proxy.heads[0].startswith(b"CONNECT intranet.corp.example:8443 HTTP/1.1\r\n")
    assert "to intranet.corp.example:8443: OK" in done.stdout


def test_setup_tells_the_running_instance_to_read_the_password(
    tmp_path: Path, private_runtime: Path
) -> None:
    """`tray-proxy setup` saved a password: a running instance reads it now (followups: H6),
    as after `tray-proxy credentials set`; only the name travels."""
    running = ServerThread(private_runtime)
    running.start()
    try:
        with ConnectRecorder() as proxy:
            home = tmp_path / "home"
            env = {**_env(), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
            done = subprocess.run(
                [sys.executable, "-m", "tray_proxy", "setup", "--yes", "--proxy"]
                + [f"http://127.0.0.1:{proxy.port}", "--test-target", "pypi.org:443"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
    finally:
        running.stop()
    assert done.returncode == 0, done.stderr
    (command,) = [c for c in running.commands if c.startswith("credentials-changed")]
    name = command.split(" ", 1)[1]
    assert f'name = "{name}"' in (home / ".config" / "tray-proxy" / "config.toml").read_text()
