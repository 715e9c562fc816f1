"""Doctor checks of the machine's side of the redirect: nft, the kernel's NAT, the installed
root helper and the way to start it as root (polkit or the sudo fallback).

Each check is `async def check_x(env) -> CheckResult`, reads only what `env` names, and bounds
every command by `env.command_timeout`. Must not import PySide6 or the relay engine.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import pwd
import stat
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tray_proxy.doctor.context import DoctorEnv, in_thread, run_command
from tray_proxy.doctor.model import CheckResult, CheckStatus
from tray_proxy.firewall.client import POLKIT_ACTION_ID, polkit_running

__all__ = ["check_helper", "check_nat_redirect", "check_nft", "check_privilege"]

NAT_PROBE = Path(__file__).with_name("nat_probe.py")
HELPER_SHEBANG = "#!/usr/bin/python3 -I"
EXEC_PATH_KEY = "org.freedesktop.policykit.exec.path"
_INSTALL = "run the installer again from the tray-proxy checkout: `bash installer/install.sh`"
_APT_NFT = "install nftables: `sudo apt-get install nftables`"


def find_nft(env: DoctorEnv) -> str | None:
    for candidate in env.nft_candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


async def check_nft(env: DoctorEnv) -> CheckResult:
    nft = find_nft(env)
    if nft is None:
        return CheckResult(
            "nft",
            CheckStatus.FAIL,
            "nft (nftables) is not installed: the redirect cannot be switched on "
            f"(looked for {', '.join(env.nft_candidates)})",
            fix=_APT_NFT,
        )
    done = await in_thread(lambda: run_command([nft, "--version"], env.command_timeout), 60)
    if not done.ok:
        why = done.error or (done.stderr.strip() or f"exit code {done.returncode}")
        return CheckResult(
            "nft", CheckStatus.FAIL, f"{nft} does not run: {why}", fix=f"re{_APT_NFT[1:]}"
        )
    return CheckResult("nft", CheckStatus.OK, f"{done.stdout.strip() or 'nft'} at {nft}")


async def check_nat_redirect(env: DoctorEnv) -> CheckResult:
    """Apply a redirect in a throwaway namespace (root or a user namespace), or, as root
    without namespaces, a uniquely named table of our own; never anyone else's table."""
    nft = find_nft(env)
    if nft is None:
        return CheckResult("nat-redirect", CheckStatus.SKIP, "nft is not installed (see nft)")
    table = f"tray_proxy_doctor_{os.getpid()}"
    probe = [sys.executable, "-I", str(NAT_PROBE), nft, table]
    unshare = env.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None
    )
    attempts: list[tuple[str, list[str]]] = []
    if unshare is not None:
        ns = (
            [unshare, "--net"] if env.euid == 0 else [unshare, "--user", "--map-root-user", "--net"]
        )
        where = "a throwaway network namespace"
        attempts.append((where, [*ns, "--", *probe, "--lo-up"]))
    if env.euid == 0:
        attempts.append((f"table inet {table} (deleted again)", probe))
    errors: list[str] = []
    for where, argv in attempts:
        done = await in_thread(functools.partial(run_command, argv, env.command_timeout), 60)
        answer = _json_line(done.stdout)
        if answer is not None and answer.get("ok") is True:
            return CheckResult(
                "nat-redirect",
                CheckStatus.OK,
                f"the kernel NAT-redirects TCP (tested with nft in {where})",
            )
        if answer is not None and answer.get("stage") in ("apply", "connect"):
            # nft itself ran in a namespace of ours: a refusal is the kernel's answer.
            errors.append(f"{answer.get('stage')}: {answer.get('error')}")
            if env.euid == 0:
                break
        else:
            errors.append(done.error or done.stderr.strip() or str(answer))
    if env.euid != 0:
        return CheckResult(
            "nat-redirect",
            CheckStatus.WARN,
            "could not test the kernel's NAT redirect without root ("
            f"{errors[-1] if errors else 'unshare is missing'})",
            fix='run the check as root: `sudo "$(command -v tray-proxy)" doctor --check '
            "nat-redirect`",
        )
    return CheckResult(
        "nat-redirect",
        CheckStatus.FAIL,
        "the kernel refused a NAT redirect rule: the redirect cannot work",
        fix="load the NAT modules: `sudo modprobe nft_chain_nat nft_redir` (on WSL: update the "
        "WSL kernel with `wsl --update` in Windows)",
        details=tuple(errors),
    )


