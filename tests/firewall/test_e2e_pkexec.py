"""End to end through the real privilege path: a user in group tray-proxy starts the installed
helper with `pkexec`, polkitd (on a private system bus) allows it by the installer's rule, and
the redirect carries curl through Squid. A user outside the group gets pkexec's 127 and the
client's NotAuthorizedError message.

Nothing on the host changes. Everything privileged lives in a private mount namespace the test
makes (`unshare --mount`): /etc is an overlay whose upper layer holds passwd/group copies with
the two test users and the group, plus the polkit rule; /usr/libexec is an overlay holding
the helper at its installed path; /usr/share/polkit-1/actions is a bind mount holding only our
policy; /run/dbus is a tmpfs with the private system bus. (Bind-mounting single files over
/etc/passwd does not work: any useradd on the host renames over it and the mount vanishes.)
When the test ends, its processes are killed and the namespace, with every mount, is gone.
The helper runs inside the lab's client network namespace.

Debian packages: pkexec, polkitd, dbus-daemon, dbus-bin (dbus-send), util-linux (unshare,
nsenter, setpriv). Must not import PySide6 or tray_proxy.ui.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tray_proxy
from tests.firewall.e2e_support import LOOPBACK_ONLY, client_left_clean, has_our_table
from tests.integration.relay import READY_MARKER, RelayProcess, UpstreamSpec, allocate_port
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME
from tray_proxy.firewall.client import INSTALLED_HELPER_PATH, SOURCE_HELPER_PATH
from tray_proxy.firewall.ruleset import RuleSpec, spec_to_wire

pytestmark = pytest.mark.lab

INSTALLER = Path(__file__).resolve().parents[2] / "installer"
REPO = Path(tray_proxy.__file__).resolve().parents[1]
POLKITD = "/usr/lib/polkit-1/polkitd"
TOOLS = {
    "pkexec": "pkexec",
    "dbus-daemon": "dbus-daemon",
    "dbus-send": "dbus-bin",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "setpriv": "util-linux",
}

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Runs as the unprivileged test user with the system python; the client picks pkexec itself.
USER_SCRIPT = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from tray_proxy.firewall.client import RedirectController, RedirectError
from tray_proxy.firewall.client import helper_path, launch_command
from tray_proxy.firewall.ruleset import spec_from_wire

async def main():
    spec = spec_from_wire(json.loads(sys.argv[2]))
    print("argv", json.dumps(launch_command(helper_path())), flush=True)
    controller = RedirectController(start_timeout=30)
    try:
        await controller.start()
        await controller.apply(spec)
    except RedirectError as exc:
        print("error", type(exc).__name__, exc, flush=True)
        return 3
    print("applied", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    removed = await controller.remove()
    code = await controller.stop()
    print("removed", removed, code, flush=True)
    return 0

sys.exit(asyncio.run(main()))
"""


def _require() -> None:
    missing = [
        f"{tool} (apt-get install {package})"
        for tool, package in TOOLS.items()
        if shutil.which(tool) is None
    ]
    if not os.access(POLKITD, os.X_OK):
        missing.append(f"{POLKITD} (apt-get install polkitd)")
    if missing:
        pytest.fail("the pkexec test needs: " + ", ".join(missing), pytrace=False)


def _free_id(taken: set[int]) -> int:
    for _ in range(200):
        candidate = 45000 + secrets.randbelow(15000)
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
    raise AssertionError("no free uid/gid found")


@dataclass
class Sandbox:
    mount_ns: list[str]  # argv prefix that enters the private mount namespace
    member: int  # uid in group tray-proxy
    outsider: int  # uid not in it
    workdir: Path

    def as_user(self, uid: int, netns: str, argv: list[str]) -> list[str]:
        # pkexec refuses a $SHELL missing from /etc/shells; env -i leaves nothing else behind.
        return [
            *self.mount_ns,
            *("ip", "netns", "exec", netns),
            *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups"),
            *("env", "-i", "PATH=/usr/bin:/bin", "SHELL=/bin/sh", "HOME=/"),
            *argv,
        ]


def _wait_for_bus_name(prefix: list[str], name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    argv = [
        *prefix,
        *("dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus", "/"),
        *("org.freedesktop.DBus.NameHasOwner", f"string:{name}"),
    ]
    while time.monotonic() < deadline:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        if "boolean true" in done.stdout:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} did not appear on the private system bus within {timeout} s")


