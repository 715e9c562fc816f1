"""The installer for real, as a new user runs it: install, install again, first run, enable,
curl through the lab's Squid, uninstall; the machine is as before.

A non-root test user with sudo runs `bash installer/install.sh --no-start --wheels DIR` (the
wheelhouse is made offline from this run's .venv: tests/installer/wheelhouse.py). Everything
root-owned it touches lives in a private mount namespace the test makes (`unshare --mount
--net`): /etc and /usr are overlays whose upper layers are the test's, /run/dbus and
/run/sudo are tmpfs. So the real installer really writes /usr/libexec/tray-proxy, the polkit
files, /etc/sudoers.d, /etc/tray-proxy, /etc/group (useradd, groupadd, usermod, gpasswd,
groupdel are the real tools), yet the host and the other tests running beside this one see
none of it; the namespace, with every mount, is gone when its last process ends.

Both ways to become root for the redirect are tested: `polkit` (a private system bus with the
real polkitd, started after the install; the client picks pkexec) and `sudo` (no polkit at all,
the installer's sudoers drop-in lets the group start exactly the helper). In both, the test's
own sudo grant (needed for the install) is removed before tray-proxy runs.

The first run is what issue 14 asks for on WSL: the proxy comes from a faked Windows
configuration (tests/fakes/windows reg.exe/netsh.exe on PATH, WSL markers in the
environment; Windows cannot run here), the keyring is the one `tray-proxy unlock` sets up
where no D-Bus session runs, `tray-proxy setup --yes` stores the password there, and the
user's `tray-proxy run` (in the lab's client network namespace) switches the redirect on.

Debian packages: util-linux (unshare, nsenter, setpriv), passwd (useradd), sudo, pkexec,
polkitd, dbus, gnome-keyring, nftables, iproute2. Must not import PySide6.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli_w
import tomllib

from tests.firewall.e2e_support import LOOPBACK_ONLY, has_our_table, wait_until
from tests.firewall.test_e2e_pkexec import BUS_CONFIG, POLKITD, _wait_for_bus_name
from tests.installer.wheelhouse import build_wheelhouse, project_wheel
from tests.integration.relay import allocate_port
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
HELPER = "/usr/libexec/tray-proxy/tray-proxy-helper"
# What install.sh places (or may) outside the user's home; compared before and after.
SYSTEM_PATHS = (
    "/usr/libexec/tray-proxy",
    "/usr/share/polkit-1/actions",
    "/etc/polkit-1/rules.d",
    "/etc/sudoers.d",
    "/etc/tray-proxy",
)
TEST_GRANT = "zz-tray-proxy-install-test"
TOOLS = {
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "setpriv": "util-linux",
    "useradd": "passwd",
    "sudo": "sudo",
    "visudo": "sudo",
    "pkexec": "pkexec",
    "dbus-daemon": "dbus",
    "gnome-keyring-daemon": "gnome-keyring",
    "nft": "nftables",
}
SOURCE_PARTS = (
    "installer",
    "tray_proxy",
    "resources",
    "tests/fakes",
    "pyproject.toml",
    "README.md",
)


def _require() -> None:
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in TOOLS.items()
               if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]  # fmt: skip
    if not os.access(POLKITD, os.X_OK):
        missing.append(f"{POLKITD} (apt-get install polkitd)")
    if missing:
        pytest.fail("the installer test needs: " + ", ".join(missing), pytrace=False)


@pytest.fixture(scope="module")
def wheels() -> Iterator[Path]:
    """The wheelhouse, once for the module, readable by the test user."""
    top = Path(tempfile.mkdtemp(prefix="tp-wheels-", dir="/tmp"))
    try:
        top.chmod(0o755)
        build_wheelhouse(REPO, top)
        for path in top.iterdir():
            path.chmod(0o644)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


# --------------------------------------------------------------------------- the sandbox


@dataclass
class Box:
    holder: subprocess.Popen[bytes]
    work: Path
    user: str
    uid: int
    home: Path
    src: Path
    runtime: Path
    services: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def mnt(self) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt"]

    @property
    def enter(self) -> list[str]:
        """Mount and network namespace of the box, as root."""
        return [*self.mnt, f"--net=/proc/{self.holder.pid}/ns/net", "--"]

    def view(self, path: str | Path) -> Path:
        """`path` as the box sees it (its overlays), from the test's own namespace."""
        return Path(f"/proc/{self.holder.pid}/root") / str(path).lstrip("/")

    def root(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.enter, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )

    def user_argv(
        self, argv: Sequence[str], *, netns: str | None = None, env: dict[str, str] | None = None
    ) -> list[str]:
        where = [*self.mnt, "--", "ip", "netns", "exec", netns] if netns else self.enter
        path = f"{self.home}/.local/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
        base = {
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8",
            "PATH": path,
            "XDG_RUNTIME_DIR": str(self.runtime),
            "PYTHONUNBUFFERED": "1",
        }
        base.update(env or {})
        return [
            *where,
            *("setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--init-groups"),
            *("env", "-i", *(f"{k}={v}" for k, v in base.items())),
            *argv,
        ]

    def as_user(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        netns: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.user_argv(argv, netns=netns, env=env),
            input=input or "",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.as_user(["bash", f"{self.src}/installer/install.sh", *args], timeout=300)

    def grant_sudo(self, granted: bool) -> None:
        grant = self.view(f"/etc/sudoers.d/{TEST_GRANT}")
        if granted:
            grant.write_text(f"{self.user} ALL=(ALL) NOPASSWD: ALL\n")
            grant.chmod(0o440)
        else:
            grant.unlink(missing_ok=True)

    def user_pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat().st_uid == self.uid:
                        pids.append(int(entry.name))
        return pids

    def kill_user_processes(self) -> None:
        """The bus and keyring `tray-proxy unlock` started outlive it on purpose: end them."""
        for _ in range(20):
            pids = self.user_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def start_polkit(self) -> None:
        (self.work / "bus.conf").write_text(BUS_CONFIG)
        for argv in (
            ["dbus-daemon", f"--config-file={self.work / 'bus.conf'}", "--nofork", "--nopidfile"],
            [POLKITD, "--no-debug"],
        ):
            log = (self.work / f"{Path(argv[0]).name}.log").open("wb")
            self.services.append(
                subprocess.Popen([*self.enter, *argv], stdout=log, stderr=subprocess.STDOUT)
            )
            log.close()
            name = (
                "org.freedesktop.DBus" if argv[0] == "dbus-daemon" else "org.freedesktop.PolicyKit1"
            )
            _wait_for_bus_name(self.enter, name)


def _free_uid() -> int:
    import pwd

    for _ in range(200):
        uid = 46000 + secrets.randbelow(14000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("no free uid")


@contextlib.contextmanager
def install_box(lab: Lab) -> Iterator[Box]:
    _require()
    work = Path(tempfile.mkdtemp(prefix="tp-install-", dir="/tmp"))
    work.chmod(0o755)
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--net", "sleep", "900"]
    )
    box: Box | None = None
    try:
        own = os.readlink("/proc/self/ns/mnt")
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/mnt") != own, 10, "unshare")
        src = work / "src"
        for part in SOURCE_PARTS:
            source = REPO / part
            if source.is_dir():
                shutil.copytree(source, src / part, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (src / part).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, src / part)
        for sub in ("etc-up", "etc-work", "usr-up", "usr-work"):
            (work / sub).mkdir()
        Path("/run/sudo").mkdir(mode=0o711, exist_ok=True)
        enter = ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--"]
        for mount in (
            ["-t", "overlay", "overlay", "-o",
             f"lowerdir=/etc,upperdir={work}/etc-up,workdir={work}/etc-work", "/etc"],
            ["-t", "overlay", "overlay", "-o",
             f"lowerdir=/usr,upperdir={work}/usr-up,workdir={work}/usr-work", "/usr"],
            ["-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/dbus"],
            ["-t", "tmpfs", "-o", "mode=0711", "tmpfs", "/run/sudo"],
        ):  # fmt: skip
            done = subprocess.run([*enter, "mount", *mount], capture_output=True, text=True)
            assert done.returncode == 0, f"mount {mount}: {done.stderr}"
        uid = _free_uid()
        user = f"tpinst{uid}"
        home = work / "home"
        box = Box(holder, work, user, uid, home, src, work / "run")
        made = box.root(
            ["useradd", "-m", "-d", str(home), "-u", str(uid), "-U", "-s", "/bin/sh", user]
        )
        assert made.returncode == 0, made.stderr
        box.runtime.mkdir(mode=0o700)
        os.chown(box.runtime, uid, uid)
        box.grant_sudo(True)
        assert box.root(["ip", "link", "set", "lo", "up"]).returncode == 0
        yield box
    finally:
        if box is not None:
            box.kill_user_processes()
            for proc in reversed(box.services):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        holder.terminate()
        holder.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    assert not Path(HELPER).exists(), "the helper leaked onto the host"


# --------------------------------------------------------------------------- snapshots


def _describe(path: Path, mtimes: bool) -> tuple[object, ...]:
    st = path.lstat()
    stamp = (st.st_mtime_ns,) if mtimes else ()
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, *stamp)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ("file", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, digest, *stamp)


