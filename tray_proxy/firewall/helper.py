#!/usr/bin/python3 -I
"""The privileged redirect helper: validates requests, renders and applies `table inet tray_proxy`.

Installed alone, root-owned 0755, at /usr/libexec/tray-proxy/tray-proxy-helper and started by
pkexec / sudo / the root user. It is also the single nft renderer of the project:
`tray_proxy.firewall.ruleset` re-exports `RuleSpec` and `render` from here, so what the golden
tests check is exactly what root applies.

Must import the standard library only (never tray_proxy.*, never PySide6): at run time it lives
outside any virtualenv, and `python3 -I` ignores PYTHONPATH and the user's site-packages.

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"v": 1, "id": 7, "op": "apply", "relay_port": 3129, ...RuleSpec fields...}
    {"v": 1, "id": 8, "op": "status"}
    {"v": 1, "id": 9, "op": "remove"}
Answers: {"v": 1, "id": N, "ok": true, ...} or {"v": 1, "id": N|null, "ok": false, "error": "..."}.
Every request line gets exactly one answer; a malformed line gets an error answer.
`status` answers {"active": new connections are redirected, "table_present": our table is in
the kernel (also after `remove`, until exit), "spec": what this helper applied or null, and
the grant below}; `apply` answers with the grant: {"owner_uid": the uid served, "captured":
whose connections are redirected in words (null before an apply), "bridges": [{"name",
"address", "network"}] the container bridges captured, each DNATed to address:relay_port};
`remove` answers {"removed": the redirect was on}. Exit status: 0 when the table is gone and
everything restored, 4 when the cleanup was incomplete, 2/3 when the helper could not start.

Who may ask for what (issue 16):
- The caller's uid comes from the launcher, never from the request: `SUDO_UID` when started by
  sudo, `PKEXEC_UID` when started by pkexec, else the real uid (root started it directly).
  Both launchers build the helper's environment themselves: pkexec clears it and sets
  PKEXEC_UID; sudo (env_reset, Debian's default) keeps a short list that never holds these
  names and always writes SUDO_UID itself. SUDO_UID wins over PKEXEC_UID because pkexec would
  have removed a SUDO_UID, so when both are present sudo started us and PKEXEC_UID came
  through from the caller. No request field can name a uid (unknown fields are refused).
- What may be granted is an administrator's decision: the root-owned policy file
  POLICY_PATH (JSON, see `Policy`; absent = the built-in defaults). A policy file that is not
  a regular root-owned file writable by root alone makes every apply fail, naming the file.
- The relay port must be a TCP socket listening in this network namespace and owned by the
  caller (read from /proc/net/tcp{,6}): a group member cannot point the redirect at a port
  someone else listens on.
- The output chains carry a `meta skuid` scope (request field `capture`, bounded by the
  policy): by default the owner's own connections and those of system accounts (uid < 1000,
  root and `_apt` act for the owner), never other human users.
- `relay_source_ports` is reserved for the relay in ip_local_reserved_ports: at most
  MAX_SOURCE_PORTS ports (or the policy's max) and never inside ip_local_port_range, so no
  other program runs out of ports.

Design of the redirect (why the rules look the way they do):
- Traffic of this host: `nat output` chain, `redirect to :PORT` (127.0.0.1 / ::1 by family).
  The relay listens on 127.0.0.1 and ::1.
- Traffic of containers (IPv4): only bridges Docker or Podman manage, resolved by the helper
  (Docker's Engine API on DOCKER_SOCKET, Podman's network files in PODMAN_NETWORKS_DIR and its
  built-in podman0), which exist here and carry the gateway address those tools gave them.
  A bridge that merely has a container-like name (a `br-lan` to the office LAN) is not one.
  Per bridge, `nat prerouting` DNATs connections from the bridge's subnet to the bridge's own
  gateway address at the relay port, and the relay listens on that address too (the client
  learns the bridges from the answers of apply and status). No DNAT to 127.0.0.1 and no
  route_localnet: that is the hole behind CVE-2020-8558. The set is rescanned every second
  (interfaces and addresses; Docker and Podman are asked again when they change, and every
  BRIDGE_RESCAN_SECONDS) and the table re-applied when it changes. `container_interfaces`
  only narrows the set.
- The `input` chain accepts new connections to the relay port only from loopback, or from a
  captured bridge's subnet to its gateway address when our prerouting rule DNATed them; it
  drops every other connection to the relay port: the relay is never reachable from another
  host, even if it were to listen on a wildcard address.
- IPv6 container traffic is not captured; with capture_containers on, forwarded IPv6 TCP from
  a captured bridge to the redirected ports is rejected with a TCP reset so clients fall back
  to IPv4 at once instead of timing out.
- Exclusions (rule order): destinations local to this host (`fib daddr type local`), the
  excluded networks, the upstream proxies' address+port, and the relay's own outbound sockets,
  recognised by their source port (the relay binds them inside `relay_source_ports`; the helper
  reserves that range in ip_local_reserved_ports so no other program's ephemeral port lands
  there).
- reject_quic: UDP 443 gets ICMP port-unreachable (this host's captured users and forwarded
  traffic of captured bridges) so browsers fall back from QUIC to TCP, which the relay carries.
- The text starts with `table inet tray_proxy` + `delete table inet tray_proxy` so one
  `nft -f -` transaction replaces the table atomically whether or not it existed.
- Every value is validated to its canonical text before rendering (`str(ip_network(t)) == t`,
  no IPv6 scope ids, interface names of a narrow alphabet), so nothing but grammar reaches nft.

Why "redirect off" does not delete the table: in a namespace where our table is the only user
of NAT, deleting it unregisters the kernel's NAT hooks, and every connection that is open
through the relay at that moment loses its address translation (its packets reach the client
as 127.0.0.1:PORT and are reset, or vanish until a timeout). Measured with curl looping while
the redirect was toggled: 10 of 170 requests hung. So:
- `remove` switches the redirect off for NEW connections only: one transaction inserts a
  `return` at the head of every chain that redirects or rejects (output, prerouting, quic,
  forward). The table, its NAT hooks and the `input` guard stay, so connections already
  redirected keep their translation while the relay drains them. So do the reserved source
  ports (the relay's open upstream sockets still use them).
- `apply` replaces the whole table in one transaction (the NAT hooks stay registered across
  it, so open connections keep their translation), which also drops those `return` rules.
- The table is deleted, and the reserved ports released, only when the helper exits (its
  input closed, SIGTERM, SIGHUP, SIGINT). The client starts it in a session of its own, so a
  terminal's Ctrl+C reaches the app only, and stops the helper after the relay drained.
- A stale table left by a killed helper is switched off the same way at start (its NAT hooks
  may still carry live connections of a relay that survived) and its reserved ports are
  adopted; the first `apply` replaces it atomically, and exit deletes it. A stale table that
  cannot be switched off is deleted at once, as before. route_localnet values that an older
  helper (which still set them) recorded are put back.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import itertools
import json
import os
import pwd
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Final, NoReturn

PROTOCOL_VERSION: Final = 1
TABLE_FAMILY: Final = "inet"
TABLE_NAME: Final = "tray_proxy"
MAX_LINE_BYTES: Final = 64 * 1024
MAX_PORTS: Final = 32
MAX_NETWORKS: Final = 256
MAX_UPSTREAMS: Final = 64
MAX_INTERFACES: Final = 32
MIN_SOURCE_PORT: Final = 1024
# The relay needs a few hundred ports at most; a range reserves them for every other program
# too, and [1024, 65535] left no port for bind(0) or connect() (issue 16 item 3).
MAX_SOURCE_PORTS: Final = 4096
RESCAN_SECONDS: Final = 1.0
BRIDGE_RESCAN_SECONDS: Final = 30.0
NFT_TIMEOUT_SECONDS: Final = 15.0
NFT_CANDIDATES: Final = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/bin/nft")
PROC_SYS: Final = "/proc/sys"
PROC_NET: Final = "/proc/net"  # the reading process's network namespace
SYS_CLASS_NET: Final = "/sys/class/net"
STATE_DIR: Final = "/run/tray-proxy-helper"
POLICY_PATH: Final = "/etc/tray-proxy/helper-policy.json"
MAX_POLICY_BYTES: Final = 64 * 1024
DOCKER_SOCKET: Final = "/run/docker.sock"
DOCKER_TIMEOUT_SECONDS: Final = 2.0
MAX_DOCKER_ANSWER: Final = 4 * 1024 * 1024
PODMAN_NETWORKS_DIR: Final = "/etc/containers/networks"
MAX_PODMAN_FILE: Final = 1024 * 1024
MAX_PODMAN_FILES: Final = 256
# Podman's built-in "podman" network has no file in PODMAN_NETWORKS_DIR.
PODMAN_DEFAULT_BRIDGE: Final = ("podman0", "10.88.0.0/16", "10.88.0.1")
MAX_BRIDGES: Final = 64
MAX_SOCKET_LINES: Final = 1_000_000
# Accounts below this uid are system accounts on Debian (root, _apt, ...): they act for the
# owner (`sudo apt update`), unlike another human user.
SYSTEM_UID_LIMIT: Final = 1000
CAPTURE_MODES: Final = ("owner", "owner+system", "all")
DEFAULT_CAPTURE: Final = "owner+system"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_REDIRECT_PORTS: Final[tuple[int, ...]] = (80, 443)
DEFAULT_EXCLUDED_NETWORKS: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)
DEFAULT_RELAY_SOURCE_PORTS: Final[tuple[int, int]] = (61000, 64999)
# Only narrows the bridges Docker/Podman manage (see the module docstring).
DEFAULT_CONTAINER_INTERFACES: Final[tuple[str, ...]] = ("docker0", "br-*", "podman*")

# Linux interface names are at most 15 bytes; nft matches a trailing "*" as a prefix wildcard.
# The character set is narrower than the kernel's so a name can never break out of nft quoting.
_INTERFACE_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\*?")
_BRIDGE_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
# Chain names read back from the kernel (a stale table) before they go into nft text.
_CHAIN_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_UID_RE: Final = re.compile(r"[0-9]{1,10}")

SPEC_FIELDS: Final = (
    "relay_port",
    "redirect_ports",
    "excluded_networks",
    "upstreams",
    "relay_source_ports",
    "container_interfaces",
    "capture_containers",
    "reject_quic",
    "capture",
)
OPS: Final = ("apply", "status", "remove")


class SpecError(ValueError):
    """A request or spec field is invalid; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _show(value: object) -> str:
    """A short, printable rendering of a rejected value (never echo a 64 KiB blob back)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(field: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass: True must not pass as port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise SpecError(field, f"must be from {low} to {high}, got {value}")
    return value


def _check_bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SpecError(field, f"must be true or false, got {_show(value)}")
    return value


def _check_sequence(
    field: str, value: object, max_len: int, kinds: tuple[type, ...] = (list,)
) -> Sequence[object]:
    # The wire carries JSON lists; a RuleSpec holds tuples so it stays immutable and hashable.
    if not isinstance(value, (list, tuple)) or not isinstance(value, kinds):
        kind = "tuple" if kinds == (tuple,) else "list"
        raise SpecError(field, f"must be a {kind}, got {_show(value)}")
    if len(value) > max_len:
        raise SpecError(field, f"must have at most {max_len} entries, got {len(value)}")
    return value


def _matches(pattern: str, name: str) -> bool:
    """nft's interface-name wildcard: a trailing "*" matches any suffix."""
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _check_network(field: str, net: object) -> IPNetwork:
    if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        raise SpecError(field, f"must be a network, got {_show(net)}")
    # A scope id ("fe80::%eth0") is not nft grammar; str() would carry any text after the %.
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.scope_id is not None:
        raise SpecError(field, "must not carry an IPv6 scope id (the part after '%')")
    return net


