"""Proxy authentication end to end: `tray-proxy run` (RelayProcess) in the lab's client
namespace, the nft redirect, curl with no proxy settings, and real Squid instances checking
Basic (basic_ncsa_auth), Digest (digest_file_auth) and NTLM (ntlm_fake_auth).

Squid cannot offer Negotiate without a KDC, so "offers Negotiate, NTLM and Basic; Negotiate
is impossible here; NTLM is chosen" is covered by tests/relay/test_auth_engine.py against a
stub whose NTLM is checked by pyspnego. Here Squid offers NTLM and Basic and the relay must
pick NTLM.

Must not import tray_proxy (the relay runs as a separate process) or PySide6.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.relay import RelayProcess, UpstreamSpec
from tests.lab.creds import ProxyCredentials
from tests.lab.curl import CurlResult
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME
from tests.lab.squid import AccessLogEntry, BasicAuth, DigestAuth, NtlmFakeAuth, SquidProxy

pytestmark = pytest.mark.lab

SquidFactory = Callable[..., SquidProxy]


def _get(
    lab: Lab, size: int = 20_000, max_time: float = 30.0, verbose: bool = False
) -> tuple[CurlResult, str]:
    """curl https://origin.lab.test/bytes/... through the redirect (no proxy settings)."""
    seed = secrets.token_hex(6)
    url = lab.origins.url("https", lab.origins.bytes_path(size, seed))
    resolve = [f"{HOSTNAME}:443:{lab.origins.v4}"]
    options = ["verbose"] if verbose else []
    result = lab.curl(url, resolve=resolve, max_time=max_time, options=options)
    return result, lab.origins.expected_sha256(size, seed)


def _check_ok(lab: Lab, size: int = 20_000) -> None:
    result, sha = _get(lab, size)
    assert result.returncode == 0, result
    assert result.http_code == 200 and result.connect_code == 0, result
    assert result.sha256 == sha


def _connects(squid: SquidProxy, t0: float) -> list[AccessLogEntry]:
    return [e for e in squid.entries() if e.method == "CONNECT" and e.time >= t0 - 0.002]


def _new_user(lab: Lab) -> ProxyCredentials:
    return ProxyCredentials.generate(f"lab-{secrets.token_hex(3)}", lab.tmp)


def _secrets_absent(relay: RelayProcess, username: str, password: str) -> None:
    log = "\n".join(relay.lines)
    for form in (password, base64.b64encode(f"{username}:{password}".encode()).decode()):
        assert form not in log, "a password reached the relay's log"


def test_basic(lab: Lab, squid_factory: SquidFactory) -> None:
    creds = _new_user(lab)
    squid = squid_factory(port=3140, auth=BasicAuth(creds))
    t0 = time.time()
    with RelayProcess(lab, UpstreamSpec.for_squid(squid, name="basic")) as relay:
        with relay.redirect():
            _check_ok(lab)
            _check_ok(lab)
        _secrets_absent(relay, creds.username, creds.password)
    entries = _connects(squid, t0)
    # The first tunnel asks (407 with no user), every later one is sent Basic at once.
    ok = [e for e in entries if e.status == 200 and e.user == creds.username]
    asked = [e for e in entries if e.status == 407]
    assert len(ok) == 2 and len(asked) == 1 and asked[0].user == "-", entries


def test_digest(lab: Lab, squid_factory: SquidFactory) -> None:
    creds = _new_user(lab)
    squid = squid_factory(port=3141, auth=DigestAuth(creds))
    t0 = time.time()
    with RelayProcess(lab, UpstreamSpec.for_squid(squid, name="digest")) as relay:
        with relay.redirect():
            for _ in range(3):
                _check_ok(lab)
        _secrets_absent(relay, creds.username, creds.password)
    entries = _connects(squid, t0)
    ok = [e for e in entries if e.status == 200 and e.user == creds.username]
    failed = [e for e in entries if e.status == 407 and e.user == creds.username]
    assert len(ok) == 3 and not failed, entries


