"""The bugs a new user hit in issue 14, end to end in the lab: a changed password reaches the
running `tray-proxy run` (bug 1), and a run with no password switches nothing on (bug 4).

Bug 1 runs everything a user would, in the lab's client namespace, inside a D-Bus session
with a real, unlocked gnome-keyring (tests/integration/keyring_env.py): `tray-proxy
credentials set`, `tray-proxy run` (its relay behind the lab's nft redirect), `tray-proxy
disable|enable|quit`. A driver (this module's `driver` command, run in that session) does
what the test asks, one JSON line in and one out; the test curls through the redirect with no
proxy settings and counts the failed logins in the lab Squid's access log. Passwords go to the
driver on its stdin and to `credentials set` on its stdin: never argv, never env.

Must not import PySide6.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import tomli_w

from tests.integration.app_support import has_table
from tests.integration.keyring_env import MODULE as KEYRING_MODULE
from tests.integration.keyring_env import REPO, KeyringSandbox
from tests.integration.relay import allocate_port
from tests.lab.environment import Lab
from tests.lab.squid import AccessLogEntry

UPSTREAM = "corp"
DRIVER = "tests.integration.test_new_user_bugs_lab"
STEP_TIMEOUT = 60.0


# --------------------------------------------------------------------------- the driver


def _tray_proxy(argv: list[str], stdin: str | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tray_proxy", *argv],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}


class _Driver:
    """Runs in the keyring's D-Bus session, in the lab's client namespace."""

    def __init__(self) -> None:
        self.run: subprocess.Popen[bytes] | None = None
        self.run_log: IO[bytes] | None = None

    def handle(self, op: dict[str, Any]) -> dict[str, Any]:
        kind = op["op"]
        if kind == "cli":  # `tray-proxy ARGV`, the password (if any) on its stdin
            return _tray_proxy(op["argv"], op.get("stdin"))
        if kind == "store":  # straight into the keyring: no notice to the running relay
            return self._store(op["username"], op["password"])
        if kind == "start":
            return self._start(op["config"], Path(op["log"]))
        if kind == "stop":
            return self._stop()
        raise ValueError(f"unknown op {kind!r}")

    def _store(self, username: str, password: str) -> dict[str, Any]:
        import asyncio

        from tray_proxy.keyring_store import CredentialStore
        from tray_proxy.relay.secrets import Secret

        asyncio.run(CredentialStore().set(UPSTREAM, username, Secret(password)))
        return {"rc": 0}

    def _start(self, config: str, log: Path) -> dict[str, Any]:
        self.run_log = log.open("wb")
        self.run = subprocess.Popen(
            [sys.executable, "-m", "tray_proxy", "run", "--config", config, "--no-redirect"],
            stdin=subprocess.DEVNULL,
            stdout=self.run_log,
            stderr=self.run_log,
        )
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            if self.run.poll() is not None:
                return {"rc": self.run.returncode, "state": None}
            status = _tray_proxy(["status", "--json"])
            if status["rc"] in (0, 1) and status["out"].strip():
                state = json.loads(status["out"]).get("state")
                if state not in ("off", "enabling"):
                    return {"rc": 0, "state": state}
            time.sleep(0.1)
        return {"rc": -1, "state": "timeout"}

    def _stop(self) -> dict[str, Any]:
        quit_ = _tray_proxy(["quit"])
        rc = None
        if self.run is not None:
            try:
                rc = self.run.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.run.kill()
                rc = self.run.wait()
        if self.run_log is not None:
            self.run_log.close()
        return {"rc": rc, "quit": quit_}

    def close(self) -> None:
        if self.run is not None and self.run.poll() is None:
            self.run.send_signal(signal.SIGTERM)
            try:
                self.run.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.run.kill()
                self.run.wait()


def driver_main() -> int:
    driver = _Driver()
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = driver.handle(json.loads(line))
            except Exception as exc:  # told to the test, which fails with it
                answer = {"rc": -1, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        driver.close()
    return 0


# --------------------------------------------------------------------------- the test's side


class Session:
    """The driver in a fresh D-Bus session with gnome-keyring, in the client namespace; the
    whole process group is killed when the test ends (pass or fail)."""

    def __init__(self, lab: Lab, sandbox: KeyringSandbox, workdir: Path) -> None:
        argv = [
            "ip", "netns", "exec", lab.client.name,
            "dbus-run-session", "--", sys.executable, "-m", KEYRING_MODULE, "session", "--",
            sys.executable, "-m", DRIVER, "driver",
        ]  # fmt: skip
        env = sandbox.env(
            {"XDG_STATE_HOME": str(workdir / "state"), "PATH": os.environ.get("PATH", "")}
        )
        self.stderr_path = workdir / "session.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )

    def ask(self, **op: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(op) + "\n").encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # every step of the driver is bounded
        assert line, "the driver ended; its stderr:\n" + self.stderr_path.read_text()[-3000:]
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.fixture
def sandbox(tmp_path: Path) -> KeyringSandbox:
    try:
        return KeyringSandbox(tmp_path)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def _config(lab: Lab, workdir: Path, port: int, username: str) -> Path:
    squid = lab.squid
    path = workdir / "config.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "relay": {
                    "port": port,
                    "listen": ["127.0.0.1", "::1"],
                    "upstream": UPSTREAM,
                    "drain_timeout": 1.0,
                },
                "upstream": [
                    {
                        "name": UPSTREAM,
                        "url": f"http://{squid.host}:{squid.port}",
                        "username": username,
                    }
                ],
            }
        )
    )
    return path


def _failed_logins(lab: Lab, t0: float, username: str) -> list[AccessLogEntry]:
    # Squid logs every failed login with the user name it was given.
    return [
        e
        for e in lab.squid.entries()
        if e.method == "CONNECT" and e.time >= t0 - 0.002 and e.status == 407
        and e.user == username
    ]  # fmt: skip


def _curl_ok(lab: Lab) -> bool:
    result = lab.curl(lab.origins.url("https", "/health", "v4"), max_time=20)
    return result.returncode == 0 and result.http_code == 200


@pytest.fixture
def session(lab: Lab, sandbox: KeyringSandbox, tmp_path: Path) -> Iterator[Session]:
    running = Session(lab, sandbox, tmp_path)
    try:
        yield running
    finally:
        running.close()


def test_a_changed_password_reaches_the_running_relay(
    lab: Lab, session: Session, tmp_path: Path
) -> None:
    """Issue 14 bug 1: `credentials set` while `tray-proxy run` runs is used at once; a wrong
    new one costs one failed login; one stored behind its back is read at the next enable."""
    creds = lab.squid.credentials
    assert creds is not None
    port = allocate_port(lab)
    config = _config(lab, tmp_path, port, creds.username)
    wrong1, wrong2 = (f"wrong-{secrets.token_hex(6)}" for _ in range(2))
    conf = ["--config", str(config)]
    t0 = time.time()
    with lab.redirect(port):
        stored = session.ask(op="cli", argv=["credentials", "set", UPSTREAM, *conf], stdin=wrong1)
        assert stored["rc"] == 0, stored
        started = session.ask(op="start", config=str(config), log=str(tmp_path / "run.log"))
        assert started == {"rc": 0, "state": "on"}, (tmp_path / "run.log").read_text()
        assert not _curl_ok(lab) and not _curl_ok(lab)
        assert len(_failed_logins(lab, t0, creds.username)) == 1

        # The right one, while the relay runs: used from the next connection on.
        t1 = time.time()
        changed = session.ask(
            op="cli", argv=["credentials", "set", UPSTREAM, *conf], stdin=creds.password
        )
        assert changed["rc"] == 0 and changed["err"] == "", changed
        assert f"the running tray-proxy uses it for {UPSTREAM} from now on" in changed["out"]
        assert _curl_ok(lab)

        # A wrong new one: its own single failed login, then the relay stops sending it.
        changed = session.ask(op="cli", argv=["credentials", "set", UPSTREAM, *conf], stdin=wrong2)
        assert changed["rc"] == 0 and changed["err"] == "", changed
        assert not _curl_ok(lab) and not _curl_ok(lab)
        assert len(_failed_logins(lab, t1, creds.username)) == 1

        # Stored behind the relay's back (no notice): read again when switched on again.
        assert session.ask(op="store", username=creds.username, password=creds.password)
        for command in ("disable", "enable"):
            switched = session.ask(op="cli", argv=[command])
            assert switched["rc"] == 0, switched
        assert _curl_ok(lab)
        stopped = session.ask(op="stop")
    assert stopped["rc"] == 0, stopped
    run_log = (tmp_path / "run.log").read_text()
    for secret in (creds.password, wrong1, wrong2):
        assert secret not in run_log
    assert "Traceback" not in run_log


def test_run_without_a_password_switches_no_redirect_on(lab: Lab, tmp_path: Path) -> None:
    """Issue 14 bug 4: no password for the proxy's user: exit 2, one line, no nft table."""
    port = allocate_port(lab)
    config = _config(lab, tmp_path, port, "alice")
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)  # no keyring here
    env["CREDENTIALS_DIRECTORY"] = str(credentials)  # and nothing in it
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        (tmp_path / var).mkdir(mode=0o700)
        env[var] = str(tmp_path / var)
    assert not has_table(lab)
    proc = lab.client.popen(
        [sys.executable, "-m", "tray_proxy", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    table_seen = False
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            table_seen = table_seen or has_table(lab)
            time.sleep(0.05)
        assert proc.poll() is not None, "tray-proxy run went on without a password"
    finally:
        proc.stop(grace=10.0)  # the helper deletes its table when its input closes
        lab.client.forget(proc)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert not table_seen and not has_table(lab)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "no password for alice at proxy corp" in lines[0]
    assert "the redirect was not switched on" in lines[0]
    assert f"`tray-proxy credentials set {UPSTREAM}`" in lines[0]


if __name__ == "__main__":
    if sys.argv[1:] == ["driver"]:
        sys.exit(driver_main())
    print(f"usage: python -m {DRIVER} driver", file=sys.stderr)
    sys.exit(2)
