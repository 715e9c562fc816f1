"""RedirectController and its helpers: start paths, error words, a full cycle with the real helper.

The full cycles run the source-tree helper inside a namespace the test creates, through the
controller's `command` override; nothing here touches the host's ruleset.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from tests.firewall.conftest import in_ns, read_sysctl, table_present
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
    helper_path,
    launch_command,
    polkit_running,
    resolve_upstreams,
)
from tray_proxy.firewall.ruleset import RuleSpec

SPEC = RuleSpec(relay_port=3129)


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


def test_full_cycle_with_the_real_helper(netns: str) -> None:
    reserved_before = read_sysctl(netns, "net/ipv4/ip_local_reserved_ports")

    async def go() -> None:
        controller = RedirectController(command=ns_command(netns))
        await controller.start()
        try:
            assert await controller.status() == RedirectStatus(active=False, spec=None)
            await controller.apply(SPEC)
            on = RedirectStatus(active=True, spec=SPEC, table_present=True)
            assert await controller.status() == on
            assert table_present(netns)
            assert await controller.remove() is True
            # Off for new connections; the table stays until the helper exits (stop below).
            off = RedirectStatus(active=False, spec=SPEC, table_present=True)
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


def test_helper_death_is_reported_on_next_request(netns: str) -> None:
    async def go() -> None:
        controller = RedirectController(command=ns_command(netns))
        await controller.start()
        try:
            await controller.apply(SPEC)
            pid = controller.pid
            assert pid is not None
            os.kill(pid, signal.SIGTERM)  # the helper cleans up and exits
            with pytest.raises(HelperExitedError, match="exit code 0"):
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
    with pytest.raises(UpstreamResolutionError, match="Check the proxy name"):
        asyncio.run(resolve_upstreams([("x" * 70 + ".corp", 8080)]))


def test_module_constants_match_the_documented_install() -> None:
    assert INSTALLED_HELPER_PATH == "/usr/libexec/tray-proxy/tray-proxy-helper"
    assert stat.S_IMODE(os.stat(client_module.SOURCE_HELPER_PATH).st_mode) == 0o755