def _check_address(field: str, addr: object) -> IPAddress:
    if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise SpecError(field, f"must start with an IP address, got {_show(addr)}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise SpecError(field, "must not carry an IPv6 scope id (the part after '%')")
    return addr


@dataclass(frozen=True)
class RuleSpec:
    """What to redirect and what to leave alone. Validated on construction.

    `capture` says whose connections on this host are redirected: "owner" (the uid that
    started the helper), "owner+system" (and the system accounts, uid < 1000) or "all".
    """

    relay_port: int
    redirect_ports: tuple[int, ...] = DEFAULT_REDIRECT_PORTS
    excluded_networks: tuple[IPNetwork, ...] = DEFAULT_EXCLUDED_NETWORKS
    upstreams: tuple[tuple[IPAddress, int], ...] = ()
    relay_source_ports: tuple[int, int] = DEFAULT_RELAY_SOURCE_PORTS
    container_interfaces: tuple[str, ...] = DEFAULT_CONTAINER_INTERFACES
    capture_containers: bool = True
    reject_quic: bool = True
    capture: str = DEFAULT_CAPTURE

    def __post_init__(self) -> None:
        _check_int("relay_port", self.relay_port, 1, 65535)
        ports = _check_sequence("redirect_ports", self.redirect_ports, MAX_PORTS, (tuple,))
        if not ports:
            raise SpecError("redirect_ports", "must name at least one port")
        for i, port in enumerate(ports):
            _check_int(f"redirect_ports[{i}]", port, 1, 65535)
        if len(set(ports)) != len(ports):
            raise SpecError("redirect_ports", "must not repeat a port")
        if self.relay_port in ports:
            raise SpecError("relay_port", "must not be one of redirect_ports (it would loop)")
        nets = _check_sequence("excluded_networks", self.excluded_networks, MAX_NETWORKS, (tuple,))
        for i, net in enumerate(nets):
            _check_network(f"excluded_networks[{i}]", net)
        ups = _check_sequence("upstreams", self.upstreams, MAX_UPSTREAMS, (tuple,))
        for i, pair in enumerate(ups):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise SpecError(
                    f"upstreams[{i}]", f"must be an (address, port) pair, got {_show(pair)}"
                )
            addr, port = pair
            _check_address(f"upstreams[{i}]", addr)
            _check_int(f"upstreams[{i}].port", port, 1, 65535)
        src = self.relay_source_ports
        if not isinstance(src, tuple) or len(src) != 2:
            raise SpecError("relay_source_ports", f"must be a [first, last] pair, got {_show(src)}")
        _check_int("relay_source_ports[0]", src[0], MIN_SOURCE_PORT, 65535)
        _check_int("relay_source_ports[1]", src[1], MIN_SOURCE_PORT, 65535)
        if src[0] > src[1]:
            raise SpecError("relay_source_ports", f"first port {src[0]} is above last {src[1]}")
        names = _check_sequence(
            "container_interfaces", self.container_interfaces, MAX_INTERFACES, (tuple,)
        )
        for i, name in enumerate(names):
            if not isinstance(name, str) or not _INTERFACE_RE.fullmatch(name):
                raise SpecError(
                    f"container_interfaces[{i}]",
                    "must be an interface name of letters, digits, '_', '.', '-' (at most 15)"
                    f" with an optional trailing '*', got {_show(name)}",
                )
            if _matches(name, "lo"):
                raise SpecError(f"container_interfaces[{i}]", "must not match the loopback 'lo'")
        _check_bool("capture_containers", self.capture_containers)
        _check_bool("reject_quic", self.reject_quic)
        if self.capture_containers and not names:
            raise SpecError("container_interfaces", "must name at least one bridge to capture")
        if not isinstance(self.capture, str) or self.capture not in CAPTURE_MODES:
            raise SpecError(
                "capture", f"must be one of {', '.join(CAPTURE_MODES)}, got {_show(self.capture)}"
            )


@dataclass(frozen=True, order=True)
class Bridge:
    """A container bridge the helper captures: its name, its gateway address, its subnet."""

    name: str
    address: ipaddress.IPv4Address
    network: ipaddress.IPv4Network

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _BRIDGE_NAME_RE.fullmatch(self.name):
            raise SpecError("bridge", f"{_show(self.name)} is not an interface name")
        if not isinstance(self.address, ipaddress.IPv4Address):
            raise SpecError("bridge", f"{_show(self.address)} is not an IPv4 address")
        if not isinstance(self.network, ipaddress.IPv4Network):
            raise SpecError("bridge", f"{_show(self.network)} is not an IPv4 network")
        if self.address not in self.network:
            raise SpecError("bridge", f"{self.address} is not in {self.network}")

    def to_wire(self) -> dict[str, object]:
        return {"name": self.name, "address": str(self.address), "network": str(self.network)}


# ---------------------------------------------------------------------------------------------
# Wire format


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise SpecError(key, "appears twice in the request")
        result[key] = value
    return result


def _no_constants(name: str) -> NoReturn:
    raise SpecError("request", f"is not strict JSON ({name} is not allowed)")


def spec_to_wire(spec: RuleSpec) -> dict[str, object]:
    """The JSON fields of an `apply` request for this spec."""
    return {
        "relay_port": spec.relay_port,
        "redirect_ports": list(spec.redirect_ports),
        "excluded_networks": [str(n) for n in spec.excluded_networks],
        "upstreams": [[str(a), p] for a, p in spec.upstreams],
        "relay_source_ports": list(spec.relay_source_ports),
        "container_interfaces": list(spec.container_interfaces),
        "capture_containers": spec.capture_containers,
        "reject_quic": spec.reject_quic,
        "capture": spec.capture,
    }


def _canonical_network(field: str, text: object) -> IPNetwork:
    """A network whose text is exactly Python's canonical form, or SpecError.

    Canonical text has no whitespace, scope id, upper-case hex or leading zero, so the text
    that reaches nft is the one `ipaddress` wrote, never one the client chose.
    """
    if not isinstance(text, str) or len(text) > 64:
        raise SpecError(field, f"must be a CIDR string, got {_show(text)}")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise SpecError(field, f"is not a network ({_show(str(exc))})") from None
    _check_network(field, net)
    if str(net) != text:
        raise SpecError(field, f"must be written {str(net)!r}, got {_show(text)}")
    return net


def _canonical_address(field: str, text: object) -> IPAddress:
    if not isinstance(text, str) or len(text) > 64:
        raise SpecError(field, f"address must be a string, got {_show(text)}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise SpecError(field, f"{_show(text)} is not an IP address") from None
    _check_address(field, addr)
    if str(addr) != text:
        raise SpecError(field, f"address must be written {str(addr)!r}, got {_show(text)}")
    return addr


def spec_from_wire(fields: dict[str, object]) -> RuleSpec:
    """Build a RuleSpec from decoded JSON, checking every type (the client is not trusted)."""
    unknown = sorted(set(fields) - set(SPEC_FIELDS))
    if unknown:
        raise SpecError(_show(unknown[0])[1:-1], "is not a known field")
    if "relay_port" not in fields:
        raise SpecError("relay_port", "is required")
    kwargs: dict[str, object] = {"relay_port": fields["relay_port"]}
    if "redirect_ports" in fields:
        kwargs["redirect_ports"] = tuple(
            _check_sequence("redirect_ports", fields["redirect_ports"], MAX_PORTS)
        )
    if "excluded_networks" in fields:
        raw = _check_sequence("excluded_networks", fields["excluded_networks"], MAX_NETWORKS)
        kwargs["excluded_networks"] = tuple(
            _canonical_network(f"excluded_networks[{i}]", text) for i, text in enumerate(raw)
        )
    if "upstreams" in fields:
        raw = _check_sequence("upstreams", fields["upstreams"], MAX_UPSTREAMS)
        ups: list[tuple[IPAddress, int]] = []
        for i, pair in enumerate(raw):
            if not isinstance(pair, list) or len(pair) != 2:
                raise SpecError(
                    f"upstreams[{i}]", f"must be an [address, port] pair, got {_show(pair)}"
                )
            addr, port = pair
            ip = _canonical_address(f"upstreams[{i}]", addr)
            ups.append((ip, _check_int(f"upstreams[{i}].port", port, 1, 65535)))
        kwargs["upstreams"] = tuple(ups)
    if "relay_source_ports" in fields:
        raw = _check_sequence("relay_source_ports", fields["relay_source_ports"], 2)
        if len(raw) != 2:
            raise SpecError("relay_source_ports", f"must be a [first, last] pair, got {_show(raw)}")
        kwargs["relay_source_ports"] = tuple(raw)
    if "container_interfaces" in fields:
        kwargs["container_interfaces"] = tuple(
            _check_sequence("container_interfaces", fields["container_interfaces"], MAX_INTERFACES)
        )
    for flag in ("capture_containers", "reject_quic", "capture"):
        if flag in fields:
            kwargs[flag] = fields[flag]
    return RuleSpec(**kwargs)  # type: ignore[arg-type]  # __post_init__ checks every type


# ---------------------------------------------------------------------------------------------
# Rendering (pure)


def _elements(items: Iterable[str]) -> str:
    return ", ".join(items)


def _collapsed(nets: Iterable[IPNetwork], version: int) -> list[str]:
    # Interval sets reject overlapping elements; collapsing also makes the text canonical.
    if version == 4:
        v4 = sorted(n for n in nets if isinstance(n, ipaddress.IPv4Network))
        return [str(n) for n in ipaddress.collapse_addresses(v4)]
    v6 = sorted(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return [str(n) for n in ipaddress.collapse_addresses(v6)]


def _port_set(ports: Sequence[int]) -> str:
    ordered = sorted(ports)
    if len(ordered) == 1:
        return str(ordered[0])
    return "{ " + _elements(str(p) for p in ordered) + " }"


def _set_block(name: str, type_: str, interval: bool, elements: list[str]) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {type_}"]
    if interval:
        lines.append("\t\tflags interval")
    if elements:
        lines.append(f"\t\telements = {{ {_elements(elements)} }}")
    lines.append("\t}")
    return lines


def _uid_scope(capture: str, owner_uid: int) -> str | None:
    """The `meta skuid` rule that lets connections of uncaptured users pass, or None ("all")."""
    if capture == "all":
        return None
    if capture == "owner":
        return f"meta skuid != {owner_uid} return"
    system = f"0-{SYSTEM_UID_LIMIT - 1}"
    if owner_uid < SYSTEM_UID_LIMIT:
        return f"meta skuid != {system} return"
    return f"meta skuid != {{ {system}, {owner_uid} }} return"


def render(spec: RuleSpec, *, owner_uid: int, bridges: Sequence[Bridge] = ()) -> str:
    """The complete `nft -f -` input that installs (or replaces) table inet tray_proxy.

    `owner_uid` is the caller the helper serves (never a request field); `bridges` are the
    container bridges it resolved and is allowed to capture (ignored without
    capture_containers).
    """
    _check_int("owner_uid", owner_uid, 0, 2**32 - 2)
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    ports = _port_set(spec.redirect_ports)
    relay = spec.relay_port
    first, last = spec.relay_source_ports
    sport = str(first) if first == last else f"{first}-{last}"
    captured = sorted(set(bridges)) if spec.capture_containers else []
    for bridge in captured:
        if not isinstance(bridge, Bridge):
            raise SpecError("bridge", f"must be a Bridge, got {_show(bridge)}")
    up4 = sorted({f"{a} . {p}" for a, p in spec.upstreams if a.version == 4})
    up6 = sorted({f"{a} . {p}" for a, p in spec.upstreams if a.version == 6})
    scope = _uid_scope(spec.capture, owner_uid)
    scoped = [f"\t\t{scope}"] if scope else []

    out = [f"table {table}", f"delete table {table}", f"table {table} {{"]
    out += _set_block("excluded_v4", "ipv4_addr", True, _collapsed(spec.excluded_networks, 4))
    out += _set_block("excluded_v6", "ipv6_addr", True, _collapsed(spec.excluded_networks, 6))
    out += _set_block("upstreams_v4", "ipv4_addr . inet_service", False, up4)
    out += _set_block("upstreams_v6", "ipv6_addr . inet_service", False, up6)
    out += [
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        *scoped,
        "\t\tfib daddr type local return",
        "\t\tip daddr @excluded_v4 return",
        "\t\tip6 daddr @excluded_v6 return",
        "\t\tip daddr . tcp dport @upstreams_v4 return",
        "\t\tip6 daddr . tcp dport @upstreams_v6 return",
        f"\t\ttcp sport {sport} return",
        f"\t\ttcp dport {ports} redirect to :{relay}",
        "\t}",
    ]
    if spec.capture_containers:
        # The chain exists also while no bridge is captured: `remove` and a rescan that finds
        # a new bridge then see the same chains.
        out += [
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority -100; policy accept;",
            "\t\tfib daddr type local return",
            "\t\tip daddr @excluded_v4 return",
            "\t\tip daddr . tcp dport @upstreams_v4 return",
        ]
        out += [
            f'\t\tiifname "{b.name}" ip saddr {b.network} tcp dport {ports}'
            f" dnat ip to {b.address}:{relay}"
            for b in captured
        ]
        out.append("\t}")
    out += [
        "\tchain input {",
        "\t\ttype filter hook input priority 0; policy accept;",
        f'\t\ttcp dport {relay} iif "lo" accept',
        f"\t\ttcp dport {relay} ct state {{ established, related }} accept",
    ]
    # Only our prerouting rule DNATs a bridge's connection to its gateway at the relay port;
    # a connection straight to gateway:relay (no DNAT) or from any other interface is dropped.
    out += [
        f'\t\tiifname "{b.name}" ip saddr {b.network} ip daddr {b.address} tcp dport {relay}'
        " ct status dnat accept"
        for b in captured
    ]
    out += [f"\t\ttcp dport {relay} drop", "\t}"]
    if spec.reject_quic:
        out += [
            "\tchain quic {",
            "\t\ttype filter hook output priority 0; policy accept;",
            *scoped,
            "\t\tfib daddr type local return",
            "\t\tip daddr @excluded_v4 return",
            "\t\tip6 daddr @excluded_v6 return",
            "\t\tudp dport 443 reject with icmpx type port-unreachable",
            "\t}",
        ]
    if spec.capture_containers or spec.reject_quic:
        out += [
            "\tchain forward {",
            "\t\ttype filter hook forward priority 0; policy accept;",
        ]
        names = sorted({b.name for b in captured})
        if names:
            ifnames = "{ " + _elements(f'"{n}"' for n in names) + " }"
            out += [
                f"\t\tiifname != {ifnames} return",
                "\t\tip daddr @excluded_v4 return",
                "\t\tip6 daddr @excluded_v6 return",
            ]
            if spec.reject_quic:
                out.append("\t\tudp dport 443 reject with icmpx type port-unreachable")
            out += [
                "\t\tip6 daddr . tcp dport @upstreams_v6 return",
                f"\t\tmeta nfproto ipv6 tcp dport {ports} reject with tcp reset",
            ]
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


def redirecting_chains(spec: RuleSpec) -> list[str]:
    """The chains `render(spec)` creates that act on new connections: all but `input`."""
    chains = ["output"]
    if spec.capture_containers:
        chains.append("prerouting")
    if spec.reject_quic:
        chains.append("quic")
    if spec.capture_containers or spec.reject_quic:
        chains.append("forward")
    return chains


def render_off(chains: Iterable[str]) -> str:
    """nft input that makes `chains` of our table let every new packet pass, in one transaction.

    A `return` at the head of a base chain ends it with the chain's policy (accept) before any
    redirect or reject. The table and its NAT hooks stay, so connections already translated
    keep their translation; see the module docstring for why the table is not deleted.
    """
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    lines = []
    for chain in chains:
        if not _CHAIN_RE.fullmatch(chain):
            raise SpecError("chain", f"{_show(chain)} is not a chain name nft accepts unquoted")
        lines.append(f"insert rule {table} {chain} return\n")
    return "".join(lines)


def render_delete() -> str:
    """nft input that removes our table whether or not it exists."""
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    return f"table {table}\ndelete table {table}\n"


# ---------------------------------------------------------------------------------------------
# Port-range text of ip_local_reserved_ports ("1000-1002,2000")


def parse_port_ranges(text: str) -> set[int]:
    ports: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def format_port_ranges(ports: Iterable[int]) -> str:
    ordered = sorted(ports)
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# The resident process


class _Stop(BaseException):
    """Raised from a signal handler to unwind into the cleanup path.

    A BaseException, so the `except Exception` that keeps a bad request from ending the helper
    cannot turn a signal into an "internal error" answer.
    """


class HelperError(Exception):
    """An operation failed; the message is sent to the client."""


def _find_nft() -> str:
    for path in NFT_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise HelperError("nft is not installed (install the nftables package)")


def _log(message: str) -> None:
    sys.stderr.write(f"tray-proxy-helper: {message}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Who asks, and what the administrator allows


class PolicyError(HelperError):
    """The administrator policy file cannot be trusted or read: every apply is refused."""


@dataclass(frozen=True)
class Policy:
    """What the helper may grant; POLICY_PATH holds it as JSON, every key optional.

    {"redirect_ports": [80, 443], "max_source_ports": 4096, "capture_containers": true,
     "capture": ["owner", "owner+system"]}
    `capture` lists the request values of `capture` that may be granted ("all" captures every
    local user's connections with the owner's identity: only when listed).
    """

    redirect_ports: frozenset[int] = frozenset(DEFAULT_REDIRECT_PORTS)
    max_source_ports: int = MAX_SOURCE_PORTS
    capture_containers: bool = True
    capture: tuple[str, ...] = ("owner", "owner+system")

    def check(self, spec: RuleSpec) -> None:
        """SpecError naming the field of `spec` that asks for more than this policy grants."""
        for port in spec.redirect_ports:
            if port not in self.redirect_ports:
                allowed = ", ".join(str(p) for p in sorted(self.redirect_ports)) or "none"
                raise SpecError(
                    "redirect_ports",
                    f"port {port} is not allowed by the administrator policy (allowed: {allowed})",
                )
        first, last = spec.relay_source_ports
        if last - first + 1 > self.max_source_ports:
            raise SpecError(
                "relay_source_ports",
                f"{first}-{last} is {last - first + 1} ports; at most {self.max_source_ports}"
                " may be reserved for the relay",
            )
        if spec.capture_containers and not self.capture_containers:
            raise SpecError(
                "capture_containers", "container capture is not allowed by the administrator policy"
            )
        if spec.capture not in self.capture:
            raise SpecError(
                "capture",
                f"{spec.capture!r} is not allowed by the administrator policy (allowed:"
                f" {', '.join(self.capture) or 'none'})",
            )


POLICY_KEYS: Final = ("redirect_ports", "max_source_ports", "capture_containers", "capture")


def _policy_from_json(data: object) -> Policy:
    if not isinstance(data, dict):
        raise ValueError("must hold one JSON object")
    unknown = sorted(set(data) - set(POLICY_KEYS))
    if unknown:
        # A typo must not silently fall back to a default the administrator meant to change.
        raise ValueError(f"has an unknown key {_show(unknown[0])}")
    policy = Policy()
    ports = data.get("redirect_ports", sorted(policy.redirect_ports))
    checked = _check_sequence("redirect_ports", ports, MAX_PORTS)
    redirect_ports = frozenset(
        _check_int(f"redirect_ports[{i}]", p, 1, 65535) for i, p in enumerate(checked)
    )
    max_source = _check_int(
        "max_source_ports", data.get("max_source_ports", policy.max_source_ports), 1, 65535
    )
    containers = _check_bool(
        "capture_containers", data.get("capture_containers", policy.capture_containers)
    )
    modes = _check_sequence("capture", data.get("capture", list(policy.capture)), 3)
    for i, mode in enumerate(modes):
        if mode not in CAPTURE_MODES:
            raise SpecError(f"capture[{i}]", f"must be one of {', '.join(CAPTURE_MODES)}")
    return Policy(redirect_ports, max_source, containers, tuple(str(m) for m in modes))


def load_policy(path: str = POLICY_PATH) -> Policy:
    """The administrator policy at `path` (absent: the defaults), or PolicyError saying why.

    The file decides what a non-admin member of the tray-proxy group may do as root, so it
    counts only when root alone can have written it: a regular file (not a symlink), owned by
    root, not writable by group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return Policy()
    except OSError as exc:
        raise _policy_error(path, f"cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _policy_error(path, "is not a regular file")
        if info.st_uid != 0:
            raise _policy_error(path, f"is owned by uid {info.st_uid}, not root")
        if info.st_mode & 0o022:
            raise _policy_error(
                path, f"is writable by group or others (mode {info.st_mode & 0o777:o})"
            )
        data = os.read(fd, MAX_POLICY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_POLICY_BYTES:
        raise _policy_error(path, f"is larger than {MAX_POLICY_BYTES} bytes")
    try:
        parsed = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants
        )
        return _policy_from_json(parsed)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _policy_error(path, f"is not valid ({_show(str(exc))[1:-1]})") from None


def _policy_error(path: str, why: str) -> PolicyError:
    return PolicyError(
        f"the administrator policy {path} {why}, so the redirect is refused. Ask an"
        " administrator to fix or remove that file."
    )


def caller_uid(environ: Mapping[str, str], real_uid: int) -> int:
    """The uid of the user who started the helper (see the module docstring for the trust)."""
    for name in ("SUDO_UID", "PKEXEC_UID"):
        text = environ.get(name)
        if text is None:
            continue
        if not _UID_RE.fullmatch(text) or int(text) > 2**32 - 2:
            raise HelperError(f"{name} is not a uid ({_show(text)})")
        return int(text)
    return real_uid


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def describe_capture(capture: str, owner_uid: int) -> str:
    """Whose connections on this host are redirected, in words for status and doctor."""
    if capture == "all":
        return "every local user"
    name = user_name(owner_uid)
    who = f"uid {owner_uid}" + (f" ({name})" if name else "")
    if capture == "owner":
        return f"{who} only"
    return f"{who} and system accounts (uid < {SYSTEM_UID_LIMIT})"


def listening_uids(proc_net: str, port: int) -> set[int]:
    """The uids owning a TCP socket that listens on `port` (any address) in this namespace."""
    uids: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            f = open(os.path.join(proc_net, name))  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue  # no tcp6 when IPv6 is disabled
        with f:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            for line in itertools.islice(f, 1, MAX_SOCKET_LINES):
                cols = line.split()
                if len(cols) < 8 or cols[3] != "0A":  # 0A: TCP_LISTEN
                    continue
                _, _, hex_port = cols[1].rpartition(":")
                with contextlib.suppress(ValueError):
                    if int(hex_port, 16) == port:
                        uids.add(int(cols[7]))
    return uids


def _read_port_range(path: str) -> tuple[int, int]:
    with open(path) as f:
        low, high = (int(x) for x in f.read().split())
    return low, high


# -- container bridges


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the Docker Engine API)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


Candidate = tuple[str, str, str | None]  # interface, subnet, gateway (as the tool wrote them)


def docker_candidates(path: str, timeout: float = DOCKER_TIMEOUT_SECONDS) -> list[Candidate]:
    """Docker's bridge networks from `GET /networks` on its socket; [] when Docker is absent.

    The socket must be root's (Docker's own): anything else could invent networks.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return []
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != 0:
        raise HelperError(f"{path} is not a socket owned by root; Docker's bridges are ignored")
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/networks", headers={"Host": "docker", "Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_DOCKER_ANSWER + 1)
        if response.status != 200:
            raise HelperError(f"Docker answered /networks with HTTP {response.status}")
    except (OSError, http.client.HTTPException) as exc:
        raise HelperError(f"cannot ask Docker for its networks ({exc})") from None
    finally:
        conn.close()
    if len(body) > MAX_DOCKER_ANSWER:
        raise HelperError(f"Docker's network list is larger than {MAX_DOCKER_ANSWER} bytes")
    try:
        networks = json.loads(body)
    except (ValueError, RecursionError):
        raise HelperError("Docker's network list is not JSON") from None
    found: list[Candidate] = []
    for net in networks if isinstance(networks, list) else ():
        if not isinstance(net, dict) or net.get("Driver") != "bridge" or net.get("Internal"):
            continue  # an internal network has no way out; the relay must not become one
        net_id = net.get("Id")
        options = net.get("Options")
        name = options.get("com.docker.network.bridge.name") if isinstance(options, dict) else None
        if not isinstance(name, str):
            name = f"br-{net_id[:12]}" if isinstance(net_id, str) else None
        ipam = net.get("IPAM")
        configs = ipam.get("Config") if isinstance(ipam, dict) else None
        if name is not None:
            found += _candidates(name, configs, "Subnet", "Gateway")
    return found


def _candidates(name: str, entries: object, subnet_key: str, gateway_key: str) -> list[Candidate]:
    """(name, subnet, gateway) for each entry of a tool's subnet list that names a subnet;
    Docker and Podman write the same thing under different keys."""
    found: list[Candidate] = []
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get(subnet_key), str):
            gateway = entry.get(gateway_key)
            found.append((name, entry[subnet_key], gateway if isinstance(gateway, str) else None))
    return found


def podman_candidates(directory: str) -> list[Candidate]:
    """Podman (netavark) bridge networks from their JSON files, plus its built-in podman0."""
    found: list[Candidate] = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise HelperError(f"cannot list {directory} ({exc.strerror})") from None
    for entry in names[:MAX_PODMAN_FILES]:
        path = os.path.join(directory, entry)
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(MAX_PODMAN_FILE + 1))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(data, dict) or data.get("driver") != "bridge" or data.get("internal"):
            continue
        name = data.get("network_interface")
        if isinstance(name, str):
            found += _candidates(name, data.get("subnets"), "subnet", "gateway")
    if not any(c[0] == PODMAN_DEFAULT_BRIDGE[0] for c in found):
        found.append(PODMAN_DEFAULT_BRIDGE)
    return found


