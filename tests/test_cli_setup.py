"""`tray-proxy setup` and its steps (setup_flow.py).

- The steps' pure parts: the name from the host (never "proxy"), checking answers, the
  result wording, first-run detection.
- The test's result words through real proxies on loopback (tests/relay/stubs.py: 407, 403,
  a proxy that never answers, a port nobody listens on).
- The command as a user meets it, in the real lab (`lab` marker): the real `tray-proxy setup`
  in the lab's client namespace, in a fresh D-Bus session with a real gnome-keyring
  (tests/integration/keyring_env.py), against the lab's real Squid with Basic auth (stock
  deny rules). Interactively it runs on a real pseudo-terminal (os.openpty, `setsid --ctty`:
  getpass reads /dev/tty with echo off, as for a user); scripted with --yes and the password
  on stdin. The proxy comes from Windows' settings through the FAKE reg.exe/netsh.exe
  (tests/fakes/windows, real output formats; Windows cannot run here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.integration.keyring_env import KeyringSandbox
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME
from tests.lab.squid import AccessLogEntry, BasicAuth
from tests.relay.stubs import ConnectProxy, Mode, Origin, echo, http_upstream
from tray_proxy.config import load_config, save_config
from tray_proxy.discovery import Discovery, Found
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult, probe_upstream
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy
from tray_proxy.setup_flow import (
    SetupAnswers,
    SetupError,
    SetupFlow,
    describe_probe,
    needs_setup,
    suggest_name,
)

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "fakes" / "windows"
PTY_DEADLINE = 90.0


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("proxy.corp.example", "corp"),
        ("webproxy.eu.acme.com", "acme"),
        ("proxy.acme.co.uk", "acme"),
        ("gw-01.bigbank.de", "bigbank"),
        ("proxy", "corp"),
        ("proxy.local", "corp"),
        ("squid.lan", "corp"),
        ("10.200.2.2", "corp"),
        ("2001:db8::1", "corp"),
    ],
)
def test_suggested_name_is_whose_proxy_never_proxy(host: str, name: str) -> None:
    assert suggest_name(host) == name


def test_first_run_detection(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    assert needs_setup(path)  # no file: first run, and no "file not found" anywhere
    path.write_text("[relay]\nport = 12080\n")
    assert needs_setup(path)  # a file without an upstream
    path.write_text('[[upstream]]\nname = "corp"\nurl = "http://p.corp.example:8080"\n')
    assert not needs_setup(path)
    path.write_text("[relay\n")
    assert not needs_setup(path)  # broken: the app shows that error instead


# --------------------------------------------------------------------------- checking answers


def test_check_fills_the_name_and_the_scheme(tmp_path: Path) -> None:
    flow = SetupFlow(tmp_path / "config.toml")
    checked = flow.check(
        SetupAnswers("proxy.corp.example:3128", "", "alice", Secret("pw"), "pypi.org:443")
    )
    assert (checked.upstream.name, checked.upstream.url) == (
        "corp",
        "http://proxy.corp.example:3128",
    )
    assert checked.credentials is not None and checked.credentials.username == "alice"
    assert checked.target == ("pypi.org", 443)
    assert "pw" not in repr(checked)


@pytest.mark.parametrize(
    ("answers", "words"),
    [
        (SetupAnswers(""), "no proxy URL given"),
        (SetupAnswers("https://p.corp:443"), "the proxy URL scheme is not supported"),
        (SetupAnswers("http://alice:pw@p.corp:8080"), "the proxy URL must not contain a user"),
        (SetupAnswers("p.corp:99999"), "the proxy URL the port must be a number 1-65535"),
        (SetupAnswers("p.corp:8080", "my proxy"), "the name must be 1-64 characters"),
        (SetupAnswers("p.corp:8080", username="alice"), "no password given for alice"),
        (SetupAnswers("p.corp:8080", username="a:b", password=Secret("x")), 'must not contain ":"'),
        (SetupAnswers("p.corp:8080", target="pypi.org"), 'the test target must be "HOST:PORT"'),
    ],
)
def test_check_says_what_is_wrong(tmp_path: Path, answers: SetupAnswers, words: str) -> None:
    with pytest.raises(SetupError) as caught:
        SetupFlow(tmp_path / "config.toml").check(answers)
    assert words in str(caught.value)
    assert "pw" not in str(caught.value)


def test_prefill_from_discovery_and_existing_settings(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    flow = SetupFlow(path)
    found = Discovery(
        (
            Found("environment: https_proxy", "http://proxy.corp.example:8080", (), None, "bob"),
            Found("Windows Internet Options (WinINET)", None, (), "http://wpad.corp/p.pac"),
        )
    )
    prefill = flow.prefill(found)
    assert (prefill.proxy_url, prefill.name, prefill.username) == (
        "http://proxy.corp.example:8080",
        "corp",
        "bob",
    )
    assert prefill.pac_url == "http://wpad.corp/p.pac"
    assert prefill.target == "www.microsoft.com:443"
    assert prefill.chosen is not None and prefill.chosen.source == "environment: https_proxy"
    # Nothing found: the settings' own active upstream.
    path.write_text(
        '[probe]\ntarget = "pypi.org:443"\n[[upstream]]\nname = "work"\n'
        'url = "http://p.work.example:3128"\nusername = "al"\n'
    )
    prefill = flow.prefill(Discovery())
    assert (prefill.proxy_url, prefill.name, prefill.username, prefill.target) == (
        "http://p.work.example:3128",
        "work",
        "al",
        "pypi.org:443",
    )


def test_a_broken_settings_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[relay]\nport = 'x'\n")
    with pytest.raises(SetupError) as caught:
        SetupFlow(path).prefill(Discovery())
    assert "relay.port" in str(caught.value) and "it was not changed" in str(caught.value)
    assert path.read_text() == "[relay]\nport = 'x'\n"


def test_save_without_login_writes_an_active_upstream_and_keeps_others(tmp_path: Path) -> None:
    # No password, so no keyring: the settings file alone (the keyring is tested in the lab).
    path = tmp_path / "config.toml"
    path.write_text('[[upstream]]\nname = "old"\nurl = "http://old.example:8080"\n')
    flow = SetupFlow(path)
    checked = flow.check(
        SetupAnswers("p.corp.example:3128", target="pypi.org:443", pac_url="http://w/p.pac")
    )
    done = asyncio.run(flow.save(checked))
    assert done == [f"wrote {path} (upstream corp, http://p.corp.example:3128)"]
    config = load_config(path)
    assert [u.name for u in config.upstreams] == ["old", "corp"]
    assert config.relay.upstream == "corp"
    assert config.probe.target == ("pypi.org", 443)
    assert config.routing.pac_url == "http://w/p.pac"
    assert (path.stat().st_mode & 0o777) == 0o600


# --------------------------------------------------------------------------- the result's words


def test_result_words_through_real_proxies_on_loopback() -> None:
    async def main() -> dict[str, tuple[ProbeResult, str]]:
        out: dict[str, tuple[ProbeResult, str]] = {}
        async with contextlib.AsyncExitStack() as stack:
            origin = await stack.enter_async_context(Origin(echo))
            authed = await stack.enter_async_context(ConnectProxy(credentials=("alice", "right")))
            forbidding = await stack.enter_async_context(ConnectProxy(Mode.FORBIDDEN))
            silent = await stack.enter_async_context(ConnectProxy(Mode.SILENT))
            target = f"{origin.address[0]}:{origin.address[1]}"
            cases: Sequence[tuple[str, UpstreamProxy, Credentials | None, float]] = [
                ("ok", http_upstream(authed, username="alice"), _creds("right"), 5),
                ("407", http_upstream(authed, username="alice"), _creds("wrong"), 5),
                ("403", http_upstream(forbidding), None, 5),
                ("silent", http_upstream(silent), None, 0.5),
            ]
            for key, upstream, creds, timeout in cases:
                result = await probe_upstream(upstream, creds, origin.address, timeout)
                proxy = f"{upstream.host}:{upstream.port}"
                out[key] = (result, describe_probe(result, proxy, target))
            with socket.socket() as unused:
                unused.bind(("127.0.0.1", 0))
                port = unused.getsockname()[1]
            gone = UpstreamProxy("gone", UpstreamKind.HTTP, "127.0.0.1", port)
            result = await probe_upstream(gone, None, origin.address, 5)
            out["refused"] = (result, describe_probe(result, f"127.0.0.1:{port}", target))
        return out

    out = asyncio.run(main())
    ms = r"[0-9.]+ ms"
    assert re.fullmatch(rf"OK: 127\.0\.0\.1:\d+ opened a tunnel to 127\.0\.0\.1:\d+ in {ms}\.",
                        out["ok"][1]), out["ok"][1]  # fmt: skip
    assert re.fullmatch(rf"The proxy answered \(407\) in {ms}: 127\.0\.0\.1:\d+ rejected the "
                        r"password for alice \(407\)\.", out["407"][1]), out["407"][1]  # fmt: skip
    assert re.fullmatch(rf"The proxy answered \(403\) in {ms}: forbidden by the proxy \(403 "
                        r"Forbidden\)\.", out["403"][1]), out["403"][1]  # fmt: skip
    assert out["silent"][0].reached_proxy is True
    assert out["silent"][1].startswith("No answer from 127.0.0.1:"), out["silent"][1]
    assert "took the connection but did not answer (timed out after 0.5 s)" in out["silent"][1]
    assert out["refused"][0].reached_proxy is False
    assert out["refused"][1].startswith("No answer from the proxy 127.0.0.1:"), out["refused"]
    assert "wrong" not in repr(out)


def test_a_proxy_that_cannot_reach_the_target_is_no_answer_from_the_target() -> None:
    result = ProbeResult(
        ProbeOutcome.UNREACHABLE,
        None,
        503,
        "p.corp:8080 could not reach pypi.org:443 (503 Service Unavailable)",
        answered_s=0.0123,
        reached_proxy=True,
    )
    assert describe_probe(result, "p.corp:8080", "pypi.org:443") == (
        "No answer from pypi.org:443: the proxy answered (503) in 12 ms: p.corp:8080 could not "
        "reach pypi.org:443 (503 Service Unavailable)."
    )


def _creds(password: str) -> Credentials:
    return Credentials("alice", Secret(password))


# --------------------------------------------------------------------------- the command, no lab


def _cli(argv: Sequence[str], home: Path, stdin: bytes = b"",
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "PYTHONPATH": str(REPO),
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "tray_proxy", "setup", *argv],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_not_a_terminal_without_yes_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _cli([], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tray-proxy: stdin is not a terminal: run `tray-proxy setup` in a terminal, or pass "
        "--yes with --proxy URL, --user NAME and --password-stdin"
    ]


def test_yes_with_nothing_found_and_no_config_never_says_file_not_found(tmp_path: Path) -> None:
    result = _cli(["--yes"], tmp_path)
    assert result.returncode == 2
    assert "no proxy was found in the environment or Windows' settings; pass --proxy URL" in (
        result.stderr
    )
    assert "not found" not in result.stderr.replace("no proxy was found", "")
    assert not (tmp_path / ".config").exists()


def test_yes_user_without_password_stdin_is_refused(tmp_path: Path) -> None:
    result = _cli(["--yes", "--proxy", "http://p.corp.example:8080", "--user", "al"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "tray-proxy: --user al needs --password-stdin (the "\
        "password on stdin)"  # fmt: skip


def test_yes_test_failure_saves_nothing(tmp_path: Path) -> None:
    # A port nobody listens on: the test fails, exit 2, no settings file.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = _cli(
        ["--yes", "--proxy", f"http://127.0.0.1:{port}", "--test-target", "pypi.org:443"],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"No answer from the proxy 127.0.0.1:{port}: connection refused" in result.stdout
    assert result.stderr.strip() == "tray-proxy: the test failed; nothing was saved (see above)"
    assert not (tmp_path / ".config" / "tray-proxy" / "config.toml").exists()


def test_the_environment_proxy_is_shown_before_it_is_used(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = _cli(["--yes"], tmp_path, env={"https_proxy": f"http://127.0.0.1:{port}"})
    lines = result.stdout.splitlines()
    shown = lines.index(f"  1. environment: https_proxy: http://127.0.0.1:{port}")
    used = lines.index(f"Using http://127.0.0.1:{port} (from environment: https_proxy).")
    assert shown < used
    assert result.returncode == 2


# --------------------------------------------------------------------------- the lab


def _windows_env(tmp_path: Path, proxy: str, pac: str | None = None) -> dict[str, str]:
    """WSL as far as discovery can tell, with Windows' Internet Options naming `proxy`."""
    text = (FAKES / "captures" / "reg-enabled.txt").read_text()
    text = text.replace("proxy.corp.example:8080", proxy)
    if pac is not None:
        text = text.replace(
            "    ProxyOverride", f"    AutoConfigURL    REG_SZ    {pac}\n    ProxyOverride"
        )
    reg = tmp_path / "reg-capture.txt"
    reg.write_text(text)
    return {
        "PATH": f"{FAKES}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "WSL_DISTRO_NAME": "Debian",
        "FAKE_WINDOWS_REG": str(reg),
        "FAKE_WINDOWS_NETSH": "netsh-direct.txt",
    }


