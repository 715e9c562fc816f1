"""The doctor against the real lab (tests/lab): the upstream probe through the lab's Squid
(Debian's stock squid.conf with Basic auth) with the right, a wrong and no password; what a
TLS client sees through it (the lab origin's certificate comes from the lab's own CA, which
the system store does not hold: to a client that is exactly what a TLS-inspecting proxy's
corporate CA looks like, so the check must name it); a running `tray-proxy run` answering
the redirect and relay checks over its control socket; and a stale `table inet tray_proxy`
left without a running instance, in a namespace of the test's own.

The doctor runs as the real CLI in the lab's client namespace; passwords reach it only in a
0600 file under $CREDENTIALS_DIRECTORY. Must not import PySide6.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.doctor.support import clean_env, one, parse_report, run_doctor, write_config
from tests.integration.relay import RelayProcess, UpstreamSpec
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME

pytestmark = pytest.mark.lab
TARGET = f"{HOSTNAME}:443"


def squid_setup(lab: Lab, tmp_path: Path, password: str | None) -> tuple[Path, dict[str, str]]:
    """A settings file naming the lab's Squid, and an environment whose
    $CREDENTIALS_DIRECTORY holds `password` (none at all when None)."""
    creds = lab.squid.credentials
    assert creds is not None
    config = write_config(
        tmp_path / "config.toml",
        [
            {
                "name": "squid",
                "url": f"http://{lab.squid.host}:{lab.squid.port}",
                "username": creds.username,
            }
        ],  # fmt: skip
    )
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = clean_env(XDG_RUNTIME_DIR=str(runtime))
    if password is not None:
        directory = tmp_path / "credentials"
        directory.mkdir(mode=0o700)
        fd = os.open(directory / "squid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password)
        env["CREDENTIALS_DIRECTORY"] = str(directory)
    return config, env


def doctor_in_client(
    lab: Lab, config: Path, env: Mapping[str, str], *checks: str
) -> tuple[int, dict[str, Any]]:
    args = ["--json", "--config", str(config), "--target", TARGET]
    for check in checks:
        args += ["--check", check]
    result = run_doctor(args, env, prefix=["ip", "netns", "exec", lab.client.name])
    return result.returncode, parse_report(result)


def test_right_password_and_an_untrusted_ca(lab: Lab, tmp_path: Path) -> None:
    creds = lab.squid.credentials
    assert creds is not None
    config, env = squid_setup(lab, tmp_path, creds.password)
    code, doc = doctor_in_client(lab, config, env, "upstream", "tls-inspection")
    upstream = one(doc, "upstream")
    assert upstream["status"] == "ok", upstream
    assert upstream["subject"] == "squid"
    assert f"tunnel to {TARGET} open in" in upstream["summary"]
    assert f"login of {creds.username} accepted" in upstream["summary"]
    assert upstream["details"] == [f"login: {creds.username}, password from $CREDENTIALS_DIRECTORY"]

    tls = one(doc, "tls-inspection")
    assert tls["status"] == "fail", tls
    assert '"CN=tray-proxy lab CA"' in tls["summary"]
    assert (
        "update-ca-certificates" in tls["fix"] and "/usr/local/share/ca-certificates" in tls["fix"]
    )
    assert any("unable to get local issuer certificate" in d for d in tls["details"])
    assert code == 1
    assert creds.password not in json.dumps(doc)
    # Squid saw the doctor's tunnels, with the login.
    lab.squid.wait_for_entry(lambda e: e.uri == TARGET and e.user == creds.username)


def test_ca_trusted_system_wide_passes(lab: Lab, tmp_path: Path) -> None:
    """Trusting the CA (SSL_CERT_FILE stands in for `update-ca-certificates` here: the test
    must not change the machine's store) turns the finding green."""
    creds = lab.squid.credentials
    assert creds is not None
    config, env = squid_setup(lab, tmp_path, creds.password)
    env["SSL_CERT_FILE"] = str(lab.ca_path)
    code, doc = doctor_in_client(lab, config, env, "upstream", "tls-inspection")
    tls = one(doc, "tls-inspection")
    assert tls["status"] == "ok", tls
    assert "CN=tray-proxy lab CA" in tls["summary"]
    assert code == 0


def test_wrong_password(lab: Lab, tmp_path: Path) -> None:
    """A wrong password is sent once per doctor run, not once per check: directory accounts
    lock after a few failures (the TLS check reuses the upstream check's probe)."""
    creds = lab.squid.credentials
    assert creds is not None
    config, env = squid_setup(lab, tmp_path, "wrong-" + creds.password)
    before = len([e for e in lab.squid.entries() if e.uri == TARGET and e.status == 407])
    code, doc = doctor_in_client(lab, config, env, "upstream", "tls-inspection")
    upstream = one(doc, "upstream")
    assert upstream["status"] == "fail", upstream
    assert f"rejected the password for {creds.username} (407)" in upstream["summary"]
    assert upstream["fix"] == "`tray-proxy credentials set squid`"
    assert one(doc, "tls-inspection")["status"] == "skip"
    assert code == 1
    # The login went to Squid exactly once (Squid logs the user name it was sent; the
    # engine's first CONNECT, without a login, is logged as "-").
    lab.squid.wait_for_entry(lambda e: e.uri == TARGET and e.user == creds.username)
    refused = [e for e in lab.squid.entries() if e.uri == TARGET and e.status == 407]
    assert [e.user for e in refused[before:]].count(creds.username) == 1, refused[before:]
    assert creds.password not in json.dumps(doc)  # neither the right one nor the wrong one


def test_no_password_at_all(lab: Lab, tmp_path: Path) -> None:
    config, env = squid_setup(lab, tmp_path, None)
    code, doc = doctor_in_client(lab, config, env, "upstream")
    upstream = one(doc, "upstream")
    assert upstream["status"] == "fail", upstream
    assert "requires a user name and password (407)" in upstream["summary"]
    assert upstream["fix"] == "`tray-proxy credentials set squid`"
    assert code == 1


def test_running_instance_answers_redirect_and_relay(lab: Lab, tmp_path: Path) -> None:
    with RelayProcess(lab, UpstreamSpec.for_squid(lab.squid)) as relay:
        env = clean_env(
            XDG_RUNTIME_DIR=str(relay.workdir / "runtime"),
            CREDENTIALS_DIRECTORY=str(relay.credentials_dir),
        )
        code, doc = doctor_in_client(lab, relay.config_path, env, "redirect", "relay")
    redirect = one(doc, "redirect")
    assert redirect["status"] in ("ok", "warn"), redirect
    assert "`tray-proxy run`" in redirect["summary"]
    relay_result = one(doc, "relay")
    assert relay_result["status"] == "ok", relay_result
    assert f"127.0.0.1:{relay.port}" in relay_result["summary"]
    assert f"[::1]:{relay.port}" in relay_result["summary"]
    assert code == 0


@pytest.mark.usefixtures("needs_root")
@pytest.mark.parametrize("stale", [True, False])
def test_stale_table_without_an_instance(tmp_path: Path, stale: bool) -> None:
    """In a network namespace of the test's own (gone when the command ends), with no
    tray-proxy running: a `table inet tray_proxy` there is stale."""
    unshare = shutil.which("unshare")
    assert unshare is not None
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    config = write_config(tmp_path / "config.toml", [])
    prefix = [unshare, "--net", "--"]
    if stale:
        prefix = [*prefix, "sh", "-c", 'nft add table inet tray_proxy && exec "$@"', "sh"]
    result = run_doctor(
        ["--json", "--config", str(config), "--check", "redirect", "--check", "relay"],
        clean_env(XDG_RUNTIME_DIR=str(runtime)),
        prefix=prefix,
    )
    doc = parse_report(result)
    redirect = one(doc, "redirect")
    relay = one(doc, "relay")
    assert relay["status"] == "skip" and relay["summary"] == "no tray-proxy is running"
    if stale:
        assert redirect["status"] == "fail", redirect
        assert "stale redirect" in redirect["summary"]
        assert redirect["fix"].startswith("remove it: `sudo nft delete table inet tray_proxy`")
        assert result.returncode == 1
    else:
        assert redirect["status"] == "ok", redirect
        assert redirect["summary"] == "off: no tray-proxy running, no table left over"
        assert result.returncode == 0


def test_redirect_on_with_the_real_helper(lab: Lab) -> None:
    """`tray-proxy run` with its redirect on (the root helper's table in the client
    namespace): the doctor, in that namespace, reports it on and the relay listening."""
    from tests.firewall.e2e_support import RedirectedRun, has_our_table

    with RedirectedRun(lab, UpstreamSpec.for_squid(lab.squid)) as run:
        assert has_our_table(lab.client)
        env = clean_env(
            XDG_RUNTIME_DIR=str(run.workdir / "runtime"),
            CREDENTIALS_DIRECTORY=str(run.workdir / "credentials"),
        )
        code, doc = doctor_in_client(
            lab, run.workdir / "config.toml", env, "redirect", "relay", "upstream"
        )
    redirect = one(doc, "redirect")
    assert redirect["status"] == "ok", redirect
    assert redirect["summary"].startswith("on (`tray-proxy run`): Redirecting TCP 80, 443")
    # Whose traffic is captured, in the root helper's words (issue 16 item 1).
    assert any(line.startswith("captured: uid ") for line in redirect["details"]), redirect
    assert one(doc, "relay")["status"] == "ok"
    assert one(doc, "upstream")["status"] == "ok"
    assert code == 0


def test_installed_helper_and_polkit_for_member_and_outsider(lab: Lab, tmp_path: Path) -> None:
    """The installer's files and a real polkitd, in the private mount namespace the pkexec
    end-to-end test builds (tests/firewall/test_e2e_pkexec.py: nothing on the host changes):
    for a member of the group tray-proxy the helper and privilege checks pass; an outsider
    is told that switching on will ask for an admin password, and how to join the group."""
    from tests.firewall.test_e2e_pkexec import polkit_sandbox

    tmp_path.chmod(0o755)
    config = write_config(tmp_path / "config.toml", [])
    config.chmod(0o644)
    argv = [sys.executable, "-m", "tray_proxy", "doctor", "--json", "--config", str(config),
            "--check", "helper", "--check", "privilege"]  # fmt: skip
    found: dict[str, dict[str, Any]] = {}
    with polkit_sandbox(lab) as sandbox:
        for who, uid in (("member", sandbox.member), ("outsider", sandbox.outsider)):
            done = subprocess.run(
                sandbox.as_user(uid, lab.client.name, argv),
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            found[who] = parse_report(done)
    helper = one(found["member"], "helper")
    assert helper["status"] == "ok", helper
    assert "/usr/libexec/tray-proxy/tray-proxy-helper" in helper["summary"]
    privilege = one(found["member"], "privilege")
    assert privilege["status"] == "ok", privilege
    assert "without a password prompt" in privilege["summary"]
    outsider = one(found["outsider"], "privilege")
    assert outsider["status"] == "warn", outsider
    assert f"tptest{sandbox.outsider} is not in the group tray-proxy" in outsider["summary"]
    assert outsider["fix"] == (
        f"`sudo usermod -aG tray-proxy tptest{sandbox.outsider}`, then log out and in again"
    )


def test_password_from_a_real_keyring(lab: Lab, tmp_path: Path) -> None:
    """The password stored with the app's own CredentialStore in a real gnome-keyring (the
    sandbox session runs in the lab's client namespace), read by the doctor without a
    prompt and sent to the real Squid."""
    from tests.integration.keyring_env import KeyringSandbox

    creds = lab.squid.credentials
    assert creds is not None
    (tmp_path / "keyring").mkdir()
    try:
        sandbox = KeyringSandbox(tmp_path / "keyring")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    prefix = ["ip", "netns", "exec", lab.client.name]
    stored = sandbox.store(
        [{"op": "set", "name": "squid", "username": creds.username, "password": creds.password}],
        prefix=prefix,
    )
    assert stored[0]["ok"], stored
    config, _env = squid_setup(lab, tmp_path, None)
    argv = [sys.executable, "-m", "tray_proxy", "doctor", "--json", "--config", str(config),
            "--target", TARGET, "--check", "keyring", "--check", "upstream"]  # fmt: skip
    result = sandbox.run(argv, prefix=prefix)
    doc = parse_report(subprocess.CompletedProcess(argv, result.returncode, result.stdout, ""))
    assert one(doc, "keyring")["status"] == "ok"
    upstream = one(doc, "upstream")
    assert upstream["status"] == "ok", upstream
    assert upstream["details"] == [f"login: {creds.username}, password from the keyring"]
    assert result.returncode == 0
    assert creds.password not in result.stdout + result.stderr
