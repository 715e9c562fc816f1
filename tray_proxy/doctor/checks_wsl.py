"""Doctor checks for WSL: the WSL version, the networking mode and `autoProxy`/`dnsTunneling`
from the Windows user's `.wslconfig` (found through interop: `cmd.exe /c echo %USERPROFILE%`,
then `wslpath`), WSLg without a system tray, and Docker Desktop's integration.

On anything but WSL each of them is skipped. Windows programs are reached only through
interop, each bounded by `env.command_timeout`. Must not import PySide6 or the relay engine.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tray_proxy.doctor.checks_session import TRAY_WATCHER, session_bus_names
from tray_proxy.doctor.context import DoctorEnv, in_thread, run_command
from tray_proxy.doctor.model import CheckResult, CheckStatus

__all__ = [
    "WslConfig",
    "WslInfo",
    "check_wsl_docker",
    "check_wsl_networking",
    "check_wsl_settings",
    "check_wsl_tray",
    "check_wsl_version",
    "read_wslconfig",
    "wsl_info",
]

PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
# The keys we read, as configparser lower-cases them; [experimental] held them before
# WSL 2.0 moved them to [wsl2], and [wsl2] wins when both set one.
_KEYS = ("networkingmode", "autoproxy", "dnstunneling")
_DEFAULTS = {"networkingmode": "nat", "autoproxy": "true", "dnstunneling": "true"}
_RESTART = "then run `wsl --shutdown` in Windows and open the distro again"


@dataclass(frozen=True)
class WslInfo:
    version: int
    kernel: str
    distro: str


def wsl_info(env: DoctorEnv) -> WslInfo | None:
    """WSL 1 or 2 from /proc/version (Microsoft's kernels say so), None elsewhere."""
    try:
        text = (env.proc / "version").read_text(errors="replace")
    except OSError:
        text = ""
    lowered = text.lower()
    if "microsoft" not in lowered and not env.environ.get("WSL_DISTRO_NAME"):
        return None
    found = re.search(r"Linux version (\S+)", text)
    kernel = found.group(1) if found else "unknown"
    version = 2 if ("wsl2" in lowered or "microsoft-standard" in lowered) else 1
    return WslInfo(version, kernel, env.environ.get("WSL_DISTRO_NAME", ""))


@dataclass(frozen=True)
class WslConfig:
    """The Windows user's .wslconfig: where it is, whether it exists, the keys we read
    (lower-case names; a missing key is absent) and where each came from."""

    linux_path: Path
    windows_path: str
    exists: bool
    values: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> tuple[str, bool]:
        """(value, set in the file) with WSL's default for a key the file does not set."""
        if key in self.values:
            return self.values[key], True
        return _DEFAULTS[key], False


def _decode(raw: bytes) -> str:
    # Notepad used to save UTF-16 with a BOM; WSL reads both.
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16", errors="replace")
    return raw.decode("utf-8-sig", errors="replace")


def _read_wslconfig(env: DoctorEnv) -> WslConfig | str:
    cmd = env.which("cmd.exe")
    wslpath = env.which("wslpath")
    if cmd is None or wslpath is None:
        return (
            "Windows interop is not available (cmd.exe or wslpath not found; "
            "[interop] enabled=false in /etc/wsl.conf?), so .wslconfig cannot be read"
        )
    echoed = run_command([cmd, "/c", "echo", "%USERPROFILE%"], env.command_timeout, env=env.environ)
    lines = [ln.strip() for ln in echoed.stdout.splitlines() if ln.strip()]
    profile = lines[-1] if lines else ""
    if not echoed.ok or not profile or "%" in profile:
        why = echoed.error or echoed.stderr.strip() or "no answer"
        return f"`cmd.exe /c echo %USERPROFILE%` did not name the Windows profile ({why})"
    converted = run_command([wslpath, "-u", profile], env.command_timeout, env=env.environ)
    home = converted.stdout.strip()
    if not converted.ok or not home:
        why = converted.error or converted.stderr.strip() or "no answer"
        return f"`wslpath -u {profile}` failed ({why})"
    linux_path = Path(home) / ".wslconfig"
    windows_path = profile.rstrip("\\") + "\\.wslconfig"
    try:
        raw = linux_path.read_bytes()
    except FileNotFoundError:
        return WslConfig(linux_path, windows_path, exists=False)
    except OSError as exc:
        return f"{linux_path} cannot be read ({exc.strerror})"
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(_decode(raw))
    except configparser.Error as exc:
        return f"{windows_path} is not readable as an INI file ({type(exc).__name__})"
    values: dict[str, str] = {}
    sections = {name.lower(): name for name in parser.sections()}
    for section in ("experimental", "wsl2"):
        if section not in sections:
            continue
        for key in _KEYS:
            value = parser.get(sections[section], key, fallback=None)
            if value is not None:
                values[key] = value.strip().strip('"').lower()
    return WslConfig(linux_path, windows_path, exists=True, values=values)


async def read_wslconfig(env: DoctorEnv) -> WslConfig | str:
    """The .wslconfig (read once per run), or why it cannot be read."""
    return await in_thread(
        lambda: env.memo("wslconfig", lambda: _read_wslconfig(env)), env.command_timeout * 2 + 5
    )


def _not_wsl(check: str) -> CheckResult:
    return CheckResult(check, CheckStatus.SKIP, "not WSL")


async def check_wsl_version(env: DoctorEnv) -> CheckResult:
    info = wsl_info(env)
    if info is None:
        return _not_wsl("wsl-version")
    distro = info.distro or "this distro"
    if info.version == 1:
        return CheckResult(
            "wsl-version",
            CheckStatus.FAIL,
            f"WSL 1 (kernel {info.kernel}): it has no netfilter, so the redirect cannot work",
            fix=f"convert the distro to WSL 2: `wsl --set-version {distro} 2` in Windows",
        )
    summary = f"WSL 2, kernel {info.kernel}, distro {distro}"
    app = await in_thread(lambda: _wsl_app_version(env), env.command_timeout + 5)
    if app is None:
        return CheckResult("wsl-version", CheckStatus.OK, summary)
    version, numbers = app
    if numbers is None or numbers < (2, 0):
        return CheckResult(
            "wsl-version",
            CheckStatus.WARN,
            f"{summary}; the WSL app is older than 2.0 ({version}): .wslconfig's "
            "networkingMode, autoProxy and dnsTunneling need WSL 2.0 or later",
            fix="update WSL: `wsl --update` in Windows, then `wsl --shutdown`",
        )
    return CheckResult("wsl-version", CheckStatus.OK, f"{summary}, WSL app {version}")


def _wsl_app_version(env: DoctorEnv) -> tuple[str, tuple[int, ...] | None] | None:
    """The WSL app's version from `wsl.exe --version` (None: wsl.exe not reachable). The
    inbox WSL of older Windows builds does not know --version: ("unknown", None)."""
    wsl = env.which("wsl.exe")
    if wsl is None:
        return None
    # WSL_UTF8=1: wsl.exe writes UTF-16 to a pipe otherwise.
    done = run_command(
        [wsl, "--version"], env.command_timeout, env={**env.environ, "WSL_UTF8": "1"}
    )
    if done.returncode is None:
        return None
    text = done.stdout.replace("\x00", "")
    # "WSL version: 2.3.26.0" (localised: "WSL-Version: ...", "Version de WSL : ...")
    found = re.search(r"^[^\n:]*WSL[^\n:]*:\s*(\d+(?:\.\d+)+)", text, re.MULTILINE)
    if not done.ok or found is None:
        return "unknown: `wsl --version` is not supported", None
    version = found.group(1)
    return version, tuple(int(part) for part in version.split("."))


async def _wsl2_config(env: DoctorEnv, check: str) -> WslConfig | CheckResult:
    info = wsl_info(env)
    if info is None:
        return _not_wsl(check)
    if info.version == 1:
        return CheckResult(check, CheckStatus.SKIP, "WSL 1 (see wsl-version)")
    config = await read_wslconfig(env)
    if isinstance(config, str):
        return CheckResult(check, CheckStatus.SKIP, config)
    return config


async def check_wsl_networking(env: DoctorEnv) -> CheckResult:
    config = await _wsl2_config(env, "wsl-networking")
    if isinstance(config, CheckResult):
        return config
    mode, explicit = config.get("networkingmode")
    origin = f"networkingMode={mode} in {config.windows_path}" if explicit else "the default"
    if mode in ("nat", "mirrored"):
        words = {
            "nat": "NAT: the distro has its own address behind Windows",
            "mirrored": "mirrored: the distro shares Windows' network interfaces",
        }[mode]
        return CheckResult("wsl-networking", CheckStatus.OK, f"networking {words} ({origin})")
    if mode == "none":
        return CheckResult(
            "wsl-networking",
            CheckStatus.FAIL,
            f"networking is switched off ({origin}): nothing reaches the proxy",
            fix=f"remove networkingMode from [wsl2] in {config.windows_path}, {_RESTART}",
        )
    return CheckResult(
        "wsl-networking",
        CheckStatus.WARN,
        f"networking mode {mode!r} ({origin}): tray-proxy is tested with NAT and mirrored",
        fix=f"set networkingMode=nat under [wsl2] in {config.windows_path}, {_RESTART}",
    )


async def check_wsl_settings(env: DoctorEnv) -> CheckResult:
    config = await _wsl2_config(env, "wsl-settings")
    if isinstance(config, CheckResult):
        return config
    auto_proxy, auto_set = config.get("autoproxy")
    dns, dns_set = config.get("dnstunneling")
    where = config.windows_path if config.exists else f"{config.windows_path} (no such file)"
    details = (
        f"autoProxy={auto_proxy}" + ("" if auto_set else " (default)"),
        f"dnsTunneling={dns}"
        + ("" if dns_set else " (default)")
        + (": Windows answers the distro's DNS queries" if dns == "true" else ""),
    )
    variables = [v for v in PROXY_VARIABLES if env.environ.get(v)]
    if variables:
        source = (
            "WSL's autoProxy copies the Windows proxy into them"
            if auto_proxy == "true"
            else ("set by your shell profile or /etc/environment")
        )
        fix = (
            f"set autoProxy=false under [wsl2] in {config.windows_path}, {_RESTART}"
            if auto_proxy == "true"
            else "remove them where they are set (~/.profile, ~/.bashrc, /etc/environment)"
        )
        return CheckResult(
            "wsl-settings",
            CheckStatus.WARN,
            f"{', '.join(variables)} set ({source}): programs that read them talk to the "
            "proxy themselves, without tray-proxy's login, and get 407",
            fix=fix,
            details=details,
        )
    return CheckResult(
        "wsl-settings",
        CheckStatus.OK,
        f"{where}: autoProxy={auto_proxy}, dnsTunneling={dns}; no proxy variables in this "
        "environment",
        details=details,
    )


async def check_wsl_tray(env: DoctorEnv) -> CheckResult:
    if wsl_info(env) is None:
        return _not_wsl("wsl-tray")
    wslg = os.path.exists(env.wslg_dir) or bool(env.environ.get("WAYLAND_DISPLAY"))
    if not wslg and not env.environ.get("DISPLAY"):
        return CheckResult(
            "wsl-tray",
            CheckStatus.WARN,
            "no display (no WSLg, no DISPLAY): the tray app cannot show anything",
            fix="run the relay headless: `tray-proxy run` (or enable WSLg: `wsl --update`)",
        )
    names = await session_bus_names(env)
    if isinstance(names, dict) and names.get(TRAY_WATCHER):
        return CheckResult("wsl-tray", CheckStatus.OK, "a system tray is available")
    return CheckResult(
        "wsl-tray",
        CheckStatus.WARN,
        "no system tray" + (" (WSLg has none)" if wslg else "") + ": `tray-proxy` shows its "
        "window instead of a tray icon; closing it asks whether to quit or keep running, and "
        "starting `tray-proxy` again brings the window back",
        fix="nothing to fix; to run without any window use `tray-proxy run`",
    )


async def check_wsl_docker(env: DoctorEnv) -> CheckResult:
    if wsl_info(env) is None:
        return _not_wsl("wsl-docker")
    docker = env.which("docker")
    target = os.path.realpath(docker) if docker else ""
    if "docker-desktop" in target or os.path.exists(env.docker_desktop_dir):
        return CheckResult(
            "wsl-docker",
            CheckStatus.WARN,
            "Docker Desktop's WSL integration is on: its engine and containers run in Docker "
            "Desktop's own distro, so their traffic (docker pull, builds) does not pass this "
            "distro's redirect",
            fix="set the proxy in Docker Desktop: Settings > Resources > Proxies",
        )
    if env.which("dockerd") or os.path.exists(env.docker_socket):
        return CheckResult(
            "wsl-docker",
            CheckStatus.OK,
            "Docker Engine runs in this distro: containers are redirected too "
            "(capture_containers under [redirect])",
        )
    return CheckResult("wsl-docker", CheckStatus.SKIP, "Docker is not installed in this distro")
