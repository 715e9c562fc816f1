"""Signals during a download: Ctrl+C, SIGTERM, SIGHUP and a closed terminal to `tray-proxy run`,
and Quit, SIGINT, SIGTERM and SIGHUP to the tray app, each while curl (no proxy settings)
fetches through the redirect, the relay and the lab's Squid (issue 16 item 8, issue 14 bugs 2
and 3).

What a drain promises: open tunnels keep flowing for `drain_timeout`; a download that ends in
that time ends complete; every client still connected then sees its connection end at once
(curl exits within drain_timeout + 1 s, never by its own timeout); the redirect is gone; and
nothing on stderr warns about a shutdown that went as it should.

Two downloads run at each signal, paced by curl's --limit-rate: one that finishes inside the
drain (16 MB, nearly done at the signal) and one that cannot (20 MB). The clients are slower
than the proxy, so the relay holds data for them at the end of the drain; the client
namespace's TCP receive buffers are small for the test, so curl notices the end of its
connection as soon as it comes, and the origin is reachable from there only through the proxy,
as in an office. "Ctrl+C" is SIGINT to the whole process group of `tray-proxy
run`, started as a terminal starts it (its own session, the group leader), so whatever the run
starts in that group gets the SIGINT too.

Real components only: the relay as `python -m tray_proxy run` (the root helper started by it),
nftables, Squid with its login, the origin, curl; the app under Xvfb (tests/integration/
app_support.py). Everything lives in the lab's namespaces. Must not import PySide6.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.firewall.e2e_support import (
    REDIRECT_ON,
    RedirectedRun,
    client_left_clean,
    has_our_table,
)
from tests.firewall.test_e2e_pkexec import REPO as PKEXEC_REPO
from tests.firewall.test_e2e_pkexec import Sandbox, polkit_sandbox
from tests.integration.app_support import GuiProcess, XServer, has_table
from tests.integration.relay import UpstreamSpec, allocate_port
from tests.lab.curl import curl_config
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess
from tests.lab.origins import HOSTNAME

pytestmark = pytest.mark.lab

DRAIN = 3.0  # relay.drain_timeout in these tests, seconds
# After the drain the client must see the end at once; 1 s covers the helper's exit and load.
END_SLACK = 1.0
# The drain must not end early either: a download still open keeps flowing this close to the
# drain's end (the loop's timer and a loaded CI machine take a little).
EARLY_SLACK = 0.5

SHORT = 16_000_000  # finishes inside the drain
SHORT_RATE = 4_000_000  # bytes/s: 4 s in all, signalled at 12 MB
SHORT_SIGNAL_AT = 12_000_000
LONG = 20_000_000  # cannot finish inside the drain
LONG_RATE = 2_000_000  # bytes/s: ~14 MB left at the signal, 7 s of work
# Clients read slower than the proxy sends (curl's limit-rate), so the relay holds data for
# them when the drain ends, here up to 4 MB in each socket's send buffer (tcp_wmem): the case
# where a FIN queued behind that data never arrived (the table, and with it the connection's
# NAT state, went 28 ms later: issue 14, bug 2). Small receive buffers keep what curl itself
# has buffered to ~0.1 s of reading, so the moment curl notices the end is the moment the
# relay ended the connection. Both only in the client namespace, for one test.
CLIENT_TCP_RMEM = "4096 65536 131072"
CLIENT_TCP_WMEM = "4194304 4194304 4194304"

# What a clean shutdown must not print (bug 3 listed these, all false alarms).
FALSE_ALARMS = re.compile(
    r" WARNING | ERROR | CRITICAL |Traceback|refused to start the redirect helper|"
    r"stopped with exit code|something unexpected",
)


@dataclass
class Download:
    """A curl in lab.client fetching /bytes/<size> over https by name, no proxy settings."""

    lab: Lab
    size: int
    seed: str
    output: Path
    proc: NsProcess
    ended_at: float | None = None

    @classmethod
    def start(cls, lab: Lab, size: int, rate: int, workdir: Path) -> Download:
        seed = f"sig-{secrets.token_hex(4)}"
        output = workdir / f"{seed}.body"
        config = curl_config(
            lab.origins.url("https", lab.origins.bytes_path(size, seed)),
            cacert=lab.ca_path,
            resolve=[f"{HOSTNAME}:443:{lab.origins.v4}"],
            output=output,
            max_time=60,
            options=[f"limit-rate = {rate}"],
        )
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc = lab.client.popen(
            ["curl", "--disable", "--config", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None
        proc.stdin.write(config.encode())
        proc.stdin.close()
        return cls(lab, size, seed, output, proc)

    def received(self) -> int:
        try:
            return self.output.stat().st_size
        except FileNotFoundError:
            return 0

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None and self.ended_at is None:
            self.ended_at = time.monotonic()
        return code

    def state(self, since: float) -> str:
        """One line for a failure message: running or how it ended, and the bytes so far."""
        code = self.poll()
        if code is None:
            how = "still running"
        else:
            assert self.ended_at is not None
            how = f"exited {code} {self.ended_at - since:.2f} s after the signal"
        return f"the {self.size // 1_000_000} MB download: {how}, {self.received()} bytes"

    def complete(self) -> bool:
        return self.received() == self.size and self.lab.origins.expected_sha256(
            self.size, self.seed
        ) == _sha256(self.output)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace").strip()

    def stop(self) -> None:
        try:
            self.proc.stop(grace=1.0)
        finally:
            self.lab.client.forget(self.proc)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wait(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    details: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            more = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{more}")
        time.sleep(0.02)


@contextlib.contextmanager
def two_downloads(lab: Lab) -> Iterator[tuple[Download, Download]]:
    workdir = lab.tmp / f"signals-{secrets.token_hex(3)}"
    workdir.mkdir(mode=0o700)
    downloads: list[Download] = []
    try:
        downloads.append(Download.start(lab, SHORT, SHORT_RATE, workdir))
        downloads.append(Download.start(lab, LONG, LONG_RATE, workdir))
        yield downloads[0], downloads[1]
    finally:
        for download in downloads:
            download.stop()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


def signal_during_downloads(
    lab: Lab, send: Callable[[], None], describe: Callable[[], str]
) -> list[str]:
    """Start both downloads, send the signal when the short one is at 12 MB, check the drain.

    Returns the problems found (empty: the drain drained); `describe()` adds the log tail.
    """
    problems: list[str] = []
    with two_downloads(lab) as (short, long):
        _wait(
            lambda: short.received() >= SHORT_SIGNAL_AT or short.poll() is not None,
            30,
            f"the 16 MB download reaching 12 MB through the relay\n{describe()}",
        )
        assert short.poll() is None, f"the download ended early: {short.stderr()}\n{describe()}"
        assert long.poll() is None, f"the download ended early: {long.stderr()}\n{describe()}"
        long_at_signal = long.received()
        signalled = time.monotonic()
        send()
        _wait(
            lambda: short.poll() is not None and long.poll() is not None,
            DRAIN + END_SLACK + 15,
            "both curls to exit",
            lambda: f"{short.state(signalled)}\n{long.state(signalled)}\n{describe()}",
        )
        assert short.ended_at is not None and long.ended_at is not None
        short_took = short.ended_at - signalled
        long_took = long.ended_at - signalled
        # The short one finishes in the drain, complete.
        if short.proc.returncode != 0 or not short.complete():
            problems.append(
                f"the 16 MB download did not finish in the drain: curl exit "
                f"{short.proc.returncode} after {short_took:.2f} s, {short.received()} bytes, "
                f"{short.stderr()!r}"
            )
        elif short_took > DRAIN:
            problems.append(f"the 16 MB download took {short_took:.2f} s after the signal")
        # The long one keeps flowing until the drain ends, then ends at once, not by curl's
        # own timeout (28).
        flowed = long.received() - long_at_signal
        if long_took > DRAIN + END_SLACK:
            problems.append(
                f"the 20 MB download ended {long_took:.2f} s after the signal (drain_timeout "
                f"{DRAIN:g} s + {END_SLACK:g} s allowed): curl exit {long.proc.returncode}"
            )
        if long_took < DRAIN - EARLY_SLACK:
            problems.append(
                f"the 20 MB download was cut {long_took:.2f} s after the signal, before "
                f"drain_timeout {DRAIN:g} s: curl exit {long.proc.returncode}, "
                f"{long.stderr()!r}"
            )
        if long.proc.returncode in (0, 28):
            problems.append(f"the 20 MB download ended with curl exit {long.proc.returncode}")
        if flowed < LONG_RATE * (DRAIN - EARLY_SLACK) / 2:
            problems.append(f"only {flowed} bytes of the 20 MB download flowed in the drain")
    return problems


def _false_alarms(lines: list[str]) -> list[str]:
    return [line for line in lines if FALSE_ALARMS.search(line)]


@pytest.fixture
def only_through_the_proxy(lab: Lab) -> Iterator[None]:
    """As on an office network, the client namespace cannot reach the origin directly, only
    through the proxy: a table of the test's own drops direct TCP to the origin (filter
    priority, after the redirect's NAT). Without it, a connection whose NAT state went with
    the redirect's table reached the origin itself, which answered with a reset, and a client
    the relay left hanging looked as if it had been ended (issue 14, bug 2)."""
    # Not "tray_proxy..." : has_our_table() looks for that text in `nft list tables`.
    table = f"test_no_direct_route_{os.getpid()}"
    ruleset = (
        f"table inet {table} {{\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    ip daddr {lab.origins.v4} tcp dport {{ 80, 443 }} drop\n"
        f"    ip6 daddr {lab.origins.v6} tcp dport {{ 80, 443 }} drop\n"
        "  }\n"
        "}\n"
    )
    lab.client.run(["nft", "-f", "-"], input=ruleset.encode())
    try:
        yield
    finally:
        lab.client.run(["nft", "delete", "table", "inet", table], check=False)


@pytest.fixture
def small_buffers(lab: Lab, only_through_the_proxy: None) -> Iterator[None]:
    """The client namespace's TCP buffers at CLIENT_TCP_RMEM / CLIENT_TCP_WMEM for one test."""
    changed: list[tuple[str, str]] = []
    try:
        for name, value in (("tcp_rmem", CLIENT_TCP_RMEM), ("tcp_wmem", CLIENT_TCP_WMEM)):
            path = f"/proc/sys/net/ipv4/{name}"
            before = lab.client.run(["cat", path]).stdout.decode().strip()
            lab.client.run(["sh", "-c", f'echo "$1" > {path}', "sh", value])
            changed.append((path, before))
        yield
    finally:
        for path, before in changed:
            lab.client.run(["sh", "-c", f'echo "$1" > {path}', "sh", before])


