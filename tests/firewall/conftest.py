"""Fixtures for the redirect tests: throwaway network namespaces and a helper driven by lines.

Every namespace, process and nft table made here is removed in `finally`, also when a test
fails. Names carry the pid and a random suffix so parallel runs do not collide.

Must not import PySide6 or tray_proxy.relay; must not depend on tests/lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tray_proxy.firewall.client import SOURCE_HELPER_PATH, SYSTEM_PYTHON

NFT_TABLE = "inet tray_proxy"


def _require_tools() -> None:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"missing tools for the firewall tests: {', '.join(missing)} "
            "(install iproute2 and nftables)"
        )
    if os.geteuid() != 0:
        pytest.fail("the firewall tests need root (network namespaces and nft)")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing; the helper runs with the system python")


def unique_name(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}{secrets.token_hex(3)}"


def _run(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@contextlib.contextmanager
def make_netns(name: str) -> Iterator[str]:
    """A fresh network namespace with loopback up; deleted on exit whatever happened."""
    _require_tools()
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _run("ip", "netns", "delete", name, check=False)


def in_ns(
    ns: str, *argv: str, check: bool = True, stdin: str | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in {ns} failed: {done.stderr.strip()}")
    return done


def table_present(ns: str) -> bool:
    return in_ns(ns, "nft", "list", "table", *NFT_TABLE.split(), check=False).returncode == 0


def ruleset_text(ns: str) -> str:
    return in_ns(ns, "nft", "list", "ruleset").stdout


def read_sysctl(ns: str, path: str) -> str:
    return in_ns(ns, "cat", f"/proc/sys/{path}").stdout.strip()


def write_sysctl(ns: str, path: str, value: str) -> None:
    in_ns(ns, "sh", "-c", f'echo "$1" > /proc/sys/{path}', "sh", value)


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")


# The relay stand-in: listens on 127.0.0.1:PORT as UID until its stdin closes.
_LISTENER = """
import os, socket, sys
uid = int(sys.argv[2])
if uid:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
sys.stdin.read()
"""

# Runs the helper's main() with test paths (policy file, Docker socket, ...): the installed
# helper takes no arguments, so no caller can point root at files of its own.
_HELPER_WITH_PATHS = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("tray_proxy_helper_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
sys.exit(module.main(**json.loads(sys.argv[2])))
"""


class Listener:
    """A TCP listener on 127.0.0.1:port inside `ns`, owned by `uid`: what the helper requires
    the relay port to be (a socket its caller listens on). Closed by close()."""

    def __init__(self, ns: str, port: int, uid: int = 0) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, SYSTEM_PYTHON, "-I", "-c", _LISTENER, str(port), str(uid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20.0)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            self.close()
            raise AssertionError(f"listener on {port} as uid {uid} in {ns} did not start")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


class HelperSession:
    """The helper as a subprocess inside a namespace, fed request lines like a transcript.

    `paths` replaces the helper's path constants (policy_path, docker_socket, podman_dir, ...);
    `env` its environment (PKEXEC_UID / SUDO_UID name its caller). With `listen` (default),
    an `apply` first starts a root listener on the requested relay port unless one runs:
    the helper refuses a relay port its caller does not listen on.
    """

    def __init__(
        self,
        ns: str,
        helper: str = SOURCE_HELPER_PATH,
        *,
        paths: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        listen: bool = True,
    ) -> None:
        self.ns = ns
        self.listen = listen
        self.listeners: dict[int, Listener] = {}
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in shutdown()
        argv = [SYSTEM_PYTHON, "-I", helper]
        if paths is not None:
            argv = [SYSTEM_PYTHON, "-I", "-c", _HELPER_WITH_PATHS, helper, json.dumps(paths)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr_file,
            env=env,
        )
        self._buffer = b""
        self._next_id = 0

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_answer(self, timeout: float = 20.0) -> dict[str, object]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer within {timeout} s; stderr: {self.stderr()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"helper closed stdout; stderr: {self.stderr()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    def line(self, data: bytes) -> dict[str, object]:
        self.send_raw(data + b"\n")
        return self.read_answer()

    def request(self, op: str, **fields: object) -> dict[str, object]:
        port = fields.get("relay_port")
        wanted = op == "apply" and self.listen and isinstance(port, int) and 0 < port < 65536
        if wanted and port not in self.listeners:
            assert isinstance(port, int)
            self.listeners[port] = Listener(self.ns, port)
        self._next_id += 1
        answer = self.line(json.dumps({"v": 1, "id": self._next_id, "op": op, **fields}).encode())
        assert answer["id"] == self._next_id, answer
        return answer

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")[-2000:]

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def shutdown(self) -> None:
        """Stop the process for good (the test may already have)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.close_stdin()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        self.stderr_file.close()
        for listener in self.listeners.values():
            listener.close()


@pytest.fixture
def netns() -> Iterator[str]:
    with make_netns(unique_name("tpfw")) as ns:
        yield ns


@pytest.fixture
def start_helper(netns: str) -> Iterator[object]:
    sessions: list[HelperSession] = []

    def start(ns: str = netns, **options: object) -> HelperSession:
        session = HelperSession(ns, **options)  # type: ignore[arg-type]
        sessions.append(session)
        return session

    try:
        yield start
    finally:
        for session in sessions:
            session.shutdown()


GOLDEN_DIR = Path(__file__).with_name("golden")
