"""The machine-side checks on real files and programs: nft where the helper looks for it,
the kernel's NAT redirect in a throwaway namespace (as root and as a normal user), the
installed helper's ownership, modes and polkit policy, and the way to start it as root.

Paths are parameters of DoctorEnv with the real defaults; each test points them at files it
makes in its own temp dir. Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.doctor.support import REPO, clean_env, one, parse_report, run_doctor
from tray_proxy.doctor import checks_system
from tray_proxy.doctor.context import DoctorEnv
from tray_proxy.doctor.model import CheckResult, CheckStatus
from tray_proxy.firewall.client import SOURCE_HELPER_PATH

POLICY = REPO / "installer/polkit/org.trayproxy.redirect.policy"
NOBODY = pwd.getpwnam("nobody")


def run(check: object, env: DoctorEnv) -> CheckResult:
    result = asyncio.run(check(env))  # type: ignore[operator]
    assert isinstance(result, CheckResult)
    return result


def env_for(tmp_path: Path, **fields: object) -> DoctorEnv:
    return DoctorEnv(config_path=tmp_path / "config.toml", **fields)  # type: ignore[arg-type]


def test_nft_missing(tmp_path: Path) -> None:
    env = env_for(tmp_path, nft_candidates=(str(tmp_path / "sbin/nft"),))
    result = run(checks_system.check_nft, env)
    assert result.status is CheckStatus.FAIL
    assert "not installed" in result.summary and str(tmp_path / "sbin/nft") in result.summary
    assert result.fix == "install nftables: `sudo apt-get install nftables`"
    nat = run(checks_system.check_nat_redirect, env)
    assert nat.status is CheckStatus.SKIP


def test_nft_present() -> None:
    env = DoctorEnv(config_path=Path("/nonexistent"))
    result = run(checks_system.check_nft, env)
    assert result.status is CheckStatus.OK, result
    assert "nftables v" in result.summary


def test_nft_that_does_not_run(tmp_path: Path) -> None:
    broken = tmp_path / "nft"
    broken.write_text("#!/bin/sh\necho 'nft: broken library' >&2\nexit 127\n")
    broken.chmod(0o755)
    result = run(checks_system.check_nft, env_for(tmp_path, nft_candidates=(str(broken),)))
    assert result.status is CheckStatus.FAIL
    assert "broken library" in result.summary


@pytest.mark.usefixtures("needs_root")
def test_nat_redirect_as_root_in_a_throwaway_namespace(tmp_path: Path) -> None:
    before = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    result = run(checks_system.check_nat_redirect, env_for(tmp_path))
    assert result.status is CheckStatus.OK, result
    assert "throwaway network namespace" in result.summary
    after = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert "tray_proxy_doctor" not in after.stdout
    assert after.stdout == before.stdout or "tray_proxy_doctor" not in before.stdout


@pytest.mark.usefixtures("needs_root")
def test_nat_redirect_as_a_normal_user(tmp_path: Path) -> None:
    """A normal user tests in a user namespace of its own (Debian allows them); the real CLI
    runs as `nobody`, every check, none of which may crash for a normal user."""
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    tmp_path.chmod(0o755)
    env = clean_env(HOME=str(home), XDG_RUNTIME_DIR=str(home), XDG_STATE_HOME=str(home))
    result = run_doctor(
        ["--json", "--config", str(home / "config.toml"), "--target", "127.0.0.1:9"],
        env,
        prefix=[
            "setpriv",
            f"--reuid={NOBODY.pw_uid}",
            f"--regid={NOBODY.pw_gid}",
            "--clear-groups",
            "--",
        ],  # fmt: skip
    )
    doc = parse_report(result)
    nat = one(doc, "nat-redirect")
    assert nat["status"] in ("ok", "warn"), nat
    if nat["status"] == "warn":  # user namespaces switched off on this kernel
        assert "without root" in nat["summary"]
    else:
        assert "throwaway network namespace" in nat["summary"]
    privilege = one(doc, "privilege")
    assert privilege["status"] != "ok" or "polkit" in privilege["summary"]
    # Every other check answers for a normal user too.
    for check in doc["checks"]:
        assert not check["summary"].startswith("the check itself failed"), check


# --------------------------------------------------------------------------- the helper


def install_helper(tmp_path: Path, policy_path: str | None = None) -> DoctorEnv:
    """A helper 'installed' the way install.sh does it, under tmp_path, with its policy."""
    libexec = tmp_path / "libexec" / "tray-proxy"
    libexec.mkdir(parents=True)
    for directory in (tmp_path, tmp_path / "libexec", libexec):
        directory.chmod(0o755)
    helper = libexec / "tray-proxy-helper"
    shutil.copyfile(SOURCE_HELPER_PATH, helper)
    helper.chmod(0o755)
    policy = tmp_path / "org.trayproxy.redirect.policy"
    text = POLICY.read_text(encoding="utf-8").replace(
        "/usr/libexec/tray-proxy/tray-proxy-helper", policy_path or str(helper)
    )
    policy.write_text(text, encoding="utf-8")
    return env_for(tmp_path, helper_path=helper, polkit_policy=policy)


def test_helper_missing(tmp_path: Path) -> None:
    result = run(checks_system.check_helper, env_for(tmp_path, helper_path=tmp_path / "absent"))
    assert result.status is CheckStatus.FAIL
    assert "not installed" in result.summary
    assert "installer/install.sh" in (result.fix or "")


@pytest.mark.usefixtures("needs_root")
def test_helper_installed_right(tmp_path: Path) -> None:
    result = run(checks_system.check_helper, install_helper(tmp_path))
    assert result.status is CheckStatus.OK, result
    assert "root-owned" in result.summary


@pytest.mark.usefixtures("needs_root")
def test_helper_writable_by_others_or_not_root_owned(tmp_path: Path) -> None:
    env = install_helper(tmp_path)
    env.helper_path.chmod(0o757)
    result = run(checks_system.check_helper, env)
    assert result.status is CheckStatus.FAIL
    assert "writable by group or others" in result.summary
    env.helper_path.chmod(0o755)
    os.chown(env.helper_path.parent, NOBODY.pw_uid, NOBODY.pw_gid)
    result = run(checks_system.check_helper, env)
    assert result.status is CheckStatus.FAIL
    assert f"owned by uid {NOBODY.pw_uid}" in result.summary


@pytest.mark.usefixtures("needs_root")
def test_helper_policy_mismatch_missing_and_old_version(tmp_path: Path) -> None:
    env = install_helper(tmp_path, policy_path="/opt/elsewhere/helper")
    result = run(checks_system.check_helper, env)
    assert result.status is CheckStatus.FAIL
    assert "runs /opt/elsewhere/helper" in result.summary

    env.polkit_policy.unlink()
    result = run(checks_system.check_helper, env)
    assert result.status is CheckStatus.WARN
    assert "polkit action is not installed" in result.summary

    install_helper(tmp_path / "again")
    env = install_helper(tmp_path / "old")
    with env.helper_path.open("a") as handle:
        handle.write("# an older version\n")
    result = run(checks_system.check_helper, env)
    assert result.status is CheckStatus.WARN
    assert "installed by another version" in result.summary


# --------------------------------------------------------------------------- privilege


def test_privilege_as_root() -> None:
    result = run(checks_system.check_privilege, DoctorEnv(Path("/x"), euid=0))
    assert result.status is CheckStatus.OK


def test_privilege_without_polkit_or_sudo(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = env_for(tmp_path, euid=NOBODY.pw_uid, uid=NOBODY.pw_uid, environ={"PATH": str(empty)})
    result = run(checks_system.check_privilege, env)
    assert result.status is CheckStatus.FAIL
    assert "pkexec is not installed and sudo is not installed" in result.summary


def test_privilege_sudo_without_the_dropin(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sudo = shutil.which("sudo")
    assert sudo is not None, "sudo is in tests/run-all.sh's APT_PACKAGES"
    (bindir / "sudo").symlink_to(sudo)
    env = env_for(
        tmp_path,
        euid=NOBODY.pw_uid,
        uid=NOBODY.pw_uid,
        environ={"PATH": str(bindir)},
        sudoers_dropin=tmp_path / "sudoers.d/tray-proxy",
    )
    result = run(checks_system.check_privilege, env)
    assert result.status is CheckStatus.FAIL
    assert "sudo fallback is not installed" in result.summary
    assert "installer/install.sh" in (result.fix or "")


@pytest.mark.usefixtures("needs_root")
def test_privilege_sudoers_dropin_owned_by_someone_else(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sudo = shutil.which("sudo")
    assert sudo is not None
    (bindir / "sudo").symlink_to(sudo)
    dropin = tmp_path / "tray-proxy"
    dropin.write_text((REPO / "installer/sudoers/tray-proxy").read_text())
    dropin.chmod(0o440)
    os.chown(dropin, NOBODY.pw_uid, NOBODY.pw_gid)
    env = env_for(
        tmp_path,
        euid=NOBODY.pw_uid,
        uid=NOBODY.pw_uid,
        environ={"PATH": str(bindir)},
        sudoers_dropin=dropin,
    )
    result = run(checks_system.check_privilege, env)
    assert result.status is CheckStatus.FAIL
    assert f"{dropin} is owned by uid {NOBODY.pw_uid}, not root" in result.summary
    assert result.fix == f"`sudo chown root:root {dropin} && sudo chmod 0440 {dropin}`"


@pytest.mark.usefixtures("needs_root")
def test_nat_redirect_refused_by_the_kernel(tmp_path: Path) -> None:
    """A kernel without nft's NAT support cannot be made here (the modules are in use), so
    `nft` is a script answering the way nft does on such a kernel; the check's namespace,
    probe script and reporting are the real ones."""
    nft = tmp_path / "nft"
    nft.write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        "echo 'Error: Could not process rule: No such file or directory' >&2\nexit 1\n"
    )
    nft.chmod(0o755)
    result = run(checks_system.check_nat_redirect, env_for(tmp_path, nft_candidates=(str(nft),)))
    assert result.status is CheckStatus.FAIL
    assert result.summary == "the kernel refused a NAT redirect rule: the redirect cannot work"
    assert "modprobe nft_chain_nat" in (result.fix or "")
    assert result.details == ("apply: Error: Could not process rule: No such file or directory",)