@contextlib.contextmanager
def polkit_sandbox(lab: Lab) -> Iterator[Sandbox]:
    _require()
    work = lab.tmp / f"polkit-{secrets.token_hex(3)}"
    work.mkdir(mode=0o755)
    taken: set[int] = set()
    member, outsider, group = _free_id(taken), _free_id(taken), _free_id(taken)
    etc = work / "etc-upper"
    (etc / "polkit-1" / "rules.d").mkdir(parents=True)
    passwd = Path("/etc/passwd").read_text()
    groups = [
        g for g in Path("/etc/group").read_text().splitlines() if not g.startswith("tray-proxy:")
    ]
    for uid in (member, outsider):
        passwd += f"tptest{uid}:x:{uid}:{uid}::/nonexistent:/bin/sh\n"
        groups.append(f"tptest{uid}:x:{uid}:")
    groups.append(f"tray-proxy:x:{group}:tptest{member}")
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text("\n".join(groups) + "\n")
    shutil.copy(INSTALLER / "polkit" / "50-tray-proxy.rules", etc / "polkit-1" / "rules.d")
    libexec = work / "libexec-upper"
    helper = libexec / Path(INSTALLED_HELPER_PATH).relative_to("/usr/libexec")
    helper.parent.mkdir(parents=True)
    shutil.copy(SOURCE_HELPER_PATH, helper)
    helper.chmod(0o755)
    actions = work / "actions"
    actions.mkdir()
    shutil.copy(INSTALLER / "polkit" / "org.trayproxy.redirect.policy", actions)
    for path in work.rglob("*"):
        path.chmod(0o755 if path.is_dir() or path == helper else 0o644)
    (work / "bus.conf").write_text(BUS_CONFIG)
    for name in ("etc-work", "libexec-work"):
        (work / name).mkdir()

    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "900"])
    processes: list[subprocess.Popen[bytes]] = []
    logs = contextlib.ExitStack()
    try:
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == own:
            assert time.monotonic() < deadline, "unshare --mount did not take effect"
            time.sleep(0.02)
        enter = ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--"]
        for mount in (
            ["-t", "overlay", "overlay", "-o", f"lowerdir=/etc,upperdir={etc},"
             f"workdir={work / 'etc-work'}", "/etc"],
            ["-t", "overlay", "overlay", "-o", f"lowerdir=/usr/libexec,upperdir={libexec},"
             f"workdir={work / 'libexec-work'}", "/usr/libexec"],
            ["--bind", str(actions), "/usr/share/polkit-1/actions"],
            ["-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/dbus"],
        ):  # fmt: skip
            done = subprocess.run(
                [*enter, "mount", *mount], capture_output=True, text=True, timeout=20
            )
            assert done.returncode == 0, f"mount {mount}: {done.stderr}"
        dbus_log = logs.enter_context((work / "dbus.log").open("wb"))
        polkitd_log = logs.enter_context((work / "polkitd.log").open("wb"))
        processes.append(
            subprocess.Popen(
                [*enter, "dbus-daemon", f"--config-file={work / 'bus.conf'}", "--nofork",
                 "--nopidfile"],
                stdout=dbus_log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        _wait_for_bus_name(enter, "org.freedesktop.DBus")
        processes.append(
            subprocess.Popen(
                [*enter, POLKITD, "--no-debug"], stdout=polkitd_log, stderr=subprocess.STDOUT
            )
        )
        _wait_for_bus_name(enter, "org.freedesktop.PolicyKit1")
        yield Sandbox(enter, member, outsider, work)
    finally:
        for proc in [*reversed(processes), holder]:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        logs.close()
        shutil.rmtree(work, ignore_errors=True)
    assert not os.path.exists(INSTALLED_HELPER_PATH), "the helper leaked onto the host"


class MemberRelay(RelayProcess):
    """The relay run by the group member, as the app would be: the helper redirects only to a
    port its caller (PKEXEC_UID) listens on (issue 16 item 2)."""

    def __init__(self, lab: Lab, upstream: UpstreamSpec, uid: int) -> None:
        super().__init__(lab, upstream)
        self.uid = uid

    def __enter__(self) -> MemberRelay:
        self.port = allocate_port(self.lab)
        self._write_files()
        for sub in ("runtime", "state"):
            (self.workdir / sub).mkdir(mode=0o700)
        for path in [self.workdir, *self.workdir.rglob("*")]:
            os.chown(path, self.uid, self.uid)
        argv = [
            *("setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"),
            *("env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent", "PYTHONUNBUFFERED=1"),
            f"CREDENTIALS_DIRECTORY={self.credentials_dir}",
            f"XDG_RUNTIME_DIR={self.workdir / 'runtime'}",
            f"XDG_STATE_HOME={self.workdir / 'state'}",
            *(sys.executable, "-m", "tray_proxy", "run"),
            *("--config", str(self.config_path), "--no-redirect", "-v"),
        ]
        self.process = self.lab.client.popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(REPO)
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        try:
            self.wait_for_line(READY_MARKER, timeout=self.start_timeout)
        except BaseException:
            self._kill()
            raise
        return self


def _read_until(proc: subprocess.Popen[str], wanted: tuple[str, ...], timeout: float) -> list[str]:
    """Lines of `proc` up to and including the first that starts with one of `wanted`."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            lines.append(line.rstrip("\n"))
            if line.startswith(wanted):
                return lines
            continue
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no line starting with {wanted} within {timeout} s; got {lines}")


def test_pkexec_group_member_gets_the_redirect_outsider_is_refused(lab: Lab) -> None:
    with client_left_clean(lab), polkit_sandbox(lab) as box:
        script = box.workdir / "user_side.py"
        script.write_text(USER_SCRIPT)
        script.chmod(0o644)
        with MemberRelay(lab, UpstreamSpec.for_squid(lab.squid), box.member) as relay:
            spec = RuleSpec(
                relay_port=relay.port,
                excluded_networks=tuple(ipaddress.ip_network(n) for n in LOOPBACK_ONLY),
                upstreams=((ipaddress.ip_address(lab.squid.host), lab.squid.port),),
                capture_containers=False,
            )
            argv = [
                "/usr/bin/python3",
                "-I",
                str(script),
                str(REPO),
                json.dumps(spec_to_wire(spec)),
            ]

            with subprocess.Popen(
                box.as_user(box.member, lab.client.name, argv),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ) as member:  # fmt: skip
                try:
                    lines = _read_until(member, ("applied", "error"), timeout=60)
                    assert lines[-1] == "applied", lines
                    launched = json.loads(lines[0].removeprefix("argv "))
                    assert launched == [shutil.which("pkexec"), INSTALLED_HELPER_PATH]
                    assert has_our_table(lab.client)
                    # The helper is root although its parent is the test user.
                    seed = f"pk-{secrets.token_hex(4)}"
                    result = lab.curl(
                        lab.origins.url("https", lab.origins.bytes_path(5000, seed)),
                        resolve=[f"{HOSTNAME}:443:{lab.origins.v4}"],
                    )
                    assert (result.returncode, result.http_code) == (0, 200), result
                    assert result.sha256 == lab.origins.expected_sha256(5000, seed)
                    event = lab.origins.wait_for_event(lambda e: seed in e.get("path", ""))
                    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6)
                    lab.squid.wait_for_entry(
                        lambda e: e.method == "CONNECT" and e.uri == f"{HOSTNAME}:443"
                    )
                    assert member.stdin is not None
                    member.stdin.write("\n")
                    member.stdin.flush()
                    lines = _read_until(member, ("removed",), timeout=30)
                    assert lines[-1] == "removed True 0", lines
                    assert member.wait(20) == 0
                    assert not has_our_table(lab.client)
                except BaseException:
                    member.kill()  # never wait on a stuck child in Popen.__exit__
                    raise

            # Outside the group: pkexec itself says 127, and the client turns it into words.
            pkexec = subprocess.run(
                box.as_user(box.outsider, lab.client.name, ["pkexec", INSTALLED_HELPER_PATH]),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert pkexec.returncode == 127, pkexec
            assert "Not authorized" in pkexec.stderr
            outsider = subprocess.run(
                box.as_user(box.outsider, lab.client.name, argv),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert outsider.returncode == 3, outsider
            last = outsider.stdout.strip().splitlines()[-1]
            assert last.startswith("error NotAuthorizedError You are not allowed"), outsider.stdout
            assert "tray-proxy group" in outsider.stdout
            assert not has_our_table(lab.client)
