"""NO_PROXY / ProxyOverride import (tray_proxy/routing/noproxy.py): what each item becomes,
what is skipped and why, and Hypothesis round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tray_proxy.routing.noproxy import format_no_proxy, parse_no_proxy
from tray_proxy.routing.rules import MatchTable


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        ("localhost,127.0.0.1,::1", ".localhost, 127.0.0.1, ::1"),
        (".corp.example, corp2.example", ".corp.example, .corp2.example"),
        ("*.corp.example;<local>", "*.corp.example, <local>"),
        ("10.*;192.168.*\t172.16.0.*", "10.0.0.0/8, 192.168.0.0/16, 172.16.0.0/24"),
        ("10.0.0.0/8 fd00::/8", "10.0.0.0/8, fd00::/8"),
        ("*", "*"),
        ("host.example:8080,[::1]:80,[fd00::1],10.0.0.1:81", ""),
        ("a.example,A.example.,a.example", ".a.example"),
        ("", ""),
        (" , ;", ""),
    ],
)
def test_items_become_patterns(text: str, patterns: str) -> None:
    imported = parse_no_proxy(text)
    if text.startswith("host.example:8080"):
        patterns = ".host.example:8080, [::1]:80, fd00::1, 10.0.0.1:81"
    assert ", ".join(p.text for p in imported.patterns) == patterns
    assert imported.skipped == ()


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("*corp*", "wildcards other than a leading *."),
        ("a.*.example", "wildcards other than a leading *."),
        ("**.x", "wildcards other than a leading *."),
        ("300.*", "not an address wildcard"),
        ("host:0", "port must be a number"),
        ("[::1", 'has "[" without'),
        ("[::1]x", 'has "[" without'),
        ("a..b", "must be a host name"),
    ],
)
def test_what_has_no_pattern_is_skipped_with_why(item: str, words: str) -> None:
    imported = parse_no_proxy(f"ok.example,{item}")
    assert [p.text for p in imported.patterns] == [".ok.example"]
    assert len(imported.skipped) == 1
    assert imported.skipped[0][0] == item
    assert words in imported.skipped[0][1]


def test_imported_names_cover_their_subdomains() -> None:
    imported = parse_no_proxy("corp.example,10.*,:8443,<local>")
    table = MatchTable([imported.patterns])
    assert table.first_match("corp.example", None, 443) == 0
    assert table.first_match("git.corp.example", None, 443) == 0
    assert table.first_match("pypi.org", None, 443) is None
    assert table.first_match("pypi.org", None, 8443) == 0
    assert table.first_match("intranet", None, 443) == 0


_label = st.from_regex(r"[a-z](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_name = st.lists(_label, min_size=1, max_size=3).map(".".join)
_item = st.one_of(
    _name,
    _name.map(lambda n: "." + n),
    _name.map(lambda n: "*." + n),
    st.just("<local>"),
    st.just("*"),
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"{a}/24"),
    st.tuples(_name, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(1, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
    st.integers(1, 255).map(lambda o: f"{o}.*"),
)


@given(items=st.lists(_item, max_size=8), sep=st.sampled_from([",", ", ", ";", " "]))
def test_round_trip(items: list[str], sep: str) -> None:
    imported = parse_no_proxy(sep.join(items))
    assert imported.skipped == ()
    again = parse_no_proxy(format_no_proxy(imported.patterns))
    assert again == imported


@given(st.text(max_size=40))
def test_any_string_imports_or_reports(text: str) -> None:
    imported = parse_no_proxy(text)
    assert all(why for _, why in imported.skipped)
    assert parse_no_proxy(format_no_proxy(imported.patterns)).patterns == imported.patterns
