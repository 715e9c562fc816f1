"""The error types the engine tells apart, and what their messages may contain."""

import pytest

from tray_proxy.relay.protocol.errors import (
    PEER_EXCERPT_LIMIT,
    HandshakeRefused,
    peer_excerpt,
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"HTTP/1.1 200", "b'HTTP/1.1 200'"),
        (bytearray(b"\x00\xff"), "b'\\x00\\xff'"),
        ("text", "'text'"),
        (b"", "b''"),
    ],
)
def test_peer_excerpt_quotes_short_data_whole(data: bytes | str, expected: str) -> None:
    assert peer_excerpt(data) == expected


@pytest.mark.parametrize("data", [b"A" * 10_000, "A" * 10_000, bytearray(b"A" * 81)])
def test_peer_excerpt_cuts_long_data_and_says_so(data: bytes | str) -> None:
    text = peer_excerpt(data)
    assert text.count("A") == PEER_EXCERPT_LIMIT
    assert text.endswith("...")


def test_peer_excerpt_limit_is_adjustable() -> None:
    assert peer_excerpt(b"abcdef", 3) == "b'abc'..."


def test_refusal_of_an_http_proxy_reads_like_its_status_line() -> None:
    exc = HandshakeRefused(
        407,
        "Proxy Authentication Required",
        auth_failed=True,
        headers=[("proxy-authenticate", 'Basic realm="corp"')],
    )
    assert str(exc) == "proxy answered 407 Proxy Authentication Required"
    assert exc.status == 407
    assert exc.reason == "Proxy Authentication Required"
    assert exc.auth_failed is True
    assert exc.headers == (("proxy-authenticate", 'Basic realm="corp"'),)


def test_refusal_defaults_to_not_about_credentials_and_no_headers() -> None:
    exc = HandshakeRefused(5, "connection refused")
    assert str(exc) == "proxy answered 5 connection refused"
    assert exc.auth_failed is False
    assert exc.headers == ()


def test_refusal_without_reason_phrase_has_no_trailing_space() -> None:
    assert str(HandshakeRefused(403, "")) == "proxy answered 403"


def test_refusal_caps_the_reason_the_peer_chose() -> None:
    exc = HandshakeRefused(403, "x" * 5000)
    assert len(exc.reason) == PEER_EXCERPT_LIMIT + 3
    assert len(str(exc)) < 120