# --------------------------------------------------------------------------- tray-proxy run


class TerminalRun(RedirectedRun):
    """`tray-proxy run` on a terminal of its own: a pty whose slave is its stdin, stdout and
    stderr and its controlling terminal, the run its session leader (as `xterm -e tray-proxy
    run` starts it). `hang_up()` closes the terminal as closing its window does: the kernel
    sends the run SIGHUP, and every later write to stderr fails (EIO)."""

    def __enter__(self) -> TerminalRun:
        self.port = allocate_port(self.lab)
        config = self._write_files()
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["CREDENTIALS_DIRECTORY"] = str(self.workdir / "credentials")
        for var, sub in (("XDG_RUNTIME_DIR", "runtime"), ("XDG_STATE_HOME", "state")):
            (self.workdir / sub).mkdir(mode=0o700, exist_ok=True)
            env[var] = str(self.workdir / sub)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("TRAY_PROXY_HELPER", None)
        self._master, slave = os.openpty()
        self._hang_up = threading.Event()
        self._closed = threading.Event()
        argv = [sys.executable, "-m", "tray_proxy", "run", "--config", str(config), "-v"]
        try:
            # start_new_session first (setsid), then the pty becomes the controlling terminal.
            self.process = self.lab.client.popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                preexec_fn=_take_controlling_terminal,
            )
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, name="terminal-run", daemon=True)
        self._reader.start()
        try:
            self.wait_for_line(REDIRECT_ON, timeout=self.timeout)
        except BaseException:
            self.kill_all()
            raise
        return self

    def _read(self) -> None:
        # Reads the terminal (the run's output) until hang_up(), then closes it: only this
        # thread touches the master fd, so it is never closed under a pending read.
        pending = b""
        try:
            while not self._hang_up.is_set():
                ready, _, _ = select.select([self._master], [], [], 0.05)
                if not ready:
                    continue
                try:
                    chunk = os.read(self._master, 65536)
                except OSError:  # EIO: the run has gone and the slave is closed
                    break
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                with self._lock:
                    self._lines += [ln.decode(errors="replace").rstrip("\r") for ln in lines]
        finally:
            os.close(self._master)
            self._closed.set()

    def hang_up(self) -> None:
        self._hang_up.set()
        assert self._closed.wait(5), "the terminal was not closed"

    def kill_all(self) -> None:
        self._hang_up.set()
        super().kill_all()