def _json_line(text: str) -> dict[str, object] | None:
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _unsafe_owner_or_mode(path: Path) -> str | None:
    """Why root must not trust `path` (owned by someone else, or writable by others)."""
    st = os.lstat(path)
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if stat.S_IMODE(st.st_mode) & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


async def check_helper(env: DoctorEnv) -> CheckResult:
    path = env.helper_path
    if not os.path.lexists(path):
        return CheckResult(
            "helper",
            CheckStatus.FAIL,
            f"the root helper is not installed at {path}: the redirect cannot be switched on",
            fix=_INSTALL,
        )
    problems: list[str] = []
    warnings: list[str] = []
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        problems.append(f"{path} is a symlink; it must be the file itself")
    elif not stat.S_ISREG(st.st_mode):
        problems.append(f"{path} is not a regular file")
    else:
        for item in (path, *path.parents):
            # Anyone who may replace the file or a directory above it may run code as root;
            # a sticky directory (/tmp) lets nobody replace what another user put there.
            sticky = item != path and bool(os.lstat(item).st_mode & stat.S_ISVTX)
            why = None if sticky else _unsafe_owner_or_mode(item)
            if why is not None:
                problems.append(why)
        if not st.st_mode & stat.S_IXOTH:
            problems.append(f"{path} is not executable (mode {stat.S_IMODE(st.st_mode):04o})")
        try:
            with open(path, "rb") as handle:
                first = handle.readline(200).decode("utf-8", "replace").strip()
        except OSError as exc:
            problems.append(f"{path} cannot be read: {exc.strerror}")
        else:
            if first != HELPER_SHEBANG:
                warnings.append(f"its first line is {first!r}, not {HELPER_SHEBANG!r}")
            if _differs(path, env.source_helper_path):
                warnings.append(
                    "it differs from this tray-proxy version's helper "
                    f"({env.source_helper_path}): installed by another version"
                )
    policy_path, policy_problem = _policy_exec_path(env.polkit_policy)
    if policy_problem is not None:
        warnings.append(policy_problem)
    elif policy_path != str(path):
        problems.append(
            f"the polkit action {POLKIT_ACTION_ID} runs {policy_path}, not {path} "
            f"({env.polkit_policy})"
        )
    if problems:
        return CheckResult(
            "helper",
            CheckStatus.FAIL,
            f"the root helper at {path} is not safe to run as root: {problems[0]}",
            fix=_INSTALL,
            details=tuple(problems[1:] + warnings),
        )
    if warnings:
        return CheckResult(
            "helper",
            CheckStatus.WARN,
            f"root helper installed at {path}, but {warnings[0]}",
            fix=_INSTALL,
            details=tuple(warnings[1:]),
        )
    return CheckResult(
        "helper",
        CheckStatus.OK,
        f"root helper installed at {path} (root-owned, not writable by others, named by the "
        "polkit action)",
    )


def _differs(installed: Path, source: Path) -> bool:
    try:
        return installed.read_bytes() != source.read_bytes()
    except OSError:
        return False  # no source tree to compare with (an installed wheel): nothing to say


def _policy_exec_path(policy: Path) -> tuple[str | None, str | None]:
    """(exec.path of our polkit action, None) or (None, why it cannot be read)."""
    try:
        root = ElementTree.parse(policy).getroot()
    except FileNotFoundError:
        return None, f"the polkit action is not installed ({policy} is missing)"
    except (OSError, ElementTree.ParseError) as exc:
        return None, f"the polkit action {policy} cannot be read ({exc})"
    for action in root.iter("action"):
        if action.get("id") != POLKIT_ACTION_ID:
            continue
        for note in action.iter("annotate"):
            if note.get("key") == EXEC_PATH_KEY:
                return (note.text or "").strip(), None
    return None, f"{policy} has no {EXEC_PATH_KEY} for {POLKIT_ACTION_ID}"


