"""Network namespaces for the real-proxy lab: create, run commands in, open sockets in, delete.

Plain Python (no pytest) so `bench/` scripts can use it too. Every namespace, process and
per-namespace /etc file made here is removed by `Namespace.close()` / the owning ExitStack,
also when setup fails halfway. Names carry the creating pid so a later run can remove what a
killed run left behind (`cleanup_stale`).

Must not import tray_proxy, pytest or PySide6.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from socket import socket as Socket
from types import TracebackType
from typing import Any

PREFIX = "tplab"
NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
# <prefix><pid>-<hex>-<role>; the pid lets a later run tell a dead run's leftovers from a live one.
_NAME_RE = re.compile(rf"^{PREFIX}(?P<pid>\d+)-(?P<tag>[0-9a-f]+)(?:-(?P<role>[a-z0-9]+))?$")
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1

# Debian package for each binary the lab needs, so a missing one fails with the fix in the message.
REQUIRED_BINARIES: dict[str, str] = {
    "ip": "iproute2",
    "nft": "nftables",
    "squid": "squid",
    "danted": "dante-server",
    "curl": "curl",
    "openssl": "openssl",
    "useradd": "passwd",
    "userdel": "passwd",
    "chpasswd": "passwd",
}
REQUIRED_FILES: dict[str, str] = {
    "/usr/lib/squid/basic_ncsa_auth": "squid",
}


class LabError(RuntimeError):
    """The lab could not be built or torn down. The message says what to do."""


class LabPrerequisiteError(LabError):
    """Something the lab needs (root, a binary) is missing."""


def check_prerequisites() -> None:
    """Raise LabPrerequisiteError naming every missing piece and the Debian package providing it."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("the lab needs root (network namespaces, nftables, useradd): run as root")
    for binary, package in REQUIRED_BINARIES.items():
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            problems.append(f"`{binary}` not found: apt-get install {package}")
    for path, package in REQUIRED_FILES.items():
        if not Path(path).exists():
            problems.append(f"{path} not found: apt-get install {package}")
    if problems:
        raise LabPrerequisiteError("lab prerequisites missing: " + "; ".join(problems))


def run_tag() -> str:
    """A fresh `<prefix><pid>-<hex>` tag: unique per lab, parseable by `cleanup_stale`."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


_libc = ctypes.CDLL(None, use_errno=True)


def _set_parent_death_signal() -> None:
    # Runs in the child between fork and exec: if the test process dies hard (SIGKILL, OOM),
    # the kernel kills the lab's servers too instead of leaving them running in a namespace.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def join_namespace(name: str) -> None:
    """The calling thread joins network namespace `name` (setns(2) moves one thread only).

    Sockets it creates afterwards, threads it starts and processes it forks live there too.
    """
    fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def thread_in_namespace(name: str) -> Iterator[None]:
    """The calling thread joins network namespace `name` until the block ends, then returns
    to the namespace it was in."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        join_namespace(name)
        try:
            yield
        finally:
            _setns(home, "the thread's own namespace again")
    finally:
        os.close(home)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class NsProcess(subprocess.Popen[bytes]):
    """A process started in a namespace, in its own process group.

    Leaving the `with` block (or `stop()`) terminates the whole group, escalates to SIGKILL
    after a grace period, and reaps the leader, so helpers it forked (Squid's auth helpers,
    Dante's children) do not survive it.
    """

    def __init__(self, ns_name: str, argv: Sequence[str], **kwargs: Any) -> None:
        self.ns_name = ns_name
        self.argv = list(argv)
        if threading.current_thread() is threading.main_thread():
            # PDEATHSIG fires when the forking *thread* exits; only safe from the main thread.
            kwargs.setdefault("preexec_fn", _set_parent_death_signal)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        super().__init__(["ip", "netns", "exec", ns_name, *argv], start_new_session=True, **kwargs)

    def __repr__(self) -> str:
        return f"<NsProcess pid={self.pid} ns={self.ns_name} argv0={self.argv[0]!r}>"

    def _leader_exited(self) -> bool:
        """True once the leader has exited; it stays a zombie so its pgid cannot be reused."""
        if self.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def stop(self, grace: float = 5.0) -> int:
        """Terminate the process group, then kill what is left, and reap the leader."""
        if self.returncode is None:
            _killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and not self._leader_exited():
                time.sleep(0.02)
        # Also after a clean exit: children of the leader may still run in its group.
        _killpg(self.pid, signal.SIGKILL)
        return self.wait(timeout=10)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            super().__exit__(exc_type, exc, tb)


