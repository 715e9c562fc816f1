"""PAC results as data (tray_proxy/routing/pac.py): parsing FindProxyForURL's answer, mapping
it to configured or ad-hoc upstreams, the per-host cache and the refetch schedule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy
from tray_proxy.routing.pac import (
    PacCache,
    PacChoice,
    PacChoiceKind,
    PacFailure,
    PacRoute,
    PacSchedule,
    map_choices,
    pac_url_for,
    parse_pac_result,
)

K = PacChoiceKind


@pytest.mark.parametrize(
    ("text", "choices"),
    [
        ("DIRECT", [PacChoice(K.DIRECT)]),
        (" direct ;", [PacChoice(K.DIRECT)]),
        ("PROXY p.corp:3128", [PacChoice(K.PROXY, "p.corp", 3128)]),
        ("HTTP P.Corp.:3128", [PacChoice(K.PROXY, "p.corp", 3128)]),
        (
            "PROXY a:1; SOCKS b:2;SOCKS5 c:3 ; HTTPS d:4; SOCKS4 e:5; DIRECT",
            [
                PacChoice(K.PROXY, "a", 1),
                PacChoice(K.SOCKS5, "b", 2),
                PacChoice(K.SOCKS5, "c", 3),
                PacChoice(K.HTTPS, "d", 4),
                PacChoice(K.SOCKS4, "e", 5),
                PacChoice(K.DIRECT),
            ],
        ),
        ("PROXY [2001:db8::1]:8080", [PacChoice(K.PROXY, "2001:db8::1", 8080)]),
        # Malformed entries are left out, the rest kept.
        (
            "PROXY; PROXY a; PROXY a:0; PROXY a:x; PROXY :1; PROXY [::1; PROXY [::1]1; "
            "PROXY a:b:1; BOGUS a:1; DIRECT x; PROXY a:1 b; PROXY ok:1",
            [PacChoice(K.PROXY, "ok", 1)],
        ),
    ],
)
def test_results_parse_into_choices(text: str, choices: list[PacChoice]) -> None:
    assert parse_pac_result(text) == tuple(choices)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "no usable entry"),
        ("PROXY", "no usable entry"),
        (None, "returned NoneType, not a string"),
        ("DIRECT;" * 1000, "too long"),
    ],
)
def test_unusable_results_are_failures(value: object, words: str) -> None:
    result = parse_pac_result(value)
    assert isinstance(result, PacFailure) and words in result.words


@given(st.text(max_size=200))
def test_any_answer_parses_or_fails_cleanly(text: str) -> None:
    result = parse_pac_result(text)
    assert isinstance(result, (tuple, PacFailure))


def test_choice_text() -> None:
    assert PacChoice(K.DIRECT).text == "DIRECT"
    assert PacChoice(K.SOCKS5, "::1", 1080).text == "SOCKS5 [::1]:1080"


CORP = UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp", 3128, "alice", AuthScheme.NTLM)
SOCKS = UpstreamProxy("sock", UpstreamKind.SOCKS5, "10.0.0.5", 1080)


def _map(text: str) -> PacRoute | PacFailure:
    choices = parse_pac_result(text)
    assert not isinstance(choices, PacFailure)
    return map_choices(choices, (CORP, SOCKS))


def test_choices_map_to_configured_upstreams_by_host_and_port() -> None:
    assert _map("PROXY PROXY.corp:3128; SOCKS 10.0.0.5:1080") == PacRoute(("corp", "sock"), False)
    assert _map("PROXY proxy.corp:3128; DIRECT; PROXY x:1") == PacRoute(("corp",), True)
    assert _map("DIRECT") == PacRoute((), True)
    assert _map("DIRECT").direct_first
    assert _map("PROXY proxy.corp:3128; PROXY proxy.corp:3128") == PacRoute(("corp",), False)


def test_unknown_proxies_become_adhoc_upstreams_with_the_same_hosts_login() -> None:
    route = _map("PROXY proxy.corp:8080; SOCKS 10.0.0.5:1080; PROXY other.example:3128")
    assert isinstance(route, PacRoute)
    assert route.upstreams == ("pac-proxy.corp-8080", "sock", "pac-other.example-3128")
    (same, creds), (other, none) = route.adhoc
    assert (same.kind, same.host, same.port, same.username, same.auth) == (
        UpstreamKind.HTTP,
        "proxy.corp",
        8080,
        "alice",
        AuthScheme.NTLM,
    )
    assert creds == "corp"
    assert (other.username, other.auth, none) == (None, AuthScheme.AUTO, None)
    # A SOCKS entry at the HTTP proxy's address is another proxy (kinds differ).
    route = _map("SOCKS proxy.corp:3128")
    assert isinstance(route, PacRoute) and route.upstreams == ("pac-proxy.corp-3128",)
    assert route.adhoc[0][0].kind is UpstreamKind.SOCKS5
    route = _map("PROXY [2001:db8::1]:80")
    assert isinstance(route, PacRoute) and route.upstreams == ("pac-2001_db8__1-80",)


def test_unsupported_kinds_are_skipped_and_alone_fail() -> None:
    assert _map("HTTPS secure:443; PROXY proxy.corp:3128") == PacRoute(("corp",), False)
    failure = _map("HTTPS secure:443; SOCKS4 old:1080")
    assert isinstance(failure, PacFailure)
    assert "HTTPS secure:443, SOCKS4 old:1080" in failure.words


@pytest.mark.parametrize(
    ("host", "port", "url", "expected"),
    [
        ("a.example", 443, None, "https://a.example/"),
        ("a.example", 80, None, "http://a.example/"),
        ("a.example", 8443, None, "https://a.example:8443/"),
        ("::1", 443, None, "https://[::1]/"),
        ("a.example", 80, "http://a.example/x?y", "http://a.example/x?y"),
    ],
)
def test_url_given_to_the_script(host: str, port: int, url: str | None, expected: str) -> None:
    assert pac_url_for(host, port, url) == expected


def test_cache_keeps_answers_for_their_ttl_and_stays_bounded() -> None:
    cache = PacCache(ttl=10.0, size=2)
    route = PacRoute(("corp",), False)
    assert cache.get("a", 443, 0.0) is None
    cache.put("a", 443, route, 0.0)
    cache.put("b", 443, PacFailure("x"), 0.0, ttl=1.0)
    assert cache.get("a", 443, 9.9) == route
    assert cache.get("a", 80, 1.0) is None
    assert cache.get("b", 443, 0.5) == PacFailure("x")
    assert cache.get("b", 443, 1.0) is None
    assert len(cache) == 1
    cache.put("c", 443, route, 0.0)
    cache.put("d", 443, route, 0.0)  # full: starts over
    assert len(cache) == 1 and cache.get("d", 443, 0.0) == route
    assert cache.get("a", 443, 10.0) is None
    cache.clear()
    assert len(cache) == 0


def test_schedule_checks_on_interval_and_retries_failures_sooner() -> None:
    s = PacSchedule(interval=600.0, retry=30.0)
    assert s.due(0.0)
    s.checked(0.0, ok=True)
    assert not s.due(599.0) and s.due(600.0)
    times = []
    now = 600.0
    for _ in range(7):
        s.checked(now, ok=False)
        times.append(s.next_check - now)
        now = s.next_check
    assert times == [30.0, 60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    s.checked(now, ok=True)
    s.checked(now, ok=False)
    assert s.next_check - now == 30.0
