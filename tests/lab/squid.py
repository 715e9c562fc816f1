"""Squid 5 instances for the lab, each with its own config, logs and credentials in a temp dir.

`SquidProxy` is a plain context manager (bench scripts use it too); the auth scheme is a small
strategy object (`NoAuth`, `BasicAuth`, `DigestAuth`, `NtlmFakeAuth`).
Squid runs in the foreground (`-N`) inside the proxy namespace and is stopped with its helpers.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.lab.creds import ProxyCredentials
from tests.lab.netns import LabError, Namespace, NsProcess

SQUID = "/usr/sbin/squid"
HELPER_DIR = Path("/usr/lib/squid")
SQUID_USER = "proxy"  # Debian's cache_effective_user; Squid refuses to keep running as root
# One record per line, key=value, so tests can parse it without guessing columns.
LOG_FORMAT = (
    "%ts.%03tu client=%>a port=%>p user=%un method=%rm uri=%ru status=%>Hs result=%Ss "
    "server=%<a to_client=%<st from_client=%>st"
)


@dataclass(frozen=True)
class AccessLogEntry:
    time: float
    client: str
    user: str
    method: str
    uri: str
    status: int
    result: str
    server: str
    fields: dict[str, str]


def parse_access_log(text: str) -> list[AccessLogEntry]:
    entries = []
    for line in text.splitlines():
        stamp, _, rest = line.partition(" ")
        fields = dict(item.split("=", 1) for item in rest.split(" ") if "=" in item)
        try:
            status = int(fields.get("status", "0"))
        except ValueError:
            status = 0
        entries.append(
            AccessLogEntry(
                time=float(stamp),
                client=fields.get("client", "-"),
                user=fields.get("user", "-"),
                method=fields.get("method", "-"),
                uri=fields.get("uri", "-"),
                status=status,
                result=fields.get("result", "-"),
                server=fields.get("server", "-"),
                fields=fields,
            )
        )
    return entries


class SquidAuth:
    """No authentication. Subclasses add `auth_param` lines and files."""

    scheme = "none"
    credentials: ProxyCredentials | None = None

    def configure(self, workdir: Path) -> list[str]:
        """Write whatever files the scheme needs into `workdir`; return squid.conf lines."""
        return []

    @property
    def required(self) -> bool:
        return False


NoAuth = SquidAuth


class BasicAuth(SquidAuth):
    """HTTP Basic checked by basic_ncsa_auth against an htpasswd file (apr1 hashes)."""

    scheme = "basic"

    def __init__(self, credentials: ProxyCredentials, realm: str = "tray-proxy lab") -> None:
        self.credentials = credentials
        self.realm = realm
        self.htpasswd_path: Path | None = None

    @property
    def required(self) -> bool:
        return True

    def configure(self, workdir: Path) -> list[str]:
        assert self.credentials is not None
        # The password goes to openssl on stdin, never in argv.
        hashed = subprocess.run(
            ["openssl", "passwd", "-apr1", "-stdin"],
            input=self.credentials.password.encode() + b"\n",
            capture_output=True,
            timeout=30,
            check=False,
        )
        if hashed.returncode != 0:
            raise LabError(f"openssl passwd failed: {hashed.stderr.decode(errors='replace')}")
        self.htpasswd_path = workdir / "htpasswd"
        self.htpasswd_path.write_bytes(self.credentials.username.encode() + b":" + hashed.stdout)
        return [
            f"auth_param basic program {HELPER_DIR / 'basic_ncsa_auth'} {self.htpasswd_path}",
            "auth_param basic children 3 startup=1 idle=1",
            f"auth_param basic realm {self.realm}",
            "auth_param basic credentialsttl 5 minutes",
        ]


class DigestAuth(SquidAuth):
    """HTTP Digest checked by digest_file_auth against a file of `user:realm:HA1` (MD5; Squid 5
    speaks no SHA-256 Digest). The plaintext password never touches the disk."""

    scheme = "digest"

    def __init__(self, credentials: ProxyCredentials, realm: str = "tray-proxy lab") -> None:
        self.credentials = credentials
        self.realm = realm
        self.password_path: Path | None = None

    @property
    def required(self) -> bool:
        return True

    def configure(self, workdir: Path) -> list[str]:
        assert self.credentials is not None
        user = self.credentials.username
        ha1 = hashlib.md5(f"{user}:{self.realm}:{self.credentials.password}".encode()).hexdigest()
        self.password_path = workdir / "digest-passwords"
        fd = os.open(self.password_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{user}:{self.realm}:{ha1}\n")
        return [
            f"auth_param digest program {HELPER_DIR / 'digest_file_auth'} -c {self.password_path}",
            "auth_param digest children 3 startup=1 idle=1",
            f"auth_param digest realm {self.realm}",
            "auth_param digest nonce_garbage_interval 5 minutes",
            "auth_param digest nonce_max_duration 30 minutes",
            "auth_param digest nonce_max_count 1000",
        ]


class NtlmFakeAuth(SquidAuth):
    """NTLM through ntlm_fake_auth, which accepts any user and password (there is no domain
    controller in the lab). With `basic`, Squid offers NTLM and then Basic (basic_ncsa_auth
    against `basic`'s credentials), as corporate proxies do."""

    scheme = "ntlm"

    def __init__(self, credentials: ProxyCredentials, basic: BasicAuth | None = None) -> None:
        self.credentials = credentials
        self.basic = basic

    @property
    def required(self) -> bool:
        return True

    @property
    def htpasswd_path(self) -> Path | None:
        return self.basic.htpasswd_path if self.basic is not None else None

    def configure(self, workdir: Path) -> list[str]:
        lines = [
            f"auth_param ntlm program {HELPER_DIR / 'ntlm_fake_auth'}",
            "auth_param ntlm children 3 startup=1 idle=1",
            "auth_param ntlm keep_alive on",
        ]
        if self.basic is not None:
            lines += self.basic.configure(workdir)
        return lines


class KerberosAuth(SquidAuth):
    """Negotiate (Kerberos) checked by negotiate_kerberos_auth against `keytab`, the key of
    `service` (`HTTP/proxy.lab.test@REALM`) from a lab KDC. `krb5_conf` is that realm's client
    configuration; the helper gets it and its replay-cache directory through `env` in its
    command line (paths only), so /etc/krb5.conf is never used. With `fallback` (NTLM or
    Basic), Squid offers Negotiate first and then that scheme, as corporate proxies do.

    Squid logs the user as the client's principal (`alice@LAB.TEST`).
    """

    scheme = "negotiate"

    def __init__(
        self,
        keytab: Path,
        service: str,
        krb5_conf: Path,
        fallback: SquidAuth | None = None,
    ) -> None:
        self.keytab_source = keytab
        self.service = service
        self.krb5_conf_source = krb5_conf
        self.fallback = fallback
        self.credentials = fallback.credentials if fallback is not None else None
        self.keytab_path: Path | None = None

    @property
    def required(self) -> bool:
        return True

    @property
    def htpasswd_path(self) -> Path | None:
        return getattr(self.fallback, "htpasswd_path", None)

    def configure(self, workdir: Path) -> list[str]:
        # Copies inside Squid's own directory, which SquidProxy hands to the `proxy` user.
        self.keytab_path = workdir / "http.keytab"
        fd = os.open(self.keytab_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.keytab_source.read_bytes())
        krb5_conf = workdir / "krb5.conf"
        shutil.copyfile(self.krb5_conf_source, krb5_conf)
        rcache = workdir / "rcache"
        rcache.mkdir()
        helper = [
            "/usr/bin/env",
            f"KRB5_CONFIG={krb5_conf}",
            f"KRB5_KTNAME=FILE:{self.keytab_path}",
            f"KRB5RCACHEDIR={rcache}",
            str(HELPER_DIR / "negotiate_kerberos_auth"),
            *("-k", str(self.keytab_path), "-s", self.service, "-c", str(rcache)),
        ]
        lines = [
            f"auth_param negotiate program {' '.join(helper)}",
            "auth_param negotiate children 3 startup=1 idle=1",
            "auth_param negotiate keep_alive on",
        ]
        if self.fallback is not None:
            lines += self.fallback.configure(workdir)
        return lines


class SquidProxy:
    """One Squid listening on `port` at the proxy namespace's v4 and v6 address.

    Attributes for consumers: `host` / `host6`, `port`, `credentials` (None without auth),
    `htpasswd_path`, `access_log`, `cache_log`, `workdir`.
    """

    def __init__(
        self,
        ns: Namespace,
        workdir: Path,
        *,
        port: int = 3128,
        auth: SquidAuth | None = None,
        hosts: str = "",
        addresses: Sequence[str] | None = None,
        extra_config: str = "",
    ) -> None:
        if ns.v4 is None or ns.v6 is None:
            raise LabError("proxy namespace has no addresses yet")
        self.ns = ns
        self.workdir = workdir
        self.port = port
        self.auth = auth or NoAuth()
        self.addresses = list(addresses) if addresses else [ns.v4, ns.v6]
        self.host = next((a for a in self.addresses if ":" not in a), ns.v4)
        self.host6 = next((a for a in self.addresses if ":" in a), ns.v6)
        self.hosts = hosts
        self.extra_config = extra_config
        self.conf_path = workdir / "squid.conf"
        self.access_log = workdir / "access.log"
        self.cache_log = workdir / "cache.log"
        self.pid_file = workdir / "squid.pid"
        self.process: NsProcess | None = None

    def __repr__(self) -> str:
        return f"<SquidProxy {self.host}:{self.port} auth={self.auth.scheme}>"

    @property
    def credentials(self) -> ProxyCredentials | None:
        return self.auth.credentials

    @property
    def htpasswd_path(self) -> Path | None:
        return getattr(self.auth, "htpasswd_path", None)

    @property
    def secret_files(self) -> list[Path]:
        """Files of the auth scheme that only Squid may read."""
        found = [
            getattr(self.auth, "htpasswd_path", None),
            getattr(self.auth, "password_path", None),
        ]
        return [p for p in found if p is not None]

    def proxy_url(self, family: int = 4) -> str:
        """`http://host:port` without credentials (IPv6 literal in brackets)."""
        host = self.host if family == 4 else f"[{self.host6}]"
        return f"http://{host}:{self.port}"

    # config --------------------------------------------------------------------------------

    def render_config(self, auth_lines: Sequence[str]) -> str:
        listen = [f"http_port {f'[{a}]' if ':' in a else a}:{self.port}" for a in self.addresses]
        access = ["http_access deny !Safe_ports", "http_access deny CONNECT !SSL_ports"]
        if self.auth.required:
            access += ["acl authed proxy_auth REQUIRED", "http_access allow lab_clients authed"]
        else:
            access.append("http_access allow lab_clients")
        access.append("http_access deny all")
        w = self.workdir
        return "\n".join(
            [
                "# tray-proxy lab Squid: generated, one instance per directory",
                *listen,
                f"pid_filename {self.pid_file}",
                f"cache_log {self.cache_log}",
                f"logformat tplab {LOG_FORMAT}",
                f"access_log stdio:{self.access_log} logformat=tplab",
                "buffered_logs off",
                "strip_query_terms off",
                "cache_store_log none",
                "logfile_rotate 0",
                f"coredump_dir {w}",
                "cache deny all",
                "cache_mem 8 MB",
                f"hosts_file {w / 'hosts'}",
                # Unanswerable on purpose: names resolve from hosts_file or not at all.
                "dns_nameservers 127.0.0.1",
                "dns_timeout 2 seconds",
                "shutdown_lifetime 0 seconds",
                "pinger_enable off",
                "netdb_filename none",
                "visible_hostname tplab-squid",
                f"cache_effective_user {SQUID_USER}",
                "acl lab_clients src 10.200.0.0/16 fd00:200::/32",
                "acl SSL_ports port 443 80 5001",
                "acl Safe_ports port 80 443 5001",
                "acl CONNECT method CONNECT",
                *auth_lines,
                self.extra_config,
                *access,
                "",
            ]
        )

    # lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> SquidProxy:
        """Start and wait until it serves; on failure nothing is left running."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "hosts").write_text("127.0.0.1 localhost\n" + self.hosts)
        auth_lines = self.auth.configure(self.workdir)
        self.conf_path.write_text(self.render_config(auth_lines))
        self.access_log.touch()
        self.cache_log.touch()
        user = pwd.getpwnam(SQUID_USER)
        # Squid drops to `proxy`: it must be able to write its logs and read the htpasswd,
        # and nobody else needs to read the hashes.
        for path in [self.workdir, *self.workdir.iterdir()]:
            os.chown(path, user.pw_uid, user.pw_gid)
        for secret in self.secret_files:
            secret.chmod(0o600)
        with (self.workdir / "squid.stderr").open("wb") as stderr:
            self.process = self.ns.popen(
                [SQUID, "-N", "-f", str(self.conf_path)], stdout=stderr, stderr=stderr
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        # Readiness from cache.log rather than a probe connection: a probe would add an
        # "error:transaction-end-before-headers" record to the access log tests read.
        expected = {f"local={f'[{a}]' if ':' in a else a}:{self.port}" for a in self.addresses}
        pattern = re.compile(r"Accepting HTTP Socket connections at .*?(local=\S+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = set(pattern.findall(self.cache_log.read_text(errors="replace")))
            if expected <= seen:
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise LabError(
            f"Squid on port {self.port} did not become ready within {timeout:.0f}s; "
            f"cache.log tail:\n{self.cache_log.read_text(errors='replace')[-3000:]}"
            f"\nstderr:\n{(self.workdir / 'squid.stderr').read_text(errors='replace')[-1000:]}"
        )

    def stop(self) -> None:
        if self.process is not None:
            proc, self.process = self.process, None
            try:
                proc.stop(grace=5.0)
            finally:
                self.ns.forget(proc)

    def __enter__(self) -> SquidProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def remove_files(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # access log ----------------------------------------------------------------------------

    def entries(self) -> list[AccessLogEntry]:
        """Parsed access log. Squid logs a CONNECT when the tunnel closes."""
        with contextlib.suppress(FileNotFoundError):
            return parse_access_log(self.access_log.read_text(errors="replace"))
        return []

    def wait_for_entry(
        self, predicate: Callable[[AccessLogEntry], bool], timeout: float = 10.0
    ) -> AccessLogEntry:
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.entries():
                if predicate(entry):
                    return entry
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no matching Squid access-log entry within {timeout}s; log:\n"
                    + self.access_log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.05)
