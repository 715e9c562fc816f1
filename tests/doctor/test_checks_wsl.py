"""The WSL checks, on this Linux machine, with fakes for the Windows pieces only.

Windows cannot run here, so `cmd.exe` and `wslpath` (which WSL's interop provides) are small
shell scripts on a PATH of the test's own, answering in the formats the real ones use
(`cmd.exe /c echo %USERPROFILE%` prints `C:\\Users\\NAME` with CRLF and complains about the
UNC working directory on stderr; `wslpath -u` prints the /mnt/c path), and /proc/version is a
file in a temp dir with the text a WSL kernel reports. The checks themselves, the .wslconfig
parsing and the subprocess timeouts are the real code.

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tray_proxy.doctor.context import DoctorEnv
from tray_proxy.doctor.model import CheckResult, CheckStatus
from tray_proxy.doctor.runner import run_checks

WSL2_VERSION = (
    "Linux version 5.15.167.4-microsoft-standard-WSL2 (root@f9c826d3017f) (gcc (GCC) 11.2.0, "
    "GNU ld (GNU Binutils) 2.37) #1 SMP Tue Nov 5 00:21:55 UTC 2024\n"
)
WSL1_VERSION = (
    "Linux version 4.4.0-19041-Microsoft (Microsoft@Microsoft.com) (gcc version 5.4.0 (GCC) ) "
    "#3996-Microsoft Thu Jan 18 16:36:00 PST 2024\n"
)
DEBIAN_VERSION = "Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) #1 SMP\n"
WSL_IDS = ("wsl-version", "wsl-networking", "wsl-settings", "wsl-tray", "wsl-docker")


class FakeWsl:
    """A temp dir laid out as a WSL distro sees it: proc/version, a fake interop bin dir
    and the Windows profile under mnt/c/Users/alice."""

    def __init__(self, root: Path, version: str = WSL2_VERSION) -> None:
        self.root = root
        self.proc = root / "proc"
        self.proc.mkdir()
        (self.proc / "version").write_text(version)
        self.bin = root / "bin"
        self.bin.mkdir()
        self.profile = root / "mnt/c/Users/alice"
        self.profile.mkdir(parents=True)
        self.script(
            "cmd.exe",
            '[ "$1 $2 $3" = "/c echo %USERPROFILE%" ] || exit 1\n'
            "echo \"'\\\\\\\\wsl.localhost\\\\Ubuntu\\\\home\\\\alice'\" >&2\n"
            'echo "CMD.EXE was started with the above path as the current directory.\n'
            'UNC paths are not supported.  Defaulting to Windows directory." >&2\n'
            "printf 'C:\\\\Users\\\\alice\\r\\n'\n",
        )
        self.script(
            "wslpath",
            '[ "$1" = "-u" ] && [ "$2" = "C:\\\\Users\\\\alice" ] || exit 1\n'
            f"echo '{self.profile}'\n",
        )

    def script(self, name: str, body: str) -> Path:
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return path

    def wslconfig(self, text: str, encoding: str = "utf-8") -> None:
        (self.profile / ".wslconfig").write_bytes(text.encode(encoding))

    def env(self, **fields: object) -> DoctorEnv:
        environ = {"PATH": str(self.bin), "WSL_DISTRO_NAME": "Ubuntu"}
        environ.update(fields.pop("extra_environ", {}))  # type: ignore[arg-type]
        defaults: dict[str, object] = {
            "proc": self.proc,
            "environ": environ,
            "wslg_dir": self.root / "mnt/wslg",
            "docker_desktop_dir": self.root / "mnt/wsl/docker-desktop",
            "docker_socket": self.root / "docker.sock",
            "command_timeout": 5.0,
        }
        defaults.update(fields)
        return DoctorEnv(self.root / "config.toml", **defaults)  # type: ignore[arg-type]


def wsl_results(env: DoctorEnv) -> dict[str, CheckResult]:
    report = asyncio.run(run_checks(env, only=WSL_IDS))
    return {r.check: r for r in report.results}


def test_not_wsl(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path, DEBIAN_VERSION)
    env = fake.env(environ={"PATH": str(fake.bin)})
    for result in wsl_results(env).values():
        assert (result.status, result.summary) == (CheckStatus.SKIP, "not WSL")


def test_wsl1_cannot_work(tmp_path: Path) -> None:
    found = wsl_results(FakeWsl(tmp_path, WSL1_VERSION).env())
    version = found["wsl-version"]
    assert version.status is CheckStatus.FAIL
    assert "WSL 1" in version.summary and "4.4.0-19041-Microsoft" in version.summary
    assert version.fix == "convert the distro to WSL 2: `wsl --set-version Ubuntu 2` in Windows"
    assert found["wsl-networking"].status is CheckStatus.SKIP


def test_wslconfig_mirrored_with_auto_proxy_and_proxy_variables(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    fake.wslconfig(
        "[wsl2]\r\nmemory=8GB\r\nnetworkingMode=mirrored\r\nautoProxy=true\r\n"
        "dnsTunneling=false\r\n"
    )
    env = fake.env(extra_environ={"HTTPS_PROXY": "http://proxy.corp:8080"})
    found = wsl_results(env)
    assert found["wsl-version"].status is CheckStatus.OK
    assert "WSL 2, kernel 5.15.167.4-microsoft-standard-WSL2" in found["wsl-version"].summary
    networking = found["wsl-networking"]
    assert networking.status is CheckStatus.OK
    assert "mirrored" in networking.summary
    assert "networkingMode=mirrored in C:\\Users\\alice\\.wslconfig" in networking.summary
    settings = found["wsl-settings"]
    assert settings.status is CheckStatus.WARN
    assert "HTTPS_PROXY set (WSL's autoProxy copies the Windows proxy" in settings.summary
    assert settings.fix is not None
    assert "autoProxy=false under [wsl2] in C:\\Users\\alice\\.wslconfig" in settings.fix
    assert "wsl --shutdown" in settings.fix
    assert "dnsTunneling=false" in settings.details


def test_no_wslconfig_means_wsl_defaults(tmp_path: Path) -> None:
    found = wsl_results(FakeWsl(tmp_path).env())
    assert found["wsl-networking"].status is CheckStatus.OK
    assert "NAT" in found["wsl-networking"].summary
    assert "(the default)" in found["wsl-networking"].summary
    settings = found["wsl-settings"]
    assert settings.status is CheckStatus.OK
    assert "(no such file)" in settings.summary
    assert "autoProxy=true (default)" in settings.details


def test_utf16_wslconfig_with_the_older_experimental_section(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    fake.wslconfig(
        "\ufeff[experimental]\r\nautoProxy=false\r\nnetworkingMode=none\r\n", "utf-16-le"
    )
    found = wsl_results(fake.env())
    assert "autoProxy=false" in found["wsl-settings"].details
    networking = found["wsl-networking"]
    assert networking.status is CheckStatus.FAIL
    assert "networking is switched off" in networking.summary


def test_without_interop_the_wslconfig_checks_say_why(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    (fake.bin / "cmd.exe").unlink()
    found = wsl_results(fake.env())
    for check in ("wsl-networking", "wsl-settings"):
        assert found[check].status is CheckStatus.SKIP
        assert "Windows interop is not available" in found[check].summary


def test_a_hanging_cmd_exe_is_bounded(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    fake.script("cmd.exe", "exec /bin/sleep 60\n")
    env = fake.env(command_timeout=1.0)
    found = wsl_results(env)
    assert found["wsl-networking"].status is CheckStatus.SKIP
    assert "did not finish within 1 s" in found["wsl-networking"].summary


def test_wslg_without_a_tray_explains_the_window(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    (tmp_path / "mnt/wslg").mkdir(parents=True)
    tray = wsl_results(fake.env(extra_environ={"WAYLAND_DISPLAY": "wayland-0"}))["wsl-tray"]
    assert tray.status is CheckStatus.WARN
    assert "no system tray (WSLg has none)" in tray.summary
    assert "shows its window instead of a tray icon" in tray.summary


def test_docker_desktop_integration(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    assert wsl_results(fake.env())["wsl-docker"].status is CheckStatus.SKIP
    desktop = tmp_path / "mnt/wsl/docker-desktop/cli-tools/usr/bin"
    desktop.mkdir(parents=True)
    (desktop / "docker").write_text("#!/bin/sh\n")
    (desktop / "docker").chmod(0o755)
    os.symlink(desktop / "docker", fake.bin / "docker")
    docker = wsl_results(fake.env())["wsl-docker"]
    assert docker.status is CheckStatus.WARN
    assert "Docker Desktop's WSL integration is on" in docker.summary
    assert docker.fix == "set the proxy in Docker Desktop: Settings > Resources > Proxies"


def test_docker_engine_in_the_distro(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    fake.script("dockerd", "exit 0\n")
    docker = wsl_results(fake.env())["wsl-docker"]
    assert docker.status is CheckStatus.OK
    assert "containers are redirected too" in docker.summary


WSL_VERSION_OUTPUT = (
    "WSL version: 2.3.26.0\r\nKernel version: 5.15.167.4-1\r\nWSLg version: 1.0.65\r\n"
    "MSRDC version: 1.2.5620\r\nDirect3D version: 1.611.1-81528511\r\n"
    "DXCore version: 10.0.26100.1-240331-1435.ge-release\r\nWindows version: 10.0.22631.4460\r\n"
)


def test_wsl_app_version(tmp_path: Path) -> None:
    """`wsl.exe --version` writes UTF-16 unless WSL_UTF8=1, as the real one does."""
    fake = FakeWsl(tmp_path)
    (tmp_path / "wsl-version.txt").write_text(WSL_VERSION_OUTPUT)
    fake.script(
        "wsl.exe",
        f'[ "$1" = "--version" ] || exit 1\n'
        f'if [ "$WSL_UTF8" = 1 ]; then exec /bin/cat {tmp_path}/wsl-version.txt; fi\n'
        f"exec /usr/bin/iconv -f utf-8 -t utf-16le {tmp_path}/wsl-version.txt\n",
    )
    version = wsl_results(fake.env())["wsl-version"]
    assert version.status is CheckStatus.OK, version
    assert version.summary.endswith("distro Ubuntu, WSL app 2.3.26.0")


def test_inbox_wsl_without_version_is_a_warning(tmp_path: Path) -> None:
    fake = FakeWsl(tmp_path)
    fake.script("wsl.exe", "echo 'Invalid command line option: --version' \nexit 1\n")
    version = wsl_results(fake.env())["wsl-version"]
    assert version.status is CheckStatus.WARN
    assert "older than 2.0" in version.summary
    assert version.fix == "update WSL: `wsl --update` in Windows, then `wsl --shutdown`"
