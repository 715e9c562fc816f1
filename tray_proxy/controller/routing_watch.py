"""The controller's side of routing health (issue 15 sections 2 and 5): probes while a relay
runs, fed into the relay's upstream health.

Two probes, both on the controller's loop (a few connections every half minute; the relay's
loop stays for traffic):

- **Health probe**, every `interval` seconds with ±20 % jitter (so several instances behind
  one proxy do not probe in step): a real CONNECT through each upstream to `[probe] target`,
  *without* a login. An answer from the proxy itself (200, a 407 asking for a login, a 403 for
  the target) means the proxy works; no connection, no answer, or the proxy's 502/503 (it
  cannot reach the target) means it does not. Each outcome goes to `RelayHandle.report_probe`,
  which opens or closes the upstream's circuit breaker; the relay publishes the change
  (UpstreamHealthChanged) for the tray and the dashboard. Why no login: a probe every 30 s
  with a password the proxy now rejects would lock a directory account within minutes
  (ARCHITECTURE, "Credentials").
- **Off-network probe** (`offnet.OffnetProber`): TCP reachability of every upstream, at once
  after a network change (netlink) and then fast, so leaving the corporate network is noticed
  within about a second. When it says DIRECT_UNREACHABLE, every upstream is reported down
  (enough failures that the breakers stay open for a minute, and again every probe round
  while away), so the router's `when_unreachable = "direct"` sends new connections DIRECT
  with no connection first waiting for a dead proxy; when it says ON_PROXY again, the
  reachable upstreams are reported up and new connections go through the proxy again.

Must not import PySide6, qasync or the relay engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from tray_proxy.config import Config
from tray_proxy.offnet import OffnetChange, OffnetPolicy, OffnetProber, Reachability
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult, probe_upstream
from tray_proxy.relay.secrets import Credentials
from tray_proxy.relay.settings import UpstreamProxy
from tray_proxy.tasks import spawn

log = logging.getLogger(__name__)

__all__ = [
    "PROBE_INTERVAL",
    "ProbeSink",
    "RoutingWatch",
    "WatchSettings",
    "health_probe",
    "proxy_answered",
]

PROBE_INTERVAL: Final = 30.0  # seconds between health probes of one upstream
PROBE_JITTER: Final = 0.2
# Failures reported per upstream when the off-network probe finds no proxy: the breaker opens
# after 3 and each further failure doubles its backoff (1, 2, 4, ... s): 9 reach 60 s, longer
# than the off-network probe's interval while away, which reports again every round.
_DOWN_REPORTS: Final = 9
_OFFNET_WORDS: Final = "unreachable from this network"

# The proxy answered as a proxy: it works, whatever it thinks of the target or the login.
_ANSWERED: Final = frozenset({ProbeOutcome.OK, ProbeOutcome.AUTH_FAILED, ProbeOutcome.FORBIDDEN})

ConnectProbe = Callable[
    [UpstreamProxy, Credentials | None, tuple[str, int], float], Awaitable[ProbeResult]
]


class ProbeSink(Protocol):
    """Where probe outcomes go: the running relay (`RelayHandle.report_probe`)."""

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None: ...


def proxy_answered(result: ProbeResult) -> bool:
    """Did the proxy itself work in this probe (even if it refused the target or a login)?"""
    return result.outcome in _ANSWERED


async def health_probe(
    upstream: UpstreamProxy, target: tuple[str, int], timeout: float
) -> ProbeResult:
    """One health probe: CONNECT through `upstream` to `target`, with no login."""
    return await probe_upstream(upstream, None, target, timeout)


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """What the watch reads from the settings. `interval`: `[routing] probe_interval` when
    the settings have it (docs/config.md), else PROBE_INTERVAL; 0 turns the health probe off."""

    upstreams: tuple[UpstreamProxy, ...]
    target: tuple[str, int]
    timeout: float
    interval: float
    offnet: OffnetPolicy
    source_ports: tuple[int, int] | None

    @classmethod
    def of(
        cls, config: Config, timings: OffnetPolicy | None = None, interval: float | None = None
    ) -> WatchSettings:
        """`interval` overrides the settings' (tests)."""
        if interval is None:
            interval = config.routing.probe_interval
        return cls(
            upstreams=tuple(config.upstreams),
            target=config.probe.target,
            # A health probe waits at most this long: a proxy slower than that is down.
            timeout=min(config.probe.timeout, 5.0),
            interval=float(interval),
            offnet=OffnetPolicy.from_routing(config.routing, timings),
            source_ports=config.relay.source_ports,
        )


