"""The redirect serves only its owner (issue 16 items 1, 2 and 4), attacked end to end.

Real components: local users made with useradd (tests/lab/users.py), real sudo with the
installer's sudoers file, real pkexec with polkitd (the sandbox of test_e2e_pkexec.py), the
real root helper at its installed path, `tray-proxy run` as an unprivileged owner with its
redirect on, nftables, Squid with Basic auth logging the user name, curl with no proxy
settings. The one fake is Docker's Engine API (tests/lab/fake_docker.py): no Docker engine
runs here, and the helper only asks it which bridges it manages; the bridges are real.

- Item 1: another local user's HTTPS never goes through the relay with the owner's proxy login,
  while the owner's and root's do (root acts for the owner: `sudo apt update`); with
  `capture = "owner"` root's goes direct too.
- Item 2: a member of the tray-proxy group, talking to the helper through pkexec with no
  password, cannot point the redirect at another user's listener nor redirect ports the
  administrator's policy does not grant (22, 25, 5432), and so intercepts nobody.
- Item 4: a bridge named like a container bridge (`br-lan`) but not managed by Docker is not
  captured and cannot reach the relay; a bridge Docker reports is captured, and its client's
  HTTPS reaches Squid through the relay listening on that bridge's gateway address.

Each privileged piece runs in a private mount namespace (`unshare --mount`), so the host's
/etc, /usr/libexec and /run never change; users, namespaces, bridges and processes the tests
make are removed also when a test fails.

Must not import PySide6 or tray_proxy.ui.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import tray_proxy
from tests.firewall.e2e_support import (
    CONN_LINE,
    LOOPBACK_ONLY,
    REDIRECT_ON,
    client_left_clean,
    has_our_table,
    wait_until,
)
from tests.firewall.test_e2e_pkexec import polkit_sandbox
from tests.integration.relay import UpstreamSpec, allocate_port
from tests.lab.curl import CurlResult, curl_config
from tests.lab.environment import Lab
from tests.lab.fake_docker import DockerNetwork, FakeDocker
from tests.lab.netns import Namespace
from tests.lab.origins import HOSTNAME
from tests.lab.squid import SquidProxy
from tests.lab.users import LocalGroup, LocalUser, local_users
from tray_proxy.firewall.client import INSTALLED_HELPER_PATH, SOURCE_HELPER_PATH

pytestmark = pytest.mark.lab

REPO = Path(tray_proxy.__file__).resolve().parents[1]
INSTALLER = REPO / "installer"
# The helper asks Docker here (helper.DOCKER_SOCKET); the sandbox links it to the fake.
DOCKER_SOCKET = "/run/docker.sock"


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.returncode} {done.stderr.strip()}"
    return done


# --------------------------------------------------------------------------- sudo sandbox


@dataclass
class SudoSandbox:
    enter: list[str]  # argv prefix that enters the private mount namespace
    workdir: Path


@contextlib.contextmanager
def sudo_sandbox(
    lab: Lab, group: LocalGroup, docker_socket: Path | None = None
) -> Iterator[SudoSandbox]:
    """A private mount namespace in which the installed helper exists and sudo lets `group`
    start it without a password (installer/sudoers/tray-proxy with that group's name), and in
    which pkexec is not installed (as on WSL without polkit, so the client takes sudo).

    With `docker_socket`, /run is a fresh tmpfs (the lab's /run/netns moved into it) where
    /run/docker.sock leads to that socket.
    """
    installed_before = os.path.exists(INSTALLED_HELPER_PATH)
    work = lab.tmp / f"sudo-{secrets.token_hex(3)}"
    work.mkdir(mode=0o755)
    sudoers = work / "sudoers.d"
    sudoers.mkdir(mode=0o755)
    template = (INSTALLER / "sudoers" / "tray-proxy").read_text()
    assert "%tray-proxy " in template
    (sudoers / "tray-proxy").write_text(template.replace("%tray-proxy ", f"%{group.name} "))
    (sudoers / "tray-proxy").chmod(0o440)
    libexec = work / "libexec-upper"
    helper = libexec / Path(INSTALLED_HELPER_PATH).relative_to("/usr/libexec")
    helper.parent.mkdir(parents=True)
    shutil.copy(SOURCE_HELPER_PATH, helper)
    helper.chmod(0o755)
    helper.parent.chmod(0o755)
    libexec.chmod(0o755)
    (work / "libexec-work").mkdir()
    _run(["visudo", "-cf", str(sudoers / "tray-proxy")])

    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "900"])
    try:
        own = os.readlink("/proc/self/ns/mnt")
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/mnt") != own, 10, "unshare --mount")
        enter = ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--"]
        mounts = [
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir=/usr/libexec,upperdir={libexec},workdir={work / 'libexec-work'}",
             "/usr/libexec"],
            ["mount", "--bind", str(sudoers), "/etc/sudoers.d"],
        ]  # fmt: skip
        pkexec = shutil.which("pkexec")
        if pkexec is not None:
            # Not executable: shutil.which("pkexec") finds nothing, the client takes sudo.
            mounts.append(["mount", "--bind", "/dev/null", pkexec])
        if docker_socket is not None:
            keep = work / "netns-keep"
            keep.mkdir()
            mounts += [
                ["mount", "--rbind", "/run/netns", str(keep)],
                ["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"],
                ["mkdir", "/run/netns"],
                ["mount", "--move", str(keep), "/run/netns"],
                ["ln", "-s", str(docker_socket), DOCKER_SOCKET],
            ]
        for argv in mounts:
            _run([*enter, *argv])
        yield SudoSandbox(enter, work)
    finally:
        holder.terminate()
        try:
            holder.wait(10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    assert os.path.exists(INSTALLED_HELPER_PATH) == installed_before, "the helper leaked"


# --------------------------------------------------------------------------- the owner's run


def _require_open_to_others(repo: Path) -> None:
    """The owner runs this checkout's tray_proxy with its venv: they must reach it."""
    for directory in (repo, *repo.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            pytest.fail(
                f"{directory} is closed to other users, so the test's owner cannot run"
                f" tray-proxy from {repo}: chmod o+x {directory} (or clone elsewhere)",
                pytrace=False,
            )


class OwnerRun:
    """`tray-proxy run` with its redirect on, as `owner` (not root), in the lab's client
    namespace inside `box`: the relay starts the installed helper with sudo itself.

    Leaving the block sends SIGTERM and expects exit 0; what is left is killed.
    """

    def __init__(
        self,
        lab: Lab,
        box: SudoSandbox,
        owner: LocalUser,
        upstream: UpstreamSpec,
        redirect: dict[str, Any] | None = None,
    ) -> None:
        self.lab = lab
        self.box = box
        self.owner = owner
        self.upstream = upstream
        self.redirect = {"exclude": LOOPBACK_ONLY, **(redirect or {})}
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def _write_files(self) -> tuple[Path, dict[str, str]]:
        home = self.box.workdir / f"owner-{self.port}"
        home.mkdir(mode=0o700)
        credentials = home / "credentials"
        credentials.mkdir(mode=0o700)
        assert self.upstream.password is not None
        (credentials / self.upstream.name).write_text(self.upstream.password)
        (credentials / self.upstream.name).chmod(0o600)
        entry = {"name": self.upstream.name, "url": self.upstream.url}
        if self.upstream.username is not None:
            entry["username"] = self.upstream.username
        relay = {"port": self.port, "upstream": self.upstream.name, "drain_timeout": 1.0}
        doc = {"relay": relay, "redirect": self.redirect, "upstream": [entry]}
        config = home / "config.toml"
        config.write_text(tomli_w.dumps(doc))
        env = {"HOME": str(home), "CREDENTIALS_DIRECTORY": str(credentials)}
        for var, sub in (
            ("XDG_RUNTIME_DIR", "runtime"),
            ("XDG_STATE_HOME", "state"),
            ("XDG_CONFIG_HOME", "config"),
        ):
            (home / sub).mkdir(mode=0o700)
            env[var] = str(home / sub)
        for path in [home, *home.rglob("*")]:
            os.chown(path, self.owner.uid, self.owner.gid)
        return config, env

    def __enter__(self) -> OwnerRun:
        _require_open_to_others(REPO)
        self.port = allocate_port(self.lab)
        config, env = self._write_files()
        argv = [
            *self.box.enter,
            *("ip", "netns", "exec", self.lab.client.name),
            *("setpriv", f"--reuid={self.owner.uid}", f"--regid={self.owner.gid}"),
            "--init-groups",
            # nsenter starts in /; -C: this tree's tray_proxy (sys.path[0] of `python -m`).
            *("env", "-i", "-C", str(REPO), "PATH=/usr/bin:/bin:/usr/sbin:/sbin"),
            "PYTHONUNBUFFERED=1",
            *(f"{k}={v}" for k, v in env.items()),
            *(sys.executable, "-m", "tray_proxy", "run", "--config", str(config), "-v"),
        ]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="owner-run", daemon=True)
        self._reader.start()
        try:
            self.wait_for_line(REDIRECT_ON, timeout=40)
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        proc = self.process
        problem = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(20)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                problem = f"tray-proxy run exited with {code} after SIGTERM"
        self._kill()
        if problem and exc_type is None:
            raise AssertionError(problem + "; log:\n" + "\n".join(self.lines[-40:]))

    def _kill(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            with self._lock:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def wait_for_line(self, text: str, timeout: float = 10.0) -> str:
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines if text in line]
            if not found and self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"tray-proxy run exited ({self.process.returncode}) before {text!r}:\n"
                    + "\n".join(self.lines[-40:])
                )
            return bool(found)

        wait_until(seen, timeout, f"{text!r} in the owner's tray-proxy log")
        return found[0]

    def relayed_clients(self) -> list[str]:
        """The client address of every connection the relay carried (its -v log lines)."""
        return [m["client"] for m in map(CONN_LINE.search, self.lines) if m is not None]


# --------------------------------------------------------------------------- curl and checks


def _ca_for_everyone(lab: Lab, work: Path) -> Path:
    """The lab CA where any user can read it (the lab's own copy is root's)."""
    ca = work / "lab-ca.crt"
    if not ca.exists():
        shutil.copy(lab.ca_path, ca)
        ca.chmod(0o644)
    return ca


def _curl_as(
    lab: Lab, user: LocalUser | None, seed: str, ca: Path, ns: Namespace | None = None
) -> CurlResult:
    """curl https://origin.lab.test/<seed> from `ns` (the client) as `user` (None: root),
    with no proxy settings. The body is dropped: the origin's log says who fetched it."""
    url = lab.origins.url("https", lab.origins.bytes_path(2000, seed))
    config = curl_config(
        url,
        cacert=ca,
        resolve=[f"{HOSTNAME}:443:{lab.origins.v4}"],
        output=Path("/dev/null"),
        max_time=15,
        options=["connect-timeout = 4"],
    )
    argv = ["curl", "--disable", "--config", "-"]
    if user is not None:
        argv = user.runuser(argv)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    done = subprocess.run(
        ["ip", "netns", "exec", (ns or lab.client).name, *argv],
        input=config.encode(),
        capture_output=True,
        timeout=40,
        env=env,
        check=False,
    )
    try:
        info = json.loads(done.stdout or b"{}")
    except json.JSONDecodeError:
        info = {}
    return CurlResult(done.returncode, b"", info, done.stderr.decode(errors="replace"))


def _peer(lab: Lab, seed: str, timeout: float = 10.0) -> str:
    """Who fetched `seed` from the origin: the proxy (relayed) or the client (direct)."""
    event = lab.origins.wait_for_event(lambda e: seed in e.get("path", ""), timeout=timeout)
    peer = event["peer"]
    assert isinstance(peer, str)
    return peer


def _seed(who: str) -> str:
    return f"h16-{who}-{secrets.token_hex(4)}"


def _own_squid(squid_factory: Any) -> SquidProxy:
    """A Squid of this test alone (stock deny rules, Basic auth): its whole access log is
    this test's, so "no request as the owner" can be counted exactly."""
    port = 3200 + secrets.randbelow(700)
    squid: SquidProxy = squid_factory(port=port, auth="basic")
    return squid


def _as_owner(squid: SquidProxy) -> list[str]:
    """Squid's log lines of tunnels made with the owner's proxy login."""
    creds = squid.credentials
    assert creds is not None
    return [f"{e.method} {e.uri} {e.status}" for e in squid.entries() if e.user == creds.username]


# --------------------------------------------------------------------------- item 1


@pytest.fixture
def owner_and_other(lab: Lab) -> Iterator[tuple[LocalUser, LocalUser, LocalGroup]]:
    """Two new human users; the first (the owner) in a new group sudo lets run the helper."""
    with local_users(lab.tag, 2, group=True) as (users, group):
        assert group is not None
        yield users[0], users[1], group


def test_another_user_is_not_relayed_with_the_owners_identity(
    lab: Lab, squid_factory: Any, owner_and_other: tuple[LocalUser, LocalUser, LocalGroup]
) -> None:
    owner, other, group = owner_and_other
    squid = _own_squid(squid_factory)
    with client_left_clean(lab), sudo_sandbox(lab, group) as box:
        ca = _ca_for_everyone(lab, box.workdir)
        with OwnerRun(lab, box, owner, UpstreamSpec.for_squid(squid)) as run:
            line = run.wait_for_line(f"uid {owner.uid}")  # whose traffic the helper captures
            assert f"uid {owner.uid}" in line and "system accounts" in line, line
            # Another person on the same machine: direct, as if tray-proxy were not there.
            seed = _seed("other")
            result = _curl_as(lab, other, seed, ca)
            assert (result.returncode, result.http_code) == (0, 200), result
            assert _peer(lab, seed) == lab.client.v4, "the other user's HTTPS was relayed"
            # The owner, and root acting for the owner: through the relay and Squid.
            for who, user in (("owner", owner), ("root", None)):
                seed = _seed(who)
                result = _curl_as(lab, user, seed, ca)
                assert (result.returncode, result.http_code) == (0, 200), (who, result)
                assert _peer(lab, seed) in (lab.proxy.v4, lab.proxy.v6), f"{who} went direct"
            wait_until(lambda: len(_as_owner(squid)) >= 2, 10, "Squid's two CONNECT entries")
            wait_until(lambda: len(run.relayed_clients()) >= 2, 10, "the relay's two lines")
            assert len(run.relayed_clients()) == 2, run.lines[-20:]
        # Exactly the owner's and root's tunnels carried the owner's login; none was other's.
        assert _as_owner(squid) == [f"CONNECT {HOSTNAME}:443 200"] * 2
    assert not has_our_table(lab.client)


def test_capture_owner_leaves_root_direct(
    lab: Lab, squid_factory: Any, owner_and_other: tuple[LocalUser, LocalUser, LocalGroup]
) -> None:
    owner, _other, group = owner_and_other
    squid = _own_squid(squid_factory)
    with client_left_clean(lab), sudo_sandbox(lab, group) as box:
        ca = _ca_for_everyone(lab, box.workdir)
        upstream = UpstreamSpec.for_squid(squid)
        with OwnerRun(lab, box, owner, upstream, redirect={"capture": "owner"}) as run:
            line = run.wait_for_line(f"uid {owner.uid}")
            assert f"uid {owner.uid}" in line and "only" in line, line
            seed = _seed("root")
            result = _curl_as(lab, None, seed, ca)
            assert (result.returncode, result.http_code) == (0, 200), result
            assert _peer(lab, seed) == lab.client.v4, "root's HTTPS was relayed"
            seed = _seed("owner")
            result = _curl_as(lab, owner, seed, ca)
            assert (result.returncode, result.http_code) == (0, 200), result
            assert _peer(lab, seed) in (lab.proxy.v4, lab.proxy.v6)
            wait_until(lambda: len(_as_owner(squid)) >= 1, 10, "Squid's CONNECT entry")
        assert _as_owner(squid) == [f"CONNECT {HOSTNAME}:443 200"]


# --------------------------------------------------------------------------- item 2

# Runs as the group member with the system python: its own listener, then the helper through
# pkexec (no password: the installer's polkit rule), request lines from argv, one answer line
# each on stdout; "OWN" in a request stands for its own listener's port. A line on stdin lets
# it go on to the next batch; EOF ends it (the helper then removes what it applied).
MEMBER_SCRIPT = r"""
import json, socket, subprocess, sys
own = socket.socket()
own.bind(("127.0.0.1", 0))
own.listen()
port = own.getsockname()[1]
print("own", port, flush=True)
helper = subprocess.Popen(["pkexec", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
for batch in json.loads(sys.argv[2]):
    for request in batch:
        if request.get("relay_port") == "OWN":
            request["relay_port"] = port
        helper.stdin.write(json.dumps(request).encode() + b"\n")
        helper.stdin.flush()
        print("answer", helper.stdout.readline().decode().strip(), flush=True)
    print("batch done", flush=True)
    if not sys.stdin.readline():
        break
helper.stdin.close()
print("helper exit", helper.wait(), flush=True)
"""

LISTEN_SCRIPT = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
"""

CONNECT_SCRIPT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(sys.argv[3].encode())
s.close()
"""


class Lines:
    """A child's stdout read line by line with a deadline (never blocks a test for good)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def until(self, prefix: str, timeout: float = 60.0, since: int = 0) -> list[str]:
        def done() -> bool:
            with self._lock:
                if any(line.startswith(prefix) for line in self.lines[since:]):
                    return True
            if self.proc.poll() is not None:
                self._thread.join(timeout=5)
                with self._lock:
                    if not any(line.startswith(prefix) for line in self.lines[since:]):
                        raise AssertionError(f"the child exited before {prefix!r}: {self.lines}")
                return True
            return False

        try:
            wait_until(done, timeout, f"{prefix!r} from the child")
        finally:
            with self._lock:
                got = list(self.lines)
        return got


def _apply(relay_port: int | str, ports: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "id": secrets.randbelow(10**6),
        "op": "apply",
        "relay_port": relay_port,
        "redirect_ports": ports,
        "excluded_networks": [],
        "capture_containers": False,
        **extra,
    }


def test_a_group_member_cannot_make_the_helper_intercept_others(lab: Lab) -> None:
    with client_left_clean(lab), polkit_sandbox(lab) as box:
        script = box.workdir / "member.py"
        script.write_text(MEMBER_SCRIPT)
        listen = box.workdir / "listen.py"
        listen.write_text(LISTEN_SCRIPT)
        connect = box.workdir / "connect.py"
        connect.write_text(CONNECT_SCRIPT)
        for path in (script, listen, connect):
            path.chmod(0o644)
        python = ["/usr/bin/python3", "-I"]
        # A listener of root's and one of another user's, on ports the member picks from.
        roots = lab.client.listen("127.0.0.1", 0)
        root_port = roots.getsockname()[1]
        roots.settimeout(0.5)
        origin_smtp = lab.origin.listen(lab.origin.v4 or "", 25)
        origin_smtp.settimeout(10)
        with contextlib.ExitStack() as stack:
            stack.callback(roots.close)
            stack.callback(origin_smtp.close)
            theirs = stack.enter_context(
                subprocess.Popen(
                    box.as_user(box.outsider, lab.client.name, [*python, str(listen)]),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
            )  # fmt: skip
            stack.callback(theirs.kill)
            assert theirs.stdout is not None
            their_port = int(theirs.stdout.readline())
            attacks = [
                # The request: someone else's listener, ports nobody granted.
                _apply(root_port, [22, 25, 5432]),
                # Each refusal on its own: a granted port, but root's or another user's listener ...
                _apply(root_port, [443]),
                _apply(their_port, [443]),
                # ... its own listener, but ports the default policy (80, 443) does not grant ...
                _apply("OWN", [22, 25]),
                # ... or every user's traffic, which the default policy does not allow.
                _apply("OWN", [443], capture="all"),
            ]
            fair = [_apply("OWN", [443])]
            member = stack.enter_context(
                subprocess.Popen(
                    box.as_user(
                        box.member,
                        lab.client.name,
                        [*python, str(script), INSTALLED_HELPER_PATH, json.dumps([attacks, fair])],
                    ),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
            )  # fmt: skip
            stack.callback(member.kill)
            lines = Lines(member)
            answers = [
                json.loads(line.removeprefix("answer "))
                for line in lines.until("batch done")
                if line.startswith("answer ")
            ]
            assert len(answers) == len(attacks), lines.lines
            assert all(answer["ok"] is False for answer in answers), answers
            errors = [str(answer["error"]) for answer in answers]
            assert errors[0].startswith(("relay_port", "redirect_ports")), errors[0]
            for error, port in zip(errors[1:3], (root_port, their_port), strict=True):
                assert error.startswith("relay_port") and str(port) in error, error
            assert errors[3].startswith("redirect_ports") and "22" in errors[3], errors[3]
            assert errors[4].startswith("capture"), errors[4]
            assert not has_our_table(lab.client), "a refused apply left a table"

            # Nothing of anyone else is intercepted: the other user's SMTP reaches the origin.
            token = f"smtp-{secrets.token_hex(4)}"
            _run(
                box.as_user(
                    box.outsider,
                    lab.client.name,
                    [*python, str(connect), lab.origin.v4 or "", "25", token],
                )
            )
            conn, peer = origin_smtp.accept()
            with conn:
                conn.settimeout(5)
                assert conn.recv(100) == token.encode()
            assert peer[0] == lab.client.v4
            with pytest.raises(TimeoutError):
                roots.accept()  # root's listener got nothing

            # What the policy grants still works, for the member's own traffic.
            assert member.stdin is not None
            member.stdin.write("\n")
            member.stdin.flush()
            lines.until("batch done", since=len(lines.lines))
            granted = json.loads(
                [line for line in lines.lines if line.startswith("answer ")][-1][7:]
            )
            assert granted["ok"] is True, granted
            assert granted["owner_uid"] == box.member, granted
            assert f"uid {box.member}" in granted["captured"], granted
            assert has_our_table(lab.client)
            member.stdin.close()
            exit_line = lines.until("helper exit")[-1]
            assert exit_line == "helper exit 0", lines.lines
            assert member.wait(20) == 0
            theirs.stdin.close()  # type: ignore[union-attr]
            theirs.wait(10)
        assert not has_our_table(lab.client)


# --------------------------------------------------------------------------- item 4


@dataclass
class BridgeNet:
    """A Linux bridge in the client namespace with one client namespace behind it."""

    bridge: str
    gateway: str
    subnet: str
    host: Namespace
    host_address: str


@contextlib.contextmanager
def bridge_with_host(lab: Lab, bridge: str, gateway: str, prefix: int) -> Iterator[BridgeNet]:
    """`bridge` (gateway/prefix) in the client namespace and a namespace at gateway+1 behind
    it, default route via the gateway. Both removed on exit."""
    role = "br" + secrets.token_hex(2)
    host = Namespace(f"{lab.tag}-{role}", role)
    veth = f"v{secrets.token_hex(3)}"
    client = lab.client.name
    parts = gateway.split(".")
    address = ".".join([*parts[:3], str(int(parts[3]) + 1)])
    try:
        host.create(lab.hosts_text())
        _run(["ip", "-n", client, "link", "add", bridge, "type", "bridge"])
        _run(["ip", "-n", client, "addr", "add", f"{gateway}/{prefix}", "dev", bridge])
        _run(["ip", "-n", client, "link", "set", bridge, "up"])
        _run(["ip", "-n", client, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
              "netns", host.name])  # fmt: skip
        _run(["ip", "-n", client, "link", "set", veth, "master", bridge, "up"])
        _run(["ip", "-n", host.name, "addr", "add", f"{address}/{prefix}", "dev", "eth0"])
        _run(["ip", "-n", host.name, "link", "set", "eth0", "up"])
        _run(["ip", "-n", host.name, "route", "add", "default", "via", gateway])
        network = f"{'.'.join(parts[:3])}.0/{prefix}"
        yield BridgeNet(bridge, gateway, network, host, address)
    finally:
        subprocess.run(["ip", "-n", client, "link", "del", veth], capture_output=True, check=False)
        subprocess.run(
            ["ip", "-n", client, "link", "del", bridge], capture_output=True, check=False
        )
        host.close()


def _reaches(ns: Namespace, address: str, port: int) -> bool:
    try:
        ns.connect(address, port, timeout=2.0).close()
    except OSError:
        return False
    return True


def test_only_bridges_docker_manages_are_captured(
    lab: Lab, squid_factory: Any, owner_and_other: tuple[LocalUser, LocalUser, LocalGroup]
) -> None:
    owner, _other, group = owner_and_other
    squid = _own_squid(squid_factory)
    app = DockerNetwork("app", "172.30.5.0/24", "172.30.5.1")
    with contextlib.ExitStack() as stack:
        stack.enter_context(client_left_clean(lab))
        lan = stack.enter_context(bridge_with_host(lab, "br-lan", "192.168.77.1", 24))
        ctr = stack.enter_context(bridge_with_host(lab, app.interface, app.gateway, 24))
        docker = stack.enter_context(FakeDocker(lab.tmp / f"docker-{secrets.token_hex(3)}.sock"))
        docker.set_networks([app])
        box = stack.enter_context(sudo_sandbox(lab, group, docker_socket=docker.path))
        ca = _ca_for_everyone(lab, box.workdir)
        run = stack.enter_context(OwnerRun(lab, box, owner, UpstreamSpec.for_squid(squid)))

        # br-lan is no container network: its machine's HTTPS is not captured (the client
        # namespace does not forward, so it simply fails) ...
        seed = _seed("lan")
        result = _curl_as(lab, None, seed, ca, ns=lan.host)
        assert result.returncode != 0, ("br-lan's HTTPS was captured", result)
        assert _as_owner(squid) == []
        # ... and the relay port is out of its reach, on the bridge's address and on the
        # Docker bridge's, where the relay does listen.
        assert not _reaches(lan.host, lan.gateway, run.port)
        assert not _reaches(lan.host, ctr.gateway, run.port)

        # The Docker network's container: captured, relayed on the bridge's own address.
        assert docker.requests, "the helper never asked Docker for its networks"
        seed = _seed("container")
        result = _curl_as(lab, None, seed, ca, ns=ctr.host)
        assert (result.returncode, result.http_code) == (0, 200), (result, run.lines[-20:])
        assert _peer(lab, seed) in (lab.proxy.v4, lab.proxy.v6)
        wait_until(lambda: len(_as_owner(squid)) >= 1, 10, "Squid's CONNECT entry")
        wait_until(lambda: run.relayed_clients(), 10, "the relay's connection line")
        clients = [c.rpartition(":")[0] for c in run.relayed_clients()]
        assert clients == [ctr.host_address], run.lines[-20:]
        assert _as_owner(squid) == [f"CONNECT {HOSTNAME}:443 200"]