_RTM_NEWADDR: Final = 20
_RTM_GETADDR: Final = 22
_NLM_F_REQUEST: Final = 0x1
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2
_NETLINK_MAX_READS: Final = 10_000


def interface_ipv4_addresses() -> dict[int, frozenset[ipaddress.IPv4Address]]:
    """Every interface's IPv4 addresses in this namespace, by index (rtnetlink address dump)."""
    result: dict[int, set[ipaddress.IPv4Address]] = {}
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    ) as sock:
        sock.settimeout(2.0)
        header = struct.pack("=IHHII", 16 + 8, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        sock.send(header + struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0))
        for _ in range(_NETLINK_MAX_READS):
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
                if length < 16 or offset + length > len(data):
                    raise OSError("malformed netlink answer")
                if kind == _NLMSG_DONE:
                    return {k: frozenset(v) for k, v in result.items()}
                if kind == _NLMSG_ERROR:
                    raise OSError("netlink refused the address dump")
                if kind == _RTM_NEWADDR and length >= 24:
                    family, _plen, _fl, _scope, index = struct.unpack_from(
                        "=BBBBI", data, offset + 16
                    )
                    attrs: dict[int, bytes] = {}
                    at = offset + 24
                    while at + 4 <= offset + length:
                        alen, atype = struct.unpack_from("=HH", data, at)
                        if alen < 4:
                            break
                        attrs[atype] = data[at + 4 : at + alen]
                        at += (alen + 3) & ~3
                    raw = attrs.get(_IFA_LOCAL, attrs.get(_IFA_ADDRESS))
                    if family == socket.AF_INET and raw is not None and len(raw) == 4:
                        result.setdefault(index, set()).add(ipaddress.IPv4Address(raw))
                offset += (length + 3) & ~3
    raise OSError("netlink address dump did not end")


