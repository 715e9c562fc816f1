"""The real tray app under a real X server: Xvfb, the trayer tray host, the GUI process in the
lab's client namespace, its control CLI, and what X says about its windows.

- `XServer`: `Xvfb -displayfd` (the server picks a free display number itself, so parallel runs
  cannot race for one), `-nolisten tcp`. Clients in a network namespace reach it through the
  socket file in /tmp/.X11-unix (an abstract socket would belong to the host's namespace).
- `TrayHost`: `trayer`, an XEmbed system tray; ready once its panel window exists.
- `GuiProcess`: `python -m tray_proxy -v --config FILE` through `ip netns exec` in lab.client,
  as root there, so the root helper runs directly and its nft table lives in that namespace
  only. The password reaches it only as a file in CREDENTIALS_DIRECTORY (never argv or env).
  `ctl("status", "--json")` runs the CLI in the same namespace with the same XDG_RUNTIME_DIR.
- `window_tree()` parses `xwininfo -root -tree` so tests can ask who embedded whom.

Every process here is started in its own session and stopped (group-wide, escalating to
SIGKILL) by its `stop()`, which the tests call from fixtures, so a failing test leaves nothing.

Must not import tray_proxy (the app is exercised as a separate process) or PySide6.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import tomli_w

from tests.integration.relay import UpstreamSpec, allocate_port
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess

TABLE = "inet tray_proxy"
READY_MARKER = "control socket at"
SCREEN = "1024x768x24"
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Between fork and exec: if pytest dies hard, the kernel kills Xvfb / trayer too.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """SIGTERM the process group, SIGKILL what is left after `grace`, reap the leader."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=10)


# Each tool and the Debian package that installs it (CI installs them too).
X_TOOLS = {
    "Xvfb": "xvfb",
    "trayer": "trayer",
    "xdotool": "xdotool",
    "xwininfo": "x11-utils",
    "xprop": "x11-utils",
    "import": "imagemagick",
}


def require_x_tools() -> None:
    """Fail, naming the packages to install, when an X tool the tests drive is missing."""
    missing = sorted({pkg for tool, pkg in X_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise AssertionError(
            f"the tray app tests need X tools that are not installed: "
            f"apt-get install {' '.join(missing)}"
        )


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f}s")
        time.sleep(interval)


# --------------------------------------------------------------------------- X server


class XServer:
    """`Xvfb` on a display number of its own choosing; `stop()` ends it."""

    def __init__(self, *, start_timeout: float = 15.0) -> None:
        self.start_timeout = start_timeout
        self.display = ""
        self.process: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: nobody reads Xvfb's stderr while it runs, and a full pipe
        # would block the server.
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<XServer {self.display or 'not started'}>"

    def start(self) -> XServer:
        require_x_tools()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        read_fd, write_fd = os.pipe()
        argv = [
            "Xvfb", "-displayfd", str(write_fd), "-nolisten", "tcp",
            "-screen", "0", SCREEN, "-noreset",
        ]  # fmt: skip
        try:
            self.process = subprocess.Popen(
                argv,
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            os.close(write_fd)
            write_fd = -1
            number = self._read_display(read_fd)
        except BaseException:
            if write_fd >= 0:
                os.close(write_fd)
            self.stop()
            raise
        finally:
            os.close(read_fd)
        self.display = f":{number}"
        return self

    def _read_display(self, fd: int) -> int:
        # Xvfb writes the display number followed by a newline once it accepts clients.
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"Xvfb did not report a display within {self.start_timeout}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 64)
            if not chunk:
                err = self._stderr_tail()
                raise AssertionError(f"Xvfb exited before it was ready ({err})")
            data += chunk
        return int(data.strip())

    def _stderr_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-500:]

    @property
    def env(self) -> dict[str, str]:
        """Environment additions for an X client of this server."""
        return {"DISPLAY": self.display}

    def x(self, argv: Sequence[str], *, timeout: float = 10.0, check: bool = True) -> str:
        """Run an X client tool (xwininfo, xdotool, xprop, import) here; its stdout."""
        env = {**_clean_env(), **self.env}
        result = subprocess.run(
            list(argv), capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()[-500:]}"
            )
        return result.stdout.decode(errors="replace")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            _stop_group(proc)
        log, self._log = self._log, None
        if log is not None:
            log.close()


