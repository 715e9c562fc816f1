"""Where is the corporate proxy? Looks where a new user's machine already says it, in order:

1. the environment: `http_proxy`, `https_proxy` (and `HTTP_PROXY`, `HTTPS_PROXY`), with
   `no_proxy` / `NO_PROXY`;
2. on WSL, Windows' own settings through interop: WinINET, the "Internet Options" of the
   user (`reg.exe query HKCU\\...\\Internet Settings`: ProxyEnable, ProxyServer in its
   `host:port` or `http=...;https=...` form, ProxyOverride with `<local>`, AutoConfigURL),
   then WinHTTP, the machine's setting for services (`netsh.exe winhttp show proxy`).

Every place becomes a `Found` (shown to the user before it is used) or a note saying why it
gave nothing. The parsers are pure functions over the tools' text; the runners around them
are thin, bounded by a timeout, and turn any failure (no interop, a hung reg.exe, output in
an unexpected form) into a note, never an exception. A password in a proxy URL (`user:pass@`)
is dropped here: only the user name goes on.

Must not import PySide6 or keyring.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

__all__ = [
    "Discovery",
    "Found",
    "RunResult",
    "WinHttpSettings",
    "WinInetSettings",
    "discover",
    "from_environment",
    "from_winhttp",
    "from_wininet",
    "is_wsl",
    "parse_netsh_winhttp",
    "parse_proxy_server",
    "parse_reg_query",
    "run_tool",
]

INTERNET_SETTINGS_KEY = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Internet Settings"
REG_QUERY = ("reg.exe", "query", INTERNET_SETTINGS_KEY)
NETSH_WINHTTP = ("netsh.exe", "winhttp", "show", "proxy")
# Where WSL's interop finds Windows' tools when C:\Windows\System32 is not on PATH
# (appendWindowsPath = false in /etc/wsl.conf).
WINDOWS_SYSTEM32 = Path("/mnt/c/Windows/System32")
TOOL_TIMEOUT = 5.0
_MAX_OUTPUT = 256 * 1024

SOURCE_ENV = "environment"
SOURCE_WININET = "Windows Internet Options (WinINET)"
SOURCE_WINHTTP = "Windows WinHTTP (netsh winhttp)"


@dataclass(frozen=True)
class Found:
    """One place that names a proxy (or a PAC script).

    `source` says where, in words (`environment: https_proxy`); `proxy_url` is
    `http://host:port` or `socks5://host:port` without any login; `username` the user name a
    URL carried (its password is never kept); `no_proxy` the destinations that place sends
    direct, as written there (`<local>` is Windows' "plain host names"); `pac_url` a proxy
    auto-config script's URL.
    """

    source: str
    proxy_url: str | None
    no_proxy: tuple[str, ...] = ()
    pac_url: str | None = None
    username: str | None = None

    def describe(self) -> str:
        """One line for the user: where, what, and what goes direct."""
        parts = [self.proxy_url or "no proxy"]
        if self.username:
            parts[0] += f" (user {self.username})"
        if self.no_proxy:
            parts.append("direct: " + ", ".join(self.no_proxy))
        if self.pac_url:
            parts.append(f"PAC script {self.pac_url}")
        return f"{self.source}: " + "; ".join(parts)


@dataclass(frozen=True)
class Discovery:
    """Everything found, in the order it was looked for, and a note per place that gave
    nothing usable (in words, for the user)."""

    found: tuple[Found, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def proxy(self) -> Found | None:
        """The first place that names a proxy: what setup offers first."""
        return next((f for f in self.found if f.proxy_url), None)

    @property
    def pac_url(self) -> str | None:
        return next((f.pac_url for f in self.found if f.pac_url), None)


# --------------------------------------------------------------------------- proxy values


@dataclass(frozen=True)
class _ProxyValue:
    url: str | None
    username: str | None = None
    problem: str | None = None
    had_password: bool = False


def _proxy_value(text: str, default_scheme: str = "http") -> _ProxyValue:
    """`proxy.corp:8080`, `http://user:pass@proxy.corp:8080/`, `socks5h://...` -> a URL
    without login or path. Never puts the value into a problem: it may hold a password."""
    value = text.strip()
    if not value:
        return _ProxyValue(None, problem="is empty")
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = default_scheme, value
    scheme = scheme.lower()
    if scheme in ("socks", "socks5", "socks5h"):
        scheme = "socks5"
    elif scheme == "https":
        return _ProxyValue(None, problem="is an https:// proxy (TLS to the proxy), not supported")
    elif scheme != "http":
        return _ProxyValue(None, problem=f"uses the {scheme!r} scheme; only http and socks5 work")
    authority = rest.split("/", 1)[0]
    login, at, hostport = authority.rpartition("@")
    username = None
    if at:
        user, _colon, _password = login.partition(":")
        username = unquote(user) or None
    if not hostport or any(c.isspace() or not c.isprintable() for c in hostport):
        return _ProxyValue(None, problem="names no host")
    return _ProxyValue(f"{scheme}://{hostport}", username, had_password=bool(at and _colon))


def _split_list(text: str, separators: str) -> tuple[str, ...]:
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    return tuple(part.strip() for part in text.split(separators[0]) if part.strip())


# --------------------------------------------------------------------------- environment

_ENV_PROXY_NAMES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")


def from_environment(env: Mapping[str, str]) -> tuple[list[Found], list[str]]:
    """`http_proxy` / `https_proxy` (lower case first, as curl reads them) with `no_proxy`.
    Variables naming the same proxy become one Found that lists them all."""
    no_proxy = _split_list(env.get("no_proxy") or env.get("NO_PROXY") or "", ", ")
    found: list[Found] = []
    notes: list[str] = []
    names_by_url: dict[str, list[str]] = {}
    users: dict[str, str | None] = {}
    for name in _ENV_PROXY_NAMES:
        raw = env.get(name)
        if raw is None or not raw.strip():
            continue
        value = _proxy_value(raw)
        if value.url is None:
            notes.append(f"{SOURCE_ENV}: {name} {value.problem}; not used")
            continue
        names_by_url.setdefault(value.url, []).append(name)
        users.setdefault(value.url, value.username)
        if value.had_password:
            notes.append(
                f"{SOURCE_ENV}: {name} carries a password; it is not used (the password is "
                "asked for and kept in the keyring)"
            )
    for url, names in names_by_url.items():
        found.append(
            Found(f"{SOURCE_ENV}: {', '.join(names)}", url, no_proxy, None, users.get(url))
        )
    return found, notes


# --------------------------------------------------------------------------- WSL


def is_wsl(proc_version: str, env: Mapping[str, str]) -> bool:
    """WSL 1 says "Microsoft" in /proc/version, WSL 2 "microsoft-standard-WSL2"; wsl.exe
    sets WSL_DISTRO_NAME and WSL_INTEROP for what it starts."""
    if env.get("WSL_DISTRO_NAME") or env.get("WSL_INTEROP"):
        return True
    return "microsoft" in proc_version.lower()


# --------------------------------------------------------------------------- WinINET


@dataclass(frozen=True)
class WinInetSettings:
    """The proxy values of `reg query HKCU\\...\\Internet Settings` (None: not there)."""

    proxy_enable: bool | None = None
    proxy_server: str | None = None
    proxy_override: str | None = None
    auto_config_url: str | None = None


def parse_reg_query(text: str) -> WinInetSettings:
    """Read `reg.exe query KEY` output: a blank line, the key, then one value per line as
    `    NAME    TYPE    DATA` (four spaces around each column), then the subkeys.
    Only the key's own values count; names are case-insensitive, as in the registry."""
    values: dict[str, tuple[str, str]] = {}
    in_key = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.upper().startswith("HKEY_"):
            if in_key:
                break  # the subkeys, listed after our key's values, without their own
            in_key = True
            continue
        if not in_key or not line.startswith(" "):
            continue
        parts = line.strip().split("    ", 2)
        if len(parts) < 2 or not parts[1].strip().startswith("REG_"):
            continue
        name = parts[0].strip().lower()
        kind = parts[1].strip()
        data = parts[2].strip() if len(parts) > 2 else ""
        values[name] = (kind, data)

    def text_of(name: str) -> str | None:
        item = values.get(name.lower())
        if item is None or not item[0].endswith("SZ"):
            return None
        return item[1] or None

    enable: bool | None = None
    item = values.get("proxyenable")
    if item is not None and item[0] == "REG_DWORD":
        with contextlib.suppress(ValueError):
            enable = int(item[1], 0) != 0
    return WinInetSettings(
        proxy_enable=enable,
        proxy_server=text_of("ProxyServer"),
        proxy_override=text_of("ProxyOverride"),
        auto_config_url=text_of("AutoConfigURL"),
    )


def parse_proxy_server(value: str) -> dict[str, str]:
    """Windows' ProxyServer / WinHTTP proxy list -> {scheme: "host:port"}.

    `proxy.corp:8080` is one proxy for every scheme (key ""); `http=a:80;https=b:8443;
    socks=c:1080` names one per scheme (keys lower case). Entries may carry `http://`.
    """
    entries: dict[str, str] = {}
    for part in _split_list(value, "; "):
        scheme, eq, server = part.partition("=")
        if eq:
            entries.setdefault(scheme.strip().lower(), server.strip())
        else:
            entries.setdefault("", part.strip())
    return entries


def _choose_server(entries: Mapping[str, str]) -> tuple[_ProxyValue, str | None]:
    """The proxy for our redirect's HTTPS and HTTP, from a ProxyServer list: the one for
    every scheme, else https's, else http's, else socks (a note says it may be SOCKS4)."""
    for key in ("", "https", "http"):
        server = entries.get(key)
        if server:
            return _proxy_value(server), None
    socks = entries.get("socks")
    if socks:
        value = _proxy_value(socks if "://" in socks else f"socks5://{socks}")
        return value, "its socks= entry is used as SOCKS5 (Windows may mean SOCKS4 there)"
    return _ProxyValue(None, problem="names no proxy for http or https"), None


def from_wininet(settings: WinInetSettings) -> tuple[list[Found], list[str]]:
    """The user's Internet Options. A ProxyServer that is switched off (ProxyEnable 0) is a
    note: Windows does not use it either. The PAC script counts whether or not ProxyEnable
    is on (WinINET reads AutoConfigURL on its own)."""
    notes: list[str] = []
    url: str | None = None
    username: str | None = None
    if settings.proxy_server:
        value, note = _choose_server(parse_proxy_server(settings.proxy_server))
        if not settings.proxy_enable:
            notes.append(
                f"{SOURCE_WININET}: a proxy is set but switched off (ProxyEnable 0); not used"
            )
        elif value.url is None:
            notes.append(f"{SOURCE_WININET}: ProxyServer {value.problem}; not used")
        else:
            url, username = value.url, value.username
            if note:
                notes.append(f"{SOURCE_WININET}: {note}")
    elif settings.proxy_enable:
        notes.append(f"{SOURCE_WININET}: ProxyEnable is on but no ProxyServer is set")
    pac = settings.auto_config_url
    if pac is not None and not pac.lower().startswith(("http://", "https://")):
        notes.append(
            f"{SOURCE_WININET}: AutoConfigURL is not an http(s) URL (a file: script cannot be "
            "read from Linux); not kept"
        )
        pac = None
    direct = _split_list(settings.proxy_override or "", ";") if url else ()
    if url is None and pac is None:
        if not notes:
            notes.append(f"{SOURCE_WININET}: no proxy set (direct connection)")
        return [], notes
    return [Found(SOURCE_WININET, url, direct, pac, username)], notes


# --------------------------------------------------------------------------- WinHTTP


@dataclass(frozen=True)
class WinHttpSettings:
    """`netsh winhttp show proxy`: direct, or a proxy list with its bypass list."""

    direct: bool
    proxy_server: str | None = None
    bypass: tuple[str, ...] = ()


def parse_netsh_winhttp(text: str) -> WinHttpSettings | None:
    """Read `netsh winhttp show proxy`; None when the text is in neither known form (another
    display language, an error message).

        Current WinHTTP proxy settings:

            Direct access (no proxy server).
    or
            Proxy Server(s) :  proxy.corp.example:8080
            Bypass List     :  <local>;*.corp.example     ("(none)" when empty)
    """
    server: str | None = None
    bypass: tuple[str, ...] = ()
    for raw in text.splitlines():
        line = raw.strip()
        if line.lower().startswith("direct access"):
            return WinHttpSettings(direct=True)
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key = key.strip().lower()
        value = value.strip()
        if key.startswith("proxy server"):
            server = value or None
        elif key.startswith("bypass list"):
            bypass = () if value.lower() in ("", "(none)") else _split_list(value, ";")
    if server is None:
        return None
    return WinHttpSettings(direct=False, proxy_server=server, bypass=bypass)


def from_winhttp(settings: WinHttpSettings | None) -> tuple[list[Found], list[str]]:
    if settings is None:
        return [], [
            f"{SOURCE_WINHTTP}: the answer was in a form this version does not read "
            "(another display language?); not used"
        ]
    if settings.direct or not settings.proxy_server:
        return [], [f"{SOURCE_WINHTTP}: direct access (no proxy server)"]
    value, note = _choose_server(parse_proxy_server(settings.proxy_server))
    if value.url is None:
        return [], [f"{SOURCE_WINHTTP}: the proxy list {value.problem}; not used"]
    notes = [f"{SOURCE_WINHTTP}: {note}"] if note else []
    return [Found(SOURCE_WINHTTP, value.url, settings.bypass, None, value.username)], notes


# --------------------------------------------------------------------------- running tools


@dataclass(frozen=True)
class RunResult:
    """A tool's exit code and output (decoded leniently: Windows tools speak the console's
    code page through interop), or `problem` in words when it could not run."""

    returncode: int = 0
    stdout: str = ""
    stderr: str = ""
    problem: str | None = None


Runner = Callable[[Sequence[str], float], RunResult]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def find_windows_tool(name: str, path: str | None = None, system32: Path = WINDOWS_SYSTEM32) -> str:
    """`reg.exe` from PATH (WSL appends Windows' PATH by default), else from System32."""
    found = shutil.which(name, path=path)
    if found:
        return found
    fallback = system32 / name
    return str(fallback) if fallback.is_file() else name


def run_tool(argv: Sequence[str], timeout: float) -> RunResult:
    """Run a Windows tool through interop, at most `timeout` seconds, reading no input."""
    tool = os.path.basename(argv[0])
    try:
        proc = subprocess.Popen(
            [find_windows_tool(argv[0]), *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a hung tool and its children end with their group
        )
    except FileNotFoundError:
        return RunResult(
            problem=f"{tool} was not found (Windows interop is off, or Windows' "
            "System32 is not on PATH)"
        )
    except OSError as exc:
        if exc.errno == errno.ENOEXEC:
            return RunResult(problem=f"{tool} cannot run: WSL's Windows interop is switched off")
        return RunResult(problem=f"{tool} cannot run: {exc.strerror or exc}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)
        proc.kill()
        proc.communicate()
        return RunResult(problem=f"{tool} did not answer within {timeout:g} s")
    return RunResult(proc.returncode, _decode(out[:_MAX_OUTPUT]), _decode(err[:_MAX_OUTPUT]))


def _failed(tool: str, result: RunResult) -> str | None:
    if result.problem is not None:
        return result.problem
    if result.returncode != 0:
        first = next((ln.strip() for ln in result.stderr.splitlines() if ln.strip()), "")
        why = f": {first[:200]}" if first else ""
        return f"{tool} failed (exit code {result.returncode}){why}"
    return None


# --------------------------------------------------------------------------- all of it


@dataclass
class _Collect:
    found: list[Found] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, part: tuple[list[Found], list[str]]) -> None:
        self.found += part[0]
        self.notes += part[1]


def discover(
    env: Mapping[str, str] | None = None,
    *,
    wsl: bool | None = None,
    run: Runner = run_tool,
    timeout: float = TOOL_TIMEOUT,
    proc_version: Path = Path("/proc/version"),
) -> Discovery:
    """Look everywhere, in order. Blocks for up to 2 x `timeout` on WSL (run it off a UI
    thread); never raises for what it finds or fails to find."""
    env = os.environ if env is None else env
    out = _Collect()
    out.add(from_environment(env))
    if wsl is None:
        try:
            version = proc_version.read_text(encoding="utf-8", errors="replace")
        except OSError:
            version = ""
        wsl = is_wsl(version, env)
    if not wsl:
        return Discovery(tuple(out.found), tuple(out.notes))

    reg = run(REG_QUERY, timeout)
    problem = _failed("reg.exe", reg)
    if problem is not None:
        out.notes.append(f"{SOURCE_WININET}: {problem}")
    else:
        out.add(from_wininet(parse_reg_query(reg.stdout)))

    netsh = run(NETSH_WINHTTP, timeout)
    problem = _failed("netsh.exe", netsh)
    if problem is not None:
        out.notes.append(f"{SOURCE_WINHTTP}: {problem}")
    else:
        out.add(from_winhttp(parse_netsh_winhttp(netsh.stdout)))
    return Discovery(tuple(out.found), tuple(out.notes))