class Namespace:
    """One network namespace of the lab (`client`, `proxy`, `origin` or `router`).

    `v4` / `v6` are its address on the lab network (None for the router, which has several).
    """

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        self.v4: str | None = None
        self.v6: str | None = None
        self.gateway_v4: str | None = None
        self.gateway_v6: str | None = None
        self._processes: list[NsProcess] = []
        self._created = False

    def __repr__(self) -> str:
        return f"<Namespace {self.role} {self.name} v4={self.v4} v6={self.v6}>"

    # lifecycle -----------------------------------------------------------------------------

    def create(self, hosts: str | None = None) -> Namespace:
        """Create the namespace, bring `lo` up, and give it its own /etc/hosts and resolv.conf.

        `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc/*, so names resolve from the
        lab's hosts file and no DNS query can go to the host's resolver.
        """
        _ip(["netns", "add", self.name])
        self._created = True
        etc = NETNS_ETC_DIR / self.name
        for attempt in range(3):
            # A parallel lab may rmdir an empty /etc/netns between our mkdir and write.
            try:
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(
                    "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
                    + (hosts or "")
                )
                (etc / "resolv.conf").write_text(
                    "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
                )
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        _ip(["-n", self.name, "link", "set", "lo", "up"])
        return self

    def close(self) -> None:
        """Stop every process started here (and strays found in the namespace), delete it."""
        errors: list[str] = []
        for proc in reversed(self._processes):
            try:
                proc.stop(grace=3.0)
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{proc!r}: {exc}")
        self._processes.clear()
        if self._created:
            _kill_namespace_pids(self.name)
            result = subprocess.run(
                ["ip", "netns", "delete", self.name], capture_output=True, timeout=30
            )
            if result.returncode != 0 and (NETNS_RUN_DIR / self.name).exists():
                errors.append(f"ip netns delete {self.name}: {result.stderr.decode().strip()}")
            self._created = False
        shutil.rmtree(NETNS_ETC_DIR / self.name, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC_DIR.rmdir()  # only if empty: other runs may still use it
        if errors:
            raise LabError("namespace teardown incomplete: " + "; ".join(errors))

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # commands ------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 30.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a short command in the namespace and capture its output.

        Never put secrets in argv: pass them through `input` or a 0600 file.
        """
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{argv[0]} in namespace {self.role} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()[-2000:]}"
            )
        return result

    def popen(self, argv: Sequence[str], **kwargs: Any) -> NsProcess:
        """Start a long-lived process; it is stopped at the latest when the namespace closes."""
        proc = NsProcess(self.name, argv, **kwargs)
        self._processes.append(proc)
        return proc

    def forget(self, proc: NsProcess) -> None:
        """Drop a process already stopped by its owner from the close-time sweep."""
        with contextlib.suppress(ValueError):
            self._processes.remove(proc)

    def pids(self) -> list[int]:
        """Pids of every process whose network namespace is this one."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, timeout=10, check=False
        )
        return [int(p) for p in out.stdout.split()]

    # sockets -------------------------------------------------------------------------------

    def socket(
        self, family: socket.AddressFamily = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> Socket:
        """A socket that lives in this namespace, usable from any thread of this process.

        A socket belongs to the namespace it was created in, so a short-lived thread joins
        the namespace (setns is per thread), creates it and exits; the caller never moves.
        """
        box: dict[str, Any] = {}

        def make() -> None:
            try:
                join_namespace(self.name)
                box["sock"] = socket.socket(family, type)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=make, name=f"setns-{self.role}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        sock: Socket = box["sock"]
        return sock

    def connect(self, addr: str, port: int, timeout: float = 5.0) -> Socket:
        """A TCP connection from this namespace to addr:port (IPv4 or IPv6 literal)."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = self.socket(family)
        try:
            sock.settimeout(timeout)
            sock.connect((addr, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def listen(self, addr: str, port: int = 0, backlog: int = 128) -> Socket:
        """A listening TCP socket in this namespace (port 0 picks a free port)."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = self.socket(family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_port(
        self,
        addr: str,
        port: int,
        timeout: float = 15.0,
        *,
        process: subprocess.Popen[bytes] | None = None,
        what: str = "",
    ) -> None:
        """Poll until addr:port accepts a TCP connection from this namespace.

        Fails early if `process` (the server expected to listen) exits meanwhile.
        """
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise LabError(
                    f"{what or 'server'} exited with {process.returncode} before listening "
                    f"on {addr}:{port}"
                )
            try:
                self.connect(addr, port, timeout=1.0).close()
                return
            except OSError as exc:
                last = exc
                time.sleep(0.05)
        raise LabError(
            f"{what or 'nothing'} listening on {addr}:{port} in namespace {self.role} "
            f"after {timeout:.0f}s ({last})"
        )

    def add_address(self, cidr: str, dev: str = "eth0") -> None:
        """Add another address to an interface (no duplicate address detection wait)."""
        extra = ["nodad"] if ":" in cidr else []
        _ip(["-n", self.name, "addr", "add", cidr, "dev", dev, *extra])


