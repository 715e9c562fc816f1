"""Off the corporate network: is any upstream proxy reachable, and if not, go direct (issue 15
section 5).

Three parts, smallest first:

- `Offnet`, a pure state machine: fed with probe rounds (one outcome per upstream) and
  network changes, it says ON_PROXY or DIRECT_UNREACHABLE ("direct: proxy unreachable") and
  when to probe next. Hysteresis: `failures_to_direct` consecutive rounds in which every
  upstream failed before going direct (one lost SYN must not send traffic around the proxy),
  one round with any upstream reachable to come back (back through the proxy as soon as it
  is there). After a network change it probes fast (0, 0.5, 1, 2, 4, 8 s), else every
  `interval` seconds (`interval_direct` while direct, to come back sooner). A round that
  started before the latest network change cannot send us direct: it measured the old
  network. `[routing] when_unreachable = "fail"` never goes direct; the state then still
  says the proxy is unreachable (`unreachable`), for the tray and `status`.
- `probe_upstreams`: one round: resolve each upstream's name and open a TCP connection to it
  (no CONNECT: reachability only; the routing health probe checks the proxy's answers), from
  the relay's reserved source-port range so the redirect never catches the probe itself
  (an upstream on 80/443 whose address the ruleset does not know yet).
- `OffnetProber`: the driver on an asyncio loop: a task that waits for the next probe or a
  network change (`NetworkWatcher`), runs a round, feeds the state machine and reports each
  change through a callback.

Time is passed in (`now`, loop time) to the state machine; no clock, no I/O there.

Must not import PySide6, qasync, the relay engine or the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tray_proxy.netwatch import NetworkWatcher, NetworkWatchError
from tray_proxy.relay.aio import within
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.settings import UpstreamProxy
from tray_proxy.relay.upstream import Dialer, UpstreamError
from tray_proxy.routing.settings import RoutingSettings
from tray_proxy.tasks import spawn

__all__ = [
    "DIRECT_WORDS",
    "Offnet",
    "OffnetChange",
    "OffnetPolicy",
    "OffnetProber",
    "ProbeResult",
    "ProbeStatus",
    "Reachability",
    "probe_upstreams",
]

DIRECT_WORDS = "direct: proxy unreachable"
_FAIL_WORDS = 'proxy unreachable (going direct is off: when_unreachable = "fail")'


class Reachability(enum.Enum):
    ON_PROXY = "on-proxy"
    DIRECT_UNREACHABLE = "direct-unreachable"


class ProbeStatus(enum.Enum):
    OK = "ok"
    REFUSED = "refused"  # the host answered: nothing listens on the proxy's port
    TIMEOUT = "timeout"  # no answer (filtered, or a network that drops the packets)
    NO_NAME = "no-name"  # the proxy's name does not resolve (typical off the corporate DNS)
    UNREACHABLE = "unreachable"  # no route, host unreachable, any other socket error


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One upstream's outcome in a probe round. `words`: for the log and `status`
    ("proxy.corp:8080: the name does not resolve"); `seconds`: how long it took."""

    upstream: str
    status: ProbeStatus
    words: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is ProbeStatus.OK


@dataclass(frozen=True, slots=True)
class OffnetPolicy:
    """How eagerly to go direct and to probe. `go_direct` is `when_unreachable == "direct"`."""

    go_direct: bool = True
    failures_to_direct: int = 2  # consecutive rounds with every upstream failing
    successes_to_return: int = 1  # consecutive rounds with one upstream reachable
    interval: float = 30.0  # periodic probe while on the proxy
    interval_direct: float = 10.0  # periodic probe while direct
    confirm: float = 0.5  # after a failed round, the next one this soon
    fast: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)  # after a network change

    def __post_init__(self) -> None:
        if self.failures_to_direct < 1 or self.successes_to_return < 1:
            raise ValueError("failures_to_direct and successes_to_return must be at least 1")
        delays = (self.interval, self.interval_direct, self.confirm, *self.fast)
        if any(not math.isfinite(d) or d < 0 for d in delays) or not self.fast:
            raise ValueError("probe delays must be finite, not negative, and fast not empty")

    @classmethod
    def from_routing(
        cls, routing: RoutingSettings, timings: OffnetPolicy | None = None
    ) -> OffnetPolicy:
        """The policy for `[routing] when_unreachable`, with the timings of `timings`."""
        return dataclasses.replace(timings or cls(), go_direct=routing.when_unreachable == "direct")

    @property
    def longest_wait(self) -> float:
        return max(self.interval, self.interval_direct, self.confirm, *self.fast)