def _take_controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _ctrl_c(run: RedirectedRun) -> None:
    os.killpg(run.pid, signal.SIGINT)  # the terminal's Ctrl+C: the whole foreground group


def _sigterm(run: RedirectedRun) -> None:
    os.kill(run.pid, signal.SIGTERM)


def _sighup(run: RedirectedRun) -> None:
    os.kill(run.pid, signal.SIGHUP)


def _sighup_to_group(run: RedirectedRun) -> None:
    os.killpg(run.pid, signal.SIGHUP)  # a shell forwarding its hang-up to the job


def _draining_run(lab: Lab) -> RedirectedRun:
    """`tray-proxy run` through the lab's Squid with these tests' drain timeout."""
    return RedirectedRun(
        lab, UpstreamSpec.for_squid(lab.squid), relay={"drain_timeout": DRAIN}, timeout=60
    )


@pytest.mark.parametrize(
    "send",
    [_ctrl_c, _sigterm, _sighup, _sighup_to_group],
    ids=["ctrl-c-to-group", "sigterm", "sighup", "sighup-to-group"],
)
def test_run_drains_on_signal(
    lab: Lab, small_buffers: None, send: Callable[[RedirectedRun], None]
) -> None:
    with client_left_clean(lab), _draining_run(lab) as run:
        _check_run_drains(lab, run, send)


