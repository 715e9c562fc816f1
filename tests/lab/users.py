"""Throwaway local users and groups for tests that need "another user" on this machine.

`local_users(tag, 2, group=True)` creates real accounts with `useradd` (human uids, 1000 and
up, in a range no distribution hands out: what the redirect treats as a person, not a system
account) and optionally one extra group they can be put in; everything is deleted on exit,
also when the test fails. Names follow the lab's pattern (`tplab<pid>u<hex>`, see
`netns.lab_user_name`), so the lab's guardian and `cleanup_stale` remove the users of a run
that died, and `local_users` removes such groups before it makes new ones.

Accounts have no home and no login shell; tests run programs as them with `runuser -u NAME`
or `setpriv`. No password is set: nothing here logs in.

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.lab.netns import PREFIX, LabError, lab_user_name

# Above every distribution's UID_MAX for people (60000) would be "not a human" to some tools;
# below it and far above the accounts a machine really has, and apart from the pkexec test's
# range (45000-59999).
UID_RANGE = (41000, 44999)
SYSTEM_UID_MAX = 999  # uids up to this are system accounts (Debian's SYS_UID_MAX)
_NAME_RE = re.compile(rf"^{PREFIX}(?P<pid>\d+)u[0-9a-f]+$")
# useradd/groupadd exit 10 when another process holds /etc/passwd's lock (parallel labs).
_LOCKED = 10
_ATTEMPTS = 50


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    gid: int

    def runuser(self, argv: Sequence[str]) -> list[str]:
        """argv running `argv` as this user (from root): `runuser -u NAME -- ...`."""
        return ["runuser", "-u", self.name, "--", *argv]


@dataclass(frozen=True)
class LocalGroup:
    name: str
    gid: int
    members: tuple[LocalUser, ...]


def _run(argv: Sequence[str]) -> None:
    for _ in range(_ATTEMPTS):
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
            return
        if done.returncode != _LOCKED:
            break
        time.sleep(0.1)
    raise LabError(
        f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
    )


def _free_id(taken: set[int]) -> int:
    for _ in range(500):
        candidate = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0] + 1)
        if candidate in taken:
            continue
        with contextlib.suppress(KeyError):
            pwd.getpwuid(candidate)
            continue
        with contextlib.suppress(KeyError):
            grp.getgrgid(candidate)
            continue
        taken.add(candidate)
        return candidate
    raise LabError(f"no free uid/gid in {UID_RANGE}")


def _new_name(tag: str) -> str:
    # lab_user_name adds one random byte, and the lab's Dante user has the same prefix: more
    # randomness keeps our names apart from it and from each other.
    return lab_user_name(tag) + secrets.token_hex(3)


def remove_stale_groups() -> list[str]:
    """Delete groups a dead test run made here (their users are swept by the lab already)."""
    removed = []
    for line in Path("/etc/group").read_text().splitlines():
        name = line.split(":", 1)[0]
        match = _NAME_RE.match(name)
        if match and not Path(f"/proc/{match['pid']}").exists():
            subprocess.run(["groupdel", name], capture_output=True, timeout=30, check=False)
            removed.append(name)
    return removed


def _delete_user(name: str) -> None:
    # --force: also while a process of the user still runs (the test kills those itself).
    done = subprocess.run(["userdel", "--force", name], capture_output=True, timeout=30)
    if done.returncode not in (0, 6):  # 6: no such user
        raise LabError(f"userdel {name}: {done.stderr.decode(errors='replace').strip()}")


def _delete_group(name: str) -> None:
    done = subprocess.run(["groupdel", name], capture_output=True, timeout=30)
    if done.returncode not in (0, 6):
        raise LabError(f"groupdel {name}: {done.stderr.decode(errors='replace').strip()}")


def kill_processes_of(uid: int) -> None:
    """SIGKILL every process running as `uid` (a test's leftovers), bounded wait."""
    for _ in range(50):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    found = True
                    os.kill(int(entry), 9)
        if not found:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def local_users(
    tag: str, count: int, *, group: bool = False
) -> Iterator[tuple[list[LocalUser], LocalGroup | None]]:
    """`count` new users (each with its own group), and with `group` one more group holding
    the first of them. `tag` is a lab run tag (`lab.tag`). All removed on exit."""
    remove_stale_groups()
    taken: set[int] = set()
    users: list[LocalUser] = []
    extra: LocalGroup | None = None
    try:
        for _ in range(count):
            name = _new_name(tag)
            uid = _free_id(taken)
            _run(["groupadd", "--gid", str(uid), name])
            try:
                _run(
                    ["useradd", "--uid", str(uid), "--gid", str(uid), "--no-create-home",
                     "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                     "--comment", "tray-proxy test user (temporary)", name]
                )  # fmt: skip
            except BaseException:
                _delete_group(name)
                raise
            users.append(LocalUser(name, uid, uid))
        if group and users:
            name = _new_name(tag)
            gid = _free_id(taken)
            _run(["groupadd", "--gid", str(gid), name])
            extra = LocalGroup(name, gid, (users[0],))
            _run(["gpasswd", "--add", users[0].name, name])
        yield users, extra
    finally:
        errors: list[str] = []
        for user in users:
            kill_processes_of(user.uid)
            try:
                _delete_user(user.name)
                # userdel removes the user's own group only when USERGROUPS_ENAB says so.
                if _group_exists(user.name):
                    _delete_group(user.name)
            except LabError as exc:
                errors.append(str(exc))
        if extra is not None:
            try:
                _delete_group(extra.name)
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("; ".join(errors))


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
