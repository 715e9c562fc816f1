"""The PAC script for real: pypac in its child process, scripts served by a real HTTP server on
loopback or read from files; refetch on change (ETag, Last-Modified, content, mtime), broken
scripts, scripts that throw or never return (killed at the deadline)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tray_proxy.routing.pac import PacFailure, PacSchedule
from tray_proxy.routing.pac_source import MAX_PAC_BYTES, PacText, Unchanged, fetch_pac
from tray_proxy.routing.pac_worker import PacEvaluator, PacScript

PAC = """
function FindProxyForURL(url, host) {
    if (dnsDomainIs(host, ".intra.example") || isPlainHostName(host)) return "DIRECT";
    if (shExpMatch(host, "*.eu.example")) return "PROXY backup.corp:3128; DIRECT";
    if (host == "loop.example") { while (true) {} }
    if (host == "throw.example") { throw new Error("no route for " + host); }
    if (host == "number.example") { return 42; }
    if (url.substring(0, 5) == "http:") return "PROXY plain.corp:8080";
    return "PROXY proxy.corp:3128; SOCKS 10.0.0.5:1080";
}
"""


@dataclass
class _Served:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


class _Origin:
    """A real HTTP server on 127.0.0.1 serving `files`, answering conditional requests, and
    recording each request's validator headers."""

    def __init__(self) -> None:
        self.files: dict[str, _Served] = {}
        self.requests: list[tuple[str, str | None, str | None]] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                inm = self.headers.get("If-None-Match")
                ims = self.headers.get("If-Modified-Since")
                origin.requests.append((self.path, inm, ims))
                served = origin.files.get(self.path.split("?")[0])
                if served is None:
                    self.send_error(404, "Not Found")
                    return
                etag = served.headers.get("ETag")
                modified = served.headers.get("Last-Modified")
                if (inm is not None and inm == etag) or (ims is not None and ims == modified):
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(served.status)
                for k, v in served.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(served.body)))
                self.end_headers()
                self.wfile.write(served.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def origin() -> Iterator[_Origin]:
    o = _Origin()
    try:
        yield o
    finally:
        o.close()


@pytest.fixture
def evaluator() -> Iterator[PacEvaluator]:
    e = PacEvaluator(timeout=2.0)
    try:
        yield e
    finally:
        e.close()


def test_pypac_answers_by_host_and_url(evaluator: PacEvaluator) -> None:
    assert evaluator.find("https://x/", "x") == PacFailure("no PAC script is loaded")
    assert evaluator.load(PAC) is None
    assert evaluator.find("https://a.intra.example/", "a.intra.example") == "DIRECT"
    assert evaluator.find("https://wiki/", "wiki") == "DIRECT"
    assert evaluator.find("https://x.eu.example/", "x.eu.example") == (
        "PROXY backup.corp:3128; DIRECT"
    )
    assert evaluator.find("http://pypi.org/simple/", "pypi.org") == "PROXY plain.corp:8080"
    assert evaluator.find("https://pypi.org/", "pypi.org") == (
        "PROXY proxy.corp:3128; SOCKS 10.0.0.5:1080"
    )


def test_a_script_that_throws_or_returns_nonsense_is_a_failure(evaluator: PacEvaluator) -> None:
    assert evaluator.load(PAC) is None
    thrown = evaluator.find("https://throw.example/", "throw.example")
    assert isinstance(thrown, PacFailure) and "no route for throw.example" in thrown.words
    number = evaluator.find("https://number.example/", "number.example")
    assert isinstance(number, PacFailure) and "not a string" in number.words
    assert evaluator.find("https://pypi.org/", "pypi.org").startswith("PROXY")  # type: ignore[union-attr]


def test_a_script_that_never_returns_is_killed_at_the_deadline(evaluator: PacEvaluator) -> None:
    evaluator.timeout = 0.5
    assert evaluator.load(PAC) is None
    started = time.monotonic()
    stuck = evaluator.find("https://loop.example/", "loop.example")
    took = time.monotonic() - started
    assert isinstance(stuck, PacFailure)
    assert "took longer than 0.5 s" in stuck.words
    assert 0.5 <= took < 5.0
    # The next question gets a fresh child with the same script.
    assert evaluator.find("https://a.intra.example/", "a.intra.example") == "DIRECT"


def test_a_broken_script_is_refused_and_the_last_good_one_stays(evaluator: PacEvaluator) -> None:
    syntax = evaluator.load("function FindProxyForURL(url, host) { return 'DIRECT' ")
    assert isinstance(syntax, PacFailure) and "does not work" in syntax.words
    assert not evaluator.loaded
    missing = evaluator.load("var x = 1;")  # no FindProxyForURL
    assert isinstance(missing, PacFailure)
    evaluator.timeout = 0.5
    looping = evaluator.load("while (true) {}\nfunction FindProxyForURL(u, h) { return 'DIRECT'; }")
    assert isinstance(looping, PacFailure) and "loading the PAC script took longer" in looping.words
    evaluator.timeout = 2.0
    assert evaluator.load(PAC) is None
    assert isinstance(evaluator.load("function ("), PacFailure)
    assert evaluator.find("https://wiki/", "wiki") == "DIRECT"


def test_a_dead_child_is_a_failure_then_restarted(evaluator: PacEvaluator) -> None:
    assert evaluator.load(PAC) is None
    proc = evaluator._proc
    assert proc is not None
    proc.kill()
    proc.wait(5)
    dead = evaluator.find("https://wiki/", "wiki")
    assert isinstance(dead, PacFailure) and "exited" in dead.words
    assert evaluator.find("https://wiki/", "wiki") == "DIRECT"


def test_a_child_that_cannot_restart_is_a_failure(evaluator: PacEvaluator, tmp_path: Path) -> None:
    assert evaluator.load(PAC) is None
    evaluator._python = str(tmp_path / "no-python")  # the interpreter went away (an upgrade)
    proc = evaluator._proc
    assert proc is not None
    proc.kill()
    proc.wait(5)
    assert isinstance(evaluator.find("https://wiki/", "wiki"), PacFailure)
    failure = evaluator.find("https://wiki/", "wiki")
    assert isinstance(failure, PacFailure) and "cannot start" in failure.words


def test_a_child_that_cannot_start_is_a_failure(tmp_path: Path) -> None:
    e = PacEvaluator(python=str(tmp_path / "no-python"))
    try:
        failure = e.load(PAC)
        assert isinstance(failure, PacFailure) and "cannot start the PAC evaluator" in failure.words
    finally:
        e.close()


def test_a_child_that_answers_nonsense_is_a_failure(tmp_path: Path) -> None:
    # A stand-in interpreter that prints garbage: what a corrupted install would do.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nread line\necho '[1, 2]'\nread line\necho 'not json'\n")
    fake.chmod(0o755)
    e = PacEvaluator(python=str(fake), timeout=5.0)
    try:
        failure = e.load(PAC)
        assert isinstance(failure, PacFailure) and "nonsense" in failure.words
    finally:
        e.close()
    fake.write_text(
        "#!/bin/sh\nread line\necho '{\"ok\": true}'\nread line\necho '{\"x\": 1}'\n"
        "read line\necho '{\"ok\": false}'\n"
    )
    e = PacEvaluator(python=str(fake), timeout=5.0)
    try:
        assert e.load(PAC) is None
        odd = e.find("https://x/", "x")
        assert isinstance(odd, PacFailure) and "nonsense" in odd.words
    finally:
        e.close()
    for script, words in [
        ("read line\necho 'not json'\n", "nonsense"),
        ("read line\nexit 0\n", "exited while loading"),
    ]:
        fake.write_text("#!/bin/sh\n" + script)
        e = PacEvaluator(python=str(fake), timeout=5.0)
        try:
            failure = e.load(PAC)
            assert isinstance(failure, PacFailure) and words in failure.words
        finally:
            e.close()
    fake.write_text("#!/bin/sh\nread line\necho '{\"ok\": false}'\nsleep 30\n")
    e = PacEvaluator(python=str(fake), timeout=5.0)
    try:
        refused = e.load(PAC)
        assert isinstance(refused, PacFailure) and "unknown error" in refused.words
    finally:
        e.close()


# -- fetching


def test_http_fetch_uses_the_etag(origin: _Origin) -> None:
    origin.files["/proxy.pac"] = _Served(PAC.encode(), {"ETag": '"v1"'})
    url = origin.url("/proxy.pac?token=s3cret")
    got = fetch_pac(url, opener=urllib.request.build_opener(urllib.request.ProxyHandler({})))
    assert isinstance(got, PacText) and got.validator == 'etag:"v1"'
    assert fetch_pac(url, got.validator) == Unchanged()
    assert origin.requests[-1][1] == '"v1"'
    origin.files["/proxy.pac"] = _Served(PAC.encode() + b"//2", {"ETag": '"v2"'})
    again = fetch_pac(url, got.validator)
    assert isinstance(again, PacText) and again.text.endswith("//2")


def test_http_fetch_uses_last_modified_or_the_content(origin: _Origin) -> None:
    stamp = "Wed, 21 Oct 2026 07:28:00 GMT"
    origin.files["/lm.pac"] = _Served(PAC.encode(), {"Last-Modified": stamp})
    got = fetch_pac(origin.url("/lm.pac"))
    assert isinstance(got, PacText) and got.validator == f"modified:{stamp}"
    assert fetch_pac(origin.url("/lm.pac"), got.validator) == Unchanged()
    assert origin.requests[-1][2] == stamp
    origin.files["/plain.pac"] = _Served(PAC.encode("latin-1") + "// café".encode("latin-1"))
    plain = fetch_pac(origin.url("/plain.pac"))
    assert isinstance(plain, PacText) and plain.text.endswith("// café")
    assert fetch_pac(origin.url("/plain.pac"), plain.validator) == Unchanged()
    assert fetch_pac(origin.url("/plain.pac"), "etag:old") != Unchanged()


def test_http_fetch_failures_say_what_and_never_show_the_query(origin: _Origin) -> None:
    missing = fetch_pac(origin.url("/nope.pac?token=s3cret"))
    assert isinstance(missing, PacFailure)
    assert "HTTP 404" in missing.words and "s3cret" not in missing.words
    origin.files["/x.html"] = _Served(b"<html>login</html>")
    assert "is not a PAC script" in fetch_pac(origin.url("/x.html")).words  # type: ignore[union-attr]
    origin.files["/big.pac"] = _Served(b"FindProxyForURL" + b" " * MAX_PAC_BYTES)
    assert "larger than" in fetch_pac(origin.url("/big.pac")).words  # type: ignore[union-attr]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = fetch_pac(f"http://127.0.0.1:{port}/p.pac", timeout=2.0)
    assert isinstance(refused, PacFailure) and "failed" in refused.words


def test_file_sources_by_path_url_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "my proxy.pac"
    path.write_text(PAC)
    got = fetch_pac(str(path))
    assert isinstance(got, PacText)
    assert fetch_pac(str(path), got.validator) == Unchanged()
    url = "file://" + str(path).replace(" ", "%20")
    assert isinstance(fetch_pac(url), PacText)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert isinstance(fetch_pac("~/my proxy.pac"), PacText)
    os.utime(path, ns=(1, 1))
    assert isinstance(fetch_pac(str(path), got.validator), PacText)
    missing = fetch_pac(str(tmp_path / "gone.pac"))
    assert isinstance(missing, PacFailure) and "cannot read the PAC file" in missing.words
    with path.open("ab") as f:
        f.truncate(MAX_PAC_BYTES + 1)
    assert "larger than" in fetch_pac(str(path)).words  # type: ignore[union-attr]


# -- the script as the router sees it


def test_script_refetches_on_change_and_keeps_the_last_good_one(origin: _Origin) -> None:
    origin.files["/proxy.pac"] = _Served(PAC.encode(), {"ETag": '"v1"'})
    script = PacScript(origin.url("/proxy.pac"), schedule=PacSchedule(interval=60, retry=5))
    try:
        failure = script.find("https://wiki/", "wiki")
        assert isinstance(failure, PacFailure) and "not fetched yet" in failure.words
        status = script.refresh(0.0)
        assert status is not None and status.ok and status.changed
        assert script.generation == 1
        assert script.find("https://wiki/", "wiki") == "DIRECT"
        assert script.refresh(30.0) is None  # not due
        status = script.refresh(60.0)
        assert status is not None and status.ok and not status.changed
        # A new version: a new generation.
        changed = PAC.replace('"DIRECT";\n    if (shExp', '"PROXY proxy.corp:3128";\n    if (shExp')
        origin.files["/proxy.pac"] = _Served(changed.encode(), {"ETag": '"v2"'})
        status = script.refresh(120.0)
        assert status is not None and status.changed and script.generation == 2
        assert script.find("https://wiki/", "wiki") == "PROXY proxy.corp:3128"
        # Broken at the source: the error is reported, the last good script stays.
        origin.files["/proxy.pac"] = _Served(b"function FindProxyForURL(", {"ETag": '"v3"'})
        status = script.refresh(180.0)
        assert status is not None and not status.ok and "does not work" in status.words
        assert script.schedule.next_check == 185.0
        assert script.find("https://wiki/", "wiki") == "PROXY proxy.corp:3128"
        del origin.files["/proxy.pac"]
        status = script.refresh(185.0)
        assert status is not None and not status.ok and "HTTP 404" in status.words
        assert script.find("https://wiki/", "wiki") == "PROXY proxy.corp:3128"
    finally:
        script.close()


def test_script_broken_from_the_start_reports_why(tmp_path: Path) -> None:
    path = tmp_path / "p.pac"
    path.write_text("function FindProxyForURL(url, host) { return ")
    script = PacScript(str(path))
    try:
        status = script.refresh(0.0)
        assert status is not None and not status.ok
        failure = script.find("https://x/", "x")
        assert isinstance(failure, PacFailure) and "does not work" in failure.words
        # Fixed on disk: the next check picks it up (the broken version was not remembered).
        path.write_text(PAC)
        status = script.refresh(0.0, force=True)
        assert status is not None and status.ok and status.changed
        assert script.find("https://wiki/", "wiki") == "DIRECT"
        status = script.refresh(0.0, force=True)
        assert status is not None and status.ok and not status.changed
    finally:
        script.close()
    gone = PacScript(str(tmp_path / "missing.pac"))
    try:
        status = gone.refresh(0.0)
        assert status is not None and not status.ok
        failure = gone.find("https://x/", "x")
        assert isinstance(failure, PacFailure) and "cannot read" in failure.words
    finally:
        gone.close()


def test_a_looping_child_ends_itself_when_nobody_stops_it() -> None:
    # What is left when the app dies (kill -9) while a script loops: the child's own timer.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tray_proxy.routing.pac_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"js": PAC, "limit": 5}).encode() + b"\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"ok": True}
        proc.stdin.write(json.dumps({"url": "https://wiki/", "host": "wiki"}).encode() + b"\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"result": "DIRECT"}
        started = time.monotonic()
        message = {"url": "https://loop.example/", "host": "loop.example", "limit": 0.5}
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()
        assert proc.wait(10) == -signal.SIGALRM
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait(5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