def _squid_login(lab: Lab) -> tuple[str, str]:
    auth = lab.squid.auth
    assert isinstance(auth, BasicAuth), f"the lab's Squid should use Basic auth, has {auth}"
    creds = auth.credentials
    assert creds is not None
    return creds.username, creds.password


def _keyring_entry(sandbox: KeyringSandbox, name: str) -> dict[str, str] | None:
    import json

    found = sandbox.run(
        ["secret-tool", "lookup", "service", "tray-proxy", "username", name], timeout=60.0
    )
    if found.returncode != 0 or not found.stdout.strip():
        return None
    entry: dict[str, str] = json.loads(found.stdout)
    return entry


def _setup_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tray_proxy", "setup", *args]


@pytest.mark.lab
def test_yes_from_windows_settings_into_the_keyring_through_squid(lab: Lab, tmp_path: Path) -> None:
    user, password = _squid_login(lab)
    proxy = f"{lab.squid.host}:{lab.squid.port}"
    sandbox = KeyringSandbox(tmp_path)
    config = sandbox.home / ".config" / "tray-proxy" / "config.toml"
    env = _windows_env(tmp_path, proxy, pac="http://wpad.lab.test/proxy.pac")
    started = time.time()
    result = sandbox.run(
        _setup_argv("--yes", "--user", user, "--password-stdin", "--test-target",
                    f"{HOSTNAME}:443"),
        input=f"{password}\n".encode(),
        env=env,
        prefix=["ip", "netns", "exec", lab.client.name],
        timeout=120.0,
    )  # fmt: skip
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    assert password not in out and password not in result.stderr
    assert f"  1. Windows Internet Options (WinINET): http://{proxy}" in out
    assert f"Using http://{proxy} (from Windows Internet Options (WinINET))." in out
    assert re.search(rf"OK: {re.escape(proxy)} opened a tunnel to {HOSTNAME}:443 in [0-9.]+ ms",
                     out), out  # fmt: skip
    saved = load_config(config)
    assert [(u.name, u.url, u.username) for u in saved.upstreams] == [
        ("corp", f"http://{proxy}", user)
    ]
    assert saved.relay.upstream == "corp"
    assert saved.probe.target == (HOSTNAME, 443)
    assert saved.routing.pac_url == "http://wpad.lab.test/proxy.pac"
    assert password not in config.read_text()
    entry = _keyring_entry(sandbox, "corp")
    assert entry is not None and entry.get("username") == user
    assert entry.get("password") == password, "the keyring holds another password"
    lab.squid.wait_for_entry(lambda e: _ours(e, started) and e.status == 200, timeout=15.0)