class TrayHost:
    """`trayer` (an XEmbed system tray) on `xserver`; ready once its panel window exists."""

    def __init__(self, xserver: XServer) -> None:
        self.xserver = xserver
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> TrayHost:
        argv = [
            "trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
            "--height", "24", "--SetDockType", "true",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            env={**_clean_env(), **self.xserver.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            poll(lambda: self.panel() is not None, timeout, "trayer's panel window")
        except BaseException:
            self.stop()
            raise
        return self

    def panel(self) -> Window | None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"trayer exited with {self.process.returncode}")
        return next(
            (w for w in window_tree(self.xserver) if w.wm_class == ("panel", "trayer")), None
        )

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            _stop_group(proc)


# --------------------------------------------------------------------------- windows


@dataclass
class Window:
    """One line of `xwininfo -root -tree`, linked to its parent."""

    id: str
    name: str | None
    wm_class: tuple[str, ...]
    width: int
    height: int
    parent: Window | None = field(default=None, repr=False)

    def ancestors(self) -> list[Window]:
        out: list[Window] = []
        node = self.parent
        while node is not None:
            out.append(node)
            node = node.parent
        return out

    @property
    def top_level(self) -> bool:
        return self.parent is None


_TREE_LINE = re.compile(
    r'^(?P<indent>\s*)(?P<id>0x[0-9a-f]+) (?:"(?P<name>.*)"|\(has no name\)): '
    r"\((?P<cls>[^)]*)\)\s+(?P<w>\d+)x(?P<h>\d+)"
)


def parse_window_tree(text: str) -> list[Window]:
    """Windows of `xwininfo -root -tree` output below the root (top-levels have no parent)."""
    windows: list[Window] = []
    stack: list[tuple[int, Window]] = []
    for line in text.splitlines():
        m = _TREE_LINE.match(line)
        if m is None:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        window = Window(
            id=m["id"],
            name=m["name"],
            wm_class=tuple(re.findall(r'"([^"]*)"', m["cls"])),
            width=int(m["w"]),
            height=int(m["h"]),
            parent=stack[-1][1] if stack else None,
        )
        windows.append(window)
        stack.append((indent, window))
    return windows


def window_tree(xserver: XServer) -> list[Window]:
    return parse_window_tree(xserver.x(["xwininfo", "-root", "-tree"]))


def window_pid(xserver: XServer, window: Window) -> int | None:
    out = xserver.x(["xprop", "-id", window.id, "_NET_WM_PID"], check=False)
    m = re.search(r"=\s*(\d+)", out)
    return int(m.group(1)) if m else None


def map_state(xserver: XServer, window: Window) -> str:
    out = xserver.x(["xwininfo", "-id", window.id])
    m = re.search(r"Map State:\s*(\w+)", out)
    assert m is not None, f"no map state in xwininfo output: {out[-300:]}"
    return m.group(1)


# --------------------------------------------------------------------------- the app


def _clean_env() -> dict[str, str]:
    """This process's environment without proxy variables and without a session bus.

    No proxy variables: the redirect, not curl's settings, must carry traffic. No session bus:
    Qt would look for a StatusNotifier host there instead of the XEmbed tray under test.
    """
    drop = {"DBUS_SESSION_BUS_ADDRESS", "WAYLAND_DISPLAY", "DISPLAY", "XAUTHORITY"}
    return {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.lower().endswith("_proxy") and not k.startswith("QT_")
    }


class GuiProcess:
    """The tray app in lab.client. `start()`, `ctl(...)`, `status()`, `stop()` (always)."""

    def __init__(
        self,
        lab: Lab,
        xserver: XServer,
        upstream: UpstreamSpec,
        *,
        args: Sequence[str] = (),
        redirect: Mapping[str, Any] | None = None,
        relay: Mapping[str, Any] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.lab = lab
        self.xserver = xserver
        self.upstream = upstream
        self.args = list(args)
        self.redirect = dict(redirect or {})
        self.relay = dict(relay or {})  # [relay] settings over the defaults below
        self.start_timeout = start_timeout
        self.workdir = lab.tmp / f"gui-{secrets.token_hex(4)}"
        self.runtime_dir = self.workdir / "run"
        self.config_home = self.workdir / "config"
        self.credentials_dir = self.workdir / "credentials"
        self.config_path = self.workdir / "config.toml"
        self.relay_port = 0
        self.process: NsProcess | None = None
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<GuiProcess {self.process!r} on {self.xserver.display}>"

    # files and environment -----------------------------------------------------------------

    def _write_files(self) -> None:
        self.workdir.mkdir(mode=0o700)
        for d in (self.runtime_dir, self.config_home, self.credentials_dir):
            d.mkdir(mode=0o700)
        if self.upstream.password is not None:
            path = self.credentials_dir / self.upstream.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.upstream.password)
        entry: dict[str, Any] = {"name": self.upstream.name, "url": self.upstream.url}
        if self.upstream.username is not None:
            entry["username"] = self.upstream.username
        self.relay_port = allocate_port(self.lab)
        doc: dict[str, Any] = {
            "relay": {
                "port": self.relay_port,
                "listen": ["127.0.0.1", "::1"],
                "upstream": self.upstream.name,
                "drain_timeout": 1.0,
                **self.relay,
            },
            "upstream": [entry],
        }
        if self.redirect:
            doc["redirect"] = self.redirect
        self.config_path.write_text(tomli_w.dumps(doc), encoding="utf-8")

    @property
    def env(self) -> dict[str, str]:
        return {
            **_clean_env(),
            **self.xserver.env,
            "QT_QPA_PLATFORM": "xcb",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.config_home),
            # The connection history goes here, not into root's own state dir.
            "XDG_STATE_HOME": str(self.workdir / "state"),
            "CREDENTIALS_DIRECTORY": str(self.credentials_dir),
            "PYTHONUNBUFFERED": "1",
        }

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> GuiProcess:
        self._write_files()
        argv = [sys.executable, "-m", "tray_proxy", "-v", "--config", str(self.config_path)]
        self.process = self.lab.client.popen(
            [*argv, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env
        )
        self._reader = threading.Thread(target=self._read_stderr, name="gui-stderr", daemon=True)
        self._reader.start()
        try:
            self.wait_for_line(READY_MARKER, timeout=self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with (self.workdir / "gui.stderr").open("w", encoding="utf-8") as copy:
            for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                copy.write(line + "\n")
                copy.flush()
                with self._lock:
                    self._lines.append(line)

    @property
    def pid(self) -> int:
        assert self.process is not None, "the GUI is not running"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails (with the log tail) when it does not exit within `timeout`."""
        assert self.process is not None
        try:
            self.returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the GUI did not exit within {timeout}s; log tail:\n{self.tail()}"
            ) from None
        return self.returncode

    def stop(self) -> None:
        """Idempotent. SIGTERM to the app alone first (its own shutdown path), then the group."""
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
            self.returncode = proc.stop(grace=3.0)
        finally:
            self.lab.client.forget(proc)
            if self._reader is not None:
                self._reader.join(timeout=10)
            if proc.stderr is not None:
                proc.stderr.close()
            # Last resort: a table left by a broken shutdown must not outlive the test.
            if has_table(self.lab):
                self.lab.client.run(["nft", "delete", "table", *TABLE.split()], check=False)

    # log -----------------------------------------------------------------------------------

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for_line(self, text: str, *, since: int = 0, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[since:]:
                if text in line:
                    return line
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process is not None else None
                raise AssertionError(
                    f"the GUI exited ({code}) before logging {text!r}; log:\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"the GUI did not log {text!r} within {timeout}s; log:\n{self.tail()}"
                )
            time.sleep(0.05)

    # control CLI ---------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`python -m tray_proxy ARGS` in lab.client with this app's XDG_RUNTIME_DIR."""
        return subprocess.run(
            ["ip", "netns", "exec", self.lab.client.name, sys.executable, "-m", "tray_proxy"]
            + list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def status(self) -> dict[str, Any]:
        result = self.ctl("status", "--json", timeout=20)
        assert result.returncode == 0, f"status failed ({result.returncode}): {result.stderr}"
        status = json.loads(result.stdout)
        assert isinstance(status, dict), result.stdout
        return status

    def enable(self) -> dict[str, Any]:
        result = self.ctl("enable")
        assert result.returncode == 0, (
            f"enable failed ({result.returncode}): {result.stdout}{result.stderr}\n{self.tail()}"
        )
        return self.wait_for_state("on")

    def wait_for_state(self, state: str, timeout: float = 20.0) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal last
            last = self.status()
            return last.get("state") == state

        try:
            poll(reached, timeout, f"state {state!r}", interval=0.2)
        except AssertionError:
            raise AssertionError(
                f"the app did not reach {state!r} within {timeout}s; last status "
                f"{json.dumps(last)[:800]}; log:\n{self.tail()}"
            ) from None
        return last

    # windows -------------------------------------------------------------------------------

    def own_windows(self) -> list[Window]:
        """Windows whose WM_CLASS is ours and whose _NET_WM_PID is this process."""
        return [
            w
            for w in window_tree(self.xserver)
            if w.wm_class == ("tray-proxy", "tray-proxy")
            and window_pid(self.xserver, w) == self.pid
        ]

    def main_window(self) -> Window | None:
        """The top-level main window, if it is mapped and viewable."""
        for w in self.own_windows():
            if (
                w.top_level
                and w.name == "tray-proxy"
                and map_state(self.xserver, w) == "IsViewable"
            ):
                return w
        return None


def has_table(lab: Lab) -> bool:
    """Is the app's nft table present in lab.client?"""
    out = lab.client.run(["nft", "list", "tables"]).stdout.decode()
    return any(line.strip() == f"table {TABLE}" for line in out.splitlines())