class RoutingWatch:
    """Probes the upstreams while one relay runs. Start, reload and stop on one loop.

        watch = RoutingWatch(relay, WatchSettings.of(config), on_offnet)
        watch.start()
        watch.reload(WatchSettings.of(new_config))
        await watch.stop()

    `on_offnet(change)` runs on the loop for each off-network change (tray, `status`);
    `on_probe(upstream, result, works)` after each health probe (the dashboard's card).
    """

    def __init__(
        self,
        sink: ProbeSink,
        settings: WatchSettings,
        on_offnet: Callable[[OffnetChange], None],
        *,
        probe: Callable[[UpstreamProxy, tuple[str, int], float], Awaitable[ProbeResult]]
        | None = None,
        watch_network: bool = True,
        rng: Callable[[], float] = random.random,
        on_probe: Callable[[UpstreamProxy, ProbeResult, bool], None] | None = None,
    ) -> None:
        self._sink = sink
        self._settings = settings
        self._on_offnet = on_offnet
        self._probe = probe or health_probe
        self._watch_network = watch_network
        self._rng = rng
        self._on_probe = on_probe
        self._tasks: dict[str, asyncio.Task[None]] = {}  # health probe loop per upstream
        self._prober: OffnetProber | None = None
        self._holding: asyncio.Task[None] | None = None
        self.state = Reachability.ON_PROXY
        self.words = ""  # "direct: proxy unreachable" while away, else ""
        self.probes = 0  # health probes that ended (tests, diagnostics)

    @property
    def settings(self) -> WatchSettings:
        return self._settings

    def start(self) -> None:
        self._start_health()
        self._start_offnet()

    def reload(self, settings: WatchSettings) -> None:
        """New upstreams, probe target, interval or policy: probe the new set at once."""
        old, self._settings = self._settings, settings
        if (old.upstreams, old.target, old.timeout, old.interval) != (
            settings.upstreams,
            settings.target,
            settings.timeout,
            settings.interval,
        ):
            self._stop_health()
            self._start_health()
        prober = self._prober
        if prober is None:
            return
        if old.offnet != settings.offnet:
            prober.set_policy(settings.offnet)
        if old.upstreams != settings.upstreams:
            prober.set_upstreams(settings.upstreams)

    async def stop(self) -> None:
        tasks = self._stop_health()
        holding, self._holding = self._holding, None
        if holding is not None:
            holding.cancel()
            tasks.append(holding)
        prober, self._prober = self._prober, None
        if prober is not None:
            await prober.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- health probe ------------------------------------------------------------------

    def _start_health(self) -> None:
        settings = self._settings
        if settings.interval <= 0:
            return
        for upstream in settings.upstreams:
            self._tasks[upstream.name] = spawn(
                self._probe_loop(upstream, settings), name=f"tray-proxy probe {upstream.name}"
            )

    def _stop_health(self) -> list[asyncio.Task[None]]:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        return tasks

    def _jittered(self, interval: float) -> float:
        return interval * (1.0 + PROBE_JITTER * (2.0 * self._rng() - 1.0))

    async def _probe_loop(self, upstream: UpstreamProxy, settings: WatchSettings) -> None:
        # The first probe at a random point of the first interval: the relay's own traffic
        # tells health at once, and a start of many instances does not probe in step.
        await asyncio.sleep(settings.interval * self._rng())
        while True:
            await self.probe_now(upstream, settings)
            await asyncio.sleep(self._jittered(settings.interval))

    async def probe_now(self, upstream: UpstreamProxy, settings: WatchSettings) -> ProbeResult:
        """One health probe of `upstream`, reported to the relay."""
        try:
            result = await self._probe(upstream, settings.target, settings.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a probe's bug must not end the loop
            log.exception("probing %s failed", upstream.name)
            result = ProbeResult(ProbeOutcome.PROTOCOL_ERROR, None, None, str(exc))
        self.probes += 1
        if self.state is Reachability.DIRECT_UNREACHABLE:
            return result  # the off-network probe decides while away
        ok = proxy_answered(result)
        latency = result.answered_s if ok else None
        self._sink.report_probe(upstream.name, ok, latency, "" if ok else result.words)
        if self._on_probe is not None:
            try:
                self._on_probe(upstream, result, ok)
            except Exception:
                log.exception("the probe observer failed on %s", upstream.name)
        return result

    # -- off the corporate network ------------------------------------------------------

    def _start_offnet(self) -> None:
        settings = self._settings
        if not settings.upstreams:
            return
        prober = OffnetProber(
            settings.offnet,
            settings.upstreams,
            self._offnet_changed,
            probe_timeout=1.0,
            source_ports=settings.source_ports,
            watch_network=self._watch_network,
        )
        prober.start()
        self._prober = prober

    def network_changed(self) -> None:
        """A network change learnt otherwise (tests; WSL: Windows' network)."""
        if self._prober is not None:
            self._prober.network_changed()

    def _offnet_changed(self, change: OffnetChange) -> None:
        self.state = change.state
        self.words = change.words if change.state is Reachability.DIRECT_UNREACHABLE else ""
        if change.state is Reachability.DIRECT_UNREACHABLE:
            log.warning("%s (%s)", change.words, change.reason)
            self._report_down(_DOWN_REPORTS)
            if self._holding is None or self._holding.done():
                self._holding = spawn(self._hold_down(), name="tray-proxy offnet hold")
        else:
            holding, self._holding = self._holding, None
            if holding is not None:
                holding.cancel()
            self._report_back()
        try:
            self._on_offnet(change)
        except Exception:
            log.exception("the off-network observer failed on %s", change)

    def _report_down(self, times: int) -> None:
        for upstream in self._settings.upstreams:
            for _ in range(times):
                self._sink.report_probe(upstream.name, False, None, _OFFNET_WORDS)

    def _report_back(self) -> None:
        prober = self._prober
        results = prober.last_results if prober is not None else ()
        reachable = {r.upstream for r in results if r.ok}
        for upstream in self._settings.upstreams:
            if upstream.name in reachable or not results:
                self._sink.report_probe(upstream.name, True, None, "")

    async def _hold_down(self) -> None:
        """While away: keep the breakers open (each failure pushes the next trial out by
        their backoff), so no connection waits for a proxy this network cannot reach."""
        prober = self._prober
        interval = prober.offnet.policy.interval_direct if prober is not None else 10.0
        while self.state is Reachability.DIRECT_UNREACHABLE:
            await asyncio.sleep(max(1.0, interval / 2))
            if self.state is Reachability.DIRECT_UNREACHABLE:
                self._report_down(1)
