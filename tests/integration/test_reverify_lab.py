"""One 407 no longer stops the relay for good (issue 16 item 7), and a password changed while
the relay runs is used at once (issue 14 bug 1, the engine's side).

Real components: the real RelayEngine in-process (its loop thread joined the lab's client
namespace), the lab's nft redirect, real curl with no proxy settings, and a real Squid whose
Basic logins basic_ncsa_auth checks against an htpasswd file the test rewrites, as a directory
service would change its mind. Squid's own access log counts the 407s the relay caused.

Squid here keeps a checked password for 1 second (`credentialsttl`; Debian's default is 2
hours): a proxy that trusted its cache for hours would not show a changed password at all.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.engine_in_lab import EngineInLab
from tests.integration.relay import allocate_port
from tests.lab.creds import ProxyCredentials
from tests.lab.curl import CurlResult
from tests.lab.environment import Lab
from tests.lab.origins import ALT_HOSTNAME
from tests.lab.squid import AccessLogEntry, BasicAuth, SquidProxy
from tray_proxy.relay.engine import RelayEngine
from tray_proxy.relay.events import CredentialsAccepted, CredentialsRejected, Event, EventBus
from tray_proxy.relay.secrets import Credentials, Secret, StaticCredentialSource
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

pytestmark = pytest.mark.lab

SQUID_PORT = 3141


class ChangingBasicAuth(BasicAuth):
    """Basic against an htpasswd file the test rewrites (`set_password`); a checked password
    is trusted for 1 second only."""

    def configure(self, workdir: Path) -> list[str]:
        lines = super().configure(workdir)
        return [
            "auth_param basic credentialsttl 1 second" if "credentialsttl" in line else line
            for line in lines
        ]

    def set_password(self, password: str, stamp: int) -> None:
        """The directory now knows `password`. `stamp`: the file's new mtime, a whole second
        never used before, since basic_ncsa_auth rereads the file when its mtime changes."""
        assert self.htpasswd_path is not None and self.credentials is not None
        hashed = subprocess.run(
            ["openssl", "passwd", "-apr1", "-stdin"],
            input=password.encode() + b"\n",
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
        # In place: the file keeps its owner (Squid's user) and mode 0600.
        with self.htpasswd_path.open("r+b") as handle:
            handle.truncate(0)
            handle.write(self.credentials.username.encode() + b":" + hashed)
        os.utime(self.htpasswd_path, (stamp, stamp))


class LabRelay(EngineInLab):
    """The engine in the client namespace, its events kept; `call(fn, *args)` runs a method
    of the engine on its loop and waits."""

    def __init__(self, lab: Lab, squid: SquidProxy, password: str, reverify_after: float) -> None:
        super().__init__(lab.client.name)
        assert squid.credentials is not None
        self.upstream = UpstreamProxy(
            "corp", UpstreamKind.HTTP, squid.host, squid.port, username=squid.credentials.username
        )
        self.password = password
        self.port = allocate_port(lab)
        self.reverify_after = reverify_after
        self.engine: RelayEngine | None = None
        self.events: list[Event] = []
        self.lock = threading.Lock()

    async def _main(self) -> None:
        settings = RelaySettings(
            port=self.port,
            listen=("127.0.0.1",),
            spare_connections=0,
            drain_timeout=0.5,
            reverify_after=self.reverify_after,
        )
        creds = Credentials(self.upstream.username or "", Secret(self.password))
        bus = EventBus()
        bus.subscribe(self._observe)
        engine = self.engine = RelayEngine(
            settings, [self.upstream], StaticCredentialSource({"corp": creds}), bus
        )
        await engine.start()
        try:
            await self.serve()
        finally:
            await engine.stop()

    def _observe(self, event: Event) -> None:
        if isinstance(event, (CredentialsRejected, CredentialsAccepted)):
            with self.lock:
                self.events.append(event)

    def of(self, kind: type[Event]) -> list[Event]:
        with self.lock:
            return [e for e in self.events if isinstance(e, kind)]

    def call(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(_call(fn, *args), self._loop).result(10)


async def _call(fn: Callable[..., object], *args: object) -> None:
    fn(*args)


class Story:
    """A Squid whose password the test changes, and what its access log says."""

    def __init__(self, lab: Lab, squid: SquidProxy, auth: ChangingBasicAuth) -> None:
        self.lab = lab
        self.squid = squid
        self.auth = auth
        self._stamp = int(time.time()) + 10
        assert lab.origins.v4 is not None
        self.target = f"{lab.origins.v4}:443"  # what the relay's CONNECTs name

    def directory_knows(self, password: str) -> None:
        """Change the password and wait (bounded) until Squid answers by it: a CONNECT by
        curl with it, to another target than the relay's, is no longer refused."""
        self._stamp += 1
        self.auth.set_password(password, self._stamp)
        assert self.auth.credentials is not None
        creds = ProxyCredentials(self.auth.credentials.username, password, Path(os.devnull))
        deadline = time.monotonic() + 20
        while True:
            result = self.lab.curl(
                self.lab.origins.url("https", "/health", ALT_HOSTNAME),
                via=self.squid,
                credentials=creds,
                resolve=[f"{ALT_HOSTNAME}:443:{self.lab.origins.v4}"],
                max_time=10,
            )
            if result.http_code == 200:
                return
            assert time.monotonic() < deadline, f"Squid never took the new password: {result}"
            time.sleep(0.2)

    def refusals(self) -> list[AccessLogEntry]:
        """Squid's 407s to the relay's CONNECTs that carried a password: failed logins. (The
        relay's first CONNECT carries none: it learns the scheme from the 407.)"""
        return [
            e
            for e in self.squid.entries()
            if e.method == "CONNECT" and e.uri == self.target and e.status == 407 and e.user != "-"
        ]

    def fetch(self) -> CurlResult:
        """curl with no proxy settings: the redirect takes it to the relay."""
        return self.lab.curl(self.lab.origins.url("https", "/health", "v4"), max_time=15)


