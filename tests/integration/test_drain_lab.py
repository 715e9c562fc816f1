"""A drain that drains (issue 16 item 8, issue 14 bug 2): when the relay stops, its listeners
close, open tunnels keep flowing up to `drain_timeout`, then every client connection still
open ends at once (the client sees a reset, not a socket that stays ESTABLISHED), and the stop
returns.

Real components: the real RelayEngine in-process (its loop thread joined the lab's client
namespace), the lab's nft redirect, real curl with no proxy settings, real Squid with Basic
auth, the lab's origin. The three quit paths of the app are tested on top of this elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.integration.engine_in_lab import EngineInLab
from tests.integration.relay import RelayProcess, UpstreamSpec, allocate_port
from tests.lab.curl import curl_config
from tests.lab.environment import Lab
from tray_proxy.relay.engine import RelayEngine
from tray_proxy.relay.events import EventBus
from tray_proxy.relay.secrets import Credentials, Secret, StaticCredentialSource
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

pytestmark = pytest.mark.lab

DRAIN = 3.0  # the relay's drain_timeout in these tests
BIG = 20 * 1024 * 1024  # the download that outlasts the drain (20 MB at 1 MB/s)
SMALL = 512 * 1024  # the download that finishes within it (about 1 s at 512 KB/s)


class DrainingEngine(EngineInLab):
    """A RelayEngine in the client namespace whose stop the test starts (`stop_now`) and
    times (`stopped_at`)."""

    def __init__(self, lab: Lab, drain: float) -> None:
        super().__init__(lab.client.name)
        squid = lab.squid
        assert squid.credentials is not None
        self.upstream = UpstreamProxy(
            "squid", UpstreamKind.HTTP, squid.host, squid.port, username=squid.credentials.username
        )
        self.credentials = Credentials(
            squid.credentials.username, Secret(squid.credentials.password)
        )
        self.port = allocate_port(lab)
        self.drain = drain
        self.stopped_at: float | None = None
        self.stopped = threading.Event()

    async def _main(self) -> None:
        settings = RelaySettings(
            port=self.port, listen=("127.0.0.1",), spare_connections=0, drain_timeout=self.drain
        )
        source = StaticCredentialSource({self.upstream.name: self.credentials})
        engine = RelayEngine(settings, [self.upstream], source, EventBus())
        await engine.start()
        try:
            await self.serve()
        finally:
            await engine.stop()
            self.stopped_at = time.monotonic()
            self.stopped.set()

    def stop_now(self) -> float:
        """Start the engine's stop; returns when it was asked (time.monotonic())."""
        assert self._loop is not None and self._stop is not None
        asked = time.monotonic()
        self._loop.call_soon_threadsafe(self._stop.set)
        return asked