class Helper:
    """Owns table inet tray_proxy and the sysctls it changes, in the current network namespace.

    It serves one user, `owner_uid` (see `caller_uid`), within the policy at `policy_path`.
    The path arguments exist for tests; production uses the module constants.
    """

    def __init__(
        self,
        nft: str,
        proc_sys: str = PROC_SYS,
        sys_class_net: str = SYS_CLASS_NET,
        *,
        owner_uid: int = 0,
        policy_path: str = POLICY_PATH,
        proc_net: str = PROC_NET,
        docker_socket: str = DOCKER_SOCKET,
        podman_dir: str = PODMAN_NETWORKS_DIR,
    ) -> None:
        self.nft = nft
        self.proc_sys = proc_sys
        self.sys_class_net = sys_class_net
        self.owner_uid = owner_uid
        self.policy_path = policy_path
        self.proc_net = proc_net
        self.docker_socket = docker_socket
        self.podman_dir = podman_dir
        # The spec in our table (kept while the redirect is off, until the table is deleted).
        self.applied: RuleSpec | None = None
        # The container bridges in our table.
        self.bridges: tuple[Bridge, ...] = ()
        # Are new connections redirected? False once `remove` put the `return` rules in.
        self.redirecting = False
        # Ports we added to ip_local_reserved_ports (not those reserved before us).
        self.reserved_added: set[int] = set()
        # route_localnet values an older helper (which set route_localnet) recorded: put back.
        self.localnet_before: dict[str, str] = {}
        # What the bridge scan last saw, so Docker and Podman are asked only on a change.
        self._bridge_signature: object = None
        self._next_bridge_scan = 0.0
        self._bridge_notes: tuple[str, ...] = ()
        netns = os.stat("/proc/self/ns/net").st_ino
        self.state_path = os.path.join(STATE_DIR, f"netns-{netns}.json")

    # -- nft

    def _nft(self, text: str) -> None:
        try:
            done = subprocess.run(
                [self.nft, "-f", "-"],
                input=text.encode(),
                capture_output=True,
                timeout=NFT_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HelperError(f"nft did not finish within {NFT_TIMEOUT_SECONDS:.0f} s") from None
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()
            raise HelperError("nft refused the ruleset: " + " | ".join(detail[:6])[:400])

    def _stale_chains(self) -> tuple[list[str], bool]:
        """The base chains of our table in the kernel that act on new connections, and
        whether one of them is a NAT chain (open connections may depend on it)."""
        done = subprocess.run(
            [self.nft, "-j", "list", "table", TABLE_FAMILY, TABLE_NAME],
            capture_output=True,
            timeout=NFT_TIMEOUT_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            raise HelperError("nft could not list the table")
        try:
            listing = json.loads(done.stdout)["nftables"]
        except (ValueError, KeyError, TypeError):
            raise HelperError("nft listed the table in an unexpected form") from None
        chains: list[str] = []
        nat = False
        for entry in listing if isinstance(listing, list) else ():
            chain = entry.get("chain") if isinstance(entry, dict) else None
            # The input chain guards the relay port and route_localnet: it stays in force.
            if isinstance(chain, dict) and chain.get("hook") not in (None, "input"):
                name = chain.get("name")
                if not isinstance(name, str) or not _CHAIN_RE.fullmatch(name):
                    raise HelperError(f"the table has a chain named {_show(name)}")
                chains.append(name)
                nat = nat or chain.get("type") == "nat"
        return chains, nat

    def table_present(self) -> bool:
        done = subprocess.run(
            [self.nft, "list", "tables", TABLE_FAMILY],
            capture_output=True,
            timeout=NFT_TIMEOUT_SECONDS,
            check=False,
        )
        wanted = f"table {TABLE_FAMILY} {TABLE_NAME}"
        return any(line.strip() == wanted for line in done.stdout.decode().splitlines())

    # -- sysctls

    def _sysctl_path(self, *parts: str) -> str:
        return os.path.join(self.proc_sys, "net", "ipv4", *parts)

    def _read(self, path: str) -> str:
        with open(path) as f:
            return f.read().strip()

    def _write(self, path: str, value: str) -> None:
        with open(path, "w") as f:
            f.write(value + "\n")

    def _reserve(self, first: int, last: int) -> None:
        path = self._sysctl_path("ip_local_reserved_ports")
        current = parse_port_ranges(self._read(path))
        base = current - self.reserved_added
        ours = set(range(first, last + 1))
        wanted = base | ours
        self.reserved_added = ours - base
        self._save_state()
        if wanted != current:
            self._write(path, format_port_ranges(wanted))

    def _unreserve(self) -> None:
        if not self.reserved_added:
            return
        path = self._sysctl_path("ip_local_reserved_ports")
        current = parse_port_ranges(self._read(path))
        self._write(path, format_port_ranges(current - self.reserved_added))
        self.reserved_added = set()

    def _interfaces(self) -> list[str]:
        try:
            return sorted(os.listdir(self.sys_class_net))
        except OSError:
            return []

    def _restore_route_localnet(self) -> None:
        """Put back route_localnet where an older helper recorded that it had changed it."""
        for name, before in sorted(self.localnet_before.items()):
            path = self._sysctl_path("conf", name, "route_localnet")
            with contextlib.suppress(OSError):
                if self._read(path) == "1":
                    self._write(path, before)
                    _log(f"route_localnet on {name} put back to {before}")
        if self.localnet_before:
            self.localnet_before = {}
            self._save_state()

    # -- what a request may ask for

    def check_request(self, spec: RuleSpec) -> None:
        """SpecError or PolicyError unless the policy and this machine allow `spec`."""
        load_policy(self.policy_path).check(spec)
        first, last = spec.relay_source_ports
        try:
            low, high = _read_port_range(self._sysctl_path("ip_local_port_range"))
        except (OSError, ValueError) as exc:
            raise HelperError(f"cannot read net.ipv4.ip_local_port_range ({exc})") from None
        if first <= high and low <= last:
            raise SpecError(
                "relay_source_ports",
                f"{first}-{last} overlaps the ports the kernel hands out ({low}-{high},"
                " net.ipv4.ip_local_port_range); choose a range outside it",
            )
        if self.owner_uid not in listening_uids(self.proc_net, spec.relay_port):
            raise SpecError(
                "relay_port",
                f"{spec.relay_port} is not a port your user (uid {self.owner_uid}) listens on",
            )

    # -- container bridges

    def _scan_signature(self) -> object:
        """What changes when a bridge appears, goes or gets its address (cheap: no Docker)."""
        try:
            addresses = interface_ipv4_addresses()
        except OSError:
            addresses = {}
        return (tuple(self._interfaces()), tuple(sorted(addresses.items())))

    def resolve_bridges(self, spec: RuleSpec) -> tuple[Bridge, ...]:
        """The bridges Docker and Podman manage here that `spec` lets the helper capture."""
        if not spec.capture_containers:
            return ()
        notes: list[str] = []
        candidates: list[Candidate] = []
        try:
            candidates += docker_candidates(self.docker_socket)
        except HelperError as exc:
            notes.append(str(exc))
        try:
            candidates += podman_candidates(self.podman_dir)
        except HelperError as exc:
            notes.append(str(exc))
        try:
            addresses = interface_ipv4_addresses()
        except OSError as exc:
            notes.append(f"cannot read the interfaces' addresses ({exc})")
            addresses = {}
        found: set[Bridge] = set()
        for name, subnet, gateway in candidates:
            if not _BRIDGE_NAME_RE.fullmatch(name) or name == "lo":
                continue
            if not any(_matches(p, name) for p in spec.container_interfaces):
                continue
            try:
                network = ipaddress.ip_network(subnet, strict=True)
                if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
                    continue  # IPv6 container traffic is not captured (module docstring)
                address = ipaddress.IPv4Address(gateway) if gateway else next(network.hosts())
                index = socket.if_nametoindex(name)
            except (ValueError, OSError, StopIteration):
                continue  # not an IPv4 subnet, or no such interface here
            if not os.path.isdir(os.path.join(self.sys_class_net, name, "bridge")):
                continue  # only a bridge is a container network
            if address not in addresses.get(index, ()) or address not in network:
                continue  # not (yet) the bridge Docker/Podman configured
            found.add(Bridge(name, address, network))
        if tuple(notes) != self._bridge_notes:
            self._bridge_notes = tuple(notes)
            for note in notes:
                _log(note)
        return tuple(sorted(found))[:MAX_BRIDGES]

    def rescan(self) -> None:
        """Re-apply the table when the set of container bridges changed (called every second)."""
        spec = self.applied
        if spec is None or not self.redirecting or not spec.capture_containers:
            return
        signature = self._scan_signature()
        now = time.monotonic()
        if signature == self._bridge_signature and now < self._next_bridge_scan:
            return
        self._bridge_signature = signature
        self._next_bridge_scan = now + BRIDGE_RESCAN_SECONDS
        bridges = self.resolve_bridges(spec)
        if bridges == self.bridges:
            return
        try:
            self._nft(render(spec, owner_uid=self.owner_uid, bridges=bridges))
        except HelperError as exc:
            _log(f"could not update the container bridges: {exc}")
            return
        self.bridges = bridges
        _log(f"container bridges now captured: {_bridge_names(bridges)}")

    # -- crash-safe state: what to undo if this process dies without cleaning up

    def _save_state(self) -> None:
        state = {
            "reserved_added": format_port_ranges(self.reserved_added),
            "route_localnet": self.localnet_before,
        }
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)

    def _drop_state(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_path)

    def _load_state(self) -> tuple[set[int], dict[str, str]]:
        """What the earlier helper in this namespace recorded it had changed (or nothing)."""
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return set(), {}
        if not isinstance(state, dict):
            return set(), {}
        reserved: set[int] = set()
        raw = state.get("reserved_added")
        if isinstance(raw, str):
            with contextlib.suppress(ValueError):
                reserved = {p for p in parse_port_ranges(raw) if 0 < p <= 65535}
        localnet = state.get("route_localnet")
        before: dict[str, str] = {}
        if isinstance(localnet, dict):
            before = {
                k: v
                for k, v in localnet.items()
                if isinstance(k, str)
                and isinstance(v, str)
                and v in ("0", "1")
                and _BRIDGE_NAME_RE.fullmatch(k)
            }
        return reserved, before

    def recover_stale(self) -> None:
        """Take over what a previous helper in this namespace left behind (it was killed).

        Its table is switched off, not deleted: connections open through it keep their
        translation (a relay may well have survived its helper), and the next `apply` replaces
        it in one transaction. Its reserved ports are adopted and released when the table
        goes. A table that cannot be switched off is deleted at once.
        """
        reserved, localnet = self._load_state()
        self.reserved_added = reserved
        self.localnet_before = localnet
        kept = False
        if self.table_present():
            try:
                chains, nat = self._stale_chains()
                if not nat:
                    raise HelperError("no open connection can depend on it")
                self._nft(render_off(chains))
                kept = True
                _log(
                    "switched off a stale table left by an earlier helper; it is replaced by"
                    " the next apply or deleted at exit"
                )
            except (HelperError, SpecError) as exc:
                _log(f"removing a stale table left by an earlier helper ({exc})")
        if kept:
            self._save_state()
            return
        self._nft(render_delete())
        with contextlib.suppress(ValueError, OSError):
            self._unreserve()
        self.reserved_added = set()
        self._restore_route_localnet()
        self._drop_state()

    # -- operations

    def apply(self, spec: RuleSpec) -> None:
        self.check_request(spec)
        # Taken before the resolution: a bridge that appears meanwhile changes it, so the
        # next rescan picks the bridge up.
        signature = self._scan_signature()
        bridges = self.resolve_bridges(spec)
        self._nft(render(spec, owner_uid=self.owner_uid, bridges=bridges))
        self.applied = spec
        self.bridges = bridges
        self.redirecting = True
        self._bridge_signature = signature
        self._next_bridge_scan = time.monotonic() + BRIDGE_RESCAN_SECONDS
        try:
            self._reserve(*spec.relay_source_ports)
        except OSError as exc:
            raise HelperError(f"could not reserve the relay source ports: {exc}") from None
        # Our table no longer DNATs to 127.0.0.1: nothing needs an older helper's values.
        self._restore_route_localnet()
        _log(
            f"applied redirect of ports {list(spec.redirect_ports)} to relay port"
            f" {spec.relay_port} for {describe_capture(spec.capture, self.owner_uid)};"
            f" container bridges: {_bridge_names(bridges)}"
        )

    def remove(self) -> bool:
        """Redirect off for new connections (the table stays, see the module docstring).

        True if the redirect was on.
        """
        spec = self.applied
        if spec is None or not self.redirecting:
            return False
        try:
            self._nft(render_off(redirecting_chains(spec)))
        except HelperError:
            if self.table_present():
                raise
            # Someone deleted the table (nft flush ruleset): the redirect is off anyway.
            self.redirecting = False
            return False
        self.redirecting = False
        _log("redirect off for new connections; the table stays until the helper exits")
        return True

    def delete_table(self) -> bool:
        """Delete the table and undo the sysctl changes; True if the table was there."""
        present = self.table_present()
        self._nft(render_delete())
        self.redirecting = False
        errors: list[str] = []
        try:
            self._unreserve()
        except OSError as exc:
            errors.append(f"ip_local_reserved_ports: {exc}")
        self._restore_route_localnet()
        self.applied = None
        self.bridges = ()
        self._drop_state()
        if errors:
            raise HelperError("table removed, but could not restore " + "; ".join(errors))
        if present:
            _log("deleted the table")
        return present

    def grant(self) -> dict[str, object]:
        """Whose traffic the table captures (null before an apply), for apply and status."""
        spec = self.applied
        return {
            "owner_uid": self.owner_uid,
            "captured": None if spec is None else describe_capture(spec.capture, self.owner_uid),
            "bridges": [b.to_wire() for b in self.bridges],
        }

    def status(self) -> dict[str, object]:
        present = self.table_present()
        return {
            "active": present and self.redirecting,
            "table_present": present,
            "spec": None if self.applied is None else spec_to_wire(self.applied),
            **self.grant(),
        }

    # -- requests

    def handle_line(self, line: bytes) -> dict[str, object]:
        request_id: object = None
        try:
            try:
                text = line.decode("utf-8")
                request = json.loads(
                    text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants
                )
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                if isinstance(exc, SpecError):
                    raise
                raise SpecError("request", "is not a JSON object on one line") from None
            if not isinstance(request, dict):
                raise SpecError("request", "must be a JSON object")
            raw_id = request.pop("id", None)
            request_id = _check_int("id", raw_id, 0, 2**53)
            version = request.pop("v", None)
            if type(version) is not int or version != PROTOCOL_VERSION:
                raise SpecError("v", f"protocol version {_show(version)} is not supported (use 1)")
            op = request.pop("op", None)
            if op not in OPS:
                raise SpecError("op", f"must be one of {', '.join(OPS)}, got {_show(op)}")
            if op == "apply":
                spec = spec_from_wire(request)
                self.apply(spec)
                return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **self.grant()}
            if request:
                raise SpecError(_show(sorted(request)[0])[1:-1], f"is not a field of {op}")
            if op == "status":
                return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **self.status()}
            removed = self.remove()
            return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "removed": removed}
        except (SpecError, HelperError) as exc:
            return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bad line must never end the redirect's owner
            _log(f"internal error on a request: {type(exc).__name__}: {exc}")
            return {
                "v": PROTOCOL_VERSION,
                "id": request_id,
                "ok": False,
                "error": f"internal error: {type(exc).__name__}: {exc}"[:400],
            }

    def cleanup(self) -> bool:
        """Delete the table and undo what we changed; False if something could not be undone."""
        try:
            self.delete_table()
        except (HelperError, OSError, subprocess.SubprocessError) as exc:
            _log(f"cleanup incomplete: {exc}")
            return False
        return True


