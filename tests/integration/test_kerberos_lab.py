"""Kerberos (Negotiate) end to end: a real MIT KDC (tests/lab/kdc.py) in the proxy namespace,
Squid checking tickets with negotiate_kerberos_auth, `kinit` in the client namespace into a
ticket cache file, and `tray-proxy run` (RelayProcess) with KRB5CCNAME / KRB5_CONFIG pointing
at it. curl has no proxy settings; Squid's access log names the Kerberos principal.

The relay's upstream is the proxy's host name (proxy.lab.test), not its address: the service
ticket is for HTTP/proxy.lab.test. Needs the `gssapi` and `krb5` modules
(tray-proxy[kerberos]) and the Debian packages krb5-kdc krb5-admin-server krb5-user; a missing
one fails the test, naming it.

Must not import tray_proxy (the relay runs as a separate process) or PySide6.
"""

from __future__ import annotations

import importlib.util
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.relay import RelayProcess, UpstreamSpec
from tests.integration.test_auth_lab import _check_ok, _connects, _get, _secrets_absent
from tests.lab.creds import ProxyCredentials
from tests.lab.environment import PROXY_HOSTNAME, Lab
from tests.lab.kdc import LabKdc
from tests.lab.netns import LabError
from tests.lab.squid import KerberosAuth, NtlmFakeAuth, SquidProxy

pytestmark = pytest.mark.lab

SquidFactory = Callable[..., SquidProxy]
SERVICE = f"HTTP/{PROXY_HOSTNAME}"


@pytest.fixture(scope="module")
def kdc(lab: Lab) -> Iterator[LabKdc]:
    """The realm LAB.TEST served from the proxy namespace, with Squid's HTTP/ key."""
    missing = [m for m in ("gssapi", "krb5") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"the relay needs {' and '.join(missing)} for Kerberos: pip install -e '.[test]' "
            "(they build from source: apt-get install libkrb5-dev gcc python3-dev)",
            pytrace=False,
        )
    server = LabKdc(lab.proxy, lab.tmp / f"kdc-{secrets.token_hex(3)}")
    try:
        server.start()
    except LabError as exc:
        pytest.fail(f"the lab KDC could not start: {exc}", pytrace=False)
    try:
        server.add_service(SERVICE, server.workdir / "http.keytab")
        yield server
    finally:
        server.stop()


@pytest.fixture
def ccache(kdc: LabKdc, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ticket cache path the relay will use (RelayProcess copies this process's env);
    empty until a test runs kinit into it. Paths only: no secret goes into the env."""
    path = kdc.workdir / f"ccache-{secrets.token_hex(4)}"
    monkeypatch.setenv("KRB5_CONFIG", str(kdc.krb5_conf))
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{path}")
    return path


def _kerberos_squid(
    kdc: LabKdc, squid_factory: SquidFactory, port: int, fallback: NtlmFakeAuth | None = None
) -> SquidProxy:
    auth = KerberosAuth(
        kdc.workdir / "http.keytab", kdc.principal(SERVICE), kdc.krb5_conf, fallback=fallback
    )
    return squid_factory(port=port, auth=auth)


def _ntlm_user() -> ProxyCredentials:
    return ProxyCredentials("LAB\\alice", "ntlm-" + secrets.token_hex(6), Path())


@pytest.mark.parametrize("password_stored", [False, True], ids=["no-password", "password"])
def test_negotiate_uses_the_ticket_cache(
    lab: Lab, kdc: LabKdc, ccache: Path, squid_factory: SquidFactory, password_stored: bool
) -> None:
    """With a ticket, Negotiate is Kerberos from the cache; a stored password (kept for
    NTLM, which Squid offers too) is not used for it."""
    user = kdc.add_user(f"krb-{secrets.token_hex(3)}")
    kdc.kinit(lab.client, user, ccache)
    ntlm = _ntlm_user()
    squid = _kerberos_squid(
        kdc, squid_factory, 3150 + password_stored, NtlmFakeAuth(ntlm) if password_stored else None
    )
    spec = UpstreamSpec(
        name="kerberos",
        url=f"http://{PROXY_HOSTNAME}:{squid.port}",
        username=ntlm.username if password_stored else user.username,
        password=ntlm.password if password_stored else None,
    )
    t0 = time.time()
    with RelayProcess(lab, spec) as relay:
        with relay.redirect():
            _check_ok(lab)
            _check_ok(lab)
        if password_stored:
            _secrets_absent(relay, ntlm.username, ntlm.password)
    entries = _connects(squid, t0)
    ok = [e for e in entries if e.status == 200]
    assert len(ok) == 2, entries
    assert all(e.user == kdc.principal(user.username) for e in ok), entries
    assert not [e for e in entries if e.status == 407 and e.user != "-"], entries


def test_without_a_ticket_negotiate_falls_back_to_ntlm(
    lab: Lab, kdc: LabKdc, ccache: Path, squid_factory: SquidFactory
) -> None:
    """Squid offers Negotiate then NTLM; the cache is empty: plain NTLM with the password."""
    assert not ccache.exists()
    ntlm = _ntlm_user()
    squid = _kerberos_squid(kdc, squid_factory, 3152, NtlmFakeAuth(ntlm))
    spec = UpstreamSpec(
        name="kerberos",
        url=f"http://{PROXY_HOSTNAME}:{squid.port}",
        username=ntlm.username,
        password=ntlm.password,
    )
    t0 = time.time()
    with RelayProcess(lab, spec) as relay:
        with relay.redirect():
            _check_ok(lab)
        _secrets_absent(relay, ntlm.username, ntlm.password)
    ok = [e for e in _connects(squid, t0) if e.status == 200]
    # ntlm_fake_auth logs the NTLM domain\\user shortened by Squid 5.7 ("L\\a").
    assert len(ok) == 1 and ok[0].user.startswith("L\\"), ok


def test_without_a_ticket_or_password_the_error_says_kinit(
    lab: Lab, kdc: LabKdc, ccache: Path, squid_factory: SquidFactory
) -> None:
    assert not ccache.exists()
    squid = _kerberos_squid(kdc, squid_factory, 3153)
    spec = UpstreamSpec(name="kerberos", url=f"http://{PROXY_HOSTNAME}:{squid.port}")
    t0 = time.time()
    with RelayProcess(lab, spec) as relay, relay.redirect():
        result, _sha = _get(lab, max_time=20)
        assert result.returncode != 0 and result.body == b"", result
        relay.wait_for_line("no Kerberos ticket: run kinit")
    assert all(e.status == 407 and e.user == "-" for e in _connects(squid, t0))
