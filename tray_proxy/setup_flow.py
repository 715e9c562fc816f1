"""First run as steps, without Qt: what `tray-proxy setup` (cli_setup.py) and the setup window
(ui/setup_window.py) both do.

1. prefill: the proxy found by discovery.py (shown with where it came from), a name derived
   from its host ("corp" from proxy.corp.example; never "proxy", or messages would read
   "through proxy proxy"), the user name it carried, the connection test's target;
2. check what the user answered by the settings file's own rules (config.parse_upstream);
3. test: one real CONNECT (or SOCKS5 handshake) through the proxy with that login, to the
   test target; the result says whether the proxy answered (and with what, in how long) or
   whether the target never answered;
4. save: the password into the keyring (credentials.CredentialStore), then the settings file,
   written atomically (config.save_config), with this upstream active, the test target as
   [probe] target and a PAC URL found in Windows as [routing] pac_url.

A missing settings file is the normal first-run case, never "file not found"; a broken one
is not overwritten. The password lives in a `Secret` and goes only to the probe and the
keyring.

Must not import PySide6; keyring (through tray_proxy.keyring_store) only when saving, so the
setup window can import these types.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from tray_proxy.config import (
    Config,
    ConfigError,
    ProbeSettings,
    RoutingSettings,
    load_config,
    parse_probe_target,
    parse_upstream,
    save_config,
)
from tray_proxy.config_edits import with_upstream
from tray_proxy.discovery import Discovery, Found, discover
from tray_proxy.errors import UserError
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult, probe_upstream
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

__all__ = [
    "CheckedAnswers",
    "KeyringStore",
    "Prefill",
    "SetupAnswers",
    "SetupError",
    "SetupFailed",
    "SetupFlow",
    "SetupService",
    "TestReport",
    "advice",
    "describe_discovery",
    "describe_probe",
    "host_of",
    "needs_setup",
    "suggest_name",
]

FALLBACK_NAME = "corp"
# Host labels that say "a proxy" or "a network", not whose: never a name by themselves.
_GENERIC_LABELS = frozenset(
    {
        "proxy", "proxies", "proxy1", "proxy2", "webproxy", "web-proxy", "px", "prx", "www",
        "web", "gw", "gateway", "http", "https", "squid", "cache", "wpad", "socks", "fw",
        "firewall", "net", "internal", "intern", "local", "lan", "localdomain", "home",
        "example", "com", "org", "co", "ac", "gov", "edu", "int", "mil",
    }
)  # fmt: skip
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_PASSWORD_BYTES = 4096


class SetupError(UserError):
    """What the user answered cannot be used (or the test failed): ask again / exit 2."""


class SetupFailed(UserError):
    """The machine could not do it (keyring, settings file): exit 1."""


def suggest_name(host: str) -> str:
    """A short name for the upstream from its host: the organisation's label.

    proxy.corp.example -> "corp", webproxy.eu.acme.com -> "acme", 10.0.0.1 -> "corp".
    Never "proxy" or another word that only says "a proxy".
    """
    try:
        ipaddress.ip_address(host.strip("[]"))
        return FALLBACK_NAME
    except ValueError:
        pass
    labels = [label.lower() for label in host.rstrip(".").split(".") if label]
    if len(labels) > 1:
        labels = labels[:-1]  # the top-level domain says nothing about whose proxy it is
    for label in reversed(labels):
        usable = label not in _GENERIC_LABELS and not label.isdigit() and len(label) > 1
        if usable and _NAME_RE.fullmatch(label):
            return label
    return FALLBACK_NAME


def needs_setup(config_path: Path) -> bool:
    """True when the app should open the setup steps: no settings file, or one without any
    upstream. A broken file is not "first run": the app shows its error instead."""
    try:
        config = load_config(config_path, missing_ok=True)
    except ConfigError:
        return False
    return not config.upstreams


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Prefill:
    """What the steps start with. `discovery` is shown to the user as it is."""

    discovery: Discovery
    proxy_url: str
    name: str
    username: str
    target: str
    pac_url: str | None
    config_path: Path
    existing: tuple[str, ...] = ()

    @property
    def chosen(self) -> Found | None:
        """The discovered place the proxy URL came from (None: typed or from the file)."""
        return next((f for f in self.discovery.found if f.proxy_url == self.proxy_url), None)


@dataclass(frozen=True)
class SetupAnswers:
    """What the user typed. An empty `name` means the suggested one; an empty `username`
    means the proxy needs no login (then `password` is not used)."""

    proxy_url: str
    name: str = ""
    username: str = ""
    password: Secret | None = field(default=None, repr=False)
    target: str = ""
    pac_url: str | None = None


@dataclass(frozen=True)
class CheckedAnswers:
    upstream: UpstreamProxy
    credentials: Credentials | None = field(repr=False)
    target: tuple[str, int]
    target_text: str
    pac_url: str | None


@dataclass(frozen=True)
class TestReport:
    """The connection test, in one line (`text`), and the probe's own result."""

    ok: bool
    text: str
    result: ProbeResult