def _helper_of(run: RedirectedRun) -> psutil.Process:
    """The run's root helper (as root, the run starts it itself, without a launcher)."""
    helpers = [
        child
        for child in psutil.Process(run.pid).children(recursive=True)
        if any("helper" in part for part in child.cmdline())
    ]
    assert len(helpers) == 1, f"the run's helper among {helpers}"
    return helpers[0]


def _request_waiting(lab: Lab, helper: psutil.Process) -> bool:
    """A request waits unread in the helper's input (it is stopped, so it cannot read).

    The input is one end of a socket pair (asyncio's subprocess stdin): `ss` shows its
    receive queue, found by the socket's inode."""
    target = os.readlink(f"/proc/{helper.pid}/fd/0")
    match = re.fullmatch(r"socket:\[(\d+)\]", target)
    assert match, f"the helper's input is {target}, not a socket"
    out = lab.client.run(["ss", "-x", "-n", "-H"]).stdout.decode()
    for line in out.splitlines():
        fields = line.split()
        # u_str ESTAB Recv-Q Send-Q * <inode> * <peer inode>
        if len(fields) >= 6 and fields[5] == match.group(1):
            return int(fields[2]) > 0
    raise AssertionError(f"no socket {match.group(1)} in the client namespace:\n{out}")


def test_ctrl_c_while_the_run_asks_its_helper_something_still_drains(
    lab: Lab, small_buffers: None
) -> None:
    # The run asks its helper every few seconds which container bridges exist. Ctrl+C while
    # that question was out cancelled it; its answer then came back to the `remove` that
    # followed ("answered 'remove' with something unexpected"), and the helper was ended
    # before the drain: open connections lost their address translation and their curls hung
    # (a CI failure: "timed out after 19.0 s waiting for both curls to exit"). Here the
    # helper is stopped until a question waits in its input, so Ctrl+C lands on it each time.
    with client_left_clean(lab), _draining_run(lab) as run:
        helper = _helper_of(run)
        mark = run.mark()
        helper.suspend()
        try:
            _wait(
                lambda: _request_waiting(lab, helper), 10, "the run's next question to its helper"
            )

            def ctrl_c_then_answer(run: RedirectedRun) -> None:
                _ctrl_c(run)
                run.wait_for_line("removing the redirect", since=mark, timeout=10)
                helper.resume()  # answers the cancelled question first, then the remove

            _check_run_drains(lab, run, ctrl_c_then_answer, mark=mark)
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                helper.resume()


