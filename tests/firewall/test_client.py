"""RedirectController and its helpers: start paths, error words, a full cycle with the real helper.

The full cycles run the source-tree helper inside a namespace the test creates, through the
controller's `command` override; nothing here touches the host's ruleset.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firewall.conftest import Listener, in_ns, read_sysctl, table_present
from tray_proxy.firewall import client as client_module
from tray_proxy.firewall.client import (
    INSTALLED_HELPER_PATH,
    SOURCE_HELPER_PATH,
    SYSTEM_PYTHON,
    AuthorizationDismissedError,
    HelperExitedError,
    HelperNotFoundError,
    HelperTimeoutError,
    NoPrivilegeMethodError,
    NotAuthorizedError,
    RedirectController,
    RedirectStatus,
    SudoNotAllowedError,
    UpstreamResolutionError,
    helper_environment,
    helper_path,
    launch_command,
    polkit_running,
    resolve_upstreams,
)
from tray_proxy.firewall.ruleset import RuleSpec

SPEC = RuleSpec(relay_port=3129)
OWNER = {"owner_uid": 0, "captured": "uid 0 (root) and system accounts (uid < 1000)"}


@pytest.fixture
def relay(netns: str) -> Iterator[Listener]:
    """The relay stand-in: the helper redirects only to a port its caller listens on."""
    listener = Listener(netns, SPEC.relay_port)
    try:
        yield listener
    finally:
        listener.close()


def ns_command(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns, SYSTEM_PYTHON, "-I", SOURCE_HELPER_PATH]


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


# -- which helper, started how


def test_helper_path_prefers_installed_copy(tmp_path: Path) -> None:
    installed = tmp_path / "tray-proxy-helper"
    assert helper_path(euid=1000, environ={}, installed=str(installed)) == SOURCE_HELPER_PATH
    installed.write_text("")
    assert helper_path(euid=1000, environ={}, installed=str(installed)) == str(installed)


def test_helper_override_only_when_already_root(tmp_path: Path) -> None:
    env = {"TRAY_PROXY_HELPER": "/tmp/evil"}
    assert helper_path(euid=0, environ=env, installed="/nonexistent") == "/tmp/evil"
    assert helper_path(euid=1000, environ=env, installed="/nonexistent") == SOURCE_HELPER_PATH


def test_launch_command_choices() -> None:
    tools = {"pkexec": "/usr/bin/pkexec", "sudo": "/usr/bin/sudo"}
    helper = INSTALLED_HELPER_PATH
    assert launch_command(helper, euid=0, which=tools.get, polkit=lambda: True) == [
        SYSTEM_PYTHON,
        "-I",
        helper,
    ]
    assert launch_command(helper, euid=1000, which=tools.get, polkit=lambda: True) == [
        "/usr/bin/pkexec",
        helper,
    ]
    # pkexec without a running polkitd cannot authorise anything: use sudo.
    assert launch_command(helper, euid=1000, which=tools.get, polkit=lambda: False) == [
        "/usr/bin/sudo",
        "-n",
        helper,
    ]
    with pytest.raises(NoPrivilegeMethodError, match="sudoers"):
        launch_command(helper, euid=1000, which=lambda _: None, polkit=lambda: True)


def test_polkit_running_reads_proc(tmp_path: Path) -> None:
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "comm").write_text("bash\n")
    (tmp_path / "self").mkdir()
    assert polkit_running(str(tmp_path)) is False
    (tmp_path / "40").mkdir()
    (tmp_path / "40" / "comm").write_text("polkitd\n")
    assert polkit_running(str(tmp_path)) is True
    assert polkit_running(str(tmp_path / "missing")) is False


# -- start failures become words


@pytest.mark.parametrize(
    ("name", "code", "error", "words"),
    [
        ("pkexec", 126, AuthorizationDismissedError, "dialog was closed"),
        ("pkexec", 127, NotAuthorizedError, "not allowed"),
        ("sudo", 1, SudoNotAllowedError, "a password is required"),
        ("other", 3, HelperExitedError, "exit code 3"),
    ],
)
def test_launcher_exit_codes_give_distinct_messages(
    tmp_path: Path, name: str, code: int, error: type[Exception], words: str
) -> None:
    fake = script(tmp_path, name, f'echo "{name}: a password is required" >&2; exit {code}')

    async def go() -> None:
        controller = RedirectController(command=[fake, "/usr/libexec/x"], stop_timeout=5)
        with pytest.raises(error, match=words):
            await controller.start()
        assert not controller.running

    asyncio.run(go())


def test_missing_helper_is_reported(tmp_path: Path) -> None:
    async def go() -> None:
        controller = RedirectController(command=[str(tmp_path / "nope")])
        with pytest.raises(HelperNotFoundError, match="does not exist"):
            await controller.start()

    asyncio.run(go())


def test_silent_helper_times_out_and_is_killed(tmp_path: Path) -> None:
    fake = script(tmp_path, "silent", "trap '' TERM HUP\nexec sleep 60")

    async def go() -> None:
        controller = RedirectController(command=[fake], start_timeout=0.5, stop_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(HelperTimeoutError, match="did not answer"):
            await controller.start()
        assert time.monotonic() - started < 10
        assert not controller.running

    asyncio.run(go())


def test_stop_kills_a_helper_that_ignores_eof(tmp_path: Path) -> None:
    answer = '{"v":1,"id":1,"ok":true,"active":false,"spec":null}'
    fake = script(
        tmp_path, "stubborn", f"read line\necho '{answer}'\ntrap '' TERM HUP\nexec sleep 60"
    )

    async def go() -> None:
        controller = RedirectController(command=[fake], stop_timeout=1.0)
        await controller.start()
        pid = controller.pid
        assert pid is not None
        started = time.monotonic()
        code = await controller.stop()
        assert code == -signal.SIGKILL
        assert time.monotonic() - started < 10
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    asyncio.run(go())


# -- the real helper in a namespace


def test_full_cycle_with_the_real_helper(netns: str, relay: Listener) -> None:
    reserved_before = read_sysctl(netns, "net/ipv4/ip_local_reserved_ports")

    async def go() -> None:
        controller = RedirectController(command=ns_command(netns))
        await controller.start()
        try:
            assert await controller.status() == RedirectStatus(active=False, spec=None, owner_uid=0)
            await controller.apply(SPEC)
            on = RedirectStatus(active=True, spec=SPEC, table_present=True, **OWNER)
            assert await controller.status() == on
            assert table_present(netns)
            assert await controller.remove() is True
            # Off for new connections; the table stays until the helper exits (stop below).
            off = RedirectStatus(active=False, spec=SPEC, table_present=True, **OWNER)
            assert await controller.status() == off
            assert await controller.remove() is False
            await controller.apply(SPEC)
            assert await controller.status() == on
        finally:
            code = await controller.stop()
        assert code == 0
        assert not controller.running

    asyncio.run(go())
    assert not table_present(netns)
    assert read_sysctl(netns, "net/ipv4/ip_local_reserved_ports") == reserved_before


def test_helper_death_is_reported_on_next_request(netns: str, relay: Listener) -> None:
    async def go() -> None:
        controller = RedirectController(command=ns_command(netns))
        await controller.start()
        try:
            await controller.apply(SPEC)
            pid = controller.pid
            assert pid is not None
            os.kill(pid, signal.SIGTERM)  # the helper cleans up and exits
            with pytest.raises(HelperExitedError, match="has stopped and removed the redirect"):
                await controller.status()
            with pytest.raises(HelperExitedError, match="not running"):
                await controller.status()
        finally:
            await controller.stop()

    asyncio.run(go())
    assert not table_present(netns)
    assert "tray_proxy" not in in_ns(netns, "nft", "list", "ruleset").stdout


# -- upstream resolution


def test_resolve_upstreams_literal_and_localhost() -> None:
    resolved = asyncio.run(
        resolve_upstreams(
            [("127.0.0.1", 3128), ("::1", 1080), ("localhost", 8080), ("127.0.0.1", 3128)]
        )
    )
    assert resolved[:2] == (
        (ipaddress.ip_address("127.0.0.1"), 3128),
        (ipaddress.ip_address("::1"), 1080),
    )
    assert (ipaddress.ip_address("127.0.0.1"), 8080) in resolved
    assert len(resolved) == len(set(resolved))


def test_resolve_upstreams_reports_bad_names() -> None:
    # A 70-character label fails IDNA encoding before any DNS query leaves the host.
    with pytest.raises(UpstreamResolutionError, match="Check the proxy.s address in Credentials"):
        asyncio.run(resolve_upstreams([("x" * 70 + ".corp", 8080)]))


def test_module_constants_match_the_documented_install() -> None:
    assert INSTALLED_HELPER_PATH == "/usr/libexec/tray-proxy/tray-proxy-helper"
    assert stat.S_IMODE(os.stat(client_module.SOURCE_HELPER_PATH).st_mode) == 0o755


# -- Ctrl+C and the stopping app (issue 16 item 8, issue 14 bug 3)


def test_helper_runs_in_a_session_of_its_own(netns: str) -> None:
    async def go() -> None:
        controller = RedirectController(command=ns_command(netns))
        await controller.start()
        try:
            pid = controller.pid
            assert pid is not None
            assert os.getsid(pid) == pid != os.getsid(0)
            assert os.getpgid(pid) != os.getpgid(0)
        finally:
            assert await controller.stop() == 0

    asyncio.run(go())


def test_root_app_gives_its_helper_no_launcher_uid_variables() -> None:
    env = {"PATH": "/usr/bin", "SUDO_UID": "1000", "PKEXEC_UID": "1000", "LANG": "C.UTF-8"}
    assert helper_environment(euid=0, environ=env) == {"PATH": "/usr/bin", "LANG": "C.UTF-8"}
    assert helper_environment(euid=1000, environ=env) is None  # pkexec/sudo build it


def test_remove_after_a_clean_helper_exit_is_no_error(
    netns: str, relay: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    """The helper had already removed its table and exited 0: stopping must stay quiet."""

    async def go() -> None:
        controller = RedirectController(command=ns_command(netns))
        await controller.start()
        await controller.apply(SPEC)
        pid = controller.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        with caplog.at_level(logging.INFO, logger="tray_proxy.firewall.client"):
            assert await controller.remove() is False
            assert await controller.stop() in (0, None)
        assert controller.last_exit == 0

    asyncio.run(go())
    assert not table_present(netns)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_launcher_words_only_before_the_helper_answered() -> None:
    sudo = ["/usr/bin/sudo", "-n", "/usr/libexec/tray-proxy/tray-proxy-helper"]
    assert isinstance(client_module._exit_error(sudo, 1, ""), SudoNotAllowedError)
    after = client_module._exit_error(sudo, 0, "", answered=True)
    assert type(after) is HelperExitedError
    assert "sudo" not in str(after) and "exit code" not in str(after)
    crashed = client_module._exit_error(sudo, 4, "cleanup incomplete", answered=True)
    assert "exit code 4" in str(crashed) and "sudo" not in str(crashed)


# An app that applies the redirect, waits for Ctrl+C, then stops as the real one does.
_APP = """
import asyncio, signal, sys
from tray_proxy.firewall.client import RedirectController
from tray_proxy.firewall.ruleset import RuleSpec