class KeyringStore(Protocol):
    """The part of credentials.CredentialStore that saving needs."""

    async def set(self, name: str, username: str, password: Secret) -> None: ...

    async def backend_description(self) -> str: ...


Probe = Callable[
    [UpstreamProxy, Credentials | None, tuple[str, int], float], Awaitable[ProbeResult]
]


# --------------------------------------------------------------------------- wording


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def describe_probe(result: ProbeResult, proxy: str, target: str) -> str:
    """The connection test's result in one sentence that names the target, and tells "the
    proxy answered (407) in 3 ms" from "no answer from the target" and from "no answer from
    the proxy". `proxy` is host:port, `target` host:port."""
    answered = f" in {_ms(result.answered_s)}" if result.answered_s is not None else ""
    if result.ok:
        latency = result.latency_s if result.latency_s is not None else 0.0
        return f"OK: {proxy} opened a tunnel to {target} in {_ms(latency)}."
    if result.outcome is ProbeOutcome.TIMEOUT:
        if result.reached_proxy:
            return (
                f"No answer from {target}: {proxy} took the connection but did not answer "
                f"({result.words}); it may still be trying to reach {target}."
            )
        return f"No answer from the proxy {proxy} ({result.words})."
    if result.outcome is ProbeOutcome.UNREACHABLE and result.status is not None:
        return f"No answer from {target}: the proxy answered ({result.status}){answered}: " + (
            f"{result.words}."
        )
    if result.status is not None:
        return f"The proxy answered ({result.status}){answered}: {result.words}."
    if result.outcome in (ProbeOutcome.REFUSED, ProbeOutcome.UNREACHABLE):
        return f"No answer from the proxy {proxy}: {result.words}."
    return f"The test through {proxy} to {target} failed: {result.words}."


def advice(result: ProbeResult, target_control: str) -> str:
    """What to change, naming the control the user has (`--test-target` or "Test target")."""
    if result.ok:
        return ""
    if result.outcome is ProbeOutcome.AUTH_FAILED:
        return "Check the user name and password."
    if result.outcome is ProbeOutcome.FORBIDDEN:
        return f"The proxy does not allow this target: set {target_control} to a site it allows."
    if result.outcome is ProbeOutcome.TIMEOUT and result.reached_proxy:
        return f"Try {target_control} with a site the proxy can reach."
    if result.outcome is ProbeOutcome.UNREACHABLE and result.status is not None:
        return f"Try {target_control} with a site the proxy can reach."
    return "Check the proxy URL (host and port) and that this machine can reach it."


# --------------------------------------------------------------------------- the steps


