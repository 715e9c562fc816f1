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
the kernel (also after `remove`, until exit), "spec": what this helper applied or null};
`remove` answers {"removed": the redirect was on}.

Design of the redirect (why the rules look the way they do):
- Traffic of this host: `nat output` chain, `redirect to :PORT` (127.0.0.1 / ::1 by family).
  The relay listens on 127.0.0.1 and ::1 only.
- Traffic of containers (IPv4): `nat prerouting`, only for `iifname` matching the container bridge
  patterns, `dnat ip to 127.0.0.1:PORT`. Plain `redirect` would send it to the bridge's own
  address, where the loopback-only relay does not listen; making the relay listen there (or on
  0.0.0.0) would put an open proxy carrying the user's credentials one firewall rule away from
  the network. A DNAT to 127.0.0.1 is routed only where `net.ipv4.conf.<bridge>.route_localnet`
  is 1, so the helper sets it on the matching bridges (and on new ones, rescanned every second
  while applied) and restores the previous values when the redirect goes off.
  route_localnet alone would let a container reach every loopback-only service of the host
  (CVE-2020-8558), so the `input` chain drops packets for 127.0.0.0/8 that arrive on a
  non-loopback interface unless conntrack says they were DNATed (by our prerouting rule) or
  belong to an existing connection.
- The `input` chain also drops new connections to the relay port from anywhere but loopback or a
  DNATed container connection: the relay is never reachable from another host, even if it were
  to listen on a wildcard address.
- IPv6 container traffic is not captured (there is no route_localnet for ::1); with
  capture_containers on, forwarded IPv6 TCP to the redirected ports is rejected with a TCP
  reset so clients fall back to IPv4 at once instead of timing out.
- Exclusions (rule order): destinations local to this host (`fib daddr type local`), the
  excluded networks, the upstream proxies' address+port, and the relay's own outbound sockets,
  recognised by their source port (the relay binds them inside `relay_source_ports`; the helper
  reserves that range in ip_local_reserved_ports so no other program's ephemeral port lands
  there).
- reject_quic: UDP 443 gets ICMP port-unreachable (host and forwarded container traffic) so
  browsers fall back from QUIC to TCP, which the relay carries.
- The text starts with `table inet tray_proxy` + `delete table inet tray_proxy` so one
  `nft -f -` transaction replaces the table atomically whether or not it existed.

Why "redirect off" does not delete the table: in a namespace where our table is the only user
of NAT, deleting it unregisters the kernel's NAT hooks, and every connection that is open
through the relay at that moment loses its address translation (its packets reach the client
as 127.0.0.1:PORT and are reset, or vanish until a timeout). Measured with curl looping while
the redirect was toggled: 10 of 170 requests hung. So:
- `remove` switches the redirect off for NEW connections only: one transaction inserts a
  `return` at the head of every chain that redirects or rejects (output, prerouting, quic,
  forward). The table, its NAT hooks and the `input` guard stay, so connections already
  redirected keep their translation while the relay drains them. So do the reserved source
  ports (the relay's open upstream sockets still use them) and route_localnet (DNATed
  container connections still need it).
- `apply` replaces the whole table in one transaction (the NAT hooks stay registered across
  it, so open connections keep their translation), which also drops those `return` rules.
- The table is deleted, and the sysctls restored, only when the helper exits (its input
  closed, SIGTERM, SIGHUP, SIGINT). The client stops the helper after the relay drained.
- A stale table left by a killed helper is switched off the same way at start (its NAT hooks
  may still carry live connections of a relay that survived) and its sysctl changes are
  adopted; the first `apply` replaces it atomically, and exit deletes it. A stale table that
  cannot be switched off is deleted at once, as before.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
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
RESCAN_SECONDS: Final = 1.0
NFT_TIMEOUT_SECONDS: Final = 15.0
NFT_CANDIDATES: Final = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/bin/nft")
PROC_SYS: Final = "/proc/sys"
SYS_CLASS_NET: Final = "/sys/class/net"
STATE_DIR: Final = "/run/tray-proxy-helper"

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
DEFAULT_CONTAINER_INTERFACES: Final[tuple[str, ...]] = ("docker0", "br-*")

# Linux interface names are at most 15 bytes; nft matches a trailing "*" as a prefix wildcard.
# The character set is narrower than the kernel's so a name can never break out of nft quoting.
_INTERFACE_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\*?")
# Chain names read back from the kernel (a stale table) before they go into nft text.
_CHAIN_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