def snapshot(box: Box, *, mtimes: bool) -> dict[str, object]:
    """Every file and directory the installer may touch, the group entries and nft tables."""
    state: dict[str, object] = {}
    skip = {box.home / ".cache", box.view(f"/etc/sudoers.d/{TEST_GRANT}")}
    for top in (*[box.view(p) for p in SYSTEM_PATHS], box.home):
        if not top.exists():
            state[str(top)] = "absent"
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in skip]
            for name in [".", *filenames, *(d for d in dirnames if (here / d).is_symlink())]:
                path = here / name if name != "." else here
                if path not in skip:
                    state[str(path)] = _describe(path, mtimes)
    groups = box.view("/etc/group").read_text().splitlines()
    state["groups"] = sorted(g for g in groups if g.startswith("tray-proxy:") or box.user in g)
    state["nft"] = box.root(["nft", "list", "tables"]).stdout
    return state


def _diff(before: dict[str, object], after: dict[str, object]) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)
    ]


# --------------------------------------------------------------------------- the run


class UserRun:
    """A command of the user's (default `tray-proxy run -v`) in the lab's client namespace;
    its output lines (stdout and stderr) collected."""

    def __init__(self, box: Box, netns: str, argv: Sequence[str] = ("tray-proxy", "run", "-v")):
        self.proc = subprocess.Popen(
            box.user_argv(list(argv), netns=netns),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                self._reader.join(2)
                if not any(text in line for line in self.lines):
                    raise AssertionError(
                        f"tray-proxy run exited {self.proc.returncode}:\n" + "\n".join(self.lines)
                    )
            return any(text in line for line in self.lines)

        wait_until(seen, timeout, f"{text!r} from tray-proxy run; log:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def _launchers() -> list[list[str]]:
    """Command lines of the processes running the installed helper (sudo stays its parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = entry.joinpath("cmdline").read_bytes().split(b"\0")[:-1]
                if any(HELPER.encode() == a for a in argv):
                    found.append([a.decode() for a in argv])
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("root_by", ["polkit", "sudo"])
def test_install_first_run_enable_uninstall(lab: Lab, wheels: Path, root_by: str) -> None:
    squid = lab.squid
    creds = squid.credentials
    assert creds is not None
    with install_box(lab) as box:
        before = snapshot(box, mtimes=False)

        # ---- install, twice
        started = time.monotonic()
        first = box.install("--no-start", "--wheels", str(wheels))
        install_seconds = time.monotonic() - started
        assert first.returncode == 0, first.stdout + first.stderr
        assert "system packages: all present" in first.stdout, first.stdout
        helper = box.view(HELPER)
        assert helper.read_bytes() == (box.src / "tray_proxy/firewall/helper.py").read_bytes()
        assert _describe(helper, False)[1:4] == ("0o755", 0, 0)
        sudoers = box.view("/etc/sudoers.d/tray-proxy")
        assert _describe(sudoers, False)[1:4] == ("0o440", 0, 0)
        for path in (
            "/usr/share/polkit-1/actions/org.trayproxy.redirect.policy",
            "/etc/polkit-1/rules.d/50-tray-proxy.rules",
            *(["/etc/tray-proxy/helper-policy.json"]
              if (box.src / "installer/helper-policy.json").exists() else []),
        ):  # fmt: skip
            assert _describe(box.view(path), False)[1:4] == ("0o644", 0, 0), path
        group = [
            g
            for g in box.view("/etc/group").read_text().splitlines()
            if g.startswith("tray-proxy:")
        ]
        assert len(group) == 1 and group[0].split(":")[3].split(",") == [box.user], group
        unit = box.home / ".config/systemd/user/tray-proxy.service"
        assert unit.read_bytes() == (box.src / "installer/systemd/tray-proxy.service").read_bytes()
        version = box.as_user(["tray-proxy", "--version"])
        assert version.returncode == 0 and version.stdout.startswith("tray-proxy "), version

        # Without --no-start and with no settings, the installer ends in the first-run step,
        # not in "file not found" (no terminal here, so it says what to run).
        unset = box.install("--wheels", str(wheels))
        assert unset.returncode == 0, unset.stdout + unset.stderr
        assert "tray-proxy setup" in unset.stdout and "not found" not in unset.stdout + unset.stderr

        installed = snapshot(box, mtimes=True)
        again = box.install("--no-start", "--wheels", str(wheels))
        assert again.returncode == 0, again.stdout + again.stderr
        assert "is up to date" in again.stdout
        assert _diff(installed, snapshot(box, mtimes=True)) == [], (
            "the second install changed things"
        )

        if root_by == "sudo":  # once is enough: a changed checkout is installed again
            marker = f"# changed {secrets.token_hex(4)}\n"
            with (box.src / "tray_proxy" / "__init__.py").open("a") as handle:
                handle.write(marker)
            changed = box.work / "wheels-changed"
            changed.mkdir(mode=0o755)
            for wheel in wheels.glob("*.whl"):
                if not wheel.name.startswith("tray_proxy-"):
                    (changed / wheel.name).symlink_to(wheel)
            project_wheel(box.src, changed).chmod(0o644)
            update = box.install("--no-start", "--wheels", str(changed))
            assert update.returncode == 0, update.stdout + update.stderr
            assert "installing tray-proxy into" in update.stdout
            installed_init = next(
                (box.home / ".local/share/tray-proxy/venv/lib").glob(
                    "python3*/site-packages/tray_proxy/__init__.py"
                )
            )
            assert installed_init.read_text().endswith(marker)

        # ---- from now on no sudo of the test's own: only what the installer set up
        box.grant_sudo(False)
        if root_by == "polkit":
            box.start_polkit()
        else:
            refused = box.as_user(["sudo", "-n", "/bin/true"])
            assert refused.returncode != 0, "the test user still has sudo beyond the helper"

        # ---- first run as on WSL: the keyring, then setup from Windows' proxy settings
        client = lab.client.name
        keyring_password = f"kr-{secrets.token_hex(6)}"
        unlocked = box.as_user(
            ["tray-proxy", "unlock"], input=keyring_password + "\n", netns=client
        )
        assert unlocked.returncode == 0, unlocked.stdout + unlocked.stderr
        assert 'created the keyring "login"' in unlocked.stdout
        fakes = box.src / "tests/fakes/windows"
        capture = box.work / "reg-capture.txt"
        capture.write_text(
            (fakes / "captures/reg-enabled.txt").read_text()
            .replace("proxy.corp.example:8080", f"{squid.host}:{squid.port}")
        )  # fmt: skip
        capture.chmod(0o644)
        windows = {
            "PATH": f"{fakes}:{box.home}/.local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "WSL_DISTRO_NAME": "Debian",
            "FAKE_WINDOWS_REG": str(capture),
            "FAKE_WINDOWS_NETSH": "netsh-direct.txt",
        }
        setup = box.as_user(
            ["tray-proxy", "setup", "--yes", "--user", creds.username, "--password-stdin",
             "--test-target", f"{HOSTNAME}:443"],
            input=creds.password + "\n", netns=client, env=windows,
        )  # fmt: skip
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert f"{squid.host}:{squid.port}" in setup.stdout + setup.stderr
        assert creds.password not in setup.stdout + setup.stderr
        config_path = box.home / ".config/tray-proxy/config.toml"
        config = tomllib.loads(config_path.read_text())
        assert [u["url"] for u in config["upstream"]] == [f"http://{squid.host}:{squid.port}"]
        assert creds.password not in config_path.read_text()
        # The lab's origin is at a private address, which the default exclusions keep direct.
        config.setdefault("relay", {}).update(port=allocate_port(lab), drain_timeout=1.0)
        config.setdefault("redirect", {})["exclude"] = LOOPBACK_ONLY
        config_path.write_text(tomli_w.dumps(config))

        # ---- enable: the user's tray-proxy run, the helper started by pkexec or sudo
        run = UserRun(box, client)
        try:
            run.wait_for("redirect on")
            wait_until(_launchers, 10, "the helper process")
            launchers = _launchers()
            via_sudo = [a for a in launchers if a[0].endswith("sudo")]
            assert bool(via_sudo) == (root_by == "sudo"), launchers
            seed = f"inst-{secrets.token_hex(4)}"
            result = lab.curl(
                lab.origins.url("https", lab.origins.bytes_path(4000, seed)),
                resolve=[f"{HOSTNAME}:443:{lab.origins.v4}"],
            )
            assert (result.returncode, result.http_code) == (0, 200), (result, run.lines[-20:])
            assert result.sha256 == lab.origins.expected_sha256(4000, seed)
            squid.wait_for_entry(lambda e: e.method == "CONNECT" and e.uri == f"{HOSTNAME}:443")
        finally:
            code = run.stop()
        assert code == 0, "\n".join(run.lines)
        assert not has_our_table(lab.client)

        # With settings, the installer ends by starting tray-proxy (no display: the relay).
        box.grant_sudo(True)
        again_run = UserRun(
            box, client, ["bash", f"{box.src}/installer/install.sh", "--wheels", str(wheels)]
        )
        try:
            again_run.wait_for("starting the headless relay")
            again_run.wait_for("redirect on")
        finally:
            code = again_run.stop()
        assert code == 0, "\n".join(again_run.lines)
        assert not has_our_table(lab.client)

        # ---- uninstall: a leftover table goes too; settings and keyring stay without --purge
        box.grant_sudo(True)
        assert box.root(["nft", "add", "table", "inet", "tray_proxy"]).returncode == 0
        removed = box.as_user(["bash", f"{box.src}/installer/install.sh", "--uninstall"])
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert "installing" not in removed.stdout  # --uninstall never re-runs the install
        assert config_path.exists() and not box.view(HELPER).exists()
        assert "tray_proxy" not in box.root(["nft", "list", "tables"]).stdout
        purged = box.as_user(["bash", f"{box.src}/installer/uninstall.sh", "--purge"])
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert "removed tray-proxy's passwords from the keyring" in purged.stdout, purged.stdout
        lookup = box.as_user(
            ["secret-tool", "lookup", "service", "tray-proxy"],
            env={"DBUS_SESSION_BUS_ADDRESS": f"unix:path={box.runtime / 'bus'}"},
        )
        assert lookup.stdout == "", "a password of tray-proxy is still in the keyring"
        assert not (box.home / ".local/state/tray-proxy").exists()
        box.kill_user_processes()
        # What the user's own use made outside tray-proxy's files: their keyring (created by
        # `tray-proxy unlock`, now without our entry) and the XDG state directory.
        shutil.rmtree(box.home / ".local/share/keyrings")
        for empty in (".local/state", ".local/share", ".local"):
            with contextlib.suppress(OSError):
                (box.home / empty).rmdir()
        box.grant_sudo(True)
        assert _diff(before, snapshot(box, mtimes=False)) == []
        print(f"install.sh took {install_seconds:.1f} s ({root_by})", file=sys.stderr)
