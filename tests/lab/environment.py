"""The whole real-proxy lab as one context manager: namespaces, PKI, origins, Squid, Dante.

```
client 10.200.1.2 ─┐                 ┌─ proxy 10.200.2.2   (Squid :3128, Dante :1080)
 fd00:200:1::2     ├── router ns ────┤   fd00:200:2::2
                   │ (forwards only) └─ origin 10.200.3.2  (HTTP :80, HTTPS :443, TCP :5001)
                                          fd00:200:3::2
```
Every namespace has a default route to the router, so the client *can* reach the origin
directly (as on a real machine); tests prove the proxy path from the proxy's logs and from
the peer address the origin logged. Plain Python: `with Lab() as lab:` works in bench scripts.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tests.lab.creds import ProxyCredentials
from tests.lab.curl import CurlResult, run_curl
from tests.lab.dante import DanteProxy, SystemUser
from tests.lab.netns import (
    Namespace,
    Redirect,
    apply_redirect,
    check_prerequisites,
    cleanup_stale,
    enable_forwarding,
    lab_user_name,
    link_to_router,
    run_tag,
)
from tests.lab.origins import ALT_HOSTNAME, HOSTNAME, Origins
from tests.lab.pki import LabPKI, make_pki
from tests.lab.squid import BasicAuth, NoAuth, SquidAuth, SquidProxy

PROXY_HOSTNAME = "proxy.lab.test"
GUARDIAN_SCRIPT = Path(__file__).with_name("guardian.py")
KEEP_ENV = "TPLAB_KEEP"  # set to 1 to keep the temp dir (configs, logs) for debugging


class Lab:
    """Build with `with Lab() as lab:`; everything is torn down on exit, also after errors.

    Attributes: `client`, `proxy`, `origin`, `router` (Namespace, with `.v4` / `.v6`),
    `pki` (`.ca_cert`), `ca_path`, `origins`, `squid`, `dante`, `tmp`, `tag`.
    """

    def __init__(
        self,
        *,
        squid: bool = True,
        dante: bool = True,
        base_dir: Path | None = None,
        keep_files: bool | None = None,
    ) -> None:
        self._want_squid = squid
        self._want_dante = dante
        self._base_dir = base_dir
        self.keep_files = os.environ.get(KEEP_ENV) == "1" if keep_files is None else keep_files
        self._stack = contextlib.ExitStack()
        self.tag = run_tag()
        self.tmp = Path()
        self.router = Namespace(f"{self.tag}-rtr", "router")
        self.client = Namespace(f"{self.tag}-cli", "client")
        self.proxy = Namespace(f"{self.tag}-pxy", "proxy")
        self.origin = Namespace(f"{self.tag}-org", "origin")
        self.pki: LabPKI | None = None
        self._origins: Origins | None = None
        self._squid: SquidProxy | None = None
        self._dante: DanteProxy | None = None
        self.dante_user: SystemUser | None = None

    def __repr__(self) -> str:
        return f"<Lab {self.tag}>"

    @property
    def namespaces(self) -> list[Namespace]:
        return [self.client, self.proxy, self.origin, self.router]

    # typed access to parts that exist once built ------------------------------------------

    @property
    def origins(self) -> Origins:
        assert self._origins is not None, "lab not started"
        return self._origins

    @property
    def squid(self) -> SquidProxy:
        assert self._squid is not None, "lab built without Squid"
        return self._squid

    @property
    def dante(self) -> DanteProxy:
        assert self._dante is not None, "lab built without Dante"
        return self._dante

    @property
    def ca_path(self) -> Path:
        assert self.pki is not None, "lab not started"
        return self.pki.ca_cert

    # lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        check_prerequisites()
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _build(self) -> None:
        stack = self._stack
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir=self._base_dir))
        # Squid drops to the `proxy` user and must reach its own subdirectory.
        self.tmp.chmod(0o711)
        stack.callback(self._remove_tmp)
        self._start_guardian()

        hosts = self.hosts_text()
        for ns in self.namespaces:
            stack.push(_closer(ns))
            ns.create(hosts)
        for ns, ifname, net in (
            (self.client, "to-cli", "1"),
            (self.proxy, "to-pxy", "2"),
            (self.origin, "to-org", "3"),
        ):
            link_to_router(self.router, ns, ifname, f"10.200.{net}", f"fd00:200:{net}")
        enable_forwarding(self.router)

        assert self.origin.v4 and self.origin.v6
        self.pki = make_pki(
            self.tmp / "pki", [HOSTNAME, ALT_HOSTNAME], [self.origin.v4, self.origin.v6]
        )
        self._origins = Origins(self.origin, self.pki, self.tmp / "origin")
        stack.callback(self._origins.stop)
        self._origins.start()

        if self._want_squid:
            self._squid = self.new_squid(auth="basic", name="squid")
            stack.callback(self._squid.stop)
            self._squid.start()
        if self._want_dante:
            creds = ProxyCredentials.generate(lab_user_name(self.tag), self.tmp)
            self.dante_user = SystemUser(creds)
            stack.callback(self.dante_user.remove)
            self.dante_user.create()
            self._dante = DanteProxy(self.proxy, self.tmp / "dante", creds)
            stack.callback(self._dante.stop)
            self._dante.start()

    def _start_guardian(self) -> None:
        # A separate process in its own session that sweeps this lab if we die without
        # running our teardown (SIGKILL, os._exit from a timeout). Registered first, so its
        # pipe closes last, after the normal teardown has removed everything.
        argv = [sys.executable, "-I", str(GUARDIAN_SCRIPT), "--tag", self.tag]
        if not self.keep_files:
            argv += ["--tmp", str(self.tmp)]
        guardian = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def stop() -> None:
            assert guardian.stdin is not None
            guardian.stdin.close()
            try:
                guardian.wait(timeout=30)
            except subprocess.TimeoutExpired:
                guardian.kill()
                guardian.wait()

        self._stack.callback(stop)

    def _remove_tmp(self) -> None:
        if not self.keep_files and self.tmp != Path():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def hosts_text(self) -> str:
        """/etc/hosts lines every lab namespace (and Squid's hosts_file) resolves from."""
        return (
            f"10.200.3.2 {HOSTNAME} {ALT_HOSTNAME}\n"
            f"fd00:200:3::2 {HOSTNAME} {ALT_HOSTNAME}\n"
            f"10.200.2.2 {PROXY_HOSTNAME}\n"
            f"fd00:200:2::2 {PROXY_HOSTNAME}\n"
        )

    # building blocks for tests -------------------------------------------------------------

    def new_squid(
        self,
        *,
        port: int = 3128,
        auth: str | SquidAuth = "basic",
        extra_config: str = "",
        addresses: Sequence[str] | None = None,
        name: str | None = None,
    ) -> SquidProxy:
        """An unstarted Squid in the proxy namespace with its own dir and fresh credentials.

        `auth` is "basic", "none" or a SquidAuth. Use as `with lab.new_squid(...).start():`
        (or through the `squid_factory` fixture). Two instances need distinct ports.
        """
        workdir = self.tmp / (name or f"squid-{port}-{secrets.token_hex(3)}")
        workdir.mkdir(parents=True)
        if auth == "basic":
            user = f"lab-{secrets.token_hex(3)}"
            auth = BasicAuth(ProxyCredentials.generate(user, self.tmp))
        elif auth == "none":
            auth = NoAuth()
        assert isinstance(auth, SquidAuth), f"unknown Squid auth {auth!r}"
        return SquidProxy(
            self.proxy,
            workdir,
            port=port,
            auth=auth,
            hosts=self.hosts_text(),
            addresses=addresses,
            extra_config=extra_config,
        )

    def redirect(
        self,
        relay_port: int,
        redirect_ports: Iterable[int] = (80, 443),
        exclude: Iterable[str] | None = None,
    ) -> Redirect:
        """Apply the lab's nft redirect in the client namespace (proxy addresses excluded)."""
        if exclude is None:
            exclude = [a for a in (self.proxy.v4, self.proxy.v6) if a]
        return apply_redirect(self.client, relay_port, redirect_ports, exclude)

    def curl(
        self,
        url: str,
        *,
        via: SquidProxy | DanteProxy | None = None,
        family: int = 4,
        credentials: ProxyCredentials | None | bool = True,
        ns: Namespace | None = None,
        resolve: Sequence[str] = (),
        data: bytes | None = None,
        max_time: float = 30.0,
        options: Sequence[str] = (),
    ) -> CurlResult:
        """curl from the client namespace, through `via` (explicit proxy) or directly.

        `credentials=True` uses the proxy's own, False/None none, or pass other ones.
        The lab CA is trusted; `resolve` adds `--resolve` entries.
        """
        creds: ProxyCredentials | None = None
        if via is not None and credentials is True:
            creds = via.credentials
        elif isinstance(credentials, ProxyCredentials):
            creds = credentials
        return run_curl(
            ns or self.client,
            url,
            workdir=self.tmp,
            proxy=via.proxy_url(family) if via is not None else None,
            credentials=creds,
            cacert=self.ca_path,
            resolve=resolve,
            data=data,
            max_time=max_time,
            options=options,
        )


def _closer(ns: Namespace) -> Callable[..., None]:
    """An ExitStack callback closing `ns` whatever exception is passing through."""

    def close(*exc: object) -> None:
        ns.close()

    return close
