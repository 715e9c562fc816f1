"""Proxy discovery: the environment, then Windows' WinINET and WinHTTP settings through WSL
interop. The Windows tools are FAKES on PATH (tests/fakes/windows: reg.exe, netsh.exe) that
print real captured output formats, because Windows cannot run here; they run as real
processes, so the timeouts, exit codes and CRLF text are the real code paths.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tray_proxy.discovery import (
    NETSH_WINHTTP,
    REG_QUERY,
    SOURCE_WINHTTP,
    SOURCE_WININET,
    Found,
    RunResult,
    WinHttpSettings,
    discover,
    from_environment,
    from_winhttp,
    from_wininet,
    is_wsl,
    parse_netsh_winhttp,
    parse_proxy_server,
    parse_reg_query,
    run_tool,
)

FAKES = Path(__file__).resolve().parent / "fakes" / "windows"
CAPTURES = FAKES / "captures"


def capture(name: str) -> str:
    """A capture as the tool sends it through interop: CRLF line ends."""
    return (CAPTURES / name).read_text(encoding="utf-8").replace("\n", "\r\n")


@pytest.fixture
def fakes_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    for var in ("FAKE_WINDOWS_REG", "FAKE_WINDOWS_NETSH"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- environment


def test_environment_lower_case_first_and_one_entry_per_proxy() -> None:
    env = {
        "http_proxy": "http://proxy.corp.example:8080",
        "HTTP_PROXY": "http://proxy.corp.example:8080/",
        "https_proxy": "proxy.corp.example:8080",
        "no_proxy": "localhost,.corp.example, 10.0.0.0/8",
    }
    found, notes = from_environment(env)
    assert found == [
        Found(
            "environment: http_proxy, HTTP_PROXY, https_proxy",
            "http://proxy.corp.example:8080",
            ("localhost", ".corp.example", "10.0.0.0/8"),
        )
    ]
    assert notes == []


def test_environment_two_proxies_in_order_and_upper_case_no_proxy() -> None:
    env = {
        "HTTPS_PROXY": "socks5h://socks.corp.example:1080",
        "http_proxy": "http://proxy.corp.example:3128",
        "NO_PROXY": "*.internal",
    }
    found, _ = from_environment(env)
    assert [(f.source, f.proxy_url) for f in found] == [
        ("environment: http_proxy", "http://proxy.corp.example:3128"),
        ("environment: HTTPS_PROXY", "socks5://socks.corp.example:1080"),
    ]
    assert all(f.no_proxy == ("*.internal",) for f in found)


def test_environment_password_is_dropped_and_never_repeated() -> None:
    env = {"https_proxy": "http://alice%40corp:S3cr%3At@proxy.corp.example:8080"}
    found, notes = from_environment(env)
    assert [(f.proxy_url, f.username) for f in found] == [
        ("http://proxy.corp.example:8080", "alice@corp")
    ]
    assert any("carries a password" in n for n in notes)
    for text in [repr(found), *notes, *(f.describe() for f in found)]:
        assert "S3cr" not in text


def test_environment_unusable_values_are_notes() -> None:
    env = {"http_proxy": "https://tls-proxy.corp.example:443", "https_proxy": "ftp://x:21"}
    found, notes = from_environment(env)
    assert found == []
    assert notes == [
        "environment: http_proxy is an https:// proxy (TLS to the proxy), not supported; not used",
        "environment: https_proxy uses the 'ftp' scheme; only http and socks5 work; not used",
    ]


def test_empty_environment_finds_nothing() -> None:
    assert from_environment({}) == ([], [])


# --------------------------------------------------------------------------- WinINET (reg)


def test_reg_query_enabled_proxy_with_local_bypass() -> None:
    settings = parse_reg_query(capture("reg-enabled.txt"))
    assert settings.proxy_enable is True
    assert settings.proxy_server == "proxy.corp.example:8080"
    assert settings.proxy_override == "*.corp.example;10.*;<local>"
    assert settings.auto_config_url is None
    found, notes = from_wininet(settings)
    assert found == [
        Found(
            SOURCE_WININET,
            "http://proxy.corp.example:8080",
            ("*.corp.example", "10.*", "<local>"),
        )
    ]
    assert notes == []


def test_reg_query_per_scheme_prefers_https() -> None:
    settings = parse_reg_query(capture("reg-per-scheme.txt"))
    assert parse_proxy_server(settings.proxy_server or "") == {
        "http": "proxy.corp.example:8080",
        "https": "secure.corp.example:8443",
        "ftp": "ftp-gw.corp.example:2121",
        "socks": "socks.corp.example:1080",
    }
    found, _ = from_wininet(settings)
    assert [f.proxy_url for f in found] == ["http://secure.corp.example:8443"]


def test_proxy_server_socks_only_is_socks5_with_a_note() -> None:
    found, notes = from_wininet(parse_reg_query(_reg_with("ProxyServer    REG_SZ    socks=s:1080")))
    assert [f.proxy_url for f in found] == ["socks5://s:1080"]
    assert notes == [f"{SOURCE_WININET}: its socks= entry is used as SOCKS5 (Windows may mean "
                     "SOCKS4 there)"]  # fmt: skip


def test_reg_query_pac_only_is_recorded() -> None:
    found, notes = from_wininet(parse_reg_query(capture("reg-pac.txt")))
    assert found == [Found(SOURCE_WININET, None, (), "http://wpad.corp.example/proxy.pac")]
    assert notes == []


def test_reg_query_switched_off_proxy_is_a_note_not_a_find() -> None:
    found, notes = from_wininet(parse_reg_query(capture("reg-switched-off.txt")))
    assert found == []
    assert notes == [f"{SOURCE_WININET}: a proxy is set but switched off (ProxyEnable 0); not used"]


def test_reg_query_direct() -> None:
    settings = parse_reg_query(capture("reg-direct.txt"))
    assert settings.proxy_enable is False and settings.proxy_server is None
    assert from_wininet(settings) == ([], [f"{SOURCE_WININET}: no proxy set (direct connection)"])


def test_reg_query_reads_only_the_keys_own_values_case_insensitively() -> None:
    text = (
        "\r\nHKEY_CURRENT_USER\\Software\\Microsoft\\Windows\\CurrentVersion\\Internet Settings"
        "\r\n    proxyenable    REG_DWORD    0x00000001\r\n    PROXYSERVER    REG_SZ    p:1\r\n"
        "\r\nHKEY_CURRENT_USER\\...\\Internet Settings\\Connections\r\n"
        "    ProxyServer    REG_SZ    not-this:2\r\n"
    )
    settings = parse_reg_query(text)
    assert (settings.proxy_enable, settings.proxy_server) == (True, "p:1")


def test_reg_query_file_pac_is_not_kept() -> None:
    text = _reg_with("AutoConfigURL    REG_SZ    file://C:/corp/proxy.pac", enable="0x0")
    found, notes = from_wininet(parse_reg_query(text))
    assert found == []
    assert "not an http(s) URL" in notes[0]


def test_reg_query_garbage_gives_nothing() -> None:
    assert from_wininet(parse_reg_query("\x00\x01 nonsense\r\n    REG_SZ\r\n"))[0] == []


def _reg_with(line: str, enable: str = "0x1") -> str:
    return (
        "\r\nHKEY_CURRENT_USER\\Software\\Microsoft\\Windows\\CurrentVersion\\Internet "
        f"Settings\r\n    ProxyEnable    REG_DWORD    {enable}\r\n    {line}\r\n"
    )


# --------------------------------------------------------------------------- WinHTTP (netsh)


def test_netsh_direct() -> None:
    settings = parse_netsh_winhttp(capture("netsh-direct.txt"))
    assert settings == WinHttpSettings(direct=True)
    assert from_winhttp(settings) == ([], [f"{SOURCE_WINHTTP}: direct access (no proxy server)"])


def test_netsh_proxy_with_bypass_list() -> None:
    settings = parse_netsh_winhttp(capture("netsh-proxy.txt"))
    assert settings == WinHttpSettings(
        direct=False,
        proxy_server="proxy.corp.example:8080",
        bypass=("<local>", "*.corp.example"),
    )
    found, notes = from_winhttp(settings)
    assert found == [
        Found(SOURCE_WINHTTP, "http://proxy.corp.example:8080", ("<local>", "*.corp.example"))
    ]
    assert notes == []


def test_netsh_per_scheme_and_none_bypass() -> None:
    settings = parse_netsh_winhttp(capture("netsh-per-scheme-none.txt"))
    assert settings is not None and settings.bypass == ()
    assert [f.proxy_url for f in from_winhttp(settings)[0]] == ["http://proxy.corp.example:8080"]


def test_netsh_in_another_language_is_a_note() -> None:
    assert parse_netsh_winhttp(capture("netsh-french.txt")) is None
    found, notes = from_winhttp(None)
    assert found == [] and "does not read" in notes[0]


# --------------------------------------------------------------------------- WSL detection


@pytest.mark.parametrize(
    ("version", "env", "expected"),
    [
        ("Linux version 5.15.153.1-microsoft-standard-WSL2 (root@...) #1 SMP", {}, True),
        ("Linux version 4.4.0-19041-Microsoft (Microsoft@Microsoft.com) (gcc 5.4.0)", {}, True),
        ("Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)", {}, False),
        ("Linux version 6.1.0-18-amd64", {"WSL_DISTRO_NAME": "Ubuntu"}, True),
        ("", {"WSL_INTEROP": "/run/WSL/12_interop"}, True),
    ],
)
def test_is_wsl(version: str, env: dict[str, str], expected: bool) -> None:
    assert is_wsl(version, env) is expected


# --------------------------------------------------------------------------- the whole


def test_not_wsl_runs_no_windows_tool(tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)\n")

    def no_run(argv: object, timeout: float) -> RunResult:
        raise AssertionError(f"ran {argv} outside WSL")

    result = discover({"https_proxy": "http://p.corp.example:3128"}, run=no_run,
                      proc_version=version)  # fmt: skip
    assert [f.proxy_url for f in result.found] == ["http://p.corp.example:3128"]
    assert result.notes == ()


def test_wsl_with_fake_windows_tools_in_order(
    fakes_on_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_WINDOWS_REG", "reg-enabled.txt")
    monkeypatch.setenv("FAKE_WINDOWS_NETSH", "netsh-proxy.txt")
    env = {"WSL_DISTRO_NAME": "Debian", "http_proxy": "http://env-proxy.corp.example:3128"}
    result = discover(env)
    assert [(f.source, f.proxy_url) for f in result.found] == [
        ("environment: http_proxy", "http://env-proxy.corp.example:3128"),
        (SOURCE_WININET, "http://proxy.corp.example:8080"),
        (SOURCE_WINHTTP, "http://proxy.corp.example:8080"),
    ]
    assert result.proxy is not None and result.proxy.source == "environment: http_proxy"
    assert result.notes == ()


def test_wsl_pac_and_direct_winhttp(fakes_on_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WINDOWS_REG", "reg-pac.txt")
    monkeypatch.setenv("FAKE_WINDOWS_NETSH", "netsh-direct.txt")
    result = discover({"WSL_INTEROP": "/run/WSL/1_interop"})
    assert result.proxy is None
    assert result.pac_url == "http://wpad.corp.example/proxy.pac"
    assert result.notes == (f"{SOURCE_WINHTTP}: direct access (no proxy server)",)


def test_broken_reg_exe_is_a_note(fakes_on_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WINDOWS_REG", "error")
    monkeypatch.setenv("FAKE_WINDOWS_NETSH", "netsh-proxy.txt")
    result = discover({"WSL_DISTRO_NAME": "Debian"})
    assert [f.source for f in result.found] == [SOURCE_WINHTTP]
    assert result.notes == (
        f"{SOURCE_WININET}: reg.exe failed (exit code 1): ERROR: The system was unable to find "
        "the specified registry key or value.",
    )


def test_hung_tools_are_bounded(fakes_on_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WINDOWS_REG", "hang")
    monkeypatch.setenv("FAKE_WINDOWS_NETSH", "hang")
    started = time.monotonic()
    result = discover({"WSL_DISTRO_NAME": "Debian"}, timeout=0.5)
    assert time.monotonic() - started < 5.0
    assert result.found == ()
    assert result.notes == (
        f"{SOURCE_WININET}: reg.exe did not answer within 0.5 s",
        f"{SOURCE_WINHTTP}: netsh.exe did not answer within 0.5 s",
    )


def test_interop_switched_off_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With interop off, the kernel cannot execute a PE file: execve fails with ENOEXEC.
    for name in ("reg.exe", "netsh.exe"):
        tool = tmp_path / name
        tool.write_bytes(b"MZ\x90\x00\x03\x00\x00\x00PE\x00\x00")
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    result = discover({"WSL_DISTRO_NAME": "Debian"})
    assert result.found == ()
    assert result.notes == (
        f"{SOURCE_WININET}: reg.exe cannot run: WSL's Windows interop is switched off",
        f"{SOURCE_WINHTTP}: netsh.exe cannot run: WSL's Windows interop is switched off",
    )


def test_tools_missing_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_tool(REG_QUERY, 1.0).problem == (
        "reg.exe was not found (Windows interop is off, or Windows' System32 is not on PATH)"
    )
    assert run_tool(NETSH_WINHTTP, 1.0).problem is not None


def test_fake_reg_exe_refuses_other_keys_like_the_real_one(fakes_on_path: None) -> None:
    result = run_tool(("reg.exe", "query", r"HKLM\Software\Nothing"), 5.0)
    assert result.returncode == 1 and "unable to find" in result.stderr
