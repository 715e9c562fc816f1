"""Doctor checks of tray-proxy's own setup and traffic: the settings file, each upstream (a
real tunnel through it, with the stored login), what a TLS client sees through it (a
TLS-inspecting proxy's CA), the redirect and the relay of the running instance (asked over
the control socket), IPv6, and which destinations the exclusions keep direct.

The upstream probes run the engine's own dial and authentication code (relay/probe.py,
relay/upstream.py) with a private credential state, like `tray-proxy credentials test`.
Must not import PySide6. No password reaches a result, a log line or an exception text.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tray_proxy.config import Config, ConfigError
from tray_proxy.doctor.checks_session import KEYRING_TIMEOUT, keyring_state
from tray_proxy.doctor.checks_system import find_nft
from tray_proxy.doctor.context import DoctorEnv, in_thread, run_command
from tray_proxy.doctor.model import CheckResult, CheckStatus
from tray_proxy.firewall.helper import TABLE_FAMILY, TABLE_NAME, parse_port_ranges
from tray_proxy.firewall.ruleset import IPNetwork
from tray_proxy.keyring_store import (
    CredentialStore,
    CredentialStoreError,
    running_under_systemd,
)
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult, probe_upstream
from tray_proxy.relay.secrets import Credentials, SystemdCredentialSource
from tray_proxy.relay.settings import UpstreamProxy
from tray_proxy.relay.upstream import Dialer, UpstreamAuth, UpstreamError, open_tunnel
from tray_proxy.tasks import spawn

__all__ = [
    "check_config",
    "check_exclusions",
    "check_ipv6",
    "check_redirect",
    "check_relay",
    "check_tls",
    "check_upstreams",
    "describe_network",
]

CONTROL_TIMEOUT = 5.0
RELAY_CONNECT_TIMEOUT = 3.0
TABLE = f"{TABLE_FAMILY} {TABLE_NAME}"
# OpenSSL's verify results that mean "signed by a CA this machine does not trust".
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
_EDIT = "docs/config.md"


# --------------------------------------------------------------------------- the settings


def _config_or_skip(env: DoctorEnv, check: str) -> Config | CheckResult:
    try:
        return env.config()
    except ConfigError:
        return CheckResult(check, CheckStatus.SKIP, "the settings file cannot be read (see config)")


async def check_config(env: DoctorEnv) -> CheckResult:
    path = env.config_path
    try:
        config = env.config()
    except ConfigError as exc:
        return CheckResult(
            "config",
            CheckStatus.FAIL,
            str(exc),
            fix=f"correct that line in {path} ({_EDIT} lists every setting)",
        )
    if not config.upstreams:
        where = "does not exist" if not os.path.exists(path) else "defines no [[upstream]]"
        return CheckResult(
            "config",
            CheckStatus.FAIL,
            f"no proxy is set up: {path} {where}",
            fix=f"start the tray app (`tray-proxy`) and set up the proxy, or add an [[upstream]] "
            f"to {path} ({_EDIT})",
        )
    active = config.active_upstream()
    names = ", ".join(u.name for u in config.upstreams)
    return CheckResult(
        "config",
        CheckStatus.OK,
        f"{path}: {len(config.upstreams)} upstream(s) ({names}); in use: "
        f"{active.name if active else 'none'}",
    )


# --------------------------------------------------------------------------- upstreams


async def _credentials(env: DoctorEnv, upstream: UpstreamProxy) -> tuple[Credentials | None, str]:
    """The login the relay would use for `upstream`, and where it came from (or why none).

    The relay's order (credentials.default_credential_source): the keyring first, then
    $CREDENTIALS_DIRECTORY/NAME; under systemd the other way round."""
    if not upstream.username:
        return None, "no user name configured"
    systemd = SystemdCredentialSource(env.environ.get("CREDENTIALS_DIRECTORY") or None)
    from_directory = systemd.get(upstream.name, upstream.username)
    if from_directory is not None and running_under_systemd(env.environ):
        return from_directory, "from $CREDENTIALS_DIRECTORY"
    stored, why = await _from_keyring(env, upstream, upstream.username)
    if stored is not None:
        return stored, "from the keyring"
    if from_directory is not None:
        return from_directory, "from $CREDENTIALS_DIRECTORY"
    return None, why


async def _from_keyring(
    env: DoctorEnv, upstream: UpstreamProxy, username: str
) -> tuple[Credentials | None, str]:
    try:
        state = await keyring_state(env)
    except asyncio.TimeoutError:
        return None, "the keyring does not answer (see keyring)"
    if (
        state.info is None
        or state.info.verdict != "secure"
        or state.error
        or state.locked
        or state.missing_collection
    ):
        return None, "the keyring cannot be read (see keyring)"
    # Asked only once the keyring is known to be unlocked: no unlock prompt from a doctor.
    store = CredentialStore(timeout=KEYRING_TIMEOUT, unlock_timeout=0.0)
    try:
        stored = await store.get(upstream.name)
    except CredentialStoreError as exc:
        return None, str(exc)
    if stored is None:
        return None, "no password is stored"
    if stored.username != username:
        return None, (
            f"the keyring holds the password of {stored.username}, but the settings say "
            f"username = {username}"
        )
    return stored, ""


def _target(env: DoctorEnv) -> str:
    host, port = env.target()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _probe(
    env: DoctorEnv, upstream: UpstreamProxy
) -> tuple[Credentials | None, str, ProbeResult]:
    creds, source = await _credentials(env, upstream)
    return creds, source, await probe_upstream(upstream, creds, env.target(), env.timeout())


async def probe_once(
    env: DoctorEnv, upstream: UpstreamProxy
) -> tuple[Credentials | None, str, ProbeResult]:
    """One probe per upstream and doctor run, shared by the upstream and TLS checks: a wrong
    password is sent once, not once per check (directory accounts lock after a few)."""
    task: asyncio.Task[tuple[Credentials | None, str, ProbeResult]] = env.memo(
        f"probe:{upstream.name}",
        lambda: spawn(_probe(env, upstream), name=f"doctor probe {upstream.name}"),
    )
    # shield: one check's time limit must not cancel the probe the other one waits for.
    return await asyncio.shield(task)


async def _check_upstream(env: DoctorEnv, upstream: UpstreamProxy) -> CheckResult:
    creds, source, result = await probe_once(env, upstream)
    target = _target(env)
    who = f"{upstream.url}"
    set_password = f"`tray-proxy credentials set {upstream.name}`"
    login: tuple[str, ...] = ()
    if upstream.username:
        login = (
            (f"login: {upstream.username}, password {source}",)
            if creds is not None
            else (f"no password for {upstream.username}: {source} ({set_password})",)
        )
    if result.ok:
        accepted = f", login of {creds.username} accepted" if creds else ""
        latency = (result.latency_s or 0.0) * 1000
        return CheckResult(
            "upstream",
            CheckStatus.OK,
            f"{who}: tunnel to {target} open in {latency:.0f} ms{accepted}",
            subject=upstream.name,
            details=login,
        )
    if result.outcome is ProbeOutcome.AUTH_FAILED:
        words = result.words if creds is not None else f"{result.words} ({source})"
        return CheckResult(
            "upstream", CheckStatus.FAIL, words, fix=set_password, subject=upstream.name
        )
    if result.outcome is ProbeOutcome.FORBIDDEN or (
        result.outcome is ProbeOutcome.UNREACHABLE and result.status is not None
    ):
        # The proxy answered and accepted us; only the probe's target is refused or down.
        return CheckResult(
            "upstream",
            CheckStatus.WARN,
            f"{who} answered, but {result.words} (probe target {target})",
            fix="probe a target the proxy allows: `tray-proxy doctor --target HOST:443`",
            subject=upstream.name,
            details=login,
        )
    return CheckResult(
        "upstream",
        CheckStatus.FAIL,
        f"{who}: {result.words}",
        fix=f"check the proxy's address in {env.config_path} (url of [[upstream]] "
        f'"{upstream.name}") and that this machine reaches it (VPN, network)',
        subject=upstream.name,
        details=login,
    )


async def check_upstreams(env: DoctorEnv) -> Sequence[CheckResult]:
    config = _config_or_skip(env, "upstream")
    if isinstance(config, CheckResult):
        return [config]
    if not config.upstreams:
        return [CheckResult("upstream", CheckStatus.SKIP, "no upstream is set up (see config)")]
    return await asyncio.gather(*(_check_upstream(env, u) for u in config.upstreams))


# --------------------------------------------------------------------------- TLS inspection


@dataclass(frozen=True)
class _TlsSeen:
    verified: bool
    verify_code: int | None
    verify_message: str
    chain: tuple[bytes, ...]  # DER, the server's certificate first


def _chain_der(tls: ssl.SSLSocket, verified: bool) -> tuple[bytes, ...]:
    """The certificates of the handshake (3.13: public API; 3.10-3.12: the _ssl object's)."""
    name = "get_verified_chain" if verified else "get_unverified_chain"
    getter = getattr(tls, name, None) or getattr(getattr(tls, "_sslobj", None), name, None)
    if getter is None:
        return ()
    out: list[bytes] = []
    for cert in getter() or ():
        if isinstance(cert, bytes):
            out.append(cert)
        else:
            out.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return tuple(out)


def _handshake(sock: socket.socket, host: str, verify: bool, timeout: float) -> _TlsSeen:
    context = ssl.create_default_context()  # the system store (/etc/ssl/certs on Debian)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            return _TlsSeen(True, None, "", _chain_der(tls, verified=verify))
    except ssl.SSLCertVerificationError as exc:
        return _TlsSeen(False, exc.verify_code, exc.verify_message or str(exc), ())
    finally:
        sock.close()


async def _tls_through(
    env: DoctorEnv, upstream: UpstreamProxy, creds: Credentials | None, verify: bool
) -> _TlsSeen:
    sock, _trailing = await asyncio.wait_for(
        open_tunnel(
            Dialer(None),
            upstream,
            env.target(),
            creds,
            UpstreamAuth(),
            connect_timeout=env.timeout(),
            handshake_timeout=env.timeout(),
            reserved=False,
        ),
        env.timeout(),
    )
    host = env.target()[0]
    return await in_thread(lambda: _handshake(sock, host, verify, env.timeout()), env.timeout() + 5)


@dataclass(frozen=True)
class _Cert:
    subject: str
    issuer: str
    sha256: str


def _describe(der: bytes) -> _Cert | None:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = x509.load_der_x509_certificate(der)
        return _Cert(
            cert.subject.rfc4514_string(),
            cert.issuer.rfc4514_string(),
            cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        )
    except Exception:  # an unreadable certificate is only named less precisely
        return None


def _local_ca_ders(directory: Path) -> set[bytes]:
    """The CA certificates an administrator added (update-ca-certificates' local dir)."""
    found: set[bytes] = set()
    try:
        files = sorted(directory.rglob("*.crt"))
    except OSError:
        return found
    for path in files:
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        for block in text.split("-----END CERTIFICATE-----")[:-1]:
            start = block.find("-----BEGIN CERTIFICATE-----")
            if start < 0:
                continue
            try:
                found.add(ssl.PEM_cert_to_DER_cert(block[start:] + "-----END CERTIFICATE-----\n"))
            except ValueError:
                continue
    return found


_TRUST_STEPS = (
    "get the CA certificate {ca} from your IT department (on Windows: certmgr.msc > Trusted "
    "Root Certification Authorities > the certificate > Export, Base-64 X.509), save it as "
    "/usr/local/share/ca-certificates/corporate-ca.crt, then run `sudo update-ca-certificates`"
)


async def _check_tls(env: DoctorEnv, upstream: UpstreamProxy) -> CheckResult:
    host, port = env.target()
    target = _target(env)
    if port == 80:
        return CheckResult(
            "tls-inspection",
            CheckStatus.SKIP,
            f"the probe target {target} is plain HTTP: no certificate to look at",
            subject=upstream.name,
        )
    creds, _source, probed = await probe_once(env, upstream)
    if not probed.ok:
        return CheckResult(
            "tls-inspection",
            CheckStatus.SKIP,
            f"no tunnel to {target} through {upstream.name} (see upstream)",
            subject=upstream.name,
        )
    try:
        seen = await _tls_through(env, upstream, creds, verify=True)
    except (UpstreamError, asyncio.TimeoutError, OSError) as exc:
        why = exc.detail if isinstance(exc, UpstreamError) else type(exc).__name__
        return CheckResult(
            "tls-inspection",
            CheckStatus.SKIP,
            f"no TLS handshake with {target} through {upstream.name} ({why}; see upstream)",
            subject=upstream.name,
        )
    except ssl.SSLError as exc:
        return CheckResult(
            "tls-inspection",
            CheckStatus.WARN,
            f"no TLS handshake with {target} through {upstream.name}: {exc.reason or exc}",
            fix="probe a TLS site the proxy allows: `tray-proxy doctor --target HOST:443`",
            subject=upstream.name,
        )
    if seen.verified:
        return _trusted(env, upstream, seen)
    if seen.verify_code not in _UNKNOWN_ISSUER:
        return CheckResult(
            "tls-inspection",
            CheckStatus.FAIL,
            f"the certificate {host} shows through {upstream.name} fails verification: "
            f"{seen.verify_message}",
            fix="ask your IT department whether the proxy rewrites certificates for this site",
            subject=upstream.name,
        )
    # Unknown issuer: look at what the proxy presents, without verifying, to name the CA.
    try:
        raw = await _tls_through(env, upstream, creds, verify=False)
    except (UpstreamError, asyncio.TimeoutError, OSError, ssl.SSLError):
        raw = _TlsSeen(False, None, "", ())
    leaf = _describe(raw.chain[0]) if raw.chain else None
    ca_name = leaf.issuer if leaf else "(not readable)"
    details = [f"verification: {seen.verify_message} (code {seen.verify_code})"]
    if leaf is not None:
        details.append(f"certificate shown for {host}: {leaf.subject}, issued by {leaf.issuer}")
    ca = next(
        (c for c in map(_describe, raw.chain[1:]) if c is not None and c.subject == ca_name),
        None,
    )
    if ca is not None:
        details.append(f"the proxy also sent that CA's certificate: SHA-256 {ca.sha256}")
    return CheckResult(
        "tls-inspection",
        CheckStatus.FAIL,
        f"{upstream.name} inspects TLS: the certificate {host} shows is issued by "
        f'"{ca_name}", a CA this system does not trust; curl, apt, git and pip will fail',
        fix=_TRUST_STEPS.format(ca=f'"{ca_name}"'),
        subject=upstream.name,
        details=tuple(details),
    )


def _trusted(env: DoctorEnv, upstream: UpstreamProxy, seen: _TlsSeen) -> CheckResult:
    host = env.target()[0]
    leaf = _describe(seen.chain[0]) if seen.chain else None
    issuer = leaf.issuer if leaf else "a trusted CA"
    root_der = seen.chain[-1] if seen.chain else b""
    if root_der and root_der in _local_ca_ders(env.local_ca_dir):
        root = _describe(root_der)
        name = root.subject if root else "a locally added CA"
        return CheckResult(
            "tls-inspection",
            CheckStatus.WARN,
            f"{upstream.name} inspects TLS: {host}'s certificate is issued by {issuer} under "
            f'"{name}", which this system trusts (added in {env.local_ca_dir}); tools with '
            "their own CA list do not",
            fix="point them at the system list: pip: `pip config set global.cert "
            "/etc/ssl/certs/ca-certificates.crt`; Node.js: NODE_EXTRA_CA_CERTS="
            "/etc/ssl/certs/ca-certificates.crt; Python requests: REQUESTS_CA_BUNDLE (same file)",
            subject=upstream.name,
        )
    return CheckResult(
        "tls-inspection",
        CheckStatus.OK,
        f"{host}'s certificate through {upstream.name} is issued by {issuer} and trusted by "
        "the system's CA list",
        subject=upstream.name,
    )


async def check_tls(env: DoctorEnv) -> Sequence[CheckResult]:
    config = _config_or_skip(env, "tls-inspection")
    if isinstance(config, CheckResult):
        return [config]
    if not config.upstreams:
        return [
            CheckResult("tls-inspection", CheckStatus.SKIP, "no upstream is set up (see config)")
        ]
    return await asyncio.gather(*(_check_tls(env, u) for u in config.upstreams))


# --------------------------------------------------------------------------- the instance


async def _instance(env: DoctorEnv) -> dict[str, Any] | None | str:
    """The running instance's `status` answer; None: none runs; a string: it cannot be asked."""
    from tray_proxy.instance import ControlError, NotRunningError, send_command

    def ask() -> dict[str, Any] | None | str:
        def query() -> dict[str, Any] | None | str:
            try:
                answer = send_command("status", env.control_socket, timeout=CONTROL_TIMEOUT)
            except NotRunningError:
                return None
            except ControlError as exc:
                return str(exc)
            if not answer.get("ok") or not isinstance(answer.get("status"), dict):
                return f"tray-proxy answered with an error: {answer.get('error')}"
            return answer

        return env.memo("instance", query)

    try:
        return await in_thread(ask, CONTROL_TIMEOUT * 2)
    except asyncio.TimeoutError:
        return f"tray-proxy did not answer within {CONTROL_TIMEOUT * 2:g} s"


def _reserved_ports(env: DoctorEnv) -> set[int]:
    try:
        text = (env.proc / "sys/net/ipv4/ip_local_reserved_ports").read_text()
        return parse_port_ranges(text)
    except (OSError, ValueError):
        return set()


async def check_redirect(env: DoctorEnv) -> CheckResult:
    answer = await _instance(env)
    if isinstance(answer, str):
        return CheckResult(
            "redirect",
            CheckStatus.WARN,
            f"the running tray-proxy cannot be asked: {answer}",
            fix="quit it (its menu's Quit) and start it again",
        )
    if answer is not None:
        status = answer["status"]
        state = str(status.get("state"))
        instance = "the tray app" if answer.get("instance") == "tray" else "`tray-proxy run`"
        message = str(status.get("message") or "")
        # Whose traffic the redirect carries (the root helper's words, issue 16 item 1).
        captured = status.get("captured")
        whose = (f"captured: {captured}",) if isinstance(captured, str) and captured else ()
        if state == "on":
            return CheckResult(
                "redirect", CheckStatus.OK, f"on ({instance}): {message}", details=whose
            )
        if state == "degraded":
            return CheckResult(
                "redirect",
                CheckStatus.WARN,
                f"degraded ({instance}): {message}",
                fix="see the proxy's state in the dashboard, or `tray-proxy status`",
                details=whose,
            )
        if state == "error":
            return CheckResult(
                "redirect",
                CheckStatus.FAIL,
                f"error ({instance}): {message}",
                fix="the message says what to do; then switch it on again (the tray menu, or "
                "`tray-proxy enable`)",
            )
        return CheckResult(
            "redirect",
            CheckStatus.WARN,
            f"{state} ({instance}): web traffic goes direct, not through the proxy",
            fix="switch it on: the tray menu, or `tray-proxy enable`",
        )
    # Nobody runs: a table in the kernel now would send ports 80/443 to a dead relay port.
    if env.euid == 0:
        nft = find_nft(env)
        if nft is not None:
            listed = await in_thread(
                lambda: run_command([nft, "list", "table", *TABLE.split()], env.command_timeout),
                60,
            )
            if listed.ok:
                return CheckResult(
                    "redirect",
                    CheckStatus.FAIL,
                    f"stale redirect: table {TABLE} is in the kernel, but no tray-proxy is "
                    "running; new web connections are sent to a relay that does not exist",
                    fix=f"remove it: `sudo nft delete table {TABLE}` (or start tray-proxy, "
                    "which removes it and applies its own)",
                )
            if listed.returncode is not None:
                return CheckResult(
                    "redirect", CheckStatus.OK, "off: no tray-proxy running, no table left over"
                )
    config = _config_or_skip(env, "redirect")
    source = config.relay.source_ports if isinstance(config, Config) else None
    if source is not None and set(range(source[0], source[1] + 1)) <= _reserved_ports(env):
        return CheckResult(
            "redirect",
            CheckStatus.WARN,
            "no tray-proxy is running, but the relay's source ports "
            f"{source[0]}-{source[1]} are still reserved: a redirect helper was probably "
            f"killed and may have left table {TABLE} behind",
            fix=f"check with `sudo nft list table {TABLE}`; if it is there, remove it with "
            f"`sudo nft delete table {TABLE}`",
        )
    return CheckResult(
        "redirect",
        CheckStatus.OK,
        "off: no tray-proxy is running",
        details=(f"only root can list the kernel's tables: `sudo nft list table {TABLE}`",),
    )


def _connect(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=RELAY_CONNECT_TIMEOUT):
        pass


async def check_relay(env: DoctorEnv) -> CheckResult:
    answer = await _instance(env)
    if answer is None or isinstance(answer, str):
        why = "no tray-proxy is running" if answer is None else answer
        return CheckResult("relay", CheckStatus.SKIP, why)
    addresses = [
        (str(a[0]), int(a[1])) for a in answer["status"].get("relay_addresses") or () if len(a) >= 2
    ]
    if not addresses:
        return CheckResult(
            "relay", CheckStatus.SKIP, "the relay is not started (it runs while the redirect is on)"
        )
    failed: list[str] = []
    for host, port in addresses:
        try:
            await in_thread(functools.partial(_connect, host, port), RELAY_CONNECT_TIMEOUT + 2)
        except (OSError, asyncio.TimeoutError) as exc:
            failed.append(f"{_where(host, port)}: {getattr(exc, 'strerror', None) or 'timeout'}")
    shown = ", ".join(_where(h, p) for h, p in addresses)
    if failed:
        return CheckResult(
            "relay",
            CheckStatus.FAIL,
            f"the relay does not accept connections on {', '.join(failed)}",
            fix="quit tray-proxy (its menu's Quit, or `tray-proxy quit`) and start it again",
        )
    return CheckResult("relay", CheckStatus.OK, f"relay listening on {shown}")


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- IPv6


def _ipv6_default_route(proc: Path) -> bool:
    try:
        lines = (proc / "net/ipv6_route").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        # destination ::/0, not the loopback device's unreachable default
        if len(fields) >= 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
            return True
    return False


def _flag(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


async def check_ipv6(env: DoctorEnv) -> CheckResult:
    config = _config_or_skip(env, "ipv6")
    if isinstance(config, CheckResult):
        return config
    conf = env.proc / "sys/net/ipv6/conf"
    if _flag(conf / "all/disable_ipv6") in (None, "1"):
        return CheckResult(
            "ipv6", CheckStatus.OK, "IPv6 is off on this machine: only IPv4 is redirected"
        )
    routed = _ipv6_default_route(env.proc)
    lo_off = _flag(conf / "lo/disable_ipv6") == "1"
    listens = "::1" in config.relay.listen
    port = config.relay.port
    if routed and (lo_off or not listens):
        why = "IPv6 is off on the loopback interface" if lo_off else "relay.listen has no ::1"
        return CheckResult(
            "ipv6",
            CheckStatus.WARN,
            f"IPv6 has a default route, so programs connect over IPv6, and those connections "
            f"are redirected to [::1]:{port}, but {why}: they fail",
            fix='listen on both: `listen = ["127.0.0.1", "::1"]` under [relay] in '
            f"{env.config_path}"
            + (" and `sudo sysctl net.ipv6.conf.lo.disable_ipv6=0`" if lo_off else ""),
        )
    if not routed:
        return CheckResult(
            "ipv6",
            CheckStatus.OK,
            "IPv6 is on but has no default route: programs connect over IPv4",
        )
    details: tuple[str, ...] = ()
    if config.redirect.capture_containers:
        details = ("containers' IPv6 connections are refused, so they fall back to IPv4",)
    return CheckResult(
        "ipv6",
        CheckStatus.OK,
        f"IPv6 is on with a default route: IPv6 connections are redirected to [::1]:{port}",
        details=details,
    )


# --------------------------------------------------------------------------- exclusions


_KNOWN_NETWORKS = {
    "127.0.0.0/8": "this machine, loopback",
    "10.0.0.0/8": "private network 10.x.x.x",
    "172.16.0.0/12": "private network 172.16.x.x-172.31.x.x",
    "192.168.0.0/16": "private network 192.168.x.x",
    "100.64.0.0/10": "shared address space 100.64.x.x-100.127.x.x: carrier-grade NAT, Tailscale",
    "169.254.0.0/16": "link-local 169.254.x.x",
    "::1/128": "this machine, IPv6 loopback",
    "fc00::/7": "IPv6 unique local addresses",
    "fe80::/10": "IPv6 link-local",
}


def describe_network(network: IPNetwork) -> str:
    """A network in words: "10.0.0.0/8 (private network 10.x.x.x)"."""
    words = _KNOWN_NETWORKS.get(str(network))
    return f"{network} ({words})" if words else str(network)


def _surprising(network: IPNetwork) -> bool:
    """Networks where an internal web site may live (not this host, not link-local)."""
    return not (network.is_loopback or network.is_link_local) and (
        network.is_private or network.subnet_of(ipaddress.ip_network("100.64.0.0/10"))  # type: ignore[arg-type]
        if network.version == 4
        else network.is_private
    )


async def check_exclusions(env: DoctorEnv) -> CheckResult:
    config = _config_or_skip(env, "exclusions")
    if isinstance(config, CheckResult):
        return config
    excluded = config.redirect.exclude
    details = tuple(f"direct: {describe_network(n)}" for n in excluded) + (
        "direct: this machine's own addresses and the upstream proxies' addresses (always)",
    )
    direct = [n for n in excluded if _surprising(n)]
    if not direct:
        return CheckResult(
            "exclusions",
            CheckStatus.OK,
            "only this machine, link-local addresses and the proxies themselves go direct",
            details=details,
        )
    listed = ", ".join(str(n) for n in direct)
    return CheckResult(
        "exclusions",
        CheckStatus.WARN,
        f"connections to {listed} go direct, never through the proxy: an internal site in "
        "these ranges is reached without it",
        fix="if such a site must go through the proxy, remove its range from `exclude` under "
        f"[redirect] in {env.config_path} ({_EDIT})",
        details=details,
    )
