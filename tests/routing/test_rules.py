"""Rule patterns and the first-match table (tray_proxy/routing/rules.py): tables of patterns
as written in the settings, which connections they match, and Hypothesis on names."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tray_proxy.routing.rules import (
    MatchTable,
    Pattern,
    PatternError,
    PatternKind,
    canonical_host,
    normalise_host,
    parse_pattern,
)


@pytest.mark.parametrize(
    ("text", "kind", "normal"),
    [
        ("Host.Example", PatternKind.EXACT, "host.example"),
        ("host.example.", PatternKind.EXACT, "host.example"),
        (".Corp.Example", PatternKind.DOMAIN, ".corp.example"),
        ("*.corp.example", PatternKind.SUBDOMAIN, "*.corp.example"),
        ("*", PatternKind.ANY, "*"),
        ("<LOCAL>", PatternKind.LOCAL, "<local>"),
        ("bücher.example", PatternKind.EXACT, "xn--bcher-kva.example"),
        ("10.0.0.0/8", PatternKind.NETWORK, "10.0.0.0/8"),
        ("10.1.2.3/8", PatternKind.NETWORK, "10.0.0.0/8"),
        ("192.0.2.7", PatternKind.NETWORK, "192.0.2.7"),
        ("fd00::/8", PatternKind.NETWORK, "fd00::/8"),
        ("2001:DB8::1", PatternKind.NETWORK, "2001:db8::1"),
        ("[2001:db8::1]", PatternKind.NETWORK, "2001:db8::1"),
        ("[fd00::/8]:443", PatternKind.NETWORK, "[fd00::/8]:443"),
        (":8443", PatternKind.PORT, ":8443"),
        ("*.corp.example:8443", PatternKind.SUBDOMAIN, "*.corp.example:8443"),
        ("10.0.0.0/8:80", PatternKind.NETWORK, "10.0.0.0/8:80"),
        ("*:80", PatternKind.ANY, "*:80"),
        ("<local>:80", PatternKind.LOCAL, "<local>:80"),
        (" host ", PatternKind.EXACT, "host"),
    ],
)
def test_patterns_parse_and_print_back(text: str, kind: PatternKind, normal: str) -> None:
    pattern = parse_pattern(text)
    assert pattern.kind is kind
    assert pattern.text == normal
    assert parse_pattern(pattern.text) == pattern


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "must not be empty"),
        (":0", "port must be a number 1-65535"),
        (":http", "port must be a number"),
        ("host:99999", "port must be a number"),
        ("[fd00::1", 'has "[" without "]"'),
        ("[fd00::1]x", 'only ":PORT" may follow'),
        ("[10.0.0.1]", "only an IPv6 address"),
        ("fd00::zz", "is not an IPv6 address"),
        ("10.0.0.0/33", "is not an IPv4 address"),
        ("300.1.1.1", "is not an IPv4 address"),
        ("fd00::/8/1:80", "is not an IPv6"),
        ("a..b", "must be a host name"),
        ("*corp*", "must be a host name"),
        ("host_-.example", "must be a host name"),
        ("-bad.example", "must be a host name"),
        ("²", "must be a host name"),
        ("x" * 64 + ".example", "must be a host name"),
    ],
)
def test_bad_patterns_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(PatternError, match=None) as caught:
        parse_pattern(text)
    assert words in str(caught.value)


def test_names_are_normalised() -> None:
    assert normalise_host("WWW.Example.COM.") == "www.example.com"
    assert normalise_host("Bücher.example") == "xn--bcher-kva.example"
    assert normalise_host("") is None
    assert normalise_host(".") is None
    assert normalise_host("a..b") is None
    assert normalise_host("\udcff.example") is None  # no IDNA form
    assert normalise_host("a." * 127 + "b") is None  # longer than 253
    assert canonical_host("[2001:DB8::1]") == "2001:db8::1"
    assert canonical_host("10.0.0.1") == "10.0.0.1"
    assert canonical_host("1host.example") == "1host.example"
    assert canonical_host("") is None


def _table(*rules: list[str]) -> MatchTable:
    return MatchTable([[parse_pattern(p) for p in rule] for rule in rules])


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    return ipaddress.ip_address(text) if text else None


TABLE = _table(
    ["intranet.example"],  # 0
    [".corp.example"],  # 1
    ["*.svc.example", ":8443"],  # 2
    ["10.0.0.0/8", "fd00::/8"],  # 3
    ["<local>"],  # 4
    ["*.git.example:22", "[2001:db8::/32]:80", "192.0.2.0/24:80", "<local>:81", "*:82"],  # 5
    ["host.example:83", ".d.example:84"],  # 6
    ["example"],  # 7 shadowed by <local> (4): first match wins
    ["*"],  # 8
)


@pytest.mark.parametrize(
    ("host", "ip", "port", "index"),
    [
        ("intranet.example", None, 443, 0),
        ("www.intranet.example", None, 443, 8),  # exact is exact
        ("corp.example", None, 443, 1),
        ("a.b.corp.example", None, 443, 1),
        ("xcorp.example", None, 443, 8),  # label boundary
        ("svc.example", None, 443, 8),  # *.suffix excludes the suffix itself
        ("api.svc.example", None, 443, 2),
        ("pypi.org", None, 8443, 2),
        ("pypi.org", "10.1.2.3", 443, 3),
        (None, "10.1.2.3", 443, 3),
        (None, "fd12::1", 443, 3),
        ("10.9.9.9", None, 443, 3),  # an address as the name matches address rules
        ("fd00::5", None, 443, 3),
        ("wiki", None, 443, 4),
        ("example", None, 443, 4),
        ("host.git.example", None, 22, 5),
        ("host.git.example", None, 23, 8),
        (None, "2001:db8::9", 80, 5),
        ("192.0.2.9", None, 80, 5),
        (None, "192.0.2.9", 81, 8),
        ("plain", None, 81, 4),
        ("pypi.org", None, 82, 5),
        ("host.example", None, 83, 6),
        ("d.example", None, 84, 6),
        ("x.d.example", None, 84, 6),
        ("x.d.example", None, 83, 8),
        ("1.2.3.4", None, 83, 8),  # a name pattern never matches an address
        (None, None, 443, 8),
    ],
)
def test_first_matching_rule_wins(host: str | None, ip: str | None, port: int, index: int) -> None:
    assert TABLE.first_match(host, _ip(ip), port) == index


def test_without_a_name_only_address_and_port_rules_match() -> None:
    table = _table([".corp.example"], ["<local>"], ["10.0.0.0/8"], [":8080"])
    assert table.first_match(None, _ip("192.0.2.1"), 443) is None
    assert table.first_match(None, _ip("10.0.0.1"), 443) == 2
    assert table.first_match(None, None, 8080) == 3
    assert _table().first_match("a.example", None, 443) is None


def test_earlier_rules_win_across_kinds() -> None:
    table = _table([":443"], ["*"], ["a.example"], ["10.0.0.0/8"], ["*.example:443"])
    assert table.first_match("a.example", _ip("10.0.0.1"), 443) == 0
    table = _table(["10.0.0.0/8"], [":443"], ["*.example:443"])
    assert table.first_match("a.example", _ip("10.0.0.1"), 443) == 0
    table = _table(["x.example"], ["*.example:443"], ["10.0.0.0/8"])
    assert table.first_match("a.example", _ip("10.0.0.1"), 443) == 1
    # A later duplicate never replaces the earlier index.
    table = _table(["*"], ["*"], ["<local>"], ["<local>"], [":1"], [":1"])
    assert table.first_match("x", None, 1) == 0


# A name's labels; all-digit names are addresses (or typos of them), never names.
_label = st.from_regex(r"[a-z](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)


@given(suffix=_names, prefix=_names, other=_label)
def test_suffix_patterns_follow_label_boundaries(suffix: str, prefix: str, other: str) -> None:
    below = f"{prefix}.{suffix}"
    domain = _table(["." + suffix])
    sub = _table(["*." + suffix])
    exact = _table([suffix])
    assert domain.first_match(suffix, None, 443) == 0
    assert domain.first_match(below, None, 443) == 0
    assert sub.first_match(suffix, None, 443) is None
    assert sub.first_match(below, None, 443) == 0
    assert exact.first_match(suffix, None, 443) == 0
    assert exact.first_match(below, None, 443) is None
    glued = other + suffix  # no dot between: never a match
    if glued != suffix and not glued.endswith("." + suffix):
        assert domain.first_match(glued, None, 443) is None
        assert sub.first_match(glued, None, 443) is None


@given(name=_names, upper=st.booleans(), dot=st.booleans())
def test_names_match_whatever_their_case_or_trailing_dot(name: str, upper: bool, dot: bool) -> None:
    written = (name.upper() if upper else name) + ("." if dot else "")
    host = canonical_host(written)
    assert host is not None
    assert _table([name]).first_match(host, None, 443) == 0
    assert _table([written]).first_match(canonical_host(name), None, 443) == 0


@given(st.text(max_size=30))
def test_any_text_either_parses_to_a_stable_pattern_or_says_why(text: str) -> None:
    try:
        pattern = parse_pattern(text)
    except PatternError as exc:
        assert str(exc)
    else:
        assert isinstance(pattern, Pattern)
        assert parse_pattern(pattern.text) == pattern


def test_a_ported_local_pattern() -> None:
    table = _table(["<local>:81"])
    assert table.first_match("plain", None, 81) == 0
    assert table.first_match("a.plain", None, 81) is None
    assert table.first_match("plain", None, 80) is None


def test_networks_of_any_prefix_length_keep_rule_order() -> None:
    table = _table(["10.1.0.0/16"], ["10.0.0.0/8", "::/0"], ["10.1.2.0/24", "0.0.0.0/0"])
    assert table.first_match(None, _ip("10.1.2.3"), 443) == 0
    assert table.first_match(None, _ip("10.2.0.1"), 443) == 1
    assert table.first_match(None, _ip("192.0.2.1"), 443) == 2
    assert table.first_match(None, _ip("2001:db8::1"), 443) == 1
    assert table.first_match("10.1.2.3", _ip("192.0.2.1"), 443) == 0  # the name's address too


# -- the index against a plain reading of the rules


def _reference(
    rules: list[list[Pattern]], host: str | None, ip: ipaddress.IPv4Address | None, port: int
) -> int | None:
    """First matching rule by the module docstring's words, one pattern at a time."""
    literal = None
    if host is not None:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
    addresses = [a for a in (ip, literal) if a is not None]
    name = host if literal is None else None

    def hit(p: Pattern) -> bool:
        if p.port is not None and p.port != port:
            return False
        k = p.kind
        if k is PatternKind.PORT or k is PatternKind.ANY:
            return True
        if k is PatternKind.NETWORK:
            return any(a.version == p.network.version and a in p.network for a in addresses)  # type: ignore[union-attr]
        if name is None:
            return False
        if k is PatternKind.LOCAL:
            return "." not in name
        if k is PatternKind.EXACT:
            return name == p.name
        if k is PatternKind.DOMAIN:
            return name == p.name or name.endswith("." + p.name)
        return name.endswith("." + p.name)

    return next((i for i, rule in enumerate(rules) if any(hit(p) for p in rule)), None)