def _check_run_drains(
    lab: Lab, run: RedirectedRun, send: Callable[[RedirectedRun], None], *, mark: int | None = None
) -> None:
    assert os.getpgid(run.pid) == run.pid, "tray-proxy run must lead its process group"
    if mark is None:
        mark = run.mark()

    def describe() -> str:
        return "tray-proxy run's log:\n" + "\n".join(run.lines[-30:])

    problems = signal_during_downloads(lab, lambda: send(run), describe)
    assert run.process is not None
    try:
        code = run.process.wait(DRAIN + 15)
    except subprocess.TimeoutExpired:
        code = None
    run.returncode = code
    lines = run.lines[mark:]
    if code != 0:
        problems.append(f"tray-proxy run exited with {code}")
    if has_our_table(lab.client):
        problems.append("table inet tray_proxy is still there")
    if not any("stopping (draining" in line for line in lines):
        problems.append("no 'stopping (draining open connections)' line")
    problems += [f"false alarm on stderr: {line}" for line in _false_alarms(lines)]
    assert not problems, "\n".join(problems) + "\n" + describe()


class MemberRun(RedirectedRun):
    """`tray-proxy run` as the polkit sandbox's group member (tests/firewall/
    test_e2e_pkexec.py): the run starts the installed helper with the real pkexec, allowed by
    the installer's polkit rule, as a user's terminal session would."""

    def __init__(self, lab: Lab, upstream: UpstreamSpec, box: Sandbox, **kwargs: Any) -> None:
        super().__init__(lab, upstream, **kwargs)
        self.box = box

    def __enter__(self) -> MemberRun:
        self.port = allocate_port(self.lab)
        config = self._write_files()
        for sub in ("runtime", "state"):
            (self.workdir / sub).mkdir(mode=0o700)
        member = self.box.member
        for path in [self.workdir, *self.workdir.rglob("*")]:
            os.chown(path, member, member)
        argv = self.box.as_user(
            member,
            self.lab.client.name,
            [
                "env",
                f"CREDENTIALS_DIRECTORY={self.workdir / 'credentials'}",
                f"XDG_RUNTIME_DIR={self.workdir / 'runtime'}",
                f"XDG_STATE_HOME={self.workdir / 'state'}",
                "PYTHONUNBUFFERED=1",
                *(sys.executable, "-m", "tray_proxy", "run", "--config", str(config), "-v"),
            ],
        )
        # Its own session, as a terminal gives it; not an NsProcess, because the mount
        # namespace has to be entered before the network namespace.
        self.process = subprocess.Popen(  # type: ignore[assignment]
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=str(PKEXEC_REPO),
        )
        self._reader = threading.Thread(target=self._read, name="member-run", daemon=True)
        self._reader.start()
        try:
            self.wait_for_line(REDIRECT_ON, timeout=self.timeout)
        except BaseException:
            self.kill_all()
            raise
        return self

    def kill_all(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(3)
                if proc.returncode is not None:
                    break
            if self.returncode is None:
                self.returncode = proc.returncode
        finally:
            if self._reader is not None:
                self._reader.join(timeout=10)
            if proc.stderr is not None:
                proc.stderr.close()


def test_run_by_a_group_member_via_pkexec_drains_on_ctrl_c(lab: Lab, small_buffers: None) -> None:
    # Issue 14 bug 3 through polkit: the helper pkexec started is in a session of its own, so
    # Ctrl+C reaches only the run, which drains and then ends the helper ("stopped with exit
    # code 0" was a false alarm when the helper got the SIGINT too).
    with (
        client_left_clean(lab),
        polkit_sandbox(lab) as box,
        MemberRun(
            lab,
            UpstreamSpec.for_squid(lab.squid),
            box,
            relay={"drain_timeout": DRAIN},
            timeout=60,
        ) as run,
    ):
        _check_run_drains(lab, run, _ctrl_c)


def test_run_drains_when_its_terminal_closes(lab: Lab, small_buffers: None) -> None:
    # Closing the terminal window: SIGHUP, and stderr is gone. The drain must not depend on
    # being able to say so.
    with (
        client_left_clean(lab),
        TerminalRun(
            lab,
            UpstreamSpec.for_squid(lab.squid),
            relay={"drain_timeout": DRAIN},
            timeout=60,
        ) as run,
    ):

        def describe() -> str:
            return "tray-proxy run's terminal, up to the hang-up:\n" + "\n".join(run.lines[-30:])

        problems = signal_during_downloads(lab, run.hang_up, describe)
        assert run.process is not None
        try:
            code = run.process.wait(DRAIN + 15)
        except subprocess.TimeoutExpired:
            code = None
        run.returncode = code
        if code != 0:
            problems.append(f"tray-proxy run exited with {code}")
        if has_our_table(lab.client):
            problems.append("table inet tray_proxy is still there")
        assert not problems, "\n".join(problems) + "\n" + describe()


def test_ctrl_c_while_the_run_starts_is_no_traceback(tmp_path: Path) -> None:
    # The settings file is a FIFO: the run blocks reading it, as it can on a slow keyring, and
    # gets Ctrl+C there. It was a KeyboardInterrupt traceback; now the run ends, switching
    # nothing on.
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo, 0o600)
    for sub in ("run", "state"):
        (tmp_path / sub).mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(XDG_RUNTIME_DIR=str(tmp_path / "run"), XDG_STATE_HOME=str(tmp_path / "state"))
    argv = [sys.executable, "-m", "tray_proxy", "run", "--config", str(fifo), "--no-redirect"]
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, env=env, start_new_session=True, text=True
    )
    try:
        writer = -1
        deadline = time.monotonic() + 30
        while writer < 0:  # opens once the run has opened the FIFO to read it
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the run never read its settings"
                time.sleep(0.02)
        try:
            os.killpg(proc.pid, signal.SIGINT)
            settings = '[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:9"\n'
            os.write(writer, settings.encode())
        finally:
            os.close(writer)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "SIGINT: stopping" in err and "stopped" in err, err
    assert "relay listening" not in err, err


