"""The port-80 forwarder's pure parts: which CONNECT answers mean "forward", the request
rewrite to absolute form, the response filter and the relay's own answers."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tray_proxy.relay.protocol.forward_http import (
    CONNECT_REFUSALS,
    ForwardRefused,
    connect_refused,
    error_response,
    proxy_request,
    request_host,
    response_fields,
)

DST = ("203.0.113.7", 80)
AUTH = ("Proxy-Authorization", "Basic c2VjcmV0")


def req(target: str = "/", *headers: tuple[str, str], method: str = "GET") -> h11.Request:
    fields = list(headers) if headers else [("Host", "origin.example")]
    return h11.Request(method=method, target=target, headers=fields)


def fields_of(request: h11.Request) -> list[tuple[bytes, bytes]]:
    return list(request.headers.raw_items())


@pytest.mark.parametrize("status", sorted(CONNECT_REFUSALS))
def test_refusals_that_mean_forward(status: int) -> None:
    assert connect_refused(status)


@pytest.mark.parametrize("status", [None, 200, 400, 404, 407, 502, 503])
def test_other_answers_do_not_mean_forward(status: int | None) -> None:
    assert not connect_refused(status)


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("/", "origin.example", "origin.example"),
        ("/", "Origin.Example:8080", "origin.example"),  # the port comes from the destination
        ("/", "user@origin.example", "origin.example"),
        ("/", "10.0.0.1", "203.0.113.7"),  # an IP in Host is not trusted over the real one
        ("/", "[::1]:80", "203.0.113.7"),
        ("/", "bad name!", "203.0.113.7"),
        ("*", "origin.example", "origin.example"),
        ("http://Other.Example:81/p?q", "origin.example", "other.example"),
        ("HTTP://other.example?q", "origin.example", "other.example"),
    ],
)
def test_request_host(target: str, host: str, expected: str) -> None:
    assert request_host(req(target, ("Host", host)), DST) == expected


def test_request_host_without_host_is_the_destination() -> None:
    request = h11.Request(method="GET", target="/", headers=[], http_version="1.0")
    assert request_host(request, DST) == "203.0.113.7"


@pytest.mark.parametrize("target", ["origin.example:80", "https://origin.example/"])
def test_a_target_that_is_not_a_path_or_http_url_is_refused(target: str) -> None:
    with pytest.raises(ForwardRefused) as info:
        request_host(req(target), DST)
    assert info.value.status == 400
    assert str(info.value).startswith("400: ")


@pytest.mark.parametrize(
    ("target", "uri"),
    [
        ("/path?q=1", b"http://origin.example/path?q=1"),
        ("*", b"http://origin.example"),
        ("http://origin.example:8080/p", b"http://origin.example/p"),
        ("http://origin.example", b"http://origin.example/"),
        ("http://origin.example?q", b"http://origin.example/?q"),
    ],
)
def test_the_target_becomes_absolute(target: str, uri: bytes) -> None:
    out = proxy_request(req(target), DST, pinned=None, authorization=None)
    assert out.request.target == uri
    assert out.host == "origin.example"


def test_a_port_other_than_80_and_an_ipv6_destination_are_in_the_authority() -> None:
    out = proxy_request(
        req("/x", ("Host", "[2001:db8::1]:8080")),
        ("2001:db8::1", 8080),
        pinned=None,
        authorization=None,
    )
    assert out.request.target == b"http://[2001:db8::1]:8080/x"
    assert dict(out.request.headers)[b"host"] == b"[2001:db8::1]:8080"


def test_hop_by_hop_fields_and_connection_tokens_go_and_our_authorization_comes() -> None:
    request = req(
        "/",
        ("Host", "origin.example:80"),
        ("Connection", "keep-alive, X-Private, Content-Length"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic client-sent"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("X-Private", "1"),
        ("Expect", "100-continue"),
        ("Content-Length", "3"),
        ("Accept", "*/*"),
    )
    out = proxy_request(request, DST, pinned="origin.example", authorization=AUTH)
    assert fields_of(out.request) == [
        (b"Host", b"origin.example"),
        (b"Expect", b"100-continue"),
        (b"Content-Length", b"3"),  # framing stays even when Connection names it
        (b"Accept", b"*/*"),
        (b"Proxy-Authorization", b"Basic c2VjcmV0"),
    ]
    assert "c2VjcmV0" not in repr(out) and repr(out) == "<ProxyRequest GET origin.example>"


def test_transfer_encoding_wins_over_content_length() -> None:
    # h11 parses a request with both (and frames it by Transfer-Encoding, RFC 9112 6.3).
    request = req(
        "/",
        ("Host", "origin.example"),
        ("Content-Length", "5"),
        ("Transfer-Encoding", "chunked"),
        method="POST",
    )
    out = proxy_request(request, DST, pinned=None, authorization=None)
    names = [n.lower() for n, _ in fields_of(out.request)]
    assert b"transfer-encoding" in names and b"content-length" not in names


def test_connect_is_refused_with_405() -> None:
    with pytest.raises(ForwardRefused) as info:
        proxy_request(
            req("origin.example:80", method="CONNECT"), DST, pinned=None, authorization=None
        )
    assert info.value.status == 405


def test_a_request_for_another_host_than_the_connection_s_gets_421() -> None:
    with pytest.raises(ForwardRefused) as info:
        proxy_request(req("/", ("Host", "b.example")), DST, pinned="a.example", authorization=None)
    assert info.value.status == 421
    assert "a.example" in info.value.words and "b.example" in info.value.words


def test_response_fields_lose_the_proxy_s_hop_by_hop_ones() -> None:
    fields = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Proxy-Authenticate", b"Basic realm=x"),
        (b"Proxy-Authentication-Info", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Via", b"1.1 squid"),
    ]
    assert response_fields(fields) == [
        (b"Content-Type", b"text/plain"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Via", b"1.1 squid"),
    ]


@pytest.mark.parametrize(("status", "reason"), [(502, b"Bad Gateway"), (599, b"")])
def test_error_response(status: int, reason: bytes) -> None:
    response, body = error_response(status, "proxy corp said no")
    assert response.status_code == status and response.reason == reason
    assert body == b"tray-proxy: proxy corp said no\n"
    headers = dict(response.headers)
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"connection"] == b"close"


_token = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","),
    min_size=1,
    max_size=40,
)


@given(host=_token, target=_token, connection=_token)
def test_any_parsed_request_rewrites_or_is_refused(host: str, target: str, connection: str) -> None:
    try:
        request = h11.Request(
            method="GET",
            target=target,
            headers=[("Host", host), ("Connection", connection)],
        )
    except h11.LocalProtocolError:
        return  # h11 would not have parsed it either
    try:
        out = proxy_request(request, DST, pinned=None, authorization=AUTH)
    except ForwardRefused as refused:
        assert refused.status in (400, 405)
        return
    assert out.request.target.startswith(b"http://")
    assert all(n.lower() != b"connection" for n, _ in fields_of(out.request))