def _user_groups(uid: int) -> tuple[str, set[str]]:
    entry = pwd.getpwuid(uid)
    gids = os.getgrouplist(entry.pw_name, entry.pw_gid)
    names: set[str] = set()
    for gid in gids:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return entry.pw_name, names


async def check_privilege(env: DoctorEnv) -> CheckResult:
    """How the app will start the helper, in the order firewall/client.py tries them."""
    if env.euid == 0:
        return CheckResult(
            "privilege", CheckStatus.OK, "running as root: the helper starts without polkit/sudo"
        )
    try:
        user, groups = _user_groups(env.uid)
    except KeyError:
        user, groups = str(env.uid), set()
    try:
        grp.getgrnam(env.group)
        group_exists = True
    except KeyError:
        group_exists = False
    in_group = env.group in groups
    add_me = f"`sudo usermod -aG {env.group} {user}`, then log out and in again"
    if not group_exists:
        add_me = _INSTALL
    pkexec = env.which("pkexec")
    if pkexec is not None and polkit_running(str(env.proc)):
        if in_group and os.path.exists(env.polkit_rules):
            return CheckResult(
                "privilege",
                CheckStatus.OK,
                f"polkit is running and {user} is in the group {env.group}: pkexec starts "
                "the helper without a password prompt",
            )
        why = (
            f"{user} is not in the group {env.group}"
            if not in_group
            else f"the polkit rule {env.polkit_rules} is missing"
        )
        return CheckResult(
            "privilege",
            CheckStatus.WARN,
            f"polkit is running, but {why}: switching on asks for an admin password, which "
            "needs a polkit authentication agent (WSLg and headless sessions have none)",
            fix=add_me if not in_group else _INSTALL,
        )
    sudo = env.which("sudo")
    no_polkit = "pkexec is not installed" if pkexec is None else "polkitd is not running"
    if sudo is None:
        return CheckResult(
            "privilege",
            CheckStatus.FAIL,
            f"no way to start the helper as root: {no_polkit} and sudo is not installed",
            fix="install polkit and sudo (`sudo apt-get install policykit-1 sudo`, as root: "
            "`apt-get install policykit-1 sudo`), then " + _INSTALL,
        )
    if not os.path.exists(env.sudoers_dropin):
        return CheckResult(
            "privilege",
            CheckStatus.FAIL,
            f"{no_polkit}, and the sudo fallback is not installed ({env.sudoers_dropin} is "
            "missing): switching on would fail",
            fix=_INSTALL,
        )
    unsafe = _unsafe_owner_or_mode(env.sudoers_dropin)
    if unsafe is not None:
        # sudo ignores (or refuses to run with) a drop-in that others could have changed.
        return CheckResult(
            "privilege",
            CheckStatus.FAIL,
            f"{no_polkit}, and sudo will not use its fallback: {unsafe}",
            fix=f"`sudo chown root:root {env.sudoers_dropin} && sudo chmod 0440 "
            f"{env.sudoers_dropin}`",
        )
    listed = await in_thread(
        lambda: run_command(
            [sudo, "-n", "-l", str(env.helper_path)], env.command_timeout, env=env.environ
        ),
        60,
    )
    if listed.ok:
        return CheckResult(
            "privilege",
            CheckStatus.OK,
            f"{no_polkit}; sudo may start {env.helper_path} without a password (the "
            f"{env.sudoers_dropin} fallback)",
        )
    fix = add_me if not in_group else _INSTALL
    detail = (listed.stderr.strip() or listed.error).splitlines()
    return CheckResult(
        "privilege",
        CheckStatus.FAIL,
        f"{no_polkit}, and sudo does not let {user} start the helper without a password"
        + ("" if in_group else f" ({user} is not in the group {env.group})"),
        fix=fix,
        details=tuple(detail[:3]),
    )
