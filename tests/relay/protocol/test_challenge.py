"""Proxy-Authenticate parsing: several headers, several challenges per header, commas and
escapes inside quoted strings, token68 blobs; anything malformed is a ProtocolError."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.relay.protocol.challenge import MAX_CHALLENGES, Challenge, parse_challenges
from tray_proxy.relay.protocol.errors import PEER_EXCERPT_LIMIT, ProtocolError


def test_squid_offering_three_schemes_in_three_headers() -> None:
    got = parse_challenges(
        [
            "Negotiate",
            "NTLM",
            'Basic realm="tray-proxy lab"',
        ]
    )
    assert got == [
        Challenge("negotiate"),
        Challenge("ntlm"),
        Challenge("basic", params={"realm": "tray-proxy lab"}),
    ]


def test_several_challenges_in_one_header_with_commas_inside_quotes() -> None:
    header = (
        'Digest realm="corp, west", qop="auth,auth-int", nonce="abc", algorithm=SHA-256, '
        'Digest realm="corp, west", nonce="def", Basic realm=x, NTLM'
    )
    got = parse_challenges([header])
    assert [c.scheme for c in got] == ["digest", "digest", "basic", "ntlm"]
    assert got[0].params == {
        "realm": "corp, west",
        "qop": "auth,auth-int",
        "nonce": "abc",
        "algorithm": "SHA-256",
    }
    assert got[1].params == {"realm": "corp, west", "nonce": "def"}
    assert got[2].params == {"realm": "x"}


def test_token68_blobs_ntlm_type2_and_negotiate() -> None:
    got = parse_challenges(["NTLM TlRMTVNTUAACAAAA==", "Negotiate oYG2MIGzoAMK+/AQA=, Basic"])
    assert got == [
        Challenge("ntlm", token68="TlRMTVNTUAACAAAA=="),
        Challenge("negotiate", token68="oYG2MIGzoAMK+/AQA="),
        Challenge("basic"),
    ]


def test_escapes_whitespace_and_empty_list_elements() -> None:
    got = parse_challenges([' , ,Basic   realm = "a \\"quoted\\" \\\\ realm" ,, , Bearer  ,'])
    assert got == [Challenge("basic", params={"realm": 'a "quoted" \\ realm'}), Challenge("bearer")]


def test_scheme_and_parameter_names_are_case_insensitive_values_are_not() -> None:
    (got,) = parse_challenges(['DIGEST Realm="R", NONCE=AbC'])
    assert got.scheme == "digest"
    assert got.params == {"realm": "R", "nonce": "AbC"}


def test_a_token68_looking_parameter_is_a_parameter() -> None:
    # "realm=" then "x": not a token68 (that must end the challenge).
    assert parse_challenges(["Basic realm=x"])[0].params == {"realm": "x"}
    # a token68 with trailing whitespace before the next challenge
    assert parse_challenges(["Negotiate abc=  , Basic"])[0].token68 == "abc="


def test_no_headers_no_challenges() -> None:
    assert parse_challenges([]) == []
    assert parse_challenges(["", " , "]) == []


def test_repr_hides_token_blobs() -> None:
    text = repr(Challenge("ntlm", token68="TlRMTVNTUAACAAAA"))
    assert "TlRM" not in text and "token68[16]" in text
    assert repr(Challenge("basic", params={"realm": "x"})) == "<Challenge basic ['realm']>"


@pytest.mark.parametrize(
    ("header", "what"),
    [
        ("=abc", "expected an authentication scheme"),
        ('Basic"realm"', "expected a space after the scheme"),
        ("Basic realm x", "expected '=' after a parameter name"),
        ("Basic a=b, c=", "expected a parameter value"),
        ('Basic realm="x" nonce="y"', "expected ',' between parameters"),
        ('Basic realm="x', "unterminated quoted string"),
        ('Basic realm="x\\', "unterminated quoted string"),
        ('Basic realm="a\x01b"', "control character"),
        ('Digest realm="a", realm="b"', "appears twice"),
        ("Basic =x", "expected a parameter name"),
    ],
)
def test_malformed_headers_are_protocol_errors(header: str, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        parse_challenges([header])


def test_too_many_challenges() -> None:
    with pytest.raises(ProtocolError, match="more than"):
        parse_challenges([", ".join(["Basic"] * (MAX_CHALLENGES + 1))])
    assert len(parse_challenges([", ".join(["Basic"] * MAX_CHALLENGES)])) == MAX_CHALLENGES


def test_error_quotes_little_of_a_huge_header() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_challenges(['Basic realm="' + "x" * 10_000])
    assert len(str(info.value)) < PEER_EXCERPT_LIMIT + 120


_HEADER_CHARS = st.sampled_from(list(' \t,="\\abcXYZ019+/=-._~') + ["\x00", "\x7f", "é"])


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.text(_HEADER_CHARS, max_size=60), max_size=4))
def test_random_headers_raise_only_protocol_errors(values: list[str]) -> None:
    try:
        got = parse_challenges(values)
    except ProtocolError:
        return
    for challenge in got:
        assert challenge.scheme == challenge.scheme.lower() and challenge.scheme


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Basic", "Digest", "NTLM", "Negotiate"]),
            st.dictionaries(
                st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
                st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
                max_size=4,
            ),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_what_we_quote_we_read_back(offers: list[tuple[str, dict[str, str]]]) -> None:
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = ", ".join(
        f"{scheme} " + ", ".join(f"{k}={quote(v)}" for k, v in params.items()) if params else scheme
        for scheme, params in offers
    )
    got = parse_challenges([header])
    assert [(c.scheme, dict(c.params)) for c in got] == [(s.lower(), p) for s, p in offers]
