"""The router: one decision per connection, from the rules, the PAC script and upstream health.

Order of precedence: the first `[[rule]]` that matches; else `[routing] default`:
- left out: the active upstream ([relay] upstream, else the one of lowest priority), then the
  others by priority (failover);
- an upstream's name: that one, then the others by priority;
- "direct": DIRECT;
- "pac": the PAC script's answer for the connection; when it cannot answer (not fetched,
  broken, threw, too slow, nothing usable), the left-out default, marked with the failure.
A rule naming an upstream pins it: no failover to the others.

Health then orders a PROXY decision's upstreams (`select.order_upstreams`). When none is
available: `when_unreachable = "direct"` turns it into DIRECT marked `unreachable`; "fail"
keeps the whole list (try them anyway, fail with the proxies' own words, never go direct).

Cost: decisions that do not depend on health are cached per (host, address, port); the common
case (no rule, no PAC, every breaker closed) is one dict lookup. PAC answers are cached per
(host, port) for the PAC TTL; a broken answer for `pac_error_ttl`. PAC evaluation blocks
(a child process, up to its deadline): the relay asks `pac_pending` on its loop and, when
True, runs `evaluate_pac` in a thread, then `decide`. `decide` itself evaluates a pending PAC
inline, for callers with no loop to protect (`tray-proxy rules test`).

Not thread-safe beyond that: `decide`, `reload` and `Health` belong to one thread (the relay's
loop); `evaluate_pac` only stores into the PAC cache.

Must not import PySide6, asyncio, socket or the relay engine.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tray_proxy.relay.settings import UpstreamProxy
from tray_proxy.routing.health import Health
from tray_proxy.routing.pac import (
    PacCache,
    PacFailure,
    PacRoute,
    map_choices,
    pac_url_for,
    parse_pac_result,
)
from tray_proxy.routing.rules import Action, MatchTable, PatternKind, canonical_host
from tray_proxy.routing.select import order_upstreams
from tray_proxy.routing.settings import DEFAULT_PAC, RoutingSettings

__all__ = ["Decision", "DecisionKind", "PacLookup", "Router", "RoutingTable"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DecisionKind(enum.Enum):
    PROXY = "proxy"
    DIRECT = "direct"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one connection goes, and what decided it (for the history and the dashboard).

    `upstreams`: PROXY's upstream names in the order to try (a failure before the tunnel is
    up moves to the next). `then_direct`: go DIRECT when all of them failed (a PAC list ending
    in DIRECT). `decided_by`: "rule[3]", "pac" or "default"; `rule_text`: that rule's text
    or the PAC script's answer. `unreachable`: DIRECT because every upstream is down.
    `pac_failure`: why the PAC script could not decide (then the default decided).
    """

    kind: DecisionKind
    upstreams: tuple[str, ...] = ()
    then_direct: bool = False
    decided_by: str = "default"
    rule_text: str = ""
    unreachable: bool = False
    pac_failure: str = ""

    @property
    def text(self) -> str:
        """One line: `proxy corp, backup (rule[2]: *.corp -> corp)`."""
        if self.kind is DecisionKind.PROXY:
            what = "proxy " + ", ".join(self.upstreams)
            if self.then_direct:
                what += ", then direct"
        elif self.unreachable:
            what = "direct: proxy unreachable"
        else:
            what = self.kind.value
        why = self.decided_by + (f": {self.rule_text}" if self.rule_text else "")
        if self.pac_failure:
            why += f"; PAC failed: {self.pac_failure}"
        return f"{what} ({why})"


class PacLookup(Protocol):
    """What the router needs of a PAC script (pac_worker.PacScript is one): its answer for a
    URL and host, and a number that changes when a new version of the script is in use."""

    generation: int

    def find(self, url: str, host: str) -> str | PacFailure: ...


class RoutingTable:
    """The settings compiled for deciding: rules indexed, upstreams ordered by priority."""

    def __init__(
        self,
        settings: RoutingSettings,
        upstreams: Sequence[UpstreamProxy],
        active: str | None = None,
    ) -> None:
        self.settings = settings
        self.upstreams = {u.name: u for u in upstreams}
        given = dict(settings.priorities)
        ranked = sorted(enumerate(upstreams), key=lambda iu: (given.get(iu[1].name, iu[0]), iu[0]))
        self.by_priority: tuple[str, ...] = tuple(u.name for _, u in ranked)
        self.rules = settings.rules
        self.match = MatchTable([r.patterns for r in settings.rules])
        # Without address patterns the address cannot change a decision: leave it out of the
        # cache key, so one entry serves every address of a name.
        self.needs_ip = any(
            p.kind is PatternKind.NETWORK for r in settings.rules for p in r.patterns
        )
        first = settings.default if settings.default not in (None, "direct", DEFAULT_PAC) else None
        if first is None:
            first = active if active in self.upstreams else None
        if first is None and self.by_priority:
            first = self.by_priority[0]
        self.failover: tuple[str, ...] = (
            () if first is None else (first, *(n for n in self.by_priority if n != first))
        )