# topology helpers ----------------------------------------------------------------------------


def _ip(args: Sequence[str], input: bytes | None = None) -> None:
    result = subprocess.run(["ip", *args], input=input, capture_output=True, timeout=30)
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")


def _sysctl(ns: Namespace, key: str, value: str) -> None:
    ns.run(["sysctl", "-qw", f"{key}={value}"])


def link_to_router(
    router: Namespace,
    ns: Namespace,
    router_if: str,
    v4_net: str,
    v6_net: str,
) -> None:
    """Join `ns` to `router` with a veth pair: ns gets .2 / ::2 on eth0, the router .1 / ::1.

    The veth is created inside the router namespace, so no interface ever appears in the
    host's own namespace. `v4_net` is like "10.200.1", `v6_net` like "fd00:200:1".
    """
    _ip(
        [
            "-n", router.name, "link", "add", router_if, "type", "veth",
            "peer", "name", "eth0", "netns", ns.name,
        ]
    )  # fmt: skip
    ns.v4, ns.v6 = f"{v4_net}.2", f"{v6_net}::2"
    ns.gateway_v4, ns.gateway_v6 = f"{v4_net}.1", f"{v6_net}::1"
    _ip(["-n", router.name, "addr", "add", f"{v4_net}.1/24", "dev", router_if])
    _ip(["-n", router.name, "addr", "add", f"{v6_net}::1/64", "dev", router_if, "nodad"])
    _ip(["-n", ns.name, "addr", "add", f"{ns.v4}/24", "dev", "eth0"])
    _ip(["-n", ns.name, "addr", "add", f"{ns.v6}/64", "dev", "eth0", "nodad"])
    _ip(["-n", router.name, "link", "set", router_if, "up"])
    _ip(["-n", ns.name, "link", "set", "eth0", "up"])
    _ip(["-n", ns.name, "route", "add", "default", "via", ns.gateway_v4])
    _ip(["-n", ns.name, "-6", "route", "add", "default", "via", ns.gateway_v6])


def enable_forwarding(router: Namespace) -> None:
    _sysctl(router, "net.ipv4.ip_forward", "1")
    _sysctl(router, "net.ipv6.conf.all.forwarding", "1")


# nftables redirect (the lab's own, not the product ruleset) -----------------------------------

LAB_NFT_TABLE = "tray_proxy_lab"


def render_redirect(
    relay_port: int,
    redirect_ports: Iterable[int] = (80, 443),
    exclude: Iterable[str] = (),
) -> str:
    """nft text: redirect locally generated TCP to `redirect_ports` to the relay on `relay_port`.

    `exclude` are addresses or networks (the upstream proxies) whose traffic is left alone,
    so the relay's own connections to a proxy on 80/443 do not loop back into it.
    """
    v4 = [a for a in exclude if ":" not in a]
    v6 = [a for a in exclude if ":" in a]
    ports = ", ".join(str(int(p)) for p in redirect_ports)
    lines = [
        f"table inet {LAB_NFT_TABLE} {{",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        "    ip daddr 127.0.0.0/8 return",
        "    ip6 daddr ::1 return",
    ]
    if v4:
        lines.append(f"    ip daddr {{ {', '.join(v4)} }} return")
    if v6:
        lines.append(f"    ip6 daddr {{ {', '.join(v6)} }} return")
    lines += [f"    tcp dport {{ {ports} }} redirect to :{int(relay_port)}", "  }", "}"]
    return "\n".join(lines) + "\n"


