"""Evaluating the PAC script with pypac, in a child process, with a deadline.

Why a child: pypac runs the script in QuickJS (dukpy), which holds the GIL while it runs. A
script that loops (or is slow) would freeze the whole app, relay thread included, and a thread
cannot be stopped. In a child it costs the relay nothing, and a script that overruns its
deadline is killed; the next evaluation starts a fresh child with the same script.

The parent (`PacEvaluator`) and the child (`python -m tray_proxy.routing.pac_worker`) speak
JSON lines: {"js": TEXT} -> {"ok": true} | {"error": WORDS}; {"url": U, "host": H} ->
{"result": TEXT} | {"error": WORDS}; each with "limit": seconds after which the child ends
itself (in case the parent is gone while a script loops). `PacScript` ties a source
(pac_source), its refetch schedule (pac.PacSchedule) and an evaluator together; the router asks
it `find(url, host)`.
Blocking: the relay calls `find` and `refresh` off its loop.

Must not import PySide6, asyncio or the relay engine; the child imports only pypac and stdlib.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tray_proxy.routing.pac import PacFailure, PacSchedule
from tray_proxy.routing.pac_source import PacText, Unchanged, fetch_pac

__all__ = ["PacEvaluator", "PacScript", "PacStatus", "main"]

_MAX_LINE = 2 << 20


class PacEvaluator:
    """One child process running pypac's PACFile; thread-safe (evaluations are serialised,
    as the script's interpreter is single-threaded anyway)."""

    def __init__(self, timeout: float = 2.0, python: str = sys.executable) -> None:
        self.timeout = timeout
        self._python = python
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._js: str | None = None

    def load(self, js: str) -> PacFailure | None:
        """Use `js` from now on; a failure when it does not parse or its test call fails
        (the previous script, if any, stays in use then)."""
        with self._lock:
            self._stop()
            failure = self._start(js)
            if failure is not None:
                # The last good script, if any, stays in use (restarted on the next find).
                self._stop()
                return failure
            self._js = js
            return None

    @property
    def loaded(self) -> bool:
        return self._js is not None

    def find(self, url: str, host: str) -> str | PacFailure:
        """FindProxyForURL(url, host) as the script returns it, or why not."""
        with self._lock:
            if self._js is None:
                return PacFailure("no PAC script is loaded")
            if self._proc is None:
                failure = self._start(self._js)
                if failure is not None:
                    self._stop()
                    return failure
            reply = self._ask({"url": url, "host": host}, "FindProxyForURL")
            if isinstance(reply, PacFailure):
                return reply
            result = reply.get("result")
            if isinstance(result, str):
                return result
            return PacFailure(str(reply.get("error", "the PAC worker answered nonsense")))

    def close(self) -> None:
        with self._lock:
            self._stop()
            self._js = None

    # -- the child

    def _start(self, js: str) -> PacFailure | None:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        try:
            self._proc = subprocess.Popen(
                [self._python, "-m", "tray_proxy.routing.pac_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                close_fds=True,
            )
        except OSError as exc:
            self._proc = None
            return PacFailure(f"cannot start the PAC evaluator: {exc.strerror or exc}")
        self._buffer = b""
        # Loading runs the script's top level and one test call: the same deadline applies.
        reply = self._ask({"js": js}, "loading the PAC script")
        if isinstance(reply, PacFailure):
            return reply
        if reply.get("ok") is True:
            return None
        return PacFailure(f"the PAC script does not work: {reply.get('error', 'unknown error')}")

    def _ask(self, message: dict[str, object], what: str) -> dict[str, object] | PacFailure:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        # The child stops itself a second after our deadline: should this process die while
        # the script loops, nobody else would stop it (see main()).
        message = {**message, "limit": self.timeout + 1.0}
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            self._stop()
            return PacFailure(f"the PAC evaluator exited while {what}")
        deadline = time.monotonic() + self.timeout
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._stop()
                    return PacFailure(
                        f"{what} took longer than {self.timeout:g} s; the PAC script was stopped"
                    )
                chunk = os.read(fd, 65536)
                if not chunk or len(self._buffer) > _MAX_LINE:
                    self._stop()
                    return PacFailure(f"the PAC evaluator exited while {what}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._stop()
            return PacFailure("the PAC evaluator answered nonsense")
        return reply

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        # Popen(stdin=PIPE, stdout=PIPE) always has both.
        assert proc.stdin is not None and proc.stdout is not None
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()


@dataclass(frozen=True, slots=True)
class PacStatus:
    """What a refresh found: `ok` False with `words` when the script could not be fetched or
    loaded (an error event; routing falls back to the rules), `changed` when a new version
    is in use (the router drops its cached PAC decisions)."""

    ok: bool
    changed: bool
    words: str = ""


class PacScript:
    """The PAC script at `location`: fetched on the caller's timer, evaluated by a child."""

    def __init__(
        self,
        location: str,
        evaluator: PacEvaluator | None = None,
        schedule: PacSchedule | None = None,
        *,
        fetch: Callable[[str, str | None], PacText | Unchanged | PacFailure] | None = None,
    ) -> None:
        self.location = location
        self.evaluator = evaluator or PacEvaluator()
        self.schedule = schedule or PacSchedule()
        self._fetch = fetch or (lambda loc, validator: fetch_pac(loc, validator))
        self._validator: str | None = None
        self.generation = 0
        self.failure: PacFailure | None = PacFailure("the PAC script was not fetched yet")

    def refresh(self, now: float, *, force: bool = False) -> PacStatus | None:
        """Fetch again when due (or `force`); None when it was not due."""
        if not force and not self.schedule.due(now):
            return None
        got = self._fetch(self.location, self._validator)
        if isinstance(got, Unchanged):
            self.schedule.checked(now, True)
            return PacStatus(ok=self.failure is None, changed=False)
        if isinstance(got, PacFailure):
            self.schedule.checked(now, False)
            # A script that worked stays in use while its source is unreachable.
            if not self.evaluator.loaded:
                self.failure = got
            return PacStatus(ok=False, changed=False, words=got.words)
        failure = self.evaluator.load(got.text)
        self.schedule.checked(now, failure is None)
        if failure is not None:
            # Retry this version on the next check, not as "unchanged".
            self._validator = None
            if not self.evaluator.loaded:
                self.failure = failure
            return PacStatus(ok=False, changed=False, words=failure.words)
        self._validator = got.validator
        self.failure = None
        self.generation += 1
        return PacStatus(ok=True, changed=True)

    def find(self, url: str, host: str) -> str | PacFailure:
        if not self.evaluator.loaded:
            return self.failure or PacFailure("no PAC script is loaded")
        return self.evaluator.find(url, host)

    def close(self) -> None:
        self.evaluator.close()


# --------------------------------------------------------------------------- the child


def main() -> int:  # pragma: no cover - runs in the child; tested through PacEvaluator
    from pypac.parser import PACFile

    pac: PACFile | None = None
    for raw in sys.stdin.buffer:
        try:
            message = json.loads(raw)
            # QuickJS holds the GIL, so no Python-level handler could run while a script loops;
            # SIGALRM's default action ends the process from the kernel side.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, float(message.get("limit", 0)))
            if "js" in message:
                pac = PACFile(message["js"])
                reply: dict[str, object] = {"ok": True}
            elif pac is None:
                reply = {"error": "no script loaded"}
            else:
                result = pac.find_proxy_for_url(message["url"], message["host"])
                reply = (
                    {"result": result}
                    if isinstance(result, str)
                    else {
                        "error": f"FindProxyForURL returned {type(result).__name__}, not a string"
                    }
                )
        except Exception as exc:  # noqa: BLE001 - every failure of the script is its answer
            reply = {"error": _words(exc)}
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def _words(exc: Exception) -> str:  # pragma: no cover - runs in the child
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:300]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