def _bridge_names(bridges: Sequence[Bridge]) -> str:
    return ", ".join(f"{b.name} ({b.network})" for b in bridges) or "none"


def _write_answer(answer: dict[str, object]) -> None:
    data = (json.dumps(answer, separators=(",", ":")) + "\n").encode()
    view = memoryview(data)
    while view:
        written = os.write(1, view)
        view = view[written:]


def serve(helper: Helper, stdin_fd: int = 0) -> None:
    """Answer request lines until stdin closes."""
    buffer = bytearray()
    discarding = False
    while True:
        timeout = RESCAN_SECONDS if helper.redirecting else None
        ready, _, _ = select.select([stdin_fd], [], [], timeout)
        if not ready:
            helper.rescan()
            continue
        chunk = os.read(stdin_fd, 65536)
        if not chunk:
            return
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > MAX_LINE_BYTES:
                    if not discarding:
                        _write_answer(_too_long())
                    discarding = True
                    buffer.clear()
                break
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if discarding:
                discarding = False  # the tail of a line already answered as too long
                continue
            if len(line) > MAX_LINE_BYTES:
                _write_answer(_too_long())
                continue
            _write_answer(helper.handle_line(line))


def _too_long() -> dict[str, object]:
    return {
        "v": PROTOCOL_VERSION,
        "id": None,
        "ok": False,
        "error": f"request: line longer than {MAX_LINE_BYTES} bytes",
    }


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(**paths: str) -> int:
    """Run the helper until its input closes. `paths` (tests only) replace the path constants.

    Exit status: 0 when the table is gone and everything restored, 4 when the cleanup was
    incomplete, 2 or 3 when the helper could not start.
    """
    if os.geteuid() != 0:
        _log("must run as root (start it through pkexec or sudo)")
        return 2
    os.umask(0o077)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        owner = caller_uid(os.environ, os.getuid())
        helper = Helper(_find_nft(), owner_uid=owner, **paths)
    except HelperError as exc:
        _log(str(exc))
        return 3
    try:
        helper.recover_stale()
        serve(helper)
        _log("input closed; removing the redirect")
    except _Stop as stop:
        _log(f"{stop}; removing the redirect")
    except BrokenPipeError:
        _log("client went away; removing the redirect")
    except HelperError as exc:
        _log(str(exc))
    finally:
        # A second signal must not interrupt the cleanup half-way.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        clean = helper.cleanup()
    return 0 if clean else 4


if __name__ == "__main__":
    sys.exit(main())