# --------------------------------------------------------------------------- the tray app


@pytest.fixture
def xserver() -> Iterator[XServer]:
    server = XServer()
    try:
        yield server.start()
    finally:
        server.stop()


def _quit(gui: GuiProcess) -> None:
    # The control socket's quit sets the same event as the tray menu's and the window's Quit.
    done = gui.ctl("quit", timeout=20)
    assert done.returncode == 0, done.stderr


def _app_sigint(gui: GuiProcess) -> None:
    os.kill(gui.pid, signal.SIGINT)


def _app_sigterm(gui: GuiProcess) -> None:
    os.kill(gui.pid, signal.SIGTERM)


def _app_sighup(gui: GuiProcess) -> None:
    os.kill(gui.pid, signal.SIGHUP)


@pytest.mark.parametrize(
    "send",
    [_quit, _app_sigint, _app_sigterm, _app_sighup],
    ids=["quit", "sigint", "sigterm", "sighup"],
)
def test_app_drains_on_quit_and_signals(
    lab: Lab, small_buffers: None, xserver: XServer, send: Callable[[GuiProcess], None]
) -> None:
    gui = GuiProcess(
        lab,
        xserver,
        UpstreamSpec.for_squid(lab.squid),
        args=["--no-tray"],
        redirect={"exclude": ["127.0.0.0/8", "::1/128"]},
        relay={"drain_timeout": DRAIN},
    )
    try:
        gui.start()
        gui.enable()
        assert has_table(lab)
        mark = len(gui.lines)

        def describe() -> str:
            return "the app's log:\n" + gui.tail(30)

        problems = signal_during_downloads(lab, lambda: send(gui), describe)
        try:
            code = gui.wait_exit(DRAIN + 15)
        except AssertionError as exc:
            code = None
            problems.append(str(exc))
        if code is not None and code != 0:
            problems.append(f"the app exited with {code}")
        if has_table(lab):
            problems.append("table inet tray_proxy is still there")
        problems += [f"false alarm on stderr: {line}" for line in _false_alarms(gui.lines[mark:])]
        assert not problems, "\n".join(problems) + "\n" + describe()
    finally:
        gui.stop()