def test_digest_wrong_password_is_one_failure(lab: Lab, squid_factory: SquidFactory) -> None:
    creds = _new_user(lab)
    squid = squid_factory(port=3142, auth=DigestAuth(creds))
    spec = UpstreamSpec.for_squid(squid, name="digestbad", password=creds.password + "-Wr0ng")
    t0 = time.time()
    with RelayProcess(lab, spec) as relay, relay.redirect():
        for _ in range(3):
            result, _sha = _get(lab, max_time=20)
            assert result.returncode != 0 and result.body == b"", result
        relay.wait_for_count("upstream-auth-failed", 3)
        assert relay.find_lines("rejected the credentials of " + creds.username)
    failed = [e for e in _connects(squid, t0) if e.status == 407 and e.user == creds.username]
    assert len(failed) == 1, failed


def test_ntlm_chosen_over_basic(lab: Lab, squid_factory: SquidFactory) -> None:
    """Squid offers NTLM then Basic; the relay answers NTLM on one kept-alive connection."""
    basic = BasicAuth(_new_user(lab))
    # Not the Basic password: only NTLM (any password) can let these credentials in.
    ntlm_user = ProxyCredentials("LAB\\alice", "ntlm-" + secrets.token_hex(6), Path())
    squid = squid_factory(port=3143, auth=NtlmFakeAuth(ntlm_user, basic=basic))
    spec = UpstreamSpec(
        name="ntlm",
        url=f"http://{squid.host}:{squid.port}",
        username=ntlm_user.username,
        password=ntlm_user.password,
    )
    t0 = time.time()
    with RelayProcess(lab, spec) as relay:
        with relay.redirect():
            _check_ok(lab)
            _check_ok(lab)
        _secrets_absent(relay, ntlm_user.username, ntlm_user.password)
    entries = _connects(squid, t0)
    ok = [e for e in entries if e.status == 200]
    assert len(ok) == 2, entries
    # ntlm_fake_auth logs the NTLM domain\\user (shortened to "L\\a" by Squid 5.7's helper);
    # Basic would have logged "LAB\\alice" and failed on this password anyway.
    assert all(e.user.startswith("L\\") for e in ok), entries
    assert not [e for e in entries if e.status == 407 and e.user != "-"], entries


def test_407_storm_fifty_parallel_curls_cost_one_failed_login(
    lab: Lab, squid_factory: SquidFactory
) -> None:
    creds = _new_user(lab)
    squid = squid_factory(port=3144, auth=BasicAuth(creds))
    wrong = creds.password + "-Wr0ng"
    spec = UpstreamSpec.for_squid(squid, name="storm", password=wrong)
    timeout = 10.0
    t0 = time.time()
    with (
        RelayProcess(lab, spec, settings={"handshake_timeout": timeout}) as relay,
        relay.redirect(),
    ):
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(lambda _i: _get(lab, max_time=30, verbose=True)[0], range(50)))
        took = time.monotonic() - started
        assert all(r.returncode != 0 and r.body == b"" for r in results), results
        assert took < timeout, f"50 curls took {took:.1f}s to fail on a refused password"
        try:
            lines = relay.wait_for_count("upstream-auth-failed", 50, timeout=20)
        except AssertionError as exc:
            # Seen once in CI (49 of 50): say how every connection ended, and what curl saw.
            reasons = collections.Counter(
                m[1] for line in relay.lines if (m := re.search(r" via storm: ([a-z-]+)", line))
            )
            raise AssertionError(
                f"{exc}\nclose reasons: {dict(reasons)}; relay lines: {len(relay.lines)}; "
                f"curl exit codes: {collections.Counter(r.returncode for r in results)}; "
                f"connect errors: {collections.Counter(r.connect_error for r in results)}"
            ) from None
        assert relay.find_lines(f"rejected the credentials of {creds.username}")
        assert any("not tried again" in line for line in lines)
        _secrets_absent(relay, creds.username, wrong)
    failed = [e for e in _connects(squid, t0) if e.status == 407 and e.user == creds.username]
    assert len(failed) <= 1, f"{len(failed)} failed logins for one wrong password"
    assert len(failed) == 1, "the wrong password never reached Squid"