@dataclass(frozen=True, slots=True)
class _Route:
    """A decision before health ordered it (what the cache holds)."""

    decision: Decision
    pac: bool = False  # the default is "pac": look up the PAC answer


class Router:
    """Decides each connection's way; see the module docstring."""

    def __init__(
        self,
        table: RoutingTable,
        pac: PacLookup | None,
        health: Health,
        *,
        pac_ttl: float = 300.0,
        pac_error_ttl: float = 30.0,
        cache_size: int = 8192,
    ) -> None:
        self.health = health
        self.pac = pac
        self.pac_cache = PacCache(pac_ttl)
        self.pac_error_ttl = pac_error_ttl
        self._cache_size = cache_size
        self._cache: dict[tuple[str | None, object, int], _Route] = {}
        self._adhoc: dict[str, tuple[UpstreamProxy, str | None]] = {}
        self._pac_decisions: dict[tuple[str | None, object, int], tuple[float, Decision]] = {}
        self._pac_generation = pac.generation if pac is not None else 0
        self.table = table
        self.reload(table)

    def reload(self, table: RoutingTable) -> None:
        """Use new settings; cached decisions go (open tunnels are not the router's business)."""
        self.table = table
        self._cache.clear()
        self.pac_cache.clear()
        self._pac_decisions.clear()
        self._adhoc.clear()
        self.health.forget(set(table.upstreams))
        s = table.settings
        self._default = self._default_route()
        self._priority = s.policy == "priority"
        self._direct_when_down = s.when_unreachable == "direct"

    def set_pac(self, pac: PacLookup | None) -> None:
        """Use another PAC script (None: none, e.g. pac_url was removed from the settings)."""
        self.pac = pac
        self._pac_generation = pac.generation if pac is not None else 0
        self.pac_cache.clear()
        self._pac_decisions.clear()

    # -- deciding

    def decide(
        self,
        host: str | None,
        ip: str | IPAddress | None,
        port: int,
        url: str | None = None,
        now: float = 0.0,
    ) -> Decision:
        """The decision for a connection to `host` (SNI or Host:, None when unknown), original
        destination `ip` and `port`; `url` is the plain-HTTP request's URL (for the PAC).
        Evaluates the PAC script inline when its answer is not cached (see `pac_pending`)."""
        route = self._route(host, ip, port)
        decision = self._pac_seen(host, ip, port, url, now) if route.pac else route.decision
        if decision.kind is not DecisionKind.PROXY:
            return decision
        if self._priority and self.health.all_closed:
            return decision
        return self._ordered(decision, now)

    def pac_pending(
        self, host: str | None, ip: str | IPAddress | None, port: int, now: float
    ) -> bool:
        """Whether `decide` would have to evaluate the PAC script (run `evaluate_pac` in a
        thread first, then `decide`)."""
        if not self._route(host, ip, port).pac:
            return False
        self._check_generation()
        key = self._pac_key(host, ip)
        return key is not None and self.pac_cache.get(key, port, now) is None

    def evaluate_pac(
        self, host: str | None, ip: str | IPAddress | None, port: int, url: str | None, now: float
    ) -> None:
        """Evaluate the PAC script for this connection and cache its answer (blocking)."""
        key = self._pac_key(host, ip)
        if key is not None and self.pac is not None:
            self._evaluate(key, port, url, now)

    def upstream(self, name: str) -> UpstreamProxy | None:
        """The upstream a decision names: configured, or ad-hoc from the PAC script."""
        known = self.table.upstreams.get(name)
        if known is not None:
            return known
        adhoc = self._adhoc.get(name)
        return adhoc[0] if adhoc is not None else None

    def credentials_name(self, name: str) -> str | None:
        """Whose keyring entry an upstream uses: its own for a configured one, a configured
        upstream's on the same host for an ad-hoc one, else None (no login)."""
        if name in self.table.upstreams:
            return name
        adhoc = self._adhoc.get(name)
        return adhoc[1] if adhoc is not None else None

    # -- inside

    def _route(self, host: str | None, ip: str | IPAddress | None, port: int) -> _Route:
        table = self.table
        key = (host, ip if table.needs_ip else None, port)
        route = self._cache.get(key)
        if route is not None:
            return route
        name = canonical_host(host) if host else None
        address = _address(ip) if table.needs_ip else None
        index = table.match.first_match(name, address, port)
        if index is None:
            route = self._default
        else:
            rule = table.rules[index]
            by, text = f"rule[{index}]", rule.text
            if rule.action is Action.DIRECT:
                route = _Route(Decision(DecisionKind.DIRECT, decided_by=by, rule_text=text))
            elif rule.action is Action.BLOCK:
                route = _Route(Decision(DecisionKind.BLOCK, decided_by=by, rule_text=text))
            else:
                assert rule.upstream is not None
                route = _Route(
                    Decision(DecisionKind.PROXY, (rule.upstream,), decided_by=by, rule_text=text)
                )
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = route
        return route

    def _default_route(self) -> _Route:
        default = self.table.settings.default
        if default == "direct":
            return _Route(Decision(DecisionKind.DIRECT))
        failover = self.table.failover
        fallback = (
            Decision(DecisionKind.PROXY, failover) if failover else Decision(DecisionKind.DIRECT)
        )
        return _Route(fallback, pac=default == DEFAULT_PAC)

    def _check_generation(self) -> None:
        pac = self.pac
        if pac is not None and pac.generation != self._pac_generation:
            self._pac_generation = pac.generation
            self.pac_cache.clear()
            self._pac_decisions.clear()

    def _pac_key(self, host: str | None, ip: str | IPAddress | None) -> str | None:
        name = canonical_host(host) if host else None
        if name is None and ip is not None:
            name = str(ip)
        return name

    def _pac_seen(
        self, host: str | None, ip: str | IPAddress | None, port: int, url: str | None, now: float
    ) -> Decision:
        # The PAC cache is keyed by the normalised name; this one by what the relay passes,
        # so a repeated connection costs one dict probe instead of a normalisation.
        self._check_generation()
        key = (host, ip if host is None else None, port)
        seen = self._pac_decisions.get(key)
        if seen is not None and now < seen[0]:
            return seen[1]
        decision, expires = self._pac_decision(host, ip, port, url, now)
        if len(self._pac_decisions) >= self._cache_size:
            self._pac_decisions.clear()
        self._pac_decisions[key] = (expires, decision)
        return decision

    def _pac_decision(
        self, host: str | None, ip: str | IPAddress | None, port: int, url: str | None, now: float
    ) -> tuple[Decision, float]:
        fallback = self._default.decision
        if self.pac is None:
            return _with_failure(fallback, "no PAC script is in use"), now + self.pac_error_ttl
        key = self._pac_key(host, ip)
        if key is None:
            words = "the connection has neither a name nor an address"
            return _with_failure(fallback, words), now + self.pac_error_ttl
        entry = self.pac_cache.entry(key, port, now)
        if entry is None:
            answer = self._evaluate(key, port, url, now)
            failed = isinstance(answer, PacFailure)
            expires = now + (self.pac_error_ttl if failed else self.pac_cache.ttl)
        else:
            expires, answer = entry
        if isinstance(answer, PacFailure):
            return _with_failure(fallback, answer.words), expires
        if answer.direct_first:
            return Decision(DecisionKind.DIRECT, decided_by="pac", rule_text="DIRECT"), expires
        decision = Decision(
            DecisionKind.PROXY,
            answer.upstreams,
            then_direct=answer.then_direct,
            decided_by="pac",
            rule_text=_pac_text(answer),
        )
        return decision, expires

    def _evaluate(self, key: str, port: int, url: str | None, now: float) -> PacRoute | PacFailure:
        assert self.pac is not None
        raw = self.pac.find(pac_url_for(key, port, url), key)
        choices = parse_pac_result(raw) if not isinstance(raw, PacFailure) else raw
        answer = (
            map_choices(choices, tuple(self.table.upstreams.values()))
            if not isinstance(choices, PacFailure)
            else choices
        )
        if isinstance(answer, PacFailure):
            self.pac_cache.put(key, port, answer, now, self.pac_error_ttl)
        else:
            for upstream, creds in answer.adhoc:
                self._adhoc[upstream.name] = (upstream, creds)
            self.pac_cache.put(key, port, answer, now)
        return answer

    def _ordered(self, decision: Decision, now: float) -> Decision:
        order = order_upstreams(decision.upstreams, self.health, self.table.settings.policy, now)
        if order == decision.upstreams:
            return decision
        if order:
            return _replace_upstreams(decision, order)
        if decision.then_direct or self._direct_when_down:
            return Decision(
                DecisionKind.DIRECT,
                decided_by=decision.decided_by,
                rule_text=decision.rule_text,
                unreachable=True,
                pac_failure=decision.pac_failure,
            )
        return decision


def _address(ip: str | IPAddress | None) -> IPAddress | None:
    if ip is None or not isinstance(ip, str):
        return ip
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def _with_failure(decision: Decision, words: str) -> Decision:
    return Decision(
        decision.kind,
        decision.upstreams,
        decision.then_direct,
        decision.decided_by,
        decision.rule_text,
        decision.unreachable,
        words,
    )


def _replace_upstreams(decision: Decision, upstreams: tuple[str, ...]) -> Decision:
    return Decision(
        decision.kind,
        upstreams,
        decision.then_direct,
        decision.decided_by,
        decision.rule_text,
        decision.unreachable,
        decision.pac_failure,
    )


def _pac_text(answer: PacRoute) -> str:
    parts = [f"PROXY {n}" for n in answer.upstreams]
    if answer.then_direct:
        parts.append("DIRECT")
    return "; ".join(parts)
