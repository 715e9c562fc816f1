"""The router (tray_proxy/routing/router.py): decisions as a table over real settings text,
then caching, health, when_unreachable, PAC (real pypac) with its fallback, and reloads."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tray_proxy.config import Config, parse_config
from tray_proxy.routing.health import BreakerPolicy, Health
from tray_proxy.routing.pac import PacFailure
from tray_proxy.routing.pac_worker import PacScript
from tray_proxy.routing.router import Decision, DecisionKind, Router, RoutingTable

PORTS = (32768, 60999)
P, D, B = DecisionKind.PROXY, DecisionKind.DIRECT, DecisionKind.BLOCK

SETTINGS = """
[relay]
upstream = "corp"

[[rule]]
match = ["*.intra.example", "10.0.0.0/8", "<local>"]
action = "direct"

[[rule]]
match = ["ads.example", ":25"]
action = "block"

[[rule]]
match = [".eu.example", "[2001:db8::/32]:443"]
action = "backup"

[[upstream]]
name = "backup"
url = "http://backup.corp:3128"

[[upstream]]
name = "corp"
url = "http://proxy.corp:3128"
username = "alice"

[[upstream]]
name = "third"
url = "socks5://10.9.9.9:1080"
priority = 0
"""


def _config(text: str) -> Config:
    return parse_config(text, "t.toml", local_port_range=PORTS)


def _router(text: str = SETTINGS, pac: object = None, health: Health | None = None) -> Router:
    config = _config(text)
    table = RoutingTable(config.routing, config.upstreams, config.relay.upstream)
    return Router(table, pac, health or Health(BreakerPolicy(jitter=0.0)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "ip", "port", "kind", "upstreams", "by"),
    [
        ("git.intra.example", "192.0.2.1", 443, D, (), "rule[0]"),
        ("pypi.org", "10.1.2.3", 443, D, (), "rule[0]"),
        ("wiki", "192.0.2.1", 80, D, (), "rule[0]"),
        ("ADS.example.", "192.0.2.1", 443, B, (), "rule[1]"),
        ("mail.example", "192.0.2.1", 25, B, (), "rule[1]"),
        ("www.eu.example", "192.0.2.1", 443, P, ("backup",), "rule[2]"),
        (None, "2001:db8::1", 443, P, ("backup",), "rule[2]"),
        (None, "2001:db8::1", 80, P, ("corp", "backup", "third"), "default"),
        # The active upstream first, then the others by priority (backup 0 by its place, third 0
        # set: a tie, kept in file order).
        ("pypi.org", "192.0.2.1", 443, P, ("corp", "backup", "third"), "default"),
        (None, None, 443, P, ("corp", "backup", "third"), "default"),
    ],
)
def test_decisions(
    host: str | None,
    ip: str | None,
    port: int,
    kind: DecisionKind,
    upstreams: tuple[str, ...],
    by: str,
) -> None:
    decision = _router().decide(host, ip, port, None, 0.0)
    assert (decision.kind, decision.upstreams, decision.decided_by) == (kind, upstreams, by)


def test_decision_words_for_the_history() -> None:
    r = _router()
    direct = r.decide("a.intra.example", None, 443)
    assert direct.decided_by == "rule[0]"
    assert direct.text == "direct (rule[0]: *.intra.example, 10.0.0.0/8, <local> -> direct)"
    assert r.decide("pypi.org", None, 443).text == "proxy corp, backup, third (default)"
    assert r.decide("pypi.org", None, 443).decided_by == "default"
    assert (
        Decision(
            P,
            ("a",),
            then_direct=True,
            decided_by="pac",
            rule_text="PROXY a; DIRECT",
            pac_failure="",
        ).text
        == "proxy a, then direct (pac: PROXY a; DIRECT)"
    )
    assert Decision(D, unreachable=True).text == "direct: proxy unreachable (default)"
    assert (
        Decision(P, ("a",), pac_failure="timeout").text == "proxy a (default; PAC failed: timeout)"
    )


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ('[routing]\ndefault = "direct"', (D, ())),
        ('[routing]\ndefault = "third"', (P, ("third", "backup", "corp"))),
        ("", (P, ("corp", "backup", "third"))),
    ],
)
def test_the_default(routing: str, expected: tuple[DecisionKind, tuple[str, ...]]) -> None:
    text = SETTINGS.replace("[relay]\n", routing + "\n[relay]\n")
    d = _router(text).decide("pypi.org", None, 443)
    assert (d.kind, d.upstreams) == expected


def test_no_upstream_and_no_active_one() -> None:
    assert _router("").decide("pypi.org", None, 443).kind is D
    text = '[[upstream]]\nname = "a"\nurl = "http://a:1"\npriority = 5\n[[upstream]]\nname = "b"\n'
    text += 'url = "http://b:1"\npriority = 0\n'
    assert _router(text).decide("x.example", None, 443).upstreams == ("b", "a")


def test_decisions_are_cached_and_reload_drops_them() -> None:
    r = _router()
    first = r.decide("pypi.org", "192.0.2.1", 443)
    assert r.decide("pypi.org", "192.0.2.1", 443) is first
    config = _config(SETTINGS.replace('action = "block"', 'action = "direct"'))
    r.reload(RoutingTable(config.routing, config.upstreams, config.relay.upstream))
    assert r.decide("ads.example", None, 443).kind is D


def test_cache_is_bounded() -> None:
    config = _config(SETTINGS)
    table = RoutingTable(config.routing, config.upstreams, config.relay.upstream)
    r = Router(table, None, Health(), cache_size=3)
    for i in range(10):
        assert r.decide(f"h{i}.example", "192.0.2.1", 443).kind is P
    assert len(r._cache) <= 3


def test_without_address_rules_the_address_is_not_part_of_the_key() -> None:
    r = _router('[[upstream]]\nname = "a"\nurl = "http://a:1"\n')
    assert not r.table.needs_ip
    assert r.decide("x.example", "192.0.2.1", 443) is r.decide("x.example", "192.0.2.2", 443)
    r2 = _router()
    assert r2.decide(None, "not an address", 443).decided_by == "default"
    assert r2.decide(None, ipaddress.ip_address("10.0.0.1"), 443).kind is D


def _down(health: Health, name: str, now: float = 0.0) -> None:
    for _ in range(health.policy.failures_to_open):
        health.failure(name, now)


def test_failover_skips_upstreams_that_are_down() -> None:
    health = Health(BreakerPolicy(jitter=0.0))
    r = _router(health=health)
    _down(health, "corp")
    assert r.decide("pypi.org", None, 443, None, 0.5).upstreams == ("backup", "third")
    assert r.decide("www.eu.example", None, 443, None, 0.5).upstreams == ("backup",)
    assert r.decide("a.intra.example", None, 443, None, 0.5).kind is D
    _down(health, "third")
    _down(health, "backup")
    down = r.decide("pypi.org", None, 443, None, 0.5)
    assert (down.kind, down.unreachable, down.decided_by) == (D, True, "default")
    assert down.text == "direct: proxy unreachable (default)"
    pinned = r.decide("www.eu.example", None, 443, None, 0.5)
    assert (pinned.kind, pinned.unreachable, pinned.decided_by) == (D, True, "rule[2]")
    # Back up: the next connections go through the proxy again.
    health.success("corp", 0.6)
    assert r.decide("pypi.org", None, 443, None, 0.6).upstreams == ("corp",)


def test_when_unreachable_fail_never_goes_direct() -> None:
    health = Health(BreakerPolicy(jitter=0.0))
    r = _router('[routing]\nwhen_unreachable = "fail"\n' + SETTINGS, health=health)
    for name in ("corp", "backup", "third"):
        _down(health, name)
    d = r.decide("pypi.org", None, 443, None, 0.5)
    assert (d.kind, d.upstreams, d.unreachable) == (P, ("corp", "backup", "third"), False)


def test_latency_policy_orders_by_measured_latency() -> None:
    health = Health(BreakerPolicy(jitter=0.0))
    r = _router('[routing]\npolicy = "latency"\n' + SETTINGS, health=health)
    health.success("backup", 0.0, 0.010)
    health.success("corp", 0.0, 0.050)
    assert r.decide("pypi.org", None, 443, None, 1.0).upstreams == ("backup", "corp", "third")


# -- PAC


@dataclass
class _Script:
    """A PacLookup with fixed answers, for the router's own logic (the real script is
    tested below and in test_pac_worker.py)."""

    answers: dict[str, str | PacFailure]
    generation: int = 1
    asked: int = 0

    def find(self, url: str, host: str) -> str | PacFailure:
        self.asked += 1
        return self.answers.get(host, PacFailure(f"no answer for {host}"))


PAC_SETTINGS = '[routing]\ndefault = "pac"\npac_url = "/etc/p.pac"\n' + SETTINGS


def test_pac_decides_what_the_rules_leave() -> None:
    script = _Script(
        {
            "pypi.org": "PROXY backup.corp:3128; PROXY proxy.corp:8080; DIRECT",
            "direct.example": "DIRECT; PROXY proxy.corp:3128",
            "sock.example": "SOCKS 10.9.9.9:1080",
            "odd.example": "HTTPS x:443",
            "192.0.2.9": "PROXY proxy.corp:3128",
        }
    )
    r = _router(PAC_SETTINGS, script)
    assert r.decide("a.intra.example", None, 443).decided_by == "rule[0]"
    assert script.asked == 0
    d = r.decide("pypi.org", None, 443)
    assert (d.kind, d.upstreams, d.then_direct, d.decided_by) == (
        P,
        ("backup", "pac-proxy.corp-8080"),
        True,
        "pac",
    )
    assert d.rule_text == "PROXY backup; PROXY pac-proxy.corp-8080; DIRECT"
    adhoc = r.upstream("pac-proxy.corp-8080")
    assert adhoc is not None and (adhoc.host, adhoc.port, adhoc.username) == (
        "proxy.corp",
        8080,
        "alice",
    )
    assert r.credentials_name("pac-proxy.corp-8080") == "corp"
    assert r.credentials_name("corp") == "corp"
    assert r.credentials_name("nobody") is None and r.upstream("nobody") is None
    assert r.upstream("corp") is not None
    assert r.decide("direct.example", None, 443).kind is D
    assert r.decide("sock.example", None, 443).upstreams == ("third",)
    assert r.decide(None, "192.0.2.9", 443).upstreams == ("corp",)
    # Cached per host: no second evaluation.
    asked = script.asked
    r.decide("pypi.org", None, 443, None, 100.0)
    assert script.asked == asked
    # After the TTL it is asked again; a new script generation drops the cache too.
    r.decide("pypi.org", None, 443, None, 400.0)
    assert script.asked == asked + 1
    script.generation += 1
    assert r.pac_pending("pypi.org", None, 443, 400.0)
    r.decide("pypi.org", None, 443, None, 400.0)
    assert script.asked == asked + 2


def test_a_pac_that_cannot_decide_falls_back_to_the_default_and_says_why() -> None:
    script = _Script({"odd.example": "HTTPS x:443", "bad.example": "nonsense"})
    r = _router(PAC_SETTINGS, script)
    for host, words in [
        ("odd.example", "no supported proxy"),
        ("bad.example", "no usable entry"),
        ("none.example", "no answer for none.example"),
    ]:
        d = r.decide(host, None, 443)
        assert (d.kind, d.upstreams, d.decided_by) == (P, ("corp", "backup", "third"), "default")
        assert words in d.pac_failure
    # A failure is cached for the shorter error TTL.
    asked = script.asked
    r.decide("odd.example", None, 443, None, 10.0)
    assert script.asked == asked
    r.decide("odd.example", None, 443, None, 31.0)
    assert script.asked == asked + 1
    assert (
        r.decide(None, None, 443).pac_failure == "the connection has neither a name nor an address"
    )
    r.set_pac(None)
    assert r.decide("pypi.org", None, 443).pac_failure == "no PAC script is in use"


def test_pac_pending_and_evaluate_off_the_loop() -> None:
    script = _Script({"pypi.org": "PROXY proxy.corp:3128"})
    r = _router(PAC_SETTINGS, script)
    assert not r.pac_pending("a.intra.example", None, 443, 0.0)  # a rule decides
    assert r.pac_pending("pypi.org", None, 443, 0.0)
    r.evaluate_pac("pypi.org", None, 443, None, 0.0)  # what the relay runs in a thread
    assert not r.pac_pending("pypi.org", None, 443, 0.0)
    asked = script.asked
    assert r.decide("pypi.org", None, 443, None, 0.0).upstreams == ("corp",)
    assert script.asked == asked
    assert not r.pac_pending(None, None, 443, 0.0)
    r.evaluate_pac(None, None, 443, None, 0.0)  # nothing to ask: no-op
    r.set_pac(None)
    r.evaluate_pac("x.example", None, 443, None, 0.0)
    assert script.asked == asked


def test_pac_then_direct_when_its_proxies_are_down() -> None:
    health = Health(BreakerPolicy(jitter=0.0))
    script = _Script({"pypi.org": "PROXY proxy.corp:3128; DIRECT"})
    r = _router(
        PAC_SETTINGS.replace("[routing]", '[routing]\nwhen_unreachable = "fail"'), script, health
    )
    _down(health, "corp")
    d = r.decide("pypi.org", None, 443, None, 0.5)
    assert (d.kind, d.unreachable, d.decided_by) == (D, True, "pac")


@pytest.fixture
def real_script(tmp_path: Path) -> Iterator[PacScript]:
    path = tmp_path / "proxy.pac"
    path.write_text(
        "function FindProxyForURL(url, host) {\n"
        '  if (dnsDomainIs(host, ".lab.example")) return "DIRECT";\n'
        '  if (url.indexOf("http:") == 0) return "PROXY backup.corp:3128";\n'
        '  return "PROXY proxy.corp:3128; DIRECT";\n'
        "}\n"
    )
    script = PacScript(str(path))
    try:
        yield script
    finally:
        script.close()


def test_real_pac_script_through_the_router(real_script: PacScript, tmp_path: Path) -> None:
    status = real_script.refresh(0.0)
    assert status is not None and status.ok
    r = _router(PAC_SETTINGS, real_script)
    assert r.decide("www.lab.example", None, 443).kind is D
    https = r.decide("pypi.org", None, 443)
    assert (https.upstreams, https.then_direct) == (("corp",), True)
    plain = r.decide("deb.debian.org", None, 80, "http://deb.debian.org/debian/dists/")
    assert plain.upstreams == ("backup",)
    # Broken on disk: the last good script keeps deciding; a reload to a missing file falls
    # back to the rules and says why.
    (tmp_path / "proxy.pac").write_text("function FindProxyForURL(")
    status = real_script.refresh(1.0, force=True)
    assert status is not None and not status.ok
    assert r.decide("other.example", None, 443).decided_by == "pac"
    missing = PacScript(str(tmp_path / "nothing.pac"))
    try:
        missing.refresh(0.0)
        r.set_pac(missing)
        d = r.decide("other.example", None, 443)
        assert d.decided_by == "default" and "cannot read the PAC file" in d.pac_failure
    finally:
        missing.close()


def test_pac_decisions_cache_is_bounded() -> None:
    script = _Script({f"h{i}.example": "PROXY proxy.corp:3128" for i in range(6)})
    config = _config(PAC_SETTINGS)
    table = RoutingTable(config.routing, config.upstreams, config.relay.upstream)
    r = Router(table, script, Health(), cache_size=2)
    for i in range(6):
        assert r.decide(f"h{i}.example", None, 443).upstreams == ("corp",)
    assert len(r._pac_decisions) <= 2
