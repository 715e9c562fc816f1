"""A real MIT Kerberos KDC (krb5kdc) for the lab, with its own realm, files and database.

`LabKdc` runs krb5kdc in the foreground in the proxy namespace. Everything it needs lives in
its own temp directory: krb5.conf (`KRB5_CONFIG`), kdc.conf (`KRB5_KDC_PROFILE`), the
database and its stash, the logs, the keytabs and the ticket caches; /etc/krb5.conf is never
read or written by anything started here. The realm's KDC is named by address, so clients in
any lab namespace find it without DNS.

Passwords (the database master key, users' passwords) reach kdb5_util, kadmin.local and
kinit on stdin, never in argv or the environment. Service principals get random keys and a
keytab. `stop()` kills krb5kdc and removes the directory, also when `start()` failed halfway.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from tests.lab.creds import ProxyCredentials
from tests.lab.netns import LabError, Namespace, NsProcess

KRB5KDC = "/usr/sbin/krb5kdc"
KDB5_UTIL = "/usr/sbin/kdb5_util"
KADMIN_LOCAL = "/usr/sbin/kadmin.local"
KINIT = "/usr/bin/kinit"
KLIST = "/usr/bin/klist"
# Debian package for each binary, so a missing one fails with the fix in the message.
REQUIRED: dict[str, str] = {
    KRB5KDC: "krb5-kdc",
    KDB5_UTIL: "krb5-kdc",
    KADMIN_LOCAL: "krb5-admin-server",
    KINIT: "krb5-user",
    KLIST: "krb5-user",
}
KDC_PORT = 88  # each lab has its own proxy namespace: no other lab's KDC can hold it
DEFAULT_REALM = "LAB.TEST"
_ENCTYPES = "aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal"


def check_kerberos_tools() -> None:
    """Raise LabError naming the Debian packages to install when a Kerberos tool is missing."""
    missing = sorted({pkg for path, pkg in REQUIRED.items() if not os.access(path, os.X_OK)})
    if missing:
        raise LabError("the Kerberos lab needs MIT Kerberos: apt-get install " + " ".join(missing))


class LabKdc:
    """`with LabKdc(lab.proxy, workdir) as kdc:` one realm served from the proxy namespace.

    `kdc.krb5_conf` is the client configuration (also for Squid's helper); `kdc.env()` the
    variables a Kerberos program needs to use it (paths only). `add_user()`,
    `add_service()` (with a keytab), `kinit()` into a ticket cache file.
    """

    def __init__(self, ns: Namespace, workdir: Path, realm: str = DEFAULT_REALM) -> None:
        if ns.v4 is None:
            raise LabError("the KDC's namespace has no address yet")
        self.ns = ns
        self.workdir = workdir
        self.realm = realm
        self.host = ns.v4
        self.krb5_conf = workdir / "krb5.conf"
        self.kdc_conf = workdir / "kdc.conf"
        self.database = workdir / "principal"
        self.log = workdir / "kdc.log"
        self.process: NsProcess | None = None

    def __repr__(self) -> str:
        return f"<LabKdc {self.realm} at {self.host}:{KDC_PORT}>"

    # files ---------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """What Kerberos programs need to use this realm only (file paths, no secrets)."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            # An empty cache unless told otherwise: never the user's /tmp/krb5cc_<uid>.
            "KRB5CCNAME": f"FILE:{self.workdir / 'no-ccache'}",
            "KRB5RCACHEDIR": str(self.workdir),
            **extra,
        }

    def _write_configs(self) -> None:
        w = self.workdir
        self.krb5_conf.write_text(
            "[libdefaults]\n"
            f"  default_realm = {self.realm}\n"
            "  dns_lookup_kdc = false\n"
            "  dns_lookup_realm = false\n"
            # The SPN is built from the name the client was given, not from lookups.
            "  dns_canonicalize_hostname = false\n"
            "  rdns = false\n"
            "  udp_preference_limit = 1\n"
            "  kdc_timesync = 0\n"
            f"  default_ccache_name = FILE:{w / 'no-ccache'}\n"
            f"  default_keytab_name = FILE:{w / 'no-keytab'}\n"
            "[realms]\n"
            f"  {self.realm} = {{\n"
            f"    kdc = {self.host}:{KDC_PORT}\n"
            "  }\n"
            "[domain_realm]\n"
            f"  .lab.test = {self.realm}\n"
            f"  lab.test = {self.realm}\n"
        )
        self.kdc_conf.write_text(
            "[kdcdefaults]\n"
            f"  kdc_listen = {self.host}:{KDC_PORT}\n"
            f"  kdc_tcp_listen = {self.host}:{KDC_PORT}\n"
            "[realms]\n"
            f"  {self.realm} = {{\n"
            f"    database_name = {self.database}\n"
            f"    key_stash_file = {w / 'stash'}\n"
            f"    acl_file = {w / 'kadm5.acl'}\n"
            "    max_life = 1h\n"
            "    max_renewable_life = 0\n"
            f"    supported_enctypes = {_ENCTYPES}\n"
            "  }\n"
            "[logging]\n"
            f"  kdc = FILE:{self.log}\n"
            f"  admin_server = FILE:{w / 'kadmin.log'}\n"
            f"  default = FILE:{w / 'krb5lib.log'}\n"
        )
        (w / "kadm5.acl").write_text("")

    def _tool(
        self, argv: list[str], *, input: bytes | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[bytes]:
        """A local database tool (no network): runs here, in the test's own namespace."""
        result = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.env()},
            check=False,
        )
        if result.returncode != 0:
            raise LabError(
                f"{Path(argv[0]).name} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()[-1500:]}"
            )
        return result

    # lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> LabKdc:
        """Create the realm's database and start krb5kdc; on failure nothing is left."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        check_kerberos_tools()
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=False)
        self._write_configs()
        master = secrets.token_urlsafe(18).encode()
        # kdb5_util asks for the master password twice; -s stashes it for krb5kdc.
        self._tool(
            [KDB5_UTIL, "-r", self.realm, "create", "-s", "-W"],
            input=master + b"\n" + master + b"\n",
        )
        with (self.workdir / "krb5kdc.stderr").open("wb") as stderr:
            self.process = self.ns.popen(
                [KRB5KDC, "-n", "-r", self.realm],
                stdout=stderr,
                stderr=stderr,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **self.env()},
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            with contextlib.suppress(OSError), self.ns.connect(self.host, KDC_PORT, timeout=1):
                return
            time.sleep(0.05)
        raise LabError(
            f"krb5kdc did not listen on {self.host}:{KDC_PORT} within {timeout:.0f}s; "
            f"stderr: {(self.workdir / 'krb5kdc.stderr').read_text(errors='replace')[-1500:]}"
            f"\nlog: {self.log.read_text(errors='replace')[-1500:] if self.log.exists() else ''}"
        )

    def stop(self) -> None:
        try:
            if self.process is not None:
                proc, self.process = self.process, None
                try:
                    proc.stop(grace=3.0)
                finally:
                    self.ns.forget(proc)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LabKdc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # principals ----------------------------------------------------------------------------

    def principal(self, name: str) -> str:
        return f"{name}@{self.realm}"

    def add_user(self, name: str) -> ProxyCredentials:
        """A user principal with a fresh password (also in a 0600 file, as lab creds are)."""
        creds = ProxyCredentials.generate(name, self.workdir)
        pw = creds.password.encode()
        # addprinc prompts for the password twice; the query holds only the principal name.
        self._tool(
            [KADMIN_LOCAL, "-r", self.realm, "-q", f"addprinc {self.principal(name)}"],
            input=pw + b"\n" + pw + b"\n",
        )
        return creds

    def add_service(self, principal: str, keytab: Path) -> Path:
        """A service principal (`HTTP/host`) with a random key, exported to `keytab`."""
        full = principal if "@" in principal else self.principal(principal)
        self._tool([KADMIN_LOCAL, "-r", self.realm, "-q", f"addprinc -randkey {full}"])
        self._tool([KADMIN_LOCAL, "-r", self.realm, "-q", f"ktadd -k FILE:{keytab} {full}"])
        if not keytab.exists():
            raise LabError(f"kadmin.local wrote no keytab for {full}")
        keytab.chmod(0o600)
        return keytab

    def kinit(self, ns: Namespace, creds: ProxyCredentials, ccache: Path) -> None:
        """Get `creds`' TGT into the ticket cache file `ccache`, from namespace `ns`."""
        env = self.env(KRB5CCNAME=f"FILE:{ccache}")
        self._ns_run(ns, [KINIT, self.principal(creds.username)], env, creds.password)
        listed = self._ns_run(ns, [KLIST], env).stdout.decode(errors="replace")
        if f"krbtgt/{self.realm}@{self.realm}" not in listed:
            raise LabError(f"kinit left no ticket-granting ticket in {ccache}: {listed}")

    def _ns_run(
        self, ns: Namespace, argv: list[str], env: Mapping[str, str], password: str | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        assigned = [f"{k}={v}" for k, v in env.items()]  # paths only; the password is stdin
        return ns.run(
            ["env", *assigned, *argv],
            input=(password + "\n").encode() if password is not None else None,
        )
