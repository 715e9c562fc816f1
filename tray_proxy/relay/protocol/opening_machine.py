"""How one redirected connection becomes a tunnel, as a sans-IO state machine.

    ROUTE --decided--> DIAL --dialed--> ASK --opened--> OPEN
      |  (PAC pending:      |   ^  |challenged           ^
      |   EvaluatePac)      |   |  v                     |
      |                     |  CHALLENGED --stepped--+   |
      +--BLOCK--> FAILED <--+--failed (no next way)      |
                            +--failed before the tunnel, next way: DIAL again (failover)
                            +--refused CONNECT :80, forwardable: Forward -------+

The machine decides; the drivers do the I/O. Each input returns the commands to carry out,
in order: `EvaluatePac` (run the router's PAC evaluation off the loop, then `decided`),
`Dial` (an upstream by name, or the original destination when `upstream` is None: DIRECT),
`Ask` (send the upstream's request and run its handshake), `StepAuth` (the proxy
challenged: run the next auth step off the loop, then `stepped`), `Forward` (serve plain
HTTP as proxy requests through that upstream), `Report` (feed the upstream's health),
`Established` and `Failed` (one reason and its words, the only place they are put together
when more than one way was tried).

Failover: a failure before the tunnel is up that says the proxy itself is in trouble
(connect refused or timed out, reset, a bad answer, a 5xx to the CONNECT) moves on to the
next upstream of the decision, at most `retries` times per connection, invisibly to the
client; then DIRECT when the decision says so (a PAC list ending in DIRECT). A decision of
the proxy about the target or the credentials (403, 407, ...) is final.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tray_proxy.relay.protocol.errors import UsageError
from tray_proxy.relay.records import CloseReason
from tray_proxy.routing.router import Decision, DecisionKind

__all__ = [
    "Ask",
    "Command",
    "Dial",
    "Established",
    "EvaluatePac",
    "Failed",
    "Forward",
    "OpeningMachine",
    "Phase",
    "Report",
    "StepAuth",
    "moves_on",
]


class Phase(enum.Enum):
    ROUTE = "route"
    DIAL = "dial"
    ASK = "ask"
    CHALLENGED = "challenged"
    FORWARD = "forward"
    OPEN = "open"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class EvaluatePac:
    """Run the router's PAC evaluation off the loop, then call `decided`."""


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to `upstream` (a name), or to the original destination when None (DIRECT,
    from the relay's reserved source ports so the redirect never catches it)."""

    upstream: str | None


@dataclass(frozen=True, slots=True)
class Ask:
    """Send `upstream` the request for the target and run its handshake."""

    upstream: str


@dataclass(frozen=True, slots=True)
class StepAuth:
    """The proxy challenged: run the next authentication step off the loop (NTLM and
    Negotiate may call the KDC), then `stepped`."""

    upstream: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Serve the connection's plain HTTP as proxy requests through `upstream`."""

    upstream: str


@dataclass(frozen=True, slots=True)
class Report:
    """Feed `upstream`'s health: a handshake worked (`latency` seconds) or failed (`words`)."""

    upstream: str
    ok: bool
    latency: float | None = None
    words: str = ""


@dataclass(frozen=True, slots=True)
class Established:
    """The tunnel is open (`upstream` None: DIRECT); `latency`: dial to open, seconds."""

    upstream: str | None
    latency: float


@dataclass(frozen=True, slots=True)
class Failed:
    """The connection cannot go anywhere: reset the client, record `reason` and `words`."""

    reason: CloseReason
    words: str
    status: int | None = None
    rejected: bool = False


Command = EvaluatePac | Dial | Ask | StepAuth | Forward | Report | Established | Failed

# Failures that say the proxy itself (or the way to it) is in trouble: another upstream
# may well do. Everything else is the proxy's decision about this target or these
# credentials, or our own configuration, and another upstream would only repeat it.
_PROXY_TROUBLE = frozenset(
    {
        CloseReason.UPSTREAM_UNREACHABLE,
        CloseReason.UPSTREAM_TIMEOUT,
        CloseReason.UPSTREAM_RESET,
        CloseReason.UPSTREAM_PROTOCOL_ERROR,
    }
)


def moves_on(reason: CloseReason, status: int | None) -> bool:
    """Whether a failure before the tunnel is up counts against the upstream (its health)
    and lets the connection try the next one: the proxy is unreachable, slow, broken, or
    answered the CONNECT with a 5xx (502 Bad Gateway, 503 while it restarts)."""
    if reason in _PROXY_TROUBLE:
        return True
    return reason is CloseReason.UPSTREAM_REFUSED and status is not None and 500 <= status < 600


class OpeningMachine:
    """One connection's opening. Inputs are methods; each returns the commands to carry out.

    `now` arguments are monotonic seconds from the driver (the machine keeps no clock).
    `retries`: how many more ways a connection may try after its first failed one.
    `forwarding`: names of the upstreams known to refuse CONNECT to this port (the driver's
    Port80Memory), for which the machine goes straight to `Forward`.
    """

    __slots__ = (
        "phase",
        "decision",
        "retries",
        "forwarding",
        "current",
        "tried",
        "dialed_at",
        "_ways",
        "_errors",
    )

    def __init__(self, retries: int = 1, forwarding: frozenset[str] = frozenset()) -> None:
        self.phase = Phase.ROUTE
        self.decision: Decision | None = None
        self.retries = retries
        self.forwarding = forwarding
        self.current: str | None = None  # the upstream of the way in progress (None: DIRECT)
        self.tried: list[str | None] = []  # the ways tried, in order
        self.dialed_at = 0.0
        self._ways: list[str | None] = []  # the ways still to try
        self._errors: list[str] = []  # one sentence per failed way

    # -- inputs ----------------------------------------------------------------------------

    def start(self, pac_pending: bool) -> list[Command]:
        """The peek is over. `pac_pending`: the router must evaluate the PAC script first."""
        self._expect(Phase.ROUTE)
        return [EvaluatePac()] if pac_pending else []

    def decided(self, decision: Decision, now: float) -> list[Command]:
        """The router's decision for this connection."""
        self._expect(Phase.ROUTE)
        self.decision = decision
        if decision.kind is DecisionKind.BLOCK:
            self.phase = Phase.FAILED
            return [Failed(CloseReason.BLOCKED, f"blocked by {_why(decision)}")]
        if decision.kind is DecisionKind.DIRECT:
            self._ways = [None]
        else:
            self._ways = [*decision.upstreams, *([None] if decision.then_direct else [])]
        if not self._ways:
            self.phase = Phase.FAILED
            return [Failed(CloseReason.NO_UPSTREAM, "no upstream proxy is set up")]
        return self._next_way(now)

    def dialed(self) -> list[Command]:
        """The connection to the upstream (or the destination) is up."""
        self._expect(Phase.DIAL)
        if self.current is None:
            return self._open(self.dialed_at)  # DIRECT: no handshake
        self.phase = Phase.ASK
        return [Ask(self.current)]

    def challenged(self) -> list[Command]:
        """The proxy answered with a challenge (407) that our credentials may answer."""
        self._expect(Phase.ASK)
        assert self.current is not None
        self.phase = Phase.CHALLENGED
        return [StepAuth(self.current)]

    def stepped(self) -> list[Command]:
        """The authentication step ran: the driver sends its answer, the handshake goes on."""
        self._expect(Phase.CHALLENGED)
        self.phase = Phase.ASK
        return []

    def opened(self, now: float) -> list[Command]:
        """The proxy opened the tunnel."""
        if self.phase is not Phase.ASK and self.phase is not Phase.CHALLENGED:
            raise UsageError(f"opened() in phase {self.phase.value}")
        return self._open(now)

    def failed(
        self,
        reason: CloseReason,
        words: str,
        now: float,
        *,
        status: int | None = None,
        rejected: bool = False,
        forward: bool = False,
    ) -> list[Command]:
        """This way failed before the tunnel was up, with `reason` and `words` (the driver's
        sentence for it). `forward`: the proxy refused to tunnel to this port and its plain
        HTTP can be forwarded instead (Port80Memory.learn said so)."""
        if self.phase not in (Phase.DIAL, Phase.ASK, Phase.CHALLENGED):
            raise UsageError(f"failed() in phase {self.phase.value}")
        name = self.current
        if forward and name is not None:
            # 403 (or 501) to CONNECT :80 is the proxy's rule, not its trouble.
            self.phase = Phase.FORWARD
            return [Forward(name)]
        commands: list[Command] = []
        trouble = moves_on(reason, status)
        if name is not None and trouble:
            commands.append(Report(name, False, words=words))
        self._errors.append(words)
        if trouble and self._ways and self.retries > 0:
            self.retries -= 1
            commands += self._next_way(now)
            return commands
        self.phase = Phase.FAILED
        commands.append(Failed(reason, self._words(), status, rejected))
        return commands

    # -- inside ----------------------------------------------------------------------------

    def _expect(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise UsageError(f"expected phase {phase.value}, not {self.phase.value}")

    def _next_way(self, now: float) -> list[Command]:
        name = self._ways.pop(0)
        self.current = name
        self.tried.append(name)
        self.dialed_at = now
        if name is not None and name in self.forwarding:
            self.phase = Phase.FORWARD
            return [Forward(name)]
        self.phase = Phase.DIAL
        return [Dial(name)]

    def _open(self, now: float) -> list[Command]:
        self.phase = Phase.OPEN
        latency = max(0.0, now - self.dialed_at)
        name = self.current
        if name is None:
            return [Established(None, latency)]
        return [Report(name, True, latency=latency), Established(name, latency)]

    def _words(self) -> str:
        """The failure sentence: the last way's, and the earlier ways' after it."""
        errors = self._errors
        if len(errors) == 1:
            return errors[0]
        return f"{errors[-1]} (tried first: {'; '.join(errors[:-1])})"


def _why(decision: Decision) -> str:
    """`rule[2] (ads.example -> block)`, `pac (...)`, `default`."""
    if decision.rule_text:
        return f"{decision.decided_by} ({decision.rule_text})"
    return decision.decided_by