@pytest.mark.lab
def test_yes_wrong_password_exits_2_and_stores_nothing(lab: Lab, tmp_path: Path) -> None:
    user, password = _squid_login(lab)
    wrong = password + "-wrong"
    sandbox = KeyringSandbox(tmp_path)
    config = sandbox.home / ".config" / "tray-proxy" / "config.toml"
    result = sandbox.run(
        _setup_argv("--yes", "--proxy", lab.squid.proxy_url(), "--user", user,
                    "--password-stdin", "--test-target", f"{HOSTNAME}:443"),
        input=f"{wrong}\n".encode(),
        prefix=["ip", "netns", "exec", lab.client.name],
        timeout=120.0,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert re.search(r"The proxy answered \(407\) in [0-9.]+ ms: .* rejected the password for "
                     rf"{re.escape(user)} \(407\)\.", result.stdout), result.stdout  # fmt: skip
    assert "Check the user name and password." in result.stdout
    # One line of ours (the D-Bus session may add its own about fd limits).
    ours = [line for line in result.stderr.splitlines() if line.startswith("tray-proxy:")]
    assert ours == ["tray-proxy: the test failed; nothing was saved (see above)"]
    assert wrong not in result.stdout + result.stderr
    assert not config.exists()
    assert _keyring_entry(sandbox, "corp") is None


@pytest.mark.lab
def test_interactive_on_a_terminal_retries_after_a_wrong_password(lab: Lab, tmp_path: Path) -> None:
    user, password = _squid_login(lab)
    wrong = password + "-wrong"
    proxy = f"{lab.squid.host}:{lab.squid.port}"
    sandbox = KeyringSandbox(tmp_path)
    config = sandbox.home / ".config" / "tray-proxy" / "config.toml"
    env = sandbox.env(_windows_env(tmp_path, proxy))
    argv = [
        "ip", "netns", "exec", lab.client.name, "dbus-run-session", "--", sys.executable, "-m",
        "tests.integration.keyring_env", "session", "--", *_setup_argv(),
    ]  # fmt: skip
    started = time.time()
    transcript, code = run_on_terminal(
        argv,
        env,
        [
            (r"Proxy URL \(or the number of one found above\) \[http://[^\]]+\]: ", ""),
            (r"A short name for this proxy \[corp\]: ", ""),
            (r"User name \(Enter with nothing: the proxy needs no login\): ", user),
            (rf"Password of {re.escape(user)} \(not shown\): ", wrong),
            (r"Test target \(a site the proxy allows\) \[www\.microsoft\.com:443\]: ",
             f"{HOSTNAME}:443"),
            (r"Change something and test again\? \[Y/n\]: ", "y"),
            (r"Proxy URL \(or the number of one found above\) \[http://[^\]]+\]: ", ""),
            (r"A short name for this proxy \[corp\]: ", ""),
            (rf"User name \(Enter with nothing: the proxy needs no login\) \[{re.escape(user)}\]: ",
             ""),
            (rf"Password of {re.escape(user)} \(not shown\): ", password),
            (rf"Test target \(a site the proxy allows\) \[{re.escape(HOSTNAME)}:443\]: ", ""),
        ],
    )  # fmt: skip
    assert code == 0, transcript
    # getpass switched echo off: neither password reached the terminal.
    assert password not in transcript and wrong not in transcript, "a password was echoed"
    assert f"  1. Windows Internet Options (WinINET): http://{proxy}" in transcript
    first, second = transcript.split("Change something and test again?", 1)
    assert "The proxy answered (407) in" in first and "Check the user name and password." in first
    assert re.search(rf"OK: {re.escape(proxy)} opened a tunnel to {HOSTNAME}:443 in", second)
    assert "Done: stored the password of" in second and "Done: wrote" in second
    saved = load_config(config)
    assert [(u.name, u.username) for u in saved.upstreams] == [("corp", user)]
    assert saved.probe.target == (HOSTNAME, 443)
    entry = _keyring_entry(sandbox, "corp")
    assert entry is not None and entry.get("username") == user
    assert entry.get("password") == password, "the keyring holds another password"
    lab.squid.wait_for_entry(lambda e: _ours(e, started) and e.status == 200, timeout=15.0)
    entries = [e for e in lab.squid.entries() if _ours(e, started)]
    assert any(e.status == 407 for e in entries), entries


def test_existing_settings_stay_when_setup_adds_an_upstream(tmp_path: Path) -> None:
    # save_config's own output read back by setup (no lab): the other sections survive.
    path = tmp_path / "config.toml"
    base = load_config(path, missing_ok=True)
    save_config(base, path)
    flow = SetupFlow(path)
    asyncio.run(flow.save(flow.check(SetupAnswers("p.corp.example:3128"))))
    assert load_config(path).relay.port == base.relay.port


def _ours(entry: AccessLogEntry, started: float) -> bool:
    return entry.method == "CONNECT" and entry.time >= started - 1 and HOSTNAME in entry.uri


def run_on_terminal(
    argv: Sequence[str],
    env: Mapping[str, str],
    script: Sequence[tuple[str, str]],
    deadline: float = PTY_DEADLINE,
) -> tuple[str, int]:
    """Run `argv` on a new pseudo-terminal as its controlling terminal (a new session, as a
    login shell gives), answer each prompt of `script` (regex, reply) in order, and return
    the whole transcript and the exit code. Bounded by `deadline`; the session's processes
    are killed at the end, pass or fail."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["setsid", "--ctty", *argv],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=dict(env),
        cwd=REPO,
    )
    os.close(slave)
    transcript = b""
    pos = 0  # answered prompts are before this offset
    step = 0
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process let go of the terminal
                    chunk = b""
                if not chunk:
                    break
                transcript += chunk
            if step < len(script):
                text = transcript.decode("utf-8", "replace")
                match = re.compile(script[step][0]).search(text, pos)
                if match is not None:
                    os.write(master, script[step][1].encode() + b"\r")
                    pos = match.end()
                    step += 1
            elif proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=max(0.1, end - time.monotonic()))
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = transcript.decode("utf-8", "replace").replace("\r\n", "\n")
    assert step == len(script), f"stopped at prompt {step} ({script[step][0]!r}):\n{text}"
    return text, code


# --------------------------------------------------------------------------- [probe] target


def test_the_credentials_dialogs_test_goes_to_the_probe_target_setting(tmp_path: Path) -> None:
    """The app's UpstreamEditorService (the credentials dialog's Test) asks the proxy for the
    settings' [probe] target, not a fixed host."""
    from tests.controller.fakes import FakeRedirect, FakeRelayFactory, Log
    from tray_proxy.app import UpstreamEditorService
    from tray_proxy.controller import ProxyController
    from tray_proxy.controller.services import ConfigFile

    async def main() -> tuple[ProbeResult, list[tuple[str, int] | None], tuple[str, int]]:
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            path = tmp_path / "config.toml"
            host, port = origin.address
            path.write_text(
                f'[probe]\ntarget = "{host}:{port}"\ntimeout = 3\n[[upstream]]\nname = "corp"\n'
                f'url = "http://{proxy.address[0]}:{proxy.address[1]}"\n'
            )
            controller = ProxyController(
                ConfigFile(path), FakeRelayFactory(Log()), FakeRedirect(Log())
            )
            editor = UpstreamEditorService(controller)
            result = await editor.probe(editor.upstreams()[0], None)
            return result, [r.target for r in proxy.requests], origin.address

    result, targets, origin = asyncio.run(main())
    assert result.ok, result
    assert targets == [origin]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[probe]\ntarget = "pypi.org"', 'probe.target: must be "HOST:PORT"'),
        ('[probe]\ntarget = "pypi.org:0"', "probe.target: the port must be a number 1-65535"),
        ('[probe]\ntarget = "[zz]:443"', "probe.target: the host in [...] must be an IPv6"),
        ("[probe]\ntimeout = 0", "probe.timeout: must be a number of seconds > 0"),
        ('[probe]\ntarjet = "x:1"', 'probe.tarjet: unknown key; did you mean "target"?'),
        ('[routing]\npac_url = "ftp://x/p.pac"', "routing.pac_url: must start with http://"),
        ('[routing]\npac_url = "http://u:pw@wpad/p.pac"', "routing.pac_url: must not contain"),
        ("routing = 3", "routing: must be a table written [routing]"),
    ],
)
def test_probe_and_routing_settings_are_checked(text: str, problem: str) -> None:
    from tray_proxy.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert problem in str(caught.value)
    assert "pw@" not in str(caught.value)


def test_probe_and_routing_settings_survive_a_save_by_the_app(tmp_path: Path) -> None:
    """Written by setup, kept when the app saves an upstream (credentials dialog)."""
    from tray_proxy.config import parse_config
    from tray_proxy.config_edits import with_upstream

    path = tmp_path / "config.toml"
    path.write_text(
        '[probe]\ntarget = "[2001:db8::1]:8443"\ntimeout = 4.5\n'
        '[routing]\npac_url = "https://wpad.corp.example/proxy.pac"\n'
    )
    config = load_config(path)
    assert config.probe.target == ("2001:db8::1", 8443) and config.probe.timeout == 4.5
    upstream = UpstreamProxy("corp", UpstreamKind.HTTP, "p.corp.example", 8080)
    config, _ = with_upstream(config, upstream)
    save_config(config, path)
    again = load_config(path)
    assert again.probe == config.probe and again.routing == config.routing
    assert parse_config(path.read_text()).routing.pac_url == "https://wpad.corp.example/proxy.pac"