@dataclass(frozen=True, slots=True)
class OffnetChange:
    """The state changed: for the event stream (tray, dashboard, `status`). `words` is the
    new state in the user's words; `reason` the failures that led to it ("" when back)."""

    state: Reachability
    unreachable: bool
    words: str
    reason: str = ""


class Offnet:
    """The state machine. Serialise calls (one loop); `now` is monotonic seconds."""

    def __init__(self, policy: OffnetPolicy, now: float) -> None:
        self.policy = policy
        self.state = Reachability.ON_PROXY
        self.unreachable = False  # every upstream failed `failures_to_direct` rounds running
        self.reason = ""  # the last failed round's words
        self.generation = 0  # bumped by every network change
        self._failed_rounds = 0
        self._good_rounds = 0
        self._fast_index: int | None = 0  # start-up probes like a network change
        self._due = now + policy.fast[0]

    @property
    def words(self) -> str:
        if self.state is Reachability.DIRECT_UNREACHABLE:
            return DIRECT_WORDS
        if self.unreachable:
            return _FAIL_WORDS
        return "through the proxy"

    def network_changed(self, now: float) -> None:
        """Links, addresses or routes changed: probe now, then fast for a while. Rounds
        already running measured the old network (their failures will not count)."""
        self.generation += 1
        self._fast_index = 0
        self._due = now + self.policy.fast[0]

    def probe_started(self, now: float) -> int:
        """A round starts now; pass the returned token to `probed`."""
        return self.generation

    def next_probe_in(self, now: float) -> float:
        """Seconds until the next round is due (0: now)."""
        return max(0.0, self._due - now)

    def probed(self, token: int, results: Sequence[ProbeResult], now: float) -> OffnetChange | None:
        """A round ended: one result per upstream. Returns the change it caused, if any."""
        before = (self.state, self.unreachable)
        reachable = any(result.ok for result in results)
        if reachable:
            self._failed_rounds = 0
            self._good_rounds += 1
            self.reason = ""
            if self._good_rounds >= self.policy.successes_to_return:
                self.unreachable = False
                self.state = Reachability.ON_PROXY
        elif results and token == self.generation:
            self._good_rounds = 0
            self._failed_rounds += 1
            self.reason = "; ".join(result.words for result in results)
            if self._failed_rounds >= self.policy.failures_to_direct:
                self.unreachable = True
                if self.policy.go_direct:
                    self.state = Reachability.DIRECT_UNREACHABLE
        self._schedule(now, failed=bool(results) and not reachable)
        if (self.state, self.unreachable) == before:
            return None
        return self._change()

    def set_policy(self, policy: OffnetPolicy, now: float) -> OffnetChange | None:
        """New settings (reload). Turning going-direct off while direct comes back at once."""
        self.policy = policy
        before = self.state
        if self.state is Reachability.DIRECT_UNREACHABLE and not policy.go_direct:
            self.state = Reachability.ON_PROXY
        elif self.unreachable and policy.go_direct:
            self.state = Reachability.DIRECT_UNREACHABLE
        if self._fast_index is not None and self._fast_index >= len(policy.fast):
            self._fast_index = None
        self._due = min(self._due, now + policy.longest_wait)
        return None if self.state is before else self._change()

    def _change(self) -> OffnetChange:
        reason = self.reason if self.unreachable else ""
        return OffnetChange(self.state, self.unreachable, self.words, reason)

    def _schedule(self, now: float, *, failed: bool) -> None:
        policy = self.policy
        if self._fast_index is not None:
            self._fast_index += 1
            if self._fast_index < len(policy.fast):
                self._due = now + policy.fast[self._fast_index]
                return
            self._fast_index = None
        if self.unreachable:  # direct, or failing with when_unreachable = "fail"
            self._due = now + policy.interval_direct
        elif failed and not self.unreachable:
            self._due = now + min(policy.confirm, policy.interval)  # confirm soon
        else:
            self._due = now + policy.interval