class Download:
    """curl in the client namespace, no proxy settings, body to a file; runs until it ends."""

    def __init__(self, lab: Lab, size: int, rate: str, max_time: float) -> None:
        self.lab = lab
        self.size = size
        self.seed = secrets.token_hex(6)
        self.dir = lab.tmp / f"drain-{self.seed}"
        self.dir.mkdir()
        self.body = self.dir / "body"
        config = curl_config(
            lab.origins.url("https", lab.origins.bytes_path(size, self.seed), "v4"),
            cacert=lab.ca_path,
            output=self.body,
            max_time=max_time,
            options=[f"limit-rate = {rate}"],
        )
        (self.dir / "curl.conf").write_text(config)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.process = lab.client.popen(
            ["curl", "--disable", "--config", str(self.dir / "curl.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.ended_at: float | None = None
        self.returncode: int | None = None
        self.stderr = b""
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        _out, self.stderr = self.process.communicate()
        self.ended_at = time.monotonic()
        self.returncode = self.process.returncode

    def received(self) -> int:
        try:
            return self.body.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_received(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.received() < count:
            assert self.ended_at is None, f"curl ended early: {self.returncode} {self.stderr!r}"
            assert time.monotonic() < deadline, f"curl got {self.received()} B in {timeout} s"
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        self._waiter.join(timeout)

    def intact(self) -> bool:
        if self.returncode != 0 or self.received() != self.size:
            return False
        digest = hashlib.sha256(self.body.read_bytes()).hexdigest()
        return digest == self.lab.origins.expected_sha256(self.size, self.seed)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.process.stop(grace=1.0)
        self.lab.client.forget(self.process)
        self._waiter.join(5)


@contextlib.contextmanager
def download(lab: Lab, size: int, rate: str, max_time: float = 60.0) -> Iterator[Download]:
    job = Download(lab, size, rate, max_time)
    try:
        yield job
    finally:
        job.close()


def _sockets(lab: Lab, selector: str) -> list[str]:
    """TCP sockets in the client namespace matching the ss filter `selector`, TIME-WAIT
    left out (a socket in it is closed both ways)."""
    out = lab.client.run(["ss", "-Htn", "state", "all", f"( {selector} )"])
    return [line for line in out.stdout.decode().splitlines() if line and "TIME-WAIT" not in line]


class ClientSockets:
    """Watches (every 20 ms, in a thread) the clients' sockets to the origin's port 443 and
    notes when the last one is gone: curl's own end may come later, when it wakes from the
    pause its rate limit makes it take."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        assert lab.origins.v4 is not None
        self.selector = f"dst {lab.origins.v4} and dport = :443"
        self.gone_at: float | None = None
        self.last: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            found = _sockets(self.lab, self.selector)
            if not found:
                self.gone_at = time.monotonic()
                return
            self.last = found
            self._stop.wait(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_download_longer_than_the_drain_ends_at_once_and_a_short_one_completes(
    lab: Lab,
) -> None:
    with (
        DrainingEngine(lab, DRAIN) as engine,
        lab.redirect(engine.port),
        download(lab, BIG, "1M") as big,
    ):
        big.wait_received(256 * 1024)
        with download(lab, SMALL, "512K") as small:
            small.wait_received(1)
            asked = engine.stop_now()
            watch = ClientSockets(lab)
            watch.start()
            try:
                small.join(DRAIN + 5)
                assert engine.stopped.wait(DRAIN + 5), "the engine's stop did not return"
                big.join(DRAIN + 10)
            finally:
                watch.close()
            assert small.intact(), (small.returncode, small.stderr, small.received())
            assert engine.stopped_at is not None
            stopped = engine.stopped_at - asked
            assert DRAIN - 0.5 <= stopped <= DRAIN + 1.0, stopped
            # Every client socket ended at once after the drain: none left established or
            # half-closed. (Before: the relay's close queued a FIN behind the bytes still in
            # its send buffer, and the rate-limited curl stayed connected for minutes.)
            assert watch.gone_at is not None, f"client sockets still open: {watch.last}"
            gone = watch.gone_at - asked
            assert gone <= DRAIN + 1.0, f"client sockets gone {gone:.2f} s after the stop"
            assert big.ended_at is not None, "the long download was still running"
            assert big.returncode != 0, "the long download cannot have completed"
            assert big.received() < BIG
            assert b"reset" in big.stderr.lower(), big.stderr
            # curl itself notices when its rate limit's pause ends (a second or so, more when
            # the machine is busy and the bytes came in bursts).
            ended = big.ended_at - asked
            assert ended <= DRAIN + 6.0, f"curl ended {ended:.2f} s after the stop"
            assert _sockets(lab, f"sport = :{engine.port}") == []


def test_tray_proxy_run_drains_on_sigterm_then_ends_every_client_at_once(lab: Lab) -> None:
    """The same through the real `tray-proxy run` (SIGTERM: the controller's stop path, the
    relay on the controller's loop)."""
    with (
        RelayProcess(
            lab,
            UpstreamSpec.for_squid(lab.squid),
            settings={"drain_timeout": DRAIN, "listen": ["127.0.0.1"]},
        ) as relay,
        relay.redirect(),
        download(lab, BIG, "1M") as big,
    ):
        big.wait_received(256 * 1024)
        with download(lab, SMALL, "512K") as small:
            small.wait_received(1)
            asked = time.monotonic()
            watch = ClientSockets(lab)
            watch.start()
            try:
                problem = relay.stop()  # SIGTERM, then wait for exit 0
                exited = time.monotonic() - asked
                small.join(DRAIN + 5)
                big.join(DRAIN + 10)
            finally:
                watch.close()
            assert problem is None, problem
            assert small.intact(), (small.returncode, small.stderr, small.received())
            assert watch.gone_at is not None, f"client sockets still open: {watch.last}"
            gone = watch.gone_at - asked
            assert DRAIN - 0.5 <= gone <= DRAIN + 1.0, f"client sockets gone after {gone:.2f} s"
            assert exited <= DRAIN + 3.0, f"tray-proxy run exited {exited:.2f} s after SIGTERM"
            assert big.returncode not in (None, 0)
            assert big.received() < BIG