class SetupFlow:
    """The steps over one settings file. `store` is the keyring (None: the real one,
    created when saving); `probe` the real probe unless a test passes another."""

    def __init__(
        self,
        config_path: Path,
        *,
        store: KeyringStore | None = None,
        probe: Probe = probe_upstream,
        timeout: float | None = None,
    ) -> None:
        self.config_path = config_path
        self._store = store
        self._probe = probe
        self._timeout = timeout

    # -- 1. prefill

    def existing(self) -> Config:
        """The settings as they are: empty defaults when there is no file yet. A file that
        cannot be read is a SetupError (it is not overwritten: the user's other settings
        are in it)."""
        try:
            return load_config(self.config_path, missing_ok=True)
        except ConfigError as exc:
            raise SetupError(
                f"{exc}. Fix it or move it away, then run the setup again; it was not changed"
            ) from None

    def prefill(self, discovery: Discovery) -> Prefill:
        config = self.existing()
        active = config.active_upstream()
        found = discovery.proxy
        if found is not None and found.proxy_url is not None:
            proxy_url = found.proxy_url
            username = found.username or (active.username if active else None) or ""
        elif active is not None:
            proxy_url, username = active.url, active.username or ""
        else:
            proxy_url, username = "", ""
        name = ""
        if proxy_url:
            same = next((u for u in config.upstreams if u.url == proxy_url), None)
            name = same.name if same is not None else suggest_name(host_of(proxy_url))
        return Prefill(
            discovery=discovery,
            proxy_url=proxy_url,
            name=name or FALLBACK_NAME,
            username=username,
            target=config.probe.target_text,
            pac_url=discovery.pac_url or config.routing.pac_url,
            config_path=self.config_path,
            existing=tuple(u.name for u in config.upstreams),
        )

    # -- 2. check

    def check(self, answers: SetupAnswers) -> CheckedAnswers:
        url = answers.proxy_url.strip()
        if not url:
            raise SetupError("no proxy URL given; it looks like http://proxy.corp.example:8080")
        if "://" not in url:
            url = f"http://{url}"  # what Windows and most tools write: host:port
        name = answers.name.strip()
        username = answers.username.strip() or None
        try:
            # The name is checked after the URL, so a bad URL is reported as such.
            probe_host = parse_upstream(name or FALLBACK_NAME, url, username).host
            upstream = parse_upstream(name or suggest_name(probe_host), url, username)
        except ConfigError as exc:
            raise SetupError(_field_words(exc)) from None
        credentials: Credentials | None = None
        if username is not None:
            password = answers.password
            if password is None or not password.reveal():
                raise SetupError(f"no password given for {username}")
            text = password.reveal()
            if "\0" in text or len(text.encode("utf-8")) > MAX_PASSWORD_BYTES:
                raise SetupError("the password has a NUL character or is over 4096 bytes")
            if upstream.kind is UpstreamKind.SOCKS5 and len(text.encode("utf-8")) > 255:
                raise SetupError("the password is longer than 255 bytes, which SOCKS5 cannot carry")
            credentials = Credentials(username, password)
        target_text = answers.target.strip() or ProbeSettings().target_text
        try:
            target = parse_probe_target(target_text)
        except ConfigError as exc:
            raise SetupError(_field_words(exc)) from None
        return CheckedAnswers(upstream, credentials, target, target_text, answers.pac_url)

    # -- 3. test

    @property
    def timeout(self) -> float:
        if self._timeout is not None:
            return self._timeout
        try:
            return self.existing().probe.timeout
        except SetupError:
            return ProbeSettings().timeout

    async def test(self, checked: CheckedAnswers) -> TestReport:
        upstream = checked.upstream
        result = await self._probe(upstream, checked.credentials, checked.target, self.timeout)
        proxy = _authority(upstream)
        return TestReport(result.ok, describe_probe(result, proxy, checked.target_text), result)

    # -- 4. save

    async def save(self, checked: CheckedAnswers) -> list[str]:
        """Store the password, then write the settings. Returns what was done, one line each.
        Raises SetupFailed when the keyring or the file cannot be written."""
        done: list[str] = []
        config = self.existing()
        upstream = checked.upstream
        old = next((u for u in config.upstreams if u.name == upstream.name), None)
        if old is not None and (old.kind, old.host, old.port) == (
            upstream.kind,
            upstream.host,
            upstream.port,
        ):
            upstream = replace(upstream, auth=old.auth)  # keep a pinned scheme
        if checked.credentials is not None:
            from tray_proxy.keyring_store import CredentialStore, CredentialStoreError

            store: KeyringStore = self._store if self._store is not None else CredentialStore()
            creds = checked.credentials
            try:
                await store.set(upstream.name, creds.username, creds.password)
                where = await store.backend_description()
            except CredentialStoreError as exc:
                raise SetupFailed(f"the password could not be stored: {exc}") from None
            done.append(f"stored the password of {creds.username} for {upstream.name} in {where}")
        config, _replaced = with_upstream(config, upstream)
        relay: RelaySettings = replace(config.relay, upstream=upstream.name)
        config = replace(
            config,
            relay=relay,
            probe=replace(config.probe, target=checked.target),
            routing=RoutingSettings(pac_url=checked.pac_url) if checked.pac_url else config.routing,
        )
        try:
            await asyncio.to_thread(save_config, config, self.config_path)
        except ConfigError as exc:
            raise SetupFailed(str(exc)) from None
        done.append(f"wrote {self.config_path} (upstream {upstream.name}, {upstream.url})")
        return done