async def main():
    controller = RedirectController(command=sys.argv[1:])
    await controller.start()
    await controller.apply(RuleSpec(relay_port=3129))
    interrupted = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
    print("applied", controller.pid, flush=True)
    await interrupted.wait()
    try:
        print("removed", await controller.remove(), flush=True)
        print("present", (await controller.status()).table_present, flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, str(exc).replace(chr(10), " "), flush=True)
    print("stopped", await controller.stop(), flush=True)

asyncio.run(main())
"""


def test_ctrl_c_to_the_apps_process_group_leaves_the_redirect_to_the_app(
    netns: str, relay: Listener
) -> None:
    """The terminal's SIGINT goes to the whole foreground process group: the helper must not
    be in it, or it deletes the table under open downloads before the app drains them."""
    app = subprocess.Popen(
        [sys.executable, "-c", _APP, *ns_command(netns)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the app's own group stands for the terminal's
    )

    def line() -> str:
        assert app.stdout is not None
        ready, _, _ = select.select([app.stdout], [], [], 30)
        assert ready, "the app did not answer within 30 s"
        return app.stdout.readline().strip()

    try:
        first = line()
        assert first.startswith("applied "), (first, app.stderr.read() if app.poll() else "")
        helper_pid = int(first.split()[1])
        os.killpg(app.pid, signal.SIGINT)
        assert [line(), line(), line()] == ["removed True", "present True", "stopped 0"]
        assert app.wait(30) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(helper_pid, 0)
        assert not table_present(netns)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait(10)
        for stream in (app.stdout, app.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
def test_a_request_given_up_leaves_the_next_one_its_own_answer(
    netns: str, relay: Listener, how: str
) -> None:
    # A request whose caller stopped waiting (the redirect watcher cancelled by a switch-off
    # while it asked for the status, or a helper slow past the timeout) gets its answer later,
    # into the pipe. The next request must not take that answer for its own: `remove` failed
    # with "something unexpected", and the app then ended the helper before the relay drained,
    # so open connections lost their address translation and their clients hung.
    async def go() -> None:
        controller = RedirectController(command=ns_command(netns), request_timeout=1.0)
        await controller.start()
        pid = controller.pid
        assert pid is not None
        try:
            await controller.apply(SPEC)
            os.kill(pid, signal.SIGSTOP)  # it cannot answer until SIGCONT
            try:
                asked = asyncio.create_task(controller.status())
                if how == "cancelled":
                    for _ in range(20):
                        await asyncio.sleep(0)
                    assert not asked.done()
                    asked.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await asked
                else:
                    with pytest.raises(HelperTimeoutError, match="did not answer 'status'"):
                        await asked
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await controller.remove() is True
            off = RedirectStatus(active=False, spec=SPEC, table_present=True, **OWNER)
            assert await controller.status() == off
            assert await controller.remove() is False
        finally:
            code = await controller.stop()
        assert code == 0

    asyncio.run(go())
    assert not table_present(netns)