@pytest.fixture
def story(lab: Lab, squid_factory: Callable[..., SquidProxy]) -> Iterator[Story]:
    user = f"rv-{secrets.token_hex(3)}"
    auth = ChangingBasicAuth(ProxyCredentials.generate(user, lab.tmp))
    squid = squid_factory(port=SQUID_PORT, auth=auth, name=f"squid-reverify-{user}")
    yield Story(lab, squid, auth)


def _wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def test_after_a_407_the_relay_tries_once_per_period_and_recovers_on_its_own(
    lab: Lab, story: Story
) -> None:
    period = 3.0
    creds = story.auth.credentials
    assert creds is not None
    with (
        LabRelay(lab, story.squid, creds.password, reverify_after=period) as relay,
        lab.redirect(relay.port, exclude=[a for a in (lab.proxy.v4, lab.proxy.v6) if a]),
    ):
        assert story.fetch().http_code == 200
        assert story.fetch().http_code == 200  # the fast path, with the verified password
        assert story.refusals() == []

        # The directory refuses the password (a hiccup): one connection, then a storm.
        story.directory_knows("not-" + creds.password)
        assert story.fetch().returncode != 0
        _wait(lambda: relay.of(CredentialsRejected), 10, "CredentialsRejected")
        rejected_at = time.monotonic()
        first = len(story.refusals())
        # The fast path's request carried the password before the 407 came back; Squid asks
        # for Basic only, so that refusal is final: one failed login, no re-check.
        assert first == 1, story.refusals()
        for _ in range(5):
            assert story.fetch().returncode != 0
        assert len(story.refusals()) == first, "the storm sent the refused password again"

        # Still refused: exactly one attempt per period.
        _wait(lambda: len(story.refusals()) >= first + 2, 3 * period, "two re-verifications")
        took = time.monotonic() - rejected_at
        again = story.refusals()[first:]
        assert len(again) == 2, again
        gap = again[1].time - again[0].time
        assert 0.85 * period <= gap <= 1.5 * period, gap
        assert took >= 1.7 * period, took
        assert len(relay.of(CredentialsRejected)) == 1  # told once, not every period

        # The directory is back: the next period's one attempt succeeds, with no user action.
        story.directory_knows(creds.password)
        before = len(story.refusals())
        _wait(lambda: relay.of(CredentialsAccepted), 3 * period, "the recovery")
        assert len(story.refusals()) == before
        assert story.fetch().http_code == 200


def test_entering_the_password_again_recovers_at_once_and_a_new_one_is_used_next(
    lab: Lab, story: Story
) -> None:
    creds = story.auth.credentials
    assert creds is not None
    with (
        LabRelay(lab, story.squid, creds.password, reverify_after=600.0) as relay,
        lab.redirect(relay.port, exclude=[a for a in (lab.proxy.v4, lab.proxy.v6) if a]),
    ):
        engine = relay.engine
        assert engine is not None
        assert story.fetch().http_code == 200
        story.directory_knows("not-" + creds.password)
        assert story.fetch().returncode != 0
        _wait(lambda: relay.of(CredentialsRejected), 10, "CredentialsRejected")
        story.directory_knows(creds.password)
        refused = len(story.refusals())
        assert story.fetch().returncode != 0  # rejected: not sent until told, 600 s
        assert len(story.refusals()) == refused

        # The user enters the same password again: one verification at once.
        started = time.monotonic()
        relay.call(engine.retry_credentials, "corp")
        _wait(lambda: relay.of(CredentialsAccepted), 10, "the verification")
        assert time.monotonic() - started < 5
        assert story.fetch().http_code == 200
        assert len(story.refusals()) == refused

        # The password changes while the relay runs (credentials set): a wrong one costs its
        # own single 407, the right one is used by the next connection.
        new = secrets.token_urlsafe(12)
        story.directory_knows(new)
        relay.call(engine.set_credentials, "corp", Credentials(creds.username, Secret("typo")))
        _wait(lambda: len(story.refusals()) == refused + 1, 10, "the typo's one 407")
        for _ in range(3):
            assert story.fetch().returncode != 0
        assert len(story.refusals()) == refused + 1
        relay.call(engine.set_credentials, "corp", Credentials(creds.username, Secret(new)))
        assert story.fetch().http_code == 200
        assert story.fetch().http_code == 200
        assert len(story.refusals()) == refused + 1