class SetupService:
    """The steps as the setup window uses them (ui/setup_window.py's SetupSteps): discovery
    off the UI thread, and after saving, `after_save` (the app: the controller re-reads the
    settings and the password, so Switch on works at once)."""

    def __init__(
        self,
        flow: SetupFlow,
        *,
        after_save: Callable[[UpstreamProxy], Awaitable[str | None]] | None = None,
        discover_fn: Callable[[], Discovery] = discover,
    ) -> None:
        self.flow = flow
        self._after_save = after_save
        self._discover = discover_fn

    @property
    def config_path(self) -> Path:
        return self.flow.config_path

    async def prefill(self) -> Prefill:
        """Discovery (up to two bounded Windows tools on WSL) and the prefill, in a thread."""
        discovery = await asyncio.to_thread(self._discover)
        return await asyncio.to_thread(self.flow.prefill, discovery)

    def check(self, answers: SetupAnswers) -> CheckedAnswers:
        return self.flow.check(answers)

    async def test(self, checked: CheckedAnswers) -> TestReport:
        return await self.flow.test(checked)

    async def save(self, checked: CheckedAnswers) -> list[str]:
        done = await self.flow.save(checked)
        if self._after_save is not None:
            try:
                warning = await self._after_save(checked.upstream)
            except ConfigError as exc:
                raise SetupFailed(str(exc)) from None
            if warning:
                done.append(warning)
        return done


def host_of(url: str) -> str:
    authority = url.split("://", 1)[-1].split("/", 1)[0].rpartition("@")[2]
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.split(":", 1)[0]


def _authority(upstream: UpstreamProxy) -> str:
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    return f"{host}:{upstream.port}"


_FIELD_WORDS = {
    "upstream.url": "the proxy URL",
    "upstream.name": "the name",
    "upstream.username": "the user name",
    "probe.target": "the test target",
}


def _field_words(exc: ConfigError) -> str:
    """A ConfigError about a typed value, worded for the prompt that asked for it."""
    return f"{_FIELD_WORDS.get(exc.field, exc.field)} {exc.problem}"


def describe_discovery(discovery: Discovery) -> Sequence[str]:
    """What was found, one line each, numbered, then the notes: shown before anything is used."""
    lines = [f"  {i}. {found.describe()}" for i, found in enumerate(discovery.found, 1)]
    if not lines:
        lines.append("  nothing found")
    lines += [f"  note: {note}" for note in discovery.notes]
    return lines