class Redirect:
    """The lab's nft redirect in one namespace; `remove()` / leaving `with` deletes the table."""

    def __init__(self, ns: Namespace, ruleset: str) -> None:
        self.ns = ns
        self.ruleset = ruleset
        self.active = False

    def apply(self) -> Redirect:
        # Delete-then-add in one transaction: re-applying replaces, never duplicates.
        text = f"table inet {LAB_NFT_TABLE}\ndelete table inet {LAB_NFT_TABLE}\n" + self.ruleset
        self.ns.run(["nft", "-f", "-"], input=text.encode())
        self.active = True
        return self

    def remove(self) -> None:
        if self.active:
            self.ns.run(["nft", "delete", "table", "inet", LAB_NFT_TABLE], check=False)
            self.active = False

    def __enter__(self) -> Redirect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_redirect(
    ns: Namespace,
    relay_port: int,
    redirect_ports: Iterable[int] = (80, 443),
    exclude: Iterable[str] = (),
) -> Redirect:
    """Load the lab redirect into `ns` now; use the result as a context manager to remove it."""
    return Redirect(ns, render_redirect(relay_port, redirect_ports, exclude)).apply()


# stale leftovers of killed runs -----------------------------------------------------------------


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _pid_alive_since(pid: int, since: float) -> bool:
    """True if `pid` runs and started no later than `since` (so it is not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 22 (starttime, clock ticks since boot) counted after the ")" ending comm.
    fields = stat.rsplit(")", 1)[1].split()
    started = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started <= since + 1.0


def _kill_namespace_pids(name: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, timeout=10)
    for pid in (int(p) for p in out.stdout.split()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # Bounded wait for the kernel to finish them so the delete does not race.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        again = subprocess.run(["ip", "netns", "pids", name], capture_output=True, timeout=10)
        if not again.stdout.split():
            return
        time.sleep(0.05)


def is_stale(name: str) -> bool:
    """A lab name whose creating process is gone (or whose pid now belongs to a newer process)."""
    match = _NAME_RE.match(name)
    if match is None:
        return False
    created = None
    for marker in (NETNS_ETC_DIR / name, NETNS_RUN_DIR / name):
        with contextlib.suppress(OSError):
            created = marker.stat().st_mtime
            break
    pid = int(match["pid"])
    if created is None:
        return not Path(f"/proc/{pid}").exists()
    return not _pid_alive_since(pid, created)


def list_lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10, check=True)
    names = [line.split()[0] for line in out.stdout.decode().splitlines() if line.strip()]
    return [n for n in names if _NAME_RE.match(n)]


def cleanup_stale() -> list[str]:
    """Remove namespaces, /etc/netns dirs and system users left by dead lab runs.

    Returns what was removed. Leftovers of runs that are still alive (other helpers running
    the lab in parallel) are never touched.
    """
    removed: list[str] = []
    for name in list_lab_namespaces():
        if is_stale(name):
            _kill_namespace_pids(name)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
            removed.append(f"netns {name}")
    if NETNS_ETC_DIR.is_dir():
        for entry in NETNS_ETC_DIR.iterdir():
            if _NAME_RE.match(entry.name) and not (NETNS_RUN_DIR / entry.name).exists():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(f"/etc/netns/{entry.name}")
    # Temp dirs are named <tag>-<random> by Lab; only the default temp dir is searched.
    for entry in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*-*"):
        tag = entry.name.rsplit("-", 1)[0]
        match = _NAME_RE.match(tag)
        if match and entry.is_dir() and not Path(f"/proc/{match['pid']}").exists():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(f"dir {entry}")
    for user in stale_users():
        subprocess.run(["userdel", "-f", user], capture_output=True, timeout=30)
        removed.append(f"user {user}")
    return removed


# Dante's system users: <prefix><pid>u<hex>; a user name cannot contain the run tag's "-".
_USER_RE = re.compile(rf"^{PREFIX}(?P<pid>\d+)u(?P<tag>[0-9a-f]+)$")


def lab_user_name(tag: str) -> str:
    """A system user name for run `tag` (tplab<pid>-<hex> -> tplab<pid>u<hex><rand>)."""
    match = _NAME_RE.match(tag)
    if match is None:
        raise ValueError(f"not a lab tag: {tag}")
    return f"{PREFIX}{match['pid']}u{match['tag']}{secrets.token_hex(1)}"


def stale_users() -> Iterator[str]:
    try:
        passwd = Path("/etc/passwd").read_text()
    except OSError:
        return
    for line in passwd.splitlines():
        name = line.split(":", 1)[0]
        match = _USER_RE.match(name)
        if match and not Path(f"/proc/{match['pid']}").exists():
            yield name