_small_names = st.sampled_from(["a", "b.a", "c.b.a", "x", "b.x", "a.x"])
_small_pattern = st.one_of(
    _small_names,
    _small_names.map(lambda n: "." + n),
    _small_names.map(lambda n: "*." + n),
    st.sampled_from(["*", "<local>", ":80", ":443", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3"]),
).flatmap(lambda p: st.sampled_from([p, p + ":80"]) if not p.startswith(":") else st.just(p))


@given(
    rules=st.lists(st.lists(_small_pattern, min_size=1, max_size=3), max_size=8),
    host=st.one_of(st.none(), _small_names, st.sampled_from(["10.1.2.3", "10.9.9.9"])),
    ip=st.one_of(st.none(), st.sampled_from(["10.1.2.3", "10.1.9.9", "10.2.0.1", "192.0.2.1"])),
    port=st.sampled_from([80, 443, 8080]),
)
def test_the_index_agrees_with_a_plain_reading(
    rules: list[list[str]], host: str | None, ip: str | None, port: int
) -> None:
    parsed = [[parse_pattern(p) for p in rule] for rule in rules]
    address = ipaddress.IPv4Address(ip) if ip else None
    expected = _reference(parsed, host, address, port)
    assert MatchTable(parsed).first_match(host, address, port) == expected
