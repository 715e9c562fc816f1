"""No proxy password leaks: `tray-proxy run` with real traffic, then a sweep of what it left.

The password reaches the relay through $CREDENTIALS_DIRECTORY (tests/integration/relay.py).
With the right password (Squid and Dante), a wrong one (a 407 and a SOCKS5 refusal), and a
relay killed with SIGABRT under faulthandler, the test looks for the password, base64 of
"user:password" (the Proxy-Authorization value) and base64 of the password alone in: every
log line, every file the run wrote (except the credentials file itself), the config file,
and /proc/PID/cmdline and /proc/PID/environ of the relay and every process below it.

Must not import tray_proxy (the relay runs as a separate process) or PySide6.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from tests.integration.relay import RelayProcess, UpstreamSpec
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME

pytestmark = pytest.mark.lab


def _forms(username: str, password: str) -> dict[str, bytes]:
    def b64(text: str) -> bytes:
        return base64.b64encode(text.encode())

    return {
        "password": password.encode(),
        "base64(user:password)": b64(f"{username}:{password}"),
        "base64(password)": b64(password),
    }


def _descendants(pid: int) -> Iterator[int]:
    yield pid
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = children.read_text().split()
        except OSError:
            continue
        for kid in kids:
            yield from _descendants(int(kid))


def _process_views(pid: int) -> dict[str, bytes]:
    """cmdline and environ of the relay and everything it started, read while it runs."""
    views: dict[str, bytes] = {}
    for each in _descendants(pid):
        for part in ("cmdline", "environ"):
            try:
                views[f"/proc/{each}/{part}"] = Path(f"/proc/{each}/{part}").read_bytes()
            except OSError:
                continue
    assert f"/proc/{pid}/environ" in views, "could not read the relay's own environ"
    return views


def _run_files(relay: RelayProcess) -> dict[str, bytes]:
    files = {
        str(p): p.read_bytes()
        for p in relay.workdir.rglob("*")
        if p.is_file() and relay.credentials_dir not in p.parents
    }
    assert str(relay.config_path) in files and str(relay.workdir / "relay.stderr") in files
    return files


def _sweep(places: dict[str, bytes], secrets_: dict[str, bytes]) -> list[str]:
    return [
        f"{form} found in {where}"
        for where, data in places.items()
        for form, needle in secrets_.items()
        if needle in data
    ]


def _traffic(lab: Lab, relay: RelayProcess) -> int:
    """One HTTPS and one HTTP GET through the redirect; returns how many succeeded."""
    ok = 0
    with relay.redirect():
        for scheme, port in (("https", 443), ("http", 80)):
            seed = secrets.token_hex(6)
            url = lab.origins.url(scheme, lab.origins.bytes_path(2000, seed))
            result = lab.curl(url, resolve=[f"{HOSTNAME}:{port}:{lab.origins.v4}"], max_time=20)
            ok += result.returncode == 0 and result.sha256 == lab.origins.expected_sha256(
                2000, seed
            )
    return ok


@pytest.mark.parametrize(
    ("kind", "wrong"),
    [("squid", False), ("squid", True), ("dante", False), ("dante", True)],
    ids=["squid-right", "squid-wrong", "dante-right", "dante-wrong"],
)
def test_password_is_nowhere_after_a_run(lab: Lab, kind: str, wrong: bool) -> None:
    creds = lab.squid.credentials if kind == "squid" else lab.dante.credentials
    assert creds is not None
    password = creds.password + "-Wr0ng" if wrong else creds.password
    if kind == "squid":
        spec = UpstreamSpec.for_squid(lab.squid, password=password)
    else:
        spec = UpstreamSpec.for_dante(lab.dante, password=password)
    with RelayProcess(lab, spec) as relay:
        views = _process_views(relay.pid)
        succeeded = _traffic(lab, relay)
        views.update({f"{k} (after traffic)": v for k, v in _process_views(relay.pid).items()})
        if wrong:
            relay.wait_for_line("rejected the credentials", timeout=10)
    assert succeeded == (0 if wrong else 2), "the traffic did not go as the password implies"
    places = {**views, **_run_files(relay), "relay log": "\n".join(relay.lines).encode()}
    needles = _forms(creds.username, password)
    if wrong:
        needles.update({f"right {k}": v for k, v in _forms(creds.username, creds.password).items()})
    # The sweep does find the password where it belongs, so finding nothing elsewhere counts.
    assert _sweep({"credentials": (relay.credentials_dir / spec.name).read_bytes()}, needles)
    assert _sweep(places, needles) == []


def test_crash_dump_carries_no_password(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = lab.squid.credentials
    assert creds is not None
    # RelayProcess passes our environment on: the relay dumps its stacks on a fatal signal.
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    relay = RelayProcess(lab, UpstreamSpec.for_squid(lab.squid, name="crash"))
    relay.__enter__()
    try:
        assert _traffic(lab, relay) == 2
        os.kill(relay.pid, signal.SIGABRT)
        deadline = time.monotonic() + 10
        while relay.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not relay.alive(), "the relay survived SIGABRT"
    finally:
        problem = relay.stop()
    assert problem is not None and str(-signal.SIGABRT) in problem, problem
    log = "\n".join(relay.lines)
    assert "Fatal Python error: Aborted" in log, "no faulthandler output to sweep"
    places = {**_run_files(relay), "crash output": log.encode()}
    assert _sweep(places, _forms(creds.username, creds.password)) == []


@pytest.mark.parametrize("wrong", [False, True], ids=["right", "wrong"])
def test_credentials_test_command_probes_and_stays_quiet(lab: Lab, wrong: bool) -> None:
    """`tray-proxy credentials test NAME --target ...`: a real probe through Squid, with the
    password from $CREDENTIALS_DIRECTORY; exit 0 and words on OK, 1 on a refused password."""
    creds = lab.squid.credentials
    assert creds is not None
    password = creds.password + "-Wr0ng" if wrong else creds.password
    spec = UpstreamSpec.for_squid(lab.squid, name="probe", password=password)
    workdir = lab.tmp / f"probe-{secrets.token_hex(4)}"
    (workdir / "credentials").mkdir(mode=0o700, parents=True)
    (workdir / "credentials" / "probe").write_text(password)
    config = workdir / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {"upstream": [{"name": "probe", "url": spec.url, "username": creds.username}]}
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["CREDENTIALS_DIRECTORY"] = str(workdir / "credentials")
    argv = [
        sys.executable, "-m", "tray_proxy.cli_credentials", "test", "probe",
        "--config", str(config), "--target", f"{lab.origins.v4}:443", "--timeout", "10",
    ]  # fmt: skip
    proc = lab.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=30)
        views = {f"/proc/{proc.pid}/cmdline": " ".join(argv).encode()}
    finally:
        proc.stop(grace=2.0)
        lab.client.forget(proc)
    assert proc.returncode == (1 if wrong else 0), (out, err[-2000:])
    assert b"Traceback" not in err
    words = "rejected the password for" if wrong else ": OK in"
    assert words in out.decode(), out
    places = {"stdout": out, "stderr": err, "config": config.read_bytes(), **views}
    assert _sweep(places, _forms(creds.username, password)) == []