SPEC_FIELDS: Final = (
    "relay_port",
    "redirect_ports",
    "excluded_networks",
    "upstreams",
    "relay_source_ports",
    "container_interfaces",
    "capture_containers",
    "reject_quic",
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


@dataclass(frozen=True)
class RuleSpec:
    """What to redirect and what to leave alone. Validated on construction."""

    relay_port: int
    redirect_ports: tuple[int, ...] = DEFAULT_REDIRECT_PORTS
    excluded_networks: tuple[IPNetwork, ...] = DEFAULT_EXCLUDED_NETWORKS
    upstreams: tuple[tuple[IPAddress, int], ...] = ()
    relay_source_ports: tuple[int, int] = DEFAULT_RELAY_SOURCE_PORTS
    container_interfaces: tuple[str, ...] = DEFAULT_CONTAINER_INTERFACES
    capture_containers: bool = True
    reject_quic: bool = True

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
            if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise SpecError(f"excluded_networks[{i}]", f"must be a network, got {_show(net)}")
        ups = _check_sequence("upstreams", self.upstreams, MAX_UPSTREAMS, (tuple,))
        for i, pair in enumerate(ups):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise SpecError(
                    f"upstreams[{i}]", f"must be an (address, port) pair, got {_show(pair)}"
                )
            addr, port = pair
            if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise SpecError(
                    f"upstreams[{i}]", f"must start with an IP address, got {_show(addr)}"
                )
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
    }


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
        nets: list[IPNetwork] = []
        for i, text in enumerate(raw):
            if not isinstance(text, str) or len(text) > 64:
                raise SpecError(
                    f"excluded_networks[{i}]", f"must be a CIDR string, got {_show(text)}"
                )
            try:
                nets.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                raise SpecError(f"excluded_networks[{i}]", f"is not a network ({exc})") from None
        kwargs["excluded_networks"] = tuple(nets)
    if "upstreams" in fields:
        raw = _check_sequence("upstreams", fields["upstreams"], MAX_UPSTREAMS)
        ups: list[tuple[IPAddress, int]] = []
        for i, pair in enumerate(raw):
            if not isinstance(pair, list) or len(pair) != 2:
                raise SpecError(
                    f"upstreams[{i}]", f"must be an [address, port] pair, got {_show(pair)}"
                )
            addr, port = pair
            if not isinstance(addr, str) or len(addr) > 64:
                raise SpecError(f"upstreams[{i}]", f"address must be a string, got {_show(addr)}")
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                raise SpecError(f"upstreams[{i}]", f"{_show(addr)} is not an IP address") from None
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
    for flag in ("capture_containers", "reject_quic"):
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