# probing ---------------------------------------------------------------------------------------


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def probe_one(upstream: UpstreamProxy, timeout: float, dialer: Dialer) -> ProbeResult:
    """Resolve `upstream`'s name and open (then close) a TCP connection to it."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    where = _authority(upstream.host, upstream.port)

    def result(status: ProbeStatus, words: str) -> ProbeResult:
        return ProbeResult(upstream.name, status, f"{where}: {words}", loop.time() - started)

    try:
        infos = await within(
            timeout, loop.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
        )
    except asyncio.TimeoutError:
        return result(ProbeStatus.TIMEOUT, f"resolving the name took over {timeout:g} s")
    except socket.gaierror as exc:
        return result(ProbeStatus.NO_NAME, f"the name does not resolve ({exc.strerror})")
    except OSError as exc:
        return result(ProbeStatus.NO_NAME, f"the name does not resolve ({exc.strerror or exc})")
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        if str(sockaddr[0]) not in addresses:
            addresses.append(str(sockaddr[0]))
    last = result(ProbeStatus.UNREACHABLE, "no address")
    deadline = started + timeout
    for address in addresses:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return result(ProbeStatus.TIMEOUT, f"no connection within {timeout:g} s")
        try:
            # reserved: the dialer's source-port range (none when it has none).
            sock = await dialer.connect(address, upstream.port, remaining, reserved=True)
        except UpstreamError as exc:
            if exc.reason is CloseReason.UPSTREAM_TIMEOUT:
                last = result(ProbeStatus.TIMEOUT, f"no connection within {timeout:g} s")
            elif exc.errno == errno.ECONNREFUSED:
                last = result(ProbeStatus.REFUSED, "connection refused")
            else:
                why = errno.errorcode.get(exc.errno or 0, "")
                words = exc.detail.removeprefix("cannot connect to ")
                last = result(ProbeStatus.UNREACHABLE, f"unreachable ({why or words})")
            continue
        sock.close()
        return result(ProbeStatus.OK, "reachable")
    return last


async def probe_upstreams(
    upstreams: Sequence[UpstreamProxy],
    timeout: float,
    *,
    source_ports: tuple[int, int] | None = (61000, 64999),
    dialer: Dialer | None = None,
) -> list[ProbeResult]:
    """One round: every upstream at once, each within `timeout` seconds, in their order.

    `source_ports`: the relay's reserved range (`RelaySettings.source_ports`), which the
    redirect never catches; None binds no source port. `dialer`: the relay's own, to share
    its source-port rotation (on its loop only); by default a private one.
    """
    if dialer is None:
        dialer = Dialer(source_ports)
    rounds = [probe_one(upstream, timeout, dialer) for upstream in upstreams]
    return list(await asyncio.gather(*rounds))


# the driver --------------------------------------------------------------------------------------


class OffnetProber:
    """Runs `Offnet` on an asyncio loop: probes when due or when the network changed.

        prober = OffnetProber(policy, upstreams, on_change, probe_timeout=1.0)
        prober.start()            # on the loop's thread (the relay's loop)
        prober.state              # read on that loop for each new connection
        prober.set_upstreams(...) / prober.set_policy(...)   # reload
        await prober.stop()

    `on_change(change)` runs on the loop. `watch_network=False` leaves out the netlink
    watcher (also used automatically where netlink is unavailable: periodic probes only).
    `source_ports` is passed to `probe_upstreams`.
    """

    def __init__(
        self,
        policy: OffnetPolicy,
        upstreams: Sequence[UpstreamProxy],
        on_change: Callable[[OffnetChange], None],
        *,
        probe_timeout: float = 1.0,
        source_ports: tuple[int, int] | None = (61000, 64999),
        watch_network: bool = True,
        network_quiet: float = 0.3,
    ) -> None:
        self._policy = policy
        self._upstreams = tuple(upstreams)
        self._on_change = on_change
        self._timeout = probe_timeout
        self._source_ports = source_ports
        self._watch_network = watch_network
        self._quiet = network_quiet
        self._offnet: Offnet | None = None
        self._watcher: NetworkWatcher | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.rounds = 0  # rounds that ended
        self.abandoned = 0  # rounds cut short by a network change
        self.last_results: tuple[ProbeResult, ...] = ()

    @property
    def state(self) -> Reachability:
        return self._offnet.state if self._offnet is not None else Reachability.ON_PROXY

    @property
    def offnet(self) -> Offnet:
        assert self._offnet is not None, "start() first"
        return self._offnet

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._stopping = False
        self._offnet = Offnet(self._policy, loop.time())
        if self._watch_network:
            watcher = NetworkWatcher(self.network_changed, quiet=self._quiet)
            try:
                watcher.start(loop)
                self._watcher = watcher
            except NetworkWatchError:
                self._watcher = None
        self._task = spawn(self._run(), name="tray-proxy offnet prober", loop=loop)

    def network_changed(self) -> None:
        """Also for callers that learn of a change otherwise (WSL: Windows' network)."""
        if self._offnet is None:
            return
        self._offnet.network_changed(asyncio.get_running_loop().time())
        self._wake.set()

    def set_upstreams(self, upstreams: Sequence[UpstreamProxy]) -> None:
        self._upstreams = tuple(upstreams)
        self.network_changed()  # probe the new ones now

    def set_policy(self, policy: OffnetPolicy) -> None:
        self._policy = policy
        if self._offnet is None:
            return
        change = self._offnet.set_policy(policy, asyncio.get_running_loop().time())
        self._wake.set()
        if change is not None:
            self._on_change(change)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        offnet = self.offnet
        while not self._stopping:
            wait = offnet.next_probe_in(loop.time())
            if wait > 0:
                self._wake.clear()
                # `within` is asyncio.timeout on 3.11: wait_for loses a cancel that comes
                # with the wake-up (set_policy then stop); `_stopping` covers 3.10's.
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(wait, self._wake.wait())
                continue  # woken early or due: ask again
            token = offnet.probe_started(loop.time())
            results = await self._round(token)
            if results is None:
                self.abandoned += 1
                continue  # the network changed meanwhile: probe the new one now
            self.rounds += 1
            self.last_results = tuple(results)
            change = offnet.probed(token, results, loop.time())
            if change is not None:
                self._on_change(change)

    async def _round(self, token: int) -> list[ProbeResult] | None:
        """One probe round; None when the network changed before it ended. A round that
        waits for a timeout on the old network would otherwise hold up the probe of the new
        one by up to `probe_timeout`, and its failure would not count (it is stale): in
        the lab that made one outage take 5.0 s to go direct instead of 2.8 s."""
        offnet = self.offnet
        probing = spawn(
            probe_upstreams(self._upstreams, self._timeout, source_ports=self._source_ports),
            name="tray-proxy offnet probe round",
        )
        try:
            while not probing.done():
                self._wake.clear()
                woken = spawn(self._wake.wait(), name="tray-proxy offnet wake")
                try:
                    await asyncio.wait({probing, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if offnet.generation != token or self._stopping:
                    return None
            return probing.result()
        finally:
            if not probing.done():
                probing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probing
