"""ConnectHandshake reading a 407's body so the next CONNECT can use the same connection."""

import pytest

from tray_proxy.relay.protocol.errors import HandshakeRefused, UsageError
from tray_proxy.relay.protocol.http_connect import ConnectHandshake, ProxyAuthRequired

OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
SQUID_407 = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b"Server: squid/5.7\r\n"
    b"Proxy-Authenticate: NTLM\r\n"
    b'Proxy-Authenticate: Basic realm="lab"\r\n'
    b"X-Squid-Error: ERR_CACHE_ACCESS_DENIED 0\r\n"
    b"Content-Type: text/html;charset=utf-8\r\n"
    b"Content-Length: 20\r\n"
    b"Connection: keep-alive\r\n\r\n"
    b"<html>denied</html>\n"
)
CHUNKED_407 = (
    b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM TlRMTVNTUAACAAAA\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


FEEDERS = pytest.mark.parametrize("chunker", [whole, bytewise], ids=["whole", "bytewise"])


def refusal(hs: ConnectHandshake, data: bytes, chunker=whole) -> ProxyAuthRequired:
    with pytest.raises(ProxyAuthRequired) as info:
        for chunk in chunker(data):
            hs.receive_data(chunk)
    return info.value


@FEEDERS
@pytest.mark.parametrize("answer", [SQUID_407, CHUNKED_407], ids=["length", "chunked"])
def test_407_body_is_read_and_the_connection_carries_the_next_leg(chunker, answer) -> None:
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=4096)
    assert b"Proxy-Authorization" not in hs.data_to_send()
    exc = refusal(hs, answer, chunker)
    assert exc.reusable and exc.status == 407 and exc.auth_failed
    assert any(n.lower() == "proxy-authenticate" for n, _ in exc.headers)
    hs.next_request([("Proxy-Authorization", "NTLM TlRMTVNTUAABAAAA")])
    second = hs.data_to_send()
    assert second.startswith(b"CONNECT origin.test:443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: NTLM TlRMTVNTUAABAAAA\r\n" in second
    for chunk in chunker(OK + b"tunnel"):
        if not hs.done:
            hs.receive_data(chunk)
    assert hs.done


def test_answer_glued_to_the_407_is_kept_for_the_next_request() -> None:
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=4096)
    exc = refusal(hs, SQUID_407 + OK[:10])
    assert exc.reusable
    hs.next_request()
    hs.receive_data(OK[10:] + b"T")
    assert hs.done and hs.trailing == b"T"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 407 No\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.0 407 No\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.1 407 No\r\n\r\nbody until the connection closes",
    ],
    ids=["connection-close", "http-1.0", "until-close"],
)
def test_407_that_ends_the_connection_is_raised_at_once(answer: bytes) -> None:
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=4096)
    exc = refusal(hs, answer)
    assert not exc.reusable
    with pytest.raises(UsageError, match="next_request"):
        hs.next_request()


def test_407_without_body_reading_is_raised_at_the_head() -> None:
    hs = ConnectHandshake("origin.test", 443)
    exc = refusal(hs, SQUID_407[: SQUID_407.index(b"<html>")])
    assert not exc.reusable


def test_a_huge_407_body_is_not_read_to_its_end() -> None:
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=10)
    exc = refusal(hs, SQUID_407)
    assert not exc.reusable


def test_407_cut_short_or_closed_mid_body() -> None:
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=4096)
    hs.receive_data(SQUID_407[:-5])
    exc = refusal(hs, b"")
    assert not exc.reusable
    with pytest.raises(UsageError):
        hs.receive_data(b"more")
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=4096)
    hs.receive_data(CHUNKED_407[:-7])
    assert not refusal(hs, b"zz\r\n").reusable  # broken chunk framing


def test_other_refusals_are_plain_handshake_refusals() -> None:
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=4096)
    with pytest.raises(HandshakeRefused) as info:
        hs.receive_data(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert not isinstance(info.value, ProxyAuthRequired)
    assert info.value.status == 403 and not info.value.auth_failed


def test_next_request_checks_headers_and_counts_the_head_afresh() -> None:
    hs = ConnectHandshake("origin.test", 443, max_refusal_body=4096, max_head=400)
    refusal(hs, SQUID_407)
    with pytest.raises(UsageError, match="invalid header name"):
        hs.next_request([("Bad Name", "x")])
    hs.next_request()
    hs.receive_data(OK)
    assert hs.done