def render(spec: RuleSpec) -> str:
    """The complete `nft -f -` input that installs (or replaces) table inet tray_proxy."""
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    ports = _port_set(spec.redirect_ports)
    relay = spec.relay_port
    first, last = spec.relay_source_ports
    sport = str(first) if first == last else f"{first}-{last}"
    ifnames = "{ " + _elements(f'"{n}"' for n in sorted(set(spec.container_interfaces))) + " }"
    up4 = sorted({f"{a} . {p}" for a, p in spec.upstreams if a.version == 4})
    up6 = sorted({f"{a} . {p}" for a, p in spec.upstreams if a.version == 6})

    out = [f"table {table}", f"delete table {table}", f"table {table} {{"]
    out += _set_block("excluded_v4", "ipv4_addr", True, _collapsed(spec.excluded_networks, 4))
    out += _set_block("excluded_v6", "ipv6_addr", True, _collapsed(spec.excluded_networks, 6))
    out += _set_block("upstreams_v4", "ipv4_addr . inet_service", False, up4)
    out += _set_block("upstreams_v6", "ipv6_addr . inet_service", False, up6)
    out += [
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
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
        out += [
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority -100; policy accept;",
            f"\t\tiifname != {ifnames} return",
            "\t\tmeta nfproto != ipv4 return",
            "\t\tfib daddr type local return",
            "\t\tip daddr @excluded_v4 return",
            "\t\tip daddr . tcp dport @upstreams_v4 return",
            f"\t\ttcp dport {ports} dnat ip to 127.0.0.1:{relay}",
            "\t}",
        ]
    out += [
        "\tchain input {",
        "\t\ttype filter hook input priority 0; policy accept;",
        '\t\tiif "lo" accept',
        "\t\tct state { established, related } accept",
        # Only root's NAT rules set this bit; ours DNAT container bridges only.
        "\t\tct status dnat accept",
    ]
    if spec.capture_containers:
        out.append("\t\tip daddr 127.0.0.0/8 drop")
    out += [f"\t\ttcp dport {relay} drop", "\t}"]
    if spec.reject_quic:
        out += [
            "\tchain quic {",
            "\t\ttype filter hook output priority 0; policy accept;",
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
            f"\t\tiifname != {ifnames} return",
            "\t\tip daddr @excluded_v4 return",
            "\t\tip6 daddr @excluded_v6 return",
        ]
        if spec.reject_quic:
            out.append("\t\tudp dport 443 reject with icmpx type port-unreachable")
        if spec.capture_containers:
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


class _Stop(Exception):
    """Raised from a signal handler to unwind into the cleanup path."""


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


class Helper:
    """Owns table inet tray_proxy and the sysctls it changes, in the current network namespace."""

    def __init__(self, nft: str, proc_sys: str = PROC_SYS, sys_class_net: str = SYS_CLASS_NET):
        self.nft = nft
        self.proc_sys = proc_sys
        self.sys_class_net = sys_class_net
        # The spec in our table (kept while the redirect is off, until the table is deleted).
        self.applied: RuleSpec | None = None
        # Are new connections redirected? False once `remove` put the `return` rules in.
        self.redirecting = False
        # Ports we added to ip_local_reserved_ports (not those reserved before us).
        self.reserved_added: set[int] = set()
        # Interfaces whose route_localnet we switched to 1, with the value before.
        self.localnet_before: dict[str, str] = {}
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

    def sync_route_localnet(self) -> None:
        """Set route_localnet=1 on every present bridge that matches the capture patterns
        (interfaces that are not bridges are never touched, whatever the patterns say)."""
        spec = self.applied
        if spec is None or not self.redirecting or not spec.capture_containers:
            return
        for name in self._interfaces():
            if not any(_matches(p, name) for p in spec.container_interfaces):
                continue
            if not os.path.isdir(os.path.join(self.sys_class_net, name, "bridge")):
                # Only a bridge is a container network. route_localnet on an uplink (a
                # pattern like "e*" matching eth0) would let other hosts' packets reach
                # the relay on 127.0.0.1: an open proxy with the user's credentials.
                continue
            path = self._sysctl_path("conf", name, "route_localnet")
            try:
                value = self._read(path)
                if value == "1":
                    continue
                self.localnet_before.setdefault(name, value)
                self._save_state()  # before the write: a crash must still know what to undo
                self._write(path, "1")
            except OSError:
                continue  # the interface vanished between listdir and open
            _log(f"route_localnet=1 on {name} (container capture)")

    def _restore_route_localnet(self, keep: RuleSpec | None = None) -> None:
        """Put back route_localnet on the bridges `keep` (the new spec) no longer captures."""
        for name, before in sorted(self.localnet_before.items()):
            if (
                keep is not None
                and keep.capture_containers
                and any(_matches(p, name) for p in keep.container_interfaces)
            ):
                continue
            path = self._sysctl_path("conf", name, "route_localnet")
            with contextlib.suppress(OSError):
                if self._read(path) == "1":
                    self._write(path, before)
            del self.localnet_before[name]
        self._save_state()

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
                and _INTERFACE_RE.fullmatch(k)
            }
        return reserved, before

    def recover_stale(self) -> None:
        """Take over what a previous helper in this namespace left behind (it was killed).

        Its table is switched off, not deleted: connections open through it keep their
        translation (a relay may well have survived its helper), and the next `apply` replaces
        it in one transaction. Its sysctl changes are adopted and undone when the table goes.
        A table that cannot be switched off is deleted at once.
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
        self._nft(render(spec))
        self.applied = spec
        self.redirecting = True
        try:
            self._reserve(*spec.relay_source_ports)
        except OSError as exc:
            raise HelperError(f"could not reserve the relay source ports: {exc}") from None
        self._restore_route_localnet(keep=spec)
        self.sync_route_localnet()
        _log(
            f"applied redirect of ports {list(spec.redirect_ports)} to relay port {spec.relay_port}"
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
        self._drop_state()
        if errors:
            raise HelperError("table removed, but could not restore " + "; ".join(errors))
        if present:
            _log("deleted the table")
        return present

    def status(self) -> dict[str, object]:
        present = self.table_present()
        return {
            "active": present and self.redirecting,
            "table_present": present,
            "spec": None if self.applied is None else spec_to_wire(self.applied),
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
                return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True}
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

    def cleanup(self) -> None:
        try:
            self.delete_table()
        except (HelperError, OSError, subprocess.SubprocessError) as exc:
            _log(f"cleanup incomplete: {exc}")


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
            helper.sync_route_localnet()
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


def main() -> int:
    if os.geteuid() != 0:
        _log("must run as root (start it through pkexec or sudo)")
        return 2
    os.umask(0o077)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        helper = Helper(_find_nft())
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
        helper.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
