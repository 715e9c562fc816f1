"""The settings file: TOML in the XDG config dir, validated on load, written atomically.

It turns the file into `RelaySettings` and `UpstreamProxy` objects and back. It holds no
secrets: a password-like key is refused, and a URL with `user:pass@` is refused without
echoing it. Every problem becomes a `ConfigError` naming the file and the field.

Must not import PySide6 (the app and headless `tray-proxy run` share it) or keyring.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeGuard

from platformdirs import user_config_path

from tray_proxy.errors import UserError
from tray_proxy.firewall.ruleset import (
    DEFAULT_CONTAINER_INTERFACES,
    DEFAULT_EXCLUDED_NETWORKS,
    MAX_SOURCE_PORTS,
    IPNetwork,
    RuleSpec,
    SpecError,
)
from tray_proxy.relay.settings import (
    AuthScheme,
    EarlyDataMode,
    RelaySettings,
    UpstreamKind,
    UpstreamProxy,
)
from tray_proxy.routing.settings import (
    ROUTING_KEYS,
    RoutingConfigError,
    RoutingSettings,
    dump_routing,
    parse_routing,
)
from tray_proxy.routing.settings import show_value as _show
from tray_proxy.routing.settings import toml_scalar as _toml_scalar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "LogSettings",
    "ProbeSettings",
    "RoutingSettings",
    "MAX_SOURCE_PORTS",
    "RedirectSettings",
    "default_config_path",
    "dump_config",
    "kernel_local_port_range",
    "load_config",
    "parse_config",
    "parse_probe_target",
    "parse_upstream",
    "save_config",
]

APP_NAME = "tray-proxy"

_DEFAULT_PORTS = {UpstreamKind.HTTP: 8080, UpstreamKind.SOCKS5: 1080}
_SCHEMES = {
    "http": UpstreamKind.HTTP,
    "socks5": UpstreamKind.SOCKS5,
    "socks5h": UpstreamKind.SOCKS5,
}
# The name is also a file name under $CREDENTIALS_DIRECTORY and a keyring entry.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_SECRET_KEYS = frozenset({"pass", "passwd", "password", "passphrase", "pwd", "secret"})
_SECRET_PARTS = ("password", "passwd", "secret")
_PASSWORD_HELP = "passwords are not stored in the config file; use `tray-proxy credentials set {}`"

_RELAY_KEYS = (
    "port",
    "listen",
    "redirect_ports",
    "upstream",
    "connect_timeout",
    "handshake_timeout",
    "idle_timeout",
    "peek_timeout",
    "source_ports",
    "drain_timeout",
    "spare_connections",
    "spare_max_age",
    "reverify_after",
    "early_data",
)
_UPSTREAM_KEYS = ("name", "url", "username", "auth", "priority")
_REDIRECT_KEYS = ("exclude", "capture", "capture_containers", "container_interfaces", "reject_quic")
# Whose traffic this host's redirect captures (issue 16 item 1); the root helper's policy may
# narrow it and refuses "all" unless the administrator allows it.
CAPTURE_CHOICES: tuple[str, ...] = ("owner+system", "owner", "all")
_LOG_KEYS = ("enabled", "path", "max_age_days", "max_size_mb")
_PROBE_KEYS = ("target", "timeout")
_ROUTING_KEYS = ROUTING_KEYS  # one list: tray_proxy/routing/settings.py
_TOP_KEYS = ("relay", "redirect", "log", "probe", "routing", "rule", "upstream")
# The root helper refuses more than this many excluded networks.
_MAX_EXCLUDE = 256
_MAX_INTERFACES = 32

# (lowest allowed, lowest is inclusive, highest inclusive) per timeout, in seconds.
_TIMEOUTS: dict[str, tuple[float, bool, float]] = {
    "connect_timeout": (0.0, False, 300.0),
    "handshake_timeout": (0.0, False, 300.0),
    "idle_timeout": (0.0, False, 86400.0),
    "peek_timeout": (0.0, True, 30.0),
    "drain_timeout": (0.0, True, 300.0),
    "spare_max_age": (0.0, False, 300.0),
    # At least a minute between re-checks of a rejected password: lock-out policies count
    # failed logins per window (issue 16 item 7).
    "reverify_after": (60.0, True, 86400.0),
}
_MAX_SPARES = 16
# relay.source_ports holds at most MAX_SOURCE_PORTS, the root helper's own limit: the range is
# reserved for the relay (ip_local_reserved_ports) while the redirect is on, and a wide one
# takes ports from every other program (issue 16, item 3).
# Nothing in the settings nests deeper than upstream[i].key (3 levels); a file nesting arrays or
# inline tables far deeper is a mistake or an attack on the parser's recursion (issue 16, item 9).
_MAX_DEPTH = 16
_LOCAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def default_config_path() -> Path:
    """Where the app and `tray-proxy run` read and write the settings."""
    return user_config_path(APP_NAME) / "config.toml"


class ConfigError(UserError):
    """A settings file that cannot be used. `str()` is the message to show the user.

    `source` is the file, `field` the dotted path (`upstream[1].url`, empty when the
    problem is the whole file), `problem` what is wrong and what is expected.
    """

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class RedirectSettings:
    """What the nftables redirect leaves alone and whether it captures containers.

    The upstreams' addresses and the relay's own source ports are excluded in any case; they
    are not settings.
    """

    exclude: tuple[IPNetwork, ...] = DEFAULT_EXCLUDED_NETWORKS
    # "owner+system": the user running tray-proxy and the system accounts acting for them
    # (uid < 1000: root for `sudo apt update`, _apt); "owner": that user only; "all": every
    # local user, with the owner's proxy identity (only where the admin's policy allows it).
    capture: str = "owner+system"
    capture_containers: bool = True
    container_interfaces: tuple[str, ...] = DEFAULT_CONTAINER_INTERFACES
    reject_quic: bool = True


@dataclass(frozen=True)
class LogSettings:
    """The connection history (monitor/history.py): on or off, where, and how much to keep.

    `path` None means the default file in the XDG state dir. Retention removes the oldest
    connections first, by age and by the file's size, whichever limit is reached first.
    """

    enabled: bool = True
    path: Path | None = None
    max_age_days: float = 30.0
    max_size_mb: float = 200.0


@dataclass(frozen=True)
class ProbeSettings:
    """The connection test (Test connection, the dashboard's Test now, `tray-proxy setup`):
    where it asks the proxy to connect, and how long it waits.

    The default is a host a corporate proxy lets through almost everywhere: Windows, Office
    and Edge need Microsoft's sites, so a proxy that forbids it breaks every desktop.
    """

    target: tuple[str, int] = ("www.microsoft.com", 443)
    timeout: float = 10.0

    @property
    def target_text(self) -> str:
        host, port = self.target
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Config:
    """The whole settings file. `path` is where it was loaded from (None when parsed from text)."""

    relay: RelaySettings
    upstreams: tuple[UpstreamProxy, ...]
    path: Path | None = None
    redirect: RedirectSettings = field(default_factory=RedirectSettings)
    log: LogSettings = field(default_factory=LogSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)

    def active_upstream(self) -> UpstreamProxy | None:
        """The upstream named by `relay.upstream`; without a name, the first one.

        None when there is no upstream, or when the name matches none of them (a parsed
        config cannot have that; one built in code can, and guessing another proxy would
        be worse than having none).
        """
        if self.relay.upstream is not None:
            return next((u for u in self.upstreams if u.name == self.relay.upstream), None)
        return self.upstreams[0] if self.upstreams else None


# --------------------------------------------------------------------------- loading


def load_config(path: Path, *, missing_ok: bool = False) -> Config:
    """Read and validate the settings file at `path`.

    A missing file is a ConfigError, unless `missing_ok`: then the defaults, with no upstream.
    """
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return Config(relay=RelaySettings(), upstreams=(), path=path)
        raise ConfigError(
            source,
            "",
            "file not found; run `tray-proxy setup` to create it (or write it by hand: "
            "docs/config.md)",
        ) from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read it: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, "", f"not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8"
        ) from None
    config = parse_config(text, source)
    return replace(config, path=path)


def parse_upstream(
    name: str,
    url: str,
    username: str | None = None,
    source: str = "setup",
    *,
    auth: str | None = None,
) -> UpstreamProxy:
    """One upstream from its fields, checked by the same rules as an [[upstream]] in the
    file (ConfigError naming `upstream.name`, `upstream.url`, `upstream.auth` or
    `upstream.username`; whether a user name may hold a ':' depends on `auth`)."""
    doc: dict[str, object] = {"name": name, "url": url}
    if username is not None:
        doc["username"] = username
    if auth is not None:
        doc["auth"] = auth
    return _Parser(source).upstream(doc, "upstream")


def parse_probe_target(text: str, source: str = "setup") -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) as [probe] target reads it; ConfigError otherwise."""
    return _Parser(source).target(text, "probe.target")


def parse_config(
    text: str,
    source: str = "config.toml",
    *,
    local_port_range: tuple[int, int] | None = None,
) -> Config:
    """Validate settings given as TOML text; `source` names it in error messages.

    `local_port_range` is the kernel's ephemeral port range that `relay.source_ports` must not
    overlap; None reads this machine's (net.ipv4.ip_local_port_range).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries "(at line L, column C)"; it never quotes a whole value.
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib recurses once per nesting level; hundreds of levels exhaust the stack.
        raise ConfigError(source, "", _TOO_DEEP) from None
    if local_port_range is None:
        local_port_range = kernel_local_port_range()
    return _Parser(source, local_port_range).document(doc)


_TOO_DEEP = (
    f"values are nested more than {_MAX_DEPTH} levels deep (arrays, tables); no setting nests "
    "like that (see docs/config.md for the keys and their values)"
)


def kernel_local_port_range(path: Path = _LOCAL_PORT_RANGE) -> tuple[int, int] | None:
    """The ports the kernel hands out for bind(0) and connect(), or None when unreadable."""
    try:
        fields = path.read_text().split()
        low, high = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return (low, high) if 0 < low <= high <= 65535 else None


def _too_deep(doc: Mapping[str, object]) -> str | None:
    """The dotted path of the first value nested deeper than _MAX_DEPTH, else None.

    Iterative on purpose: the validation that follows recurses, and a recursion here would fail
    on the very input it is meant to catch.
    """
    stack: list[tuple[object, str, int]] = [(doc, "", 0)]
    while stack:
        value, at, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return at
        if isinstance(value, dict):
            stack.extend((v, f"{at}.{k}" if at else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{at}[{i}]", depth + 1) for i, v in enumerate(value))
    return None


class _Parser:
    def __init__(self, source: str, local_port_range: tuple[int, int] | None = None) -> None:
        self.source = source
        self.local_port_range = local_port_range

    def fail(self, field: str, problem: str) -> ConfigError:
        return ConfigError(self.source, field, problem)

    def document(self, doc: Mapping[str, object]) -> Config:
        deep = _too_deep(doc)
        if deep is not None:
            # Only the key is named: 400 levels of "[0]" would not be a one-line message.
            raise self.fail(".".join(deep.split("[", 1)[0].split(".")[:2]), _TOO_DEEP)
        # Secrets first: a misplaced password must be reported as such, never as an
        # "unknown key" or a type error that might quote it.
        secret = next(_secret_keys(doc), None)
        if secret is not None:
            field, upstream_name = secret
            raise self.fail(field, _PASSWORD_HELP.format(upstream_name or "NAME"))
        self.no_unknown_keys(doc, _TOP_KEYS, "")

        relay_doc = doc.get("relay", {})
        if not isinstance(relay_doc, dict):
            raise self.fail("relay", f"must be a table written [relay], got {_show(relay_doc)}")
        upstream_docs = doc.get("upstream", [])
        if not isinstance(upstream_docs, list) or not all(
            isinstance(u, dict) for u in upstream_docs
        ):
            raise self.fail(
                "upstream", f"must be tables written [[upstream]], got {_show(upstream_docs)}"
            )

        upstreams = tuple(self.upstream(u, f"upstream[{i}]") for i, u in enumerate(upstream_docs))
        seen: dict[str, int] = {}
        for i, u in enumerate(upstreams):
            if u.name in seen:
                raise self.fail(
                    f"upstream[{i}].name",
                    f'"{u.name}" is already the name of upstream[{seen[u.name]}]; '
                    "each upstream needs its own name",
                )
            seen[u.name] = i
        relay = self.relay(relay_doc, upstreams)
        redirect_doc = doc.get("redirect", {})
        if not isinstance(redirect_doc, dict):
            raise self.fail(
                "redirect", f"must be a table written [redirect], got {_show(redirect_doc)}"
            )
        redirect = self.redirect(redirect_doc)
        log_doc = doc.get("log", {})
        if not isinstance(log_doc, dict):
            raise self.fail("log", f"must be a table written [log], got {_show(log_doc)}")
        log = self.log(log_doc)
        probe = self.probe(self.table(doc, "probe"))
        routing = self.routing(
            self.table(doc, "routing"), doc.get("rule"), upstream_docs, [u.name for u in upstreams]
        )
        return Config(
            relay=relay,
            upstreams=upstreams,
            path=None,
            redirect=redirect,
            log=log,
            probe=probe,
            routing=routing,
        )

    def table(self, doc: Mapping[str, object], key: str) -> Mapping[str, object]:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table written [{key}], got {_show(value)}")
        return value

    # -- [probe] and [routing]

    def probe(self, doc: Mapping[str, object]) -> ProbeSettings:
        self.no_unknown_keys(doc, _PROBE_KEYS, "probe")
        defaults = ProbeSettings()
        target = defaults.target
        if "target" in doc:
            target = self.target(doc["target"], "probe.target")
        timeout = self.seconds(
            doc.get("timeout", defaults.timeout), "probe.timeout", 0.0, False, 300.0
        )
        return ProbeSettings(target=target, timeout=timeout)

    def target(self, value: object, field: str) -> tuple[str, int]:
        example = 'must be "HOST:PORT", like "www.microsoft.com:443" or "[2001:db8::1]:443"'
        if not isinstance(value, str):
            raise self.fail(field, f"{example}, got {_show(value)}")
        if value.startswith("["):
            inner, bracket, rest = value[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise self.fail(field, f"{example}, got {_show(value)}")
            try:
                host = str(ipaddress.IPv6Address(inner))
            except ValueError:
                raise self.fail(field, "the host in [...] must be an IPv6 address") from None
            port_text = rest[1:]
        else:
            host, colon, port_text = value.rpartition(":")
            if not colon or not host or ":" in host:
                raise self.fail(field, f"{example}, got {_show(value)}")
            host = self.host(host, field)
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise self.fail(field, f"the port must be a number 1-65535, got {_show(value)}")
        return host, int(port_text)

    def routing(
        self,
        doc: Mapping[str, object],
        rules: object,
        upstream_docs: list[dict[str, object]],
        names: list[str],
    ) -> RoutingSettings:
        # [routing], [[rule]] and [[upstream]] priority: tray_proxy/routing/settings.py.
        self.no_unknown_keys(doc, _ROUTING_KEYS, "routing")
        try:
            return parse_routing(doc, rules, upstream_docs, names)
        except RoutingConfigError as exc:
            raise self.fail(exc.field, exc.problem) from None

    def no_unknown_keys(self, table: Mapping[str, object], known: tuple[str, ...], at: str) -> None:
        for key in table:
            if key not in known:
                field = f"{at}.{key}" if at else key
                close = difflib.get_close_matches(key, known, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                raise self.fail(field, f"unknown key; {hint}known keys: {', '.join(known)}")

    # -- [relay]

    def relay(
        self, doc: Mapping[str, object], upstreams: tuple[UpstreamProxy, ...]
    ) -> RelaySettings:
        self.no_unknown_keys(doc, _RELAY_KEYS, "relay")
        defaults = RelaySettings()
        port = self.port(doc.get("port", defaults.port), "relay.port")
        listen = self.listen(doc.get("listen", list(defaults.listen)))
        redirect_ports = self.redirect_ports(
            doc.get("redirect_ports", list(defaults.redirect_ports))
        )

        upstream = doc.get("upstream")
        if upstream is not None:
            names = [u.name for u in upstreams]
            if not isinstance(upstream, str):
                raise self.fail(
                    "relay.upstream", f"must be an upstream name, got {_show(upstream)}"
                )
            if upstream not in names:
                defined = ", ".join(f'"{n}"' for n in names) if names else "none (add [[upstream]])"
                raise self.fail(
                    "relay.upstream",
                    f"{_show(upstream)} is not the name of an [[upstream]]; defined: {defined}",
                )

        timeouts: dict[str, float] = {}
        for key, (lo, lo_inclusive, hi) in _TIMEOUTS.items():
            timeouts[key] = self.seconds(
                doc.get(key, getattr(defaults, key)), f"relay.{key}", lo, lo_inclusive, hi
            )

        source_ports = self.source_ports(doc.get("source_ports", defaults.source_ports))
        if source_ports is not None and source_ports[0] <= port <= source_ports[1]:
            raise self.fail(
                "relay.source_ports",
                f"{source_ports[0]}-{source_ports[1]} contains relay.port {port}; "
                "move one of them so the listener and the outbound range do not clash",
            )
        if port in redirect_ports:
            raise self.fail(
                "relay.redirect_ports",
                f"contains relay.port {port}, the relay's own listening port: connections to "
                "it would be redirected back into the relay; remove it from "
                "relay.redirect_ports or move relay.port",
            )

        spares = doc.get("spare_connections", defaults.spare_connections)
        if not _is_int(spares) or not 0 <= spares <= _MAX_SPARES:
            raise self.fail(
                "relay.spare_connections",
                f"must be an integer 0-{_MAX_SPARES} (0 opens no spare connections to the "
                f"proxy), got {_show(spares)}",
            )

        return RelaySettings(
            port=port,
            listen=listen,
            redirect_ports=redirect_ports,
            upstream=upstream,
            connect_timeout=timeouts["connect_timeout"],
            handshake_timeout=timeouts["handshake_timeout"],
            idle_timeout=timeouts["idle_timeout"],
            peek_timeout=timeouts["peek_timeout"],
            source_ports=source_ports,
            drain_timeout=timeouts["drain_timeout"],
            spare_connections=spares,
            spare_max_age=timeouts["spare_max_age"],
            reverify_after=timeouts["reverify_after"],
            early_data=self.early_data(doc.get("early_data", defaults.early_data)),
        )

    def early_data(self, value: object) -> EarlyDataMode:
        # The file says true / false / "auto"; RelaySettings says "on" / "off" / "auto".
        if isinstance(value, bool):
            return "on" if value else "off"
        if value == "auto":
            return "auto"
        raise self.fail("relay.early_data", f'must be "auto", true or false, got {_show(value)}')

    def port(self, value: object, field: str) -> int:
        if not _is_int(value) or not 1 <= value <= 65535:
            raise self.fail(field, f"must be an integer 1-65535, got {_show(value)}")
        return value

    def listen(self, value: object) -> tuple[str, ...]:
        field = "relay.listen"
        if not isinstance(value, list) or not value:
            raise self.fail(
                field,
                f'must be a non-empty array of addresses like ["127.0.0.1", "::1"], '
                f"got {_show(value)}",
            )
        out: list[str] = []
        for i, item in enumerate(value):
            item_field = f"{field}[{i}]"
            if not isinstance(item, str):
                raise self.fail(item_field, f"must be an IP address string, got {_show(item)}")
            try:
                address = ipaddress.ip_address(item)
            except ValueError:
                raise self.fail(
                    item_field,
                    f"must be an IP address such as 127.0.0.1 or ::1, got {_show(item)}",
                ) from None
            if not address.is_loopback:
                raise self.fail(
                    item_field,
                    f"{_show(item)} is not a loopback address; the relay must never be reachable "
                    "from another host (it would be an open proxy carrying your credentials). "
                    "Use 127.0.0.1 and/or ::1",
                )
            text = str(address)
            if text in out:
                raise self.fail(item_field, f"{_show(item)} is listed twice")
            out.append(text)
        return tuple(out)

    def redirect_ports(self, value: object) -> tuple[int, ...]:
        field = "relay.redirect_ports"
        if not isinstance(value, list) or not 1 <= len(value) <= 64:
            raise self.fail(
                field,
                f"must be an array of 1 to 64 port numbers like [80, 443], got {_show(value)}",
            )
        ports = tuple(self.port(p, f"{field}[{i}]") for i, p in enumerate(value))
        for i, p in enumerate(ports):
            if p in ports[:i]:
                raise self.fail(f"{field}[{i}]", f"port {p} is listed twice")
        return ports

    def seconds(self, value: object, field: str, lo: float, lo_inclusive: bool, hi: float) -> float:
        lowest = f">= {lo:g}" if lo_inclusive else f"> {lo:g}"
        expected = f"must be a number of seconds {lowest} and <= {hi:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(field, f"{expected}, got {_show(value)}")
        seconds = float(value)
        in_range = (seconds >= lo if lo_inclusive else seconds > lo) and seconds <= hi
        if math.isnan(seconds) or not in_range:
            raise self.fail(field, f"{expected}, got {_show(value)}")
        return seconds

    def source_ports(self, value: object) -> tuple[int, int] | None:
        field = "relay.source_ports"
        expected = "must be [low, high] (two ports 1024-65535, low <= high) or false to disable"
        if value is False or value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise self.fail(field, f"{expected}, got {_show(value)}")
        lo, hi = value
        for i, p in enumerate((lo, hi)):
            if not _is_int(p) or not 1024 <= p <= 65535:
                raise self.fail(
                    f"{field}[{i}]",
                    f"must be an integer 1024-65535 (ports below 1024 are reserved for "
                    f"services), got {_show(p)}",
                )
        if lo > hi:
            raise self.fail(field, f"low {lo} is above high {hi}; write [{hi}, {lo}]")
        if hi - lo + 1 > MAX_SOURCE_PORTS:
            raise self.fail(
                field,
                f"{lo}-{hi} is {hi - lo + 1} ports; at most {MAX_SOURCE_PORTS} (the range is "
                "reserved for the relay while the redirect is on, so other programs could not "
                f"use these ports). {_suggest(self.local_port_range)}",
            )
        local = self.local_port_range
        if local is not None and _overlap((lo, hi), local):
            raise self.fail(
                field,
                f"{lo}-{hi} overlaps {local[0]}-{local[1]}, the ports the kernel gives every "
                "program for its connections (net.ipv4.ip_local_port_range); reserving them "
                f"for the relay would make other programs' connections fail. {_suggest(local)}",
            )
        return (lo, hi)

    # -- [redirect]

    def redirect(self, doc: Mapping[str, object]) -> RedirectSettings:
        self.no_unknown_keys(doc, _REDIRECT_KEYS, "redirect")
        defaults = RedirectSettings()
        exclude = self.exclude(doc.get("exclude", [str(n) for n in defaults.exclude]))
        whose = doc.get("capture", defaults.capture)
        if whose not in CAPTURE_CHOICES:
            raise self.fail(
                "redirect.capture",
                f"must be one of {', '.join(map(repr, CAPTURE_CHOICES))}, got {_show(whose)}",
            )
        capture = self.flag(
            doc.get("capture_containers", defaults.capture_containers),
            "redirect.capture_containers",
        )
        interfaces = self.interfaces(
            doc.get("container_interfaces", list(defaults.container_interfaces))
        )
        if capture and not interfaces:
            raise self.fail(
                "redirect.container_interfaces",
                "must name at least one bridge while capture_containers is true "
                '(for example ["docker0", "br-*"]), or set capture_containers = false',
            )
        reject_quic = self.flag(
            doc.get("reject_quic", defaults.reject_quic), "redirect.reject_quic"
        )
        return RedirectSettings(
            exclude=exclude,
            capture=str(whose),
            capture_containers=capture,
            container_interfaces=interfaces,
            reject_quic=reject_quic,
        )

    def flag(self, value: object, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {_show(value)}")
        return value

    def exclude(self, value: object) -> tuple[IPNetwork, ...]:
        field = "redirect.exclude"
        if not isinstance(value, list) or len(value) > _MAX_EXCLUDE:
            raise self.fail(
                field,
                f"must be an array of at most {_MAX_EXCLUDE} networks like "
                f'["10.0.0.0/8", "fc00::/7"], got {_show(value)}',
            )
        out: list[IPNetwork] = []
        for i, item in enumerate(value):
            item_field = f"{field}[{i}]"
            if not isinstance(item, str):
                raise self.fail(item_field, f"must be a network string, got {_show(item)}")
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise self.fail(
                    item_field,
                    f"must be an address or network such as 10.0.0.0/8 or fc00::/7, "
                    f"got {_show(item)}",
                ) from None
            if network.network_address != ipaddress.ip_interface(item).ip:
                # 10.1.2.3/8 is more likely a typo than a wish for 10.0.0.0/8: do not guess.
                raise self.fail(
                    item_field, f"{_show(item)} has host bits set; write {_show(str(network))}"
                )
            if network in out:
                raise self.fail(item_field, f"{_show(item)} is listed twice")
            out.append(network)
        return tuple(out)

    def interfaces(self, value: object) -> tuple[str, ...]:
        field = "redirect.container_interfaces"
        if not isinstance(value, list) or len(value) > _MAX_INTERFACES:
            raise self.fail(
                field,
                f"must be an array of at most {_MAX_INTERFACES} interface names like "
                f'["docker0", "br-*"], got {_show(value)}',
            )
        out: list[str] = []
        for i, item in enumerate(value):
            item_field = f"{field}[{i}]"
            if not isinstance(item, str):
                raise self.fail(item_field, f"must be an interface name, got {_show(item)}")
            # The root helper's own check is the one rule for names; ask it.
            try:
                RuleSpec(relay_port=1, redirect_ports=(2,), container_interfaces=(item,))
            except SpecError as exc:
                problem = str(exc).split(": ", 1)[1].rsplit(", got", 1)[0]
                raise self.fail(item_field, f"{problem}, got {_show(item)}") from None
            if item in out:
                raise self.fail(item_field, f"{_show(item)} is listed twice")
            out.append(item)
        return tuple(out)

    # -- [log]

    def log(self, doc: Mapping[str, object]) -> LogSettings:
        self.no_unknown_keys(doc, _LOG_KEYS, "log")
        defaults = LogSettings()
        enabled = self.flag(doc.get("enabled", defaults.enabled), "log.enabled")
        path: Path | None = None
        value = doc.get("path")
        if value is not None:
            if not isinstance(value, str) or not value.strip() or not value.isprintable():
                raise self.fail(
                    "log.path",
                    "must be the path of the history file, like "
                    f'"~/.local/state/tray-proxy/history.sqlite3", got {_show(value)}',
                )
            path = Path(value).expanduser()
            if not path.is_absolute():
                raise self.fail(
                    "log.path",
                    f"must be an absolute path (or start with ~/), got {_show(value)}",
                )
        max_age = self.amount(
            doc.get("max_age_days", defaults.max_age_days), "log.max_age_days", "days", 3650
        )
        max_size = self.amount(
            doc.get("max_size_mb", defaults.max_size_mb), "log.max_size_mb", "MiB", 1_000_000
        )
        return LogSettings(enabled=enabled, path=path, max_age_days=max_age, max_size_mb=max_size)

    def amount(self, value: object, field: str, unit: str, hi: float) -> float:
        expected = f"must be a number of {unit} > 0 and <= {hi:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(field, f"{expected}, got {_show(value)}")
        if math.isnan(value) or not 0 < value <= hi:
            raise self.fail(field, f"{expected}, got {_show(value)}")
        return float(value)

    # -- [[upstream]]

    def upstream(self, doc: Mapping[str, object], at: str) -> UpstreamProxy:
        self.no_unknown_keys(doc, _UPSTREAM_KEYS, at)
        for key in ("name", "url"):
            if key not in doc:
                raise self.fail(f"{at}.{key}", "is required")
        name = doc["name"]
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise self.fail(
                f"{at}.name",
                "must be 1-64 characters of letters, digits, '.', '_' or '-' "
                f'(not "." or ".."), got {_show(name)}',
            )
        kind, host, port = self.url(doc["url"], f"{at}.url", name)
        auth = self.auth_scheme(doc.get("auth", "auto"), f"{at}.auth", kind)
        username = doc.get("username")
        if username is not None:
            username = self.username(username, f"{at}.username", kind, auth)
        return UpstreamProxy(
            name=name, kind=kind, host=host, port=port, username=username, auth=auth
        )

    def auth_scheme(self, value: object, field: str, kind: UpstreamKind) -> AuthScheme:
        choices = ", ".join(f'"{a.value}"' for a in AuthScheme)
        if not isinstance(value, str) or value.lower() not in {a.value for a in AuthScheme}:
            raise self.fail(field, f"must be one of {choices}, got {_show(value)}")
        auth = AuthScheme(value.lower())
        if kind is UpstreamKind.SOCKS5 and auth is not AuthScheme.AUTO:
            raise self.fail(
                field, 'a SOCKS5 proxy only knows username/password: leave it out or use "auto"'
            )
        return auth

    def url(self, value: object, field: str, name: str) -> tuple[UpstreamKind, str, int]:
        # Never quote the URL back: a typo'd one may still hold a password.
        example = 'like "http://proxy.example:8080" or "socks5://proxy.example:1080"'
        if not isinstance(value, str):
            raise self.fail(field, f"must be a URL {example}, got {_show(value)}")
        if "@" in value:
            raise self.fail(
                field,
                "must not contain a user name or password (user:pass@); put the user name in "
                f"`username` and store the password with `tray-proxy credentials set {name}` "
                "(it is kept in the keyring or $CREDENTIALS_DIRECTORY, never in this file)",
            )
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise self.fail(field, f"must start with http:// or socks5://, {example}")
        kind = _SCHEMES.get(scheme.lower())
        if kind is None:
            # The scheme is not quoted either: "alice:S3cret//..." is still a possible typo.
            hint = " (TLS to the proxy is not supported)" if scheme.lower() == "https" else ""
            raise self.fail(
                field,
                f"scheme is not supported{hint}; use http:// (HTTP CONNECT) or socks5://",
            )
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        tail = rest[len(authority) :]
        if tail not in ("", "/"):
            raise self.fail(field, f"must have no path, query or fragment, {example}")
        if any(c.isspace() or not c.isprintable() for c in authority):
            raise self.fail(field, "must not contain spaces or control characters")

        port_text: str | None = None
        if authority.startswith("["):
            inner, bracket, after = authority[1:].partition("]")
            if not bracket:
                raise self.fail(field, 'has "[" without "]"; write IPv6 hosts like [2001:db8::1]')
            try:
                host = str(ipaddress.IPv6Address(inner))
            except ValueError:
                raise self.fail(field, "the host in [...] must be an IPv6 address") from None
            if after:
                if not after.startswith(":"):
                    raise self.fail(field, 'after "]" only ":port" may follow')
                port_text = after[1:]
        else:
            host, colon, after = authority.partition(":")
            if colon:
                if ":" in after:
                    raise self.fail(
                        field, "IPv6 hosts must be in brackets, like [2001:db8::1]:8080"
                    )
                port_text = after
            host = self.host(host, field)

        if port_text is None:
            port = _DEFAULT_PORTS[kind]
        elif not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise self.fail(field, "the port must be a number 1-65535 (or leave it out)")
        else:
            port = int(port_text)
        return kind, host, port

    def host(self, host: str, field: str) -> str:
        if not host:
            raise self.fail(field, "must name a host, like http://proxy.example:8080")
        if not host.isascii():
            raise self.fail(
                field, "the host must be ASCII; write an international name in its xn-- form"
            )
        if re.fullmatch(r"[0-9.]+", host):
            try:
                return str(ipaddress.IPv4Address(host))
            except ValueError:
                raise self.fail(field, "the host is not a valid IPv4 address") from None
        name = host[:-1] if host.endswith(".") else host
        if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
            raise self.fail(
                field,
                "the host must be a DNS name (letters, digits, '-', dot-separated labels), "
                "an IPv4 address, or an IPv6 address in [brackets]",
            )
        return host

    def username(
        self, value: object, field: str, kind: UpstreamKind, auth: AuthScheme = AuthScheme.AUTO
    ) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {_show(value)}")
        if not value:
            raise self.fail(
                field, "must not be empty; leave the key out when the proxy needs no login"
            )
        if not value.isprintable():
            raise self.fail(field, "must not contain control characters or line breaks")
        if len(value.encode("utf-8")) > 255:
            raise self.fail(field, "must be at most 255 bytes in UTF-8")
        if (
            kind is UpstreamKind.HTTP
            and auth in (AuthScheme.AUTO, AuthScheme.BASIC)
            and ":" in value
        ):
            # RFC 7617 section 2: a Basic user-id cannot contain a colon.
            raise self.fail(
                field, 'must not contain ":" (HTTP Basic authentication cannot carry it)'
            )
        return value


def _secret_keys(
    value: object, at: str = "", upstream_name: str | None = None
) -> Iterator[tuple[str, str | None]]:
    """Yield the dotted path of every password-like key, with the enclosing upstream's name."""
    if isinstance(value, dict):
        name = value.get("name")
        if at.startswith("upstream[") and isinstance(name, str) and _NAME_RE.fullmatch(name):
            upstream_name = name
        for key, item in value.items():
            path = f"{at}.{key}" if at else key
            lowered = key.lower()
            if lowered in _SECRET_KEYS or any(part in lowered for part in _SECRET_PARTS):
                yield path, upstream_name
            else:
                yield from _secret_keys(item, path, upstream_name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _secret_keys(item, f"{at}[{i}]", upstream_name)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _suggest(local: tuple[int, int] | None) -> str:
    """Advice: a range of 4,000 ports outside the kernel's ephemeral ports, if there is room."""
    default = RelaySettings().source_ports
    assert default is not None
    if local is None or not _overlap(default, local):
        return f"Use [{default[0]}, {default[1]}] (the default)"
    low, high = local
    if high <= 65535 - 4000:
        return f"Use a range above it, like [{high + 1}, {high + 4000}]"
    if low - 4000 >= 1024:
        return f"Use a range below it, like [{low - 4000}, {low - 1}]"
    return (
        "Narrow net.ipv4.ip_local_port_range (sysctl) to make room, or set "
        "source_ports = false and run with --no-redirect"
    )


def _is_int(value: object) -> TypeGuard[int]:
    # TOML booleans arrive as Python bools, which are ints: `port = true` must not pass.
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- saving


def dump_config(config: Config) -> str:
    """The settings as TOML text that `parse_config` reads back to an equal Config.

    Every field is written, defaults included, so the file shows what can be changed.
    """
    relay = config.relay
    relay_doc: dict[str, object] = {
        "port": relay.port,
        "listen": list(relay.listen),
        "redirect_ports": list(relay.redirect_ports),
        "upstream": relay.upstream,
        **{key: float(getattr(relay, key)) for key in _TIMEOUTS},
        "source_ports": list(relay.source_ports) if relay.source_ports is not None else False,
        "spare_connections": relay.spare_connections,
        "early_data": {"on": True, "off": False}.get(relay.early_data, relay.early_data),
    }
    redirect = config.redirect
    redirect_doc: dict[str, object] = {
        "exclude": [str(n) for n in redirect.exclude],
        "capture": redirect.capture,
        "capture_containers": redirect.capture_containers,
        "container_interfaces": list(redirect.container_interfaces),
        "reject_quic": redirect.reject_quic,
    }
    log = config.log
    log_doc: dict[str, object] = {
        "enabled": log.enabled,
        "path": str(log.path) if log.path is not None else None,
        "max_age_days": float(log.max_age_days),
        "max_size_mb": float(log.max_size_mb),
    }
    lines = [
        "# tray-proxy settings (docs/config.md). No passwords here: they live in the keyring,",
        "# set with `tray-proxy credentials set NAME`.",
        "",
        "[relay]",
        *_toml_lines(relay_doc, _RELAY_KEYS),
        "",
        "[redirect]",
        *_toml_lines(redirect_doc, _REDIRECT_KEYS),
        "",
        "[log]",
        *_toml_lines(log_doc, _LOG_KEYS),
        "",
        "[probe]",
        *_toml_lines(
            {"target": config.probe.target_text, "timeout": float(config.probe.timeout)},
            _PROBE_KEYS,
        ),
    ]
    routing_lines = dump_routing(config.routing)
    if routing_lines:
        lines += ["", *routing_lines]
    priorities = dict(config.routing.priorities)
    for u in config.upstreams:
        entry: dict[str, object] = {"name": u.name, "url": u.url, "username": u.username}
        if u.auth is not AuthScheme.AUTO:
            entry["auth"] = u.auth.value
        entry["priority"] = priorities.get(u.name)
        lines += ["", "[[upstream]]", *_toml_lines(entry, _UPSTREAM_KEYS)]
    return "\n".join(lines) + "\n"


def _toml_lines(table: Mapping[str, object], order: tuple[str, ...]) -> Iterator[str]:
    # tomli_w escapes the values; the layout (one line per key, [[upstream]] blocks, short
    # arrays inline) is ours, because tomli_w would inline the upstreams and split arrays.
    for key in order:
        value = table.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            yield f"{key} = [{', '.join(_toml_scalar(v) for v in value)}]"
        else:
            yield f"{key} = {_toml_scalar(value)}"


def save_config(config: Config, path: Path) -> None:
    """Write the settings to `path` atomically, mode 0600; the old file survives any failure."""
    text = dump_config(config).encode("utf-8")
    # Write through a symlink (dotfile managers) instead of replacing the link itself.
    target = Path(os.path.realpath(path))
    directory = target.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600 in the same directory, so os.replace is a rename.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot save it: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), 0o600)
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise ConfigError(str(path), "", f"cannot save it: {exc.strerror or exc}") from None
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some file systems refuse to open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
