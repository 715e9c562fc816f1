"""HTTP CONNECT handshake: transcripts of what real proxies answer, trickled and fuzzed."""

from collections.abc import Callable, Iterable

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.relay.protocol.auth import basic_proxy_authorization
from tray_proxy.relay.protocol.errors import HandshakeRefused, ProtocolError, UsageError
from tray_proxy.relay.protocol.http_connect import (
    MAX_RESPONSE_HEADERS,
    ConnectHandshake,
    connect_request,
    format_authority,
    plain_2xx_end,
)

FUZZ = settings(max_examples=400, deadline=None)

# What Squid 5.7 sends on the wire, byte for byte apart from the dates.
SQUID_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"
SQUID_407 = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b"Server: squid/5.7\r\n"
    b"Mime-Version: 1.0\r\n"
    b"Date: Thu, 27 Nov 2025 07:47:00 GMT\r\n"
    b"Content-Type: text/html;charset=utf-8\r\n"
    b"Content-Length: 3520\r\n"
    b"X-Squid-Error: ERR_CACHE_ACCESS_DENIED 0\r\n"
    b"Vary: Accept-Language\r\n"
    b"Content-Language: en\r\n"
    b'Proxy-Authenticate: Basic realm="Squid proxy-caching web server"\r\n'
    b"X-Cache: MISS from proxy.corp\r\n"
    b"Via: 1.1 proxy.corp (squid/5.7)\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
    b"<!DOCTYPE html PUBLIC ...><html><body>Cache Access Denied</body></html>"
)
SQUID_403 = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Server: squid/5.7\r\n"
    b"Content-Type: text/html;charset=utf-8\r\n"
    b"Content-Length: 3423\r\n"
    b"X-Squid-Error: ERR_ACCESS_DENIED 0\r\n"
    b"\r\n"
    b"<html>Access Denied</html>"
)
SQUID_502 = (
    b"HTTP/1.1 502 Bad Gateway\r\n"
    b"Server: squid/5.7\r\n"
    b"X-Squid-Error: ERR_CONNECT_FAIL 111\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)
CONTINUE_THEN_200 = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n" + SQUID_200
# Some appliances send a body length on the 2xx; RFC 9110 section 9.3.6 says to ignore it.
# The server hello glued after the head is tunnel data.
GLUED_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03"
)
CHUNKED_200 = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nSSH-2.0-OpenSSH_9.2\r\n"


def feed(hs: ConnectHandshake, chunks: Iterable[bytes]) -> bytes:
    """Feed the proxy's bytes until the tunnel opens; return what the client then receives."""
    leftover = b""
    for chunk in chunks:
        if hs.done:
            leftover += chunk
        else:
            hs.receive_data(chunk)
    assert hs.done
    return hs.trailing + leftover


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        chunks.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        chunks.append(data[pos:])
    return chunks


Chunker = Callable[[bytes], list[bytes]]
FEEDERS = pytest.mark.parametrize("chunker", [whole, bytewise], ids=["whole", "bytewise"])


# -- the request ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("example.com", 443, "example.com:443"),
        ("10.0.0.1", 80, "10.0.0.1:80"),
        ("2001:db8::1", 443, "[2001:db8::1]:443"),
        ("[2001:db8::1]", 443, "[2001:db8::1]:443"),
    ],
)
def test_format_authority(host: str, port: int, expected: str) -> None:
    assert format_authority(host, port) == expected


def test_request_is_queued_on_construction_and_sent_once() -> None:
    hs = ConnectHandshake("example.com", 443)
    assert hs.data_to_send() == b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    assert hs.data_to_send() == b""
    assert not hs.done
    assert hs.trailing == b""


def test_request_to_ipv6_literal_uses_brackets() -> None:
    hs = ConnectHandshake("2001:db8::1", 443)
    assert hs.data_to_send() == (
        b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n"
    )


def test_request_carries_extra_headers_in_order() -> None:
    hs = ConnectHandshake(
        "example.com",
        443,
        headers=[basic_proxy_authorization("alice", "hunter2"), ("User-Agent", " tray-proxy ")],
    )
    assert hs.data_to_send() == (
        b"CONNECT example.com:443 HTTP/1.1\r\n"
        b"Host: example.com:443\r\n"
        b"Proxy-Authorization: Basic YWxpY2U6aHVudGVyMg==\r\n"
        b"User-Agent: tray-proxy\r\n"
        b"\r\n"
    )


def test_repr_shows_target_and_state_but_never_headers() -> None:
    hs = ConnectHandshake("example.com", 443, headers=[("Proxy-Authorization", "Basic c2VjcmV0")])
    assert repr(hs) == "<ConnectHandshake example.com:443 waiting>"
    hs.receive_data(SQUID_200)
    assert repr(hs) == "<ConnectHandshake example.com:443 done>"
    failed = ConnectHandshake("example.com", 443)
    with pytest.raises(HandshakeRefused):
        failed.receive_data(SQUID_403)
    assert repr(failed) == "<ConnectHandshake example.com:443 failed>"


@pytest.mark.parametrize(
    ("host", "port", "message"),
    [
        ("", 443, "empty"),
        ("exa mple.com", 443, "printable ASCII"),
        ("example.com\r\nX-Evil: 1", 443, "printable ASCII"),
        ("example.com\x00", 443, "printable ASCII"),
        ("example.com\x7f", 443, "printable ASCII"),
        ("b\u00fccher.de", 443, "IDNA"),
        ("2001:db8::zz", 443, "not an IPv6 address"),
        ("[example.com]", 443, "not an IPv6 address"),
        ("[2001:db8::1", 443, "not an IPv6 address"),
        ("user@example.com", 443, "not a host name"),
        ("example.com/path", 443, "not a host name"),
        ("example.com", 0, "outside 1-65535"),
        ("example.com", 65536, "outside 1-65535"),
    ],
)
def test_invalid_target_is_our_bug(host: str, port: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ConnectHandshake(host, port)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (("Proxy Authorization", "hunter2"), "invalid header name"),
        (("X-A\r\nX-B", "hunter2"), "invalid header name"),
        (("", "hunter2"), "invalid header name"),
        (("Proxy-Authorization", "Basic hunter2\r\nX-Evil: 1"), "control or non-ASCII"),
        (("Proxy-Authorization", "Basic hunter2\x00"), "control or non-ASCII"),
        (("Proxy-Authorization", "Basic hunter2\n"), "control or non-ASCII"),
        (("X-Name", "hunter2 \u00e9"), "control or non-ASCII"),
        (("Host", "hunter2.example"), "written by the CONNECT handshake"),
        (("content-length", "5"), "written by the CONNECT handshake"),
        (("Transfer-Encoding", "chunked"), "written by the CONNECT handshake"),
    ],
)
def test_invalid_header_is_our_bug_and_the_value_stays_secret(
    header: tuple[str, str], message: str
) -> None:
    with pytest.raises(UsageError, match=message) as info:
        ConnectHandshake("example.com", 443, headers=[header])
    assert "hunter2" not in str(info.value)


# -- the proxy opens the tunnel --------------------------------------------------------------


@FEEDERS
@pytest.mark.parametrize(
    ("answer", "to_client"),
    [
        (SQUID_200, b""),
        (SQUID_200 + b"\x16\x03\x03", b"\x16\x03\x03"),
        (CONTINUE_THEN_200, b""),
        (GLUED_200, b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03"),
        (CHUNKED_200, b"SSH-2.0-OpenSSH_9.2\r\n"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 299\r\n\r\nx", b"x"),
        (b"HTTP/1.1 200 OK\nVia: 1.1 old-proxy\n\n\x00\x01", b"\x00\x01"),
    ],
    ids=["squid", "squid+data", "1xx", "content-length", "chunked", "204", "299", "bare-lf"],
)
def test_any_2xx_opens_the_tunnel(chunker: Chunker, answer: bytes, to_client: bytes) -> None:
    hs = ConnectHandshake("example.com", 443)
    hs.data_to_send()
    assert feed(hs, chunker(answer)) == to_client
    assert hs.data_to_send() == b""


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), max_size=40))
def test_tunnel_data_survives_any_segmentation(sizes: list[int]) -> None:
    hs = ConnectHandshake("example.com", 443)
    assert feed(hs, split(GLUED_200 + b"more", sizes)) == GLUED_200[-11:] + b"more"


def test_after_the_tunnel_opens_more_handshake_input_is_our_bug() -> None:
    hs = ConnectHandshake("example.com", 443)
    hs.receive_data(SQUID_200)
    with pytest.raises(UsageError):
        hs.receive_data(b"tunnel data belongs to the pipe")
    with pytest.raises(UsageError):
        hs.receive_data(b"")


# -- the proxy says no ---------------------------------------------------------------------


@FEEDERS
@pytest.mark.parametrize(
    ("answer", "status", "reason", "auth_failed"),
    [
        (SQUID_407, 407, "Proxy Authentication Required", True),
        (SQUID_403, 403, "Forbidden", False),
        (SQUID_502, 502, "Bad Gateway", False),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + SQUID_502, 502, "Bad Gateway", False),
        (b"HTTP/1.0 301 Moved\r\nLocation: http://portal/\r\n\r\n", 301, "Moved", False),
        (b"HTTP/1.1 407 \r\n\r\n", 407, "", True),
        (b"HTTP/1.1 503 Service \xe9tendu\r\n\r\n", 503, "Service \u00e9tendu", False),
    ],
    ids=["407", "403", "502", "1xx-502", "301", "407-no-reason", "latin1-reason"],
)
def test_non_2xx_is_a_refusal(
    chunker: Chunker, answer: bytes, status: int, reason: str, auth_failed: bool
) -> None:
    hs = ConnectHandshake("example.com", 443)
    with pytest.raises(HandshakeRefused) as info:
        for chunk in chunker(answer):
            hs.receive_data(chunk)
    assert (info.value.status, info.value.reason, info.value.auth_failed) == (
        status,
        reason,
        auth_failed,
    )
    assert not hs.done
    with pytest.raises(UsageError):
        hs.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")


def test_407_hands_over_the_challenge_headers() -> None:
    hs = ConnectHandshake("example.com", 443)
    with pytest.raises(HandshakeRefused) as info:
        hs.receive_data(SQUID_407)
    assert str(info.value) == "proxy answered 407 Proxy Authentication Required"
    assert ("proxy-authenticate", 'Basic realm="Squid proxy-caching web server"') in (
        info.value.headers
    )
    assert ("x-squid-error", "ERR_CACHE_ACCESS_DENIED 0") in info.value.headers
    assert len(info.value.headers) == 12


# -- the proxy misbehaves --------------------------------------------------------------------


@FEEDERS
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 2000 OK\r\n\r\n", "invalid HTTP response"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "invalid HTTP response"),
        (b"\x05\x00\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\n continued\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "invalid HTTP response"),
        (b"\r\n\r\n", "invalid HTTP response"),
    ],
    ids=["status", "not-http", "socks", "nul", "fold-at-start", "bad-cl", "101", "empty-head"],
)
def test_garbage_is_a_protocol_error(chunker: Chunker, answer: bytes, message: str) -> None:
    hs = ConnectHandshake("example.com", 443)
    with pytest.raises(ProtocolError, match=message):
        for chunk in chunker(answer):
            hs.receive_data(chunk)
    with pytest.raises(UsageError):
        hs.receive_data(b"x")


@FEEDERS
def test_ten_thousand_headers_are_refused_by_size(chunker: Chunker) -> None:
    answer = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: 0\r\n" * 10_000 + b"\r\n"
    hs = ConnectHandshake("example.com", 443)
    with pytest.raises(ProtocolError, match="head larger than 16384 bytes"):
        for chunk in chunker(answer):
            hs.receive_data(chunk)


def test_many_small_headers_within_the_size_cap_are_refused_by_count() -> None:
    answer = b"HTTP/1.1 200 OK\r\n" + b"A:\r\n" * (MAX_RESPONSE_HEADERS + 1) + b"\r\n"
    hs = ConnectHandshake("example.com", 443)
    with pytest.raises(ProtocolError, match=f"{MAX_RESPONSE_HEADERS + 1} headers"):
        hs.receive_data(answer)


def test_exactly_the_header_cap_is_fine() -> None:
    answer = b"HTTP/1.1 200 OK\r\n" + b"A:\r\n" * MAX_RESPONSE_HEADERS + b"\r\n"
    hs = ConnectHandshake("example.com", 443)
    hs.receive_data(answer)
    assert hs.done


def test_head_cap_is_configurable_and_counts_bytes_not_chunks() -> None:
    answer = b"HTTP/1.1 200 OK\r\nVia: " + b"p" * 100 + b"\r\n\r\n"
    roomy = ConnectHandshake("example.com", 443, max_head=len(answer))
    roomy.receive_data(answer + b"tunnel")
    assert roomy.trailing == b"tunnel"
    tight = ConnectHandshake("example.com", 443, max_head=len(answer) - 1)
    with pytest.raises(ProtocolError, match=f"larger than {len(answer) - 1} bytes"):
        tight.receive_data(answer + b"tunnel")


def test_endless_interim_answers_hit_the_head_cap() -> None:
    hs = ConnectHandshake("example.com", 443, max_head=1000)
    with pytest.raises(ProtocolError, match="larger than 1000 bytes"):
        for _ in range(100):
            hs.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n")


def test_eof_before_any_answer() -> None:
    hs = ConnectHandshake("example.com", 443)
    with pytest.raises(ProtocolError, match="without answering CONNECT example.com:443"):
        hs.receive_data(b"")
    with pytest.raises(UsageError):
        hs.receive_data(b"")


def test_eof_in_the_middle_of_the_head() -> None:
    hs = ConnectHandshake("example.com", 443)
    hs.receive_data(b"HTTP/1.1 200 Connection est")
    with pytest.raises(ProtocolError, match=r"in the middle of its answer .* \(after 27 bytes\)"):
        hs.receive_data(b"")


def test_eof_after_an_interim_answer() -> None:
    hs = ConnectHandshake("example.com", 443)
    hs.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n")
    with pytest.raises(ProtocolError, match="in the middle of its answer"):
        hs.receive_data(b"")


def test_error_quotes_little_of_a_huge_garbage_line() -> None:
    hs = ConnectHandshake("example.com", 443)
    with pytest.raises(ProtocolError) as info:
        hs.receive_data(b"A" * 10_000 + b"\r\n\r\n")
    assert str(info.value).count("A") <= 120
    assert len(str(info.value)) < 250


# -- fuzzing ---------------------------------------------------------------------------------


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"HTTP/1.1 ", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 x\r\n\r\n"]),
    data=st.binary(max_size=300),
    sizes=st.lists(st.integers(1, 50), max_size=10),
    eof=st.booleans(),
)
def test_random_answers_raise_only_protocol_errors_or_refusals(
    prefix: bytes, data: bytes, sizes: list[int], eof: bool
) -> None:
    hs = ConnectHandshake("example.com", 443, max_head=256)
    chunks = [c for c in split(prefix + data, sizes) if c] + ([b""] if eof else [])
    try:
        for chunk in chunks:
            if hs.done:
                break
            hs.receive_data(chunk)
    except (ProtocolError, HandshakeRefused) as exc:
        assert len(str(exc)) < 400
        assert not hs.done
    else:
        assert hs.done or not eof


@FUZZ
@given(
    status=st.integers(200, 599),
    reason=st.binary(max_size=30).filter(lambda r: b"\r" not in r and b"\n" not in r),
    body=st.binary(max_size=30),
)
def test_every_final_status_either_opens_or_refuses(
    status: int, reason: bytes, body: bytes
) -> None:
    hs = ConnectHandshake("example.com", 443)
    answer = b"HTTP/1.1 %d %s\r\n\r\n%s" % (status, reason, body)
    try:
        hs.receive_data(answer)
    except HandshakeRefused as exc:
        assert not 200 <= status < 300
        assert exc.status == status
        assert exc.auth_failed == (status == 407)
    except ProtocolError:
        # h11 rejects control bytes in the reason phrase (RFC 9112 section 4).
        assert any(b < 0x20 and b != 0x09 or b == 0x7F for b in reason)
    else:
        assert 200 <= status < 300
        assert hs.trailing == body


# -- the plain-2xx fast path and its boundary with h11 ----------------------------------------
#
# A whole 2xx head in one segment is read without h11; everything else goes to h11. The oracle
# is the same class with the fast path switched off: h11 alone, as before the fast path.

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HEADER_NAMES = st.text(TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in ("host", "content-length", "transfer-encoding")
)
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"))


def h11_request(authority: str, headers: list[tuple[str, str]]) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="CONNECT", target=authority, headers=headers)
    return conn.send(request) + conn.send(h11.EndOfMessage())


@FUZZ
@given(
    host=st.sampled_from(["example.com", "10.0.0.1", "2001:db8::1", "[::1]", "a-b_c.x"]),
    port=st.integers(1, 65535),
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4),
)
def test_request_bytes_are_what_h11_writes(
    host: str, port: int, headers: list[tuple[str, str]]
) -> None:
    hs = ConnectHandshake(host, port, headers=headers)
    authority = format_authority(host, port)
    stripped = [(name, value.strip(" \t")) for name, value in headers]
    assert hs.data_to_send() == h11_request(authority, [("Host", authority), *stripped])


class H11Only(ConnectHandshake):
    def _plain_2xx(self, data: bytes) -> bool:
        return False


def outcome(
    chunks: list[bytes], max_head: int = 16384, kind: type[ConnectHandshake] = ConnectHandshake
) -> tuple[str, bytes]:
    """How the handshake ended: opened (and what the client gets), refused, or still waiting."""
    hs = kind("example.com", 443, max_head=max_head)
    try:
        tunnel = feed(hs, chunks)
    except (ProtocolError, HandshakeRefused) as exc:
        return (type(exc).__name__, str(exc).encode())
    except AssertionError:
        return ("waiting", b"")
    return ("open", tunnel)


def ends_alike(answer: bytes, max_head: int = 16384) -> tuple[str, bytes]:
    chunks = [answer] if answer else []
    result = outcome(chunks, max_head)
    assert result == outcome(chunks, max_head, H11Only)
    return result


def many_headers(n: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * n + b"\r\n"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (SQUID_200 + b"tls", "open"),
        (b"HTTP/1.0 204 \r\nVia: 1.0 p\r\nX-Empty:\r\n\r\n", "open"),
        (b"HTTP/1.1 200\r\n\r\n", "open"),  # no reason phrase, not even its space
        (b"HTTP/2.0 200 OK\r\n\r\n", "open"),
        (b"HTTP/1.1 200 OK\nVia: p\n\ntls", "open"),  # bare LF line ends
        (b"HTTP/1.1 200 OK\r\nVia: p\r\n  folded\r\n\r\n", "open"),
        (b"HTTP/1.1 200 Caf\xe9\r\nX: \xff\r\n\r\n", "open"),  # obs-text
        (b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 5\r\n\r\n12345", "open"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "ProtocolError"),
        (b"HTTP/1.1 200 OK\r\nX: a\x7fb\r\n\r\n", "open"),  # h11 takes DEL as obs-text
        (b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n", "ProtocolError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "ProtocolError"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "ProtocolError"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "ProtocolError"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" * 2 + b"\r\n", "ProtocolError"),
        (b"HTTP/1.1 200 O\x00K\r\n\r\n", "ProtocolError"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "ProtocolError"),
        (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "ProtocolError"),
        (CONTINUE_THEN_200, "open"),
        (SQUID_407, "ProxyAuthRequired"),
        (many_headers(MAX_RESPONSE_HEADERS), "open"),
        (many_headers(MAX_RESPONSE_HEADERS + 1), "ProtocolError"),
    ],
)
def test_fast_path_and_h11_end_every_answer_alike(answer: bytes, expected: str) -> None:
    assert ends_alike(answer)[0] == expected


def test_head_cap_holds_on_the_fast_path() -> None:
    answer = b"HTTP/1.1 200 OK\r\nVia: " + b"p" * 100 + b"\r\n\r\ntls"
    head = len(answer) - 3
    assert ends_alike(answer, max_head=head) == ("open", b"tls")
    kind, message = ends_alike(answer, max_head=head - 1)
    assert kind == "ProtocolError"
    assert f"larger than {head - 1} bytes".encode() in message


def test_plain_200_in_one_segment_needs_no_h11() -> None:
    # Per-connection CPU: the relay's common case must not build an h11.Connection.
    hs = ConnectHandshake("example.com", 443)
    hs.receive_data(SQUID_200 + b"\x16\x03")
    assert hs.done and hs.trailing == b"\x16\x03"
    assert hs._conn is None


HEAD_PIECES = st.sampled_from(
    [
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.0 299 x\r\n",
        b"HTTP/1.1 100 Continue\r\n",
        b"HTTP/1.1 407 Auth\r\n",
        b"Via: 1.1 p\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: x\r\n",
        b"transfer-encoding: chunked\r\n",
        b"Connection: close\r\n",
        b" folded\r\n",
        b"X: \x00\r\n",
        b"X: \x80\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b":",
        b"abc",
    ]
)


@FUZZ
@given(pieces=st.lists(HEAD_PIECES, max_size=8), tail=st.binary(max_size=8))
def test_random_heads_end_alike_with_and_without_the_fast_path(
    pieces: list[bytes], tail: bytes
) -> None:
    ends_alike(b"HTTP/1.1 200 OK\r\n" + b"".join(pieces) + b"\r\n" + tail, max_head=200)
    ends_alike(b"".join(pieces) + tail, max_head=200)


# -- the pieces the relay's fast path uses without a ConnectHandshake ---------------------


@pytest.mark.parametrize(
    ("host", "port", "headers"),
    [
        ("example.com", 443, []),
        ("10.0.0.1", 80, [("Proxy-Authorization", "Basic YWxpY2U6cHc=")]),
        ("2001:db8::1", 8443, [("User-Agent", "x"), ("Proxy-Authorization", "Basic eA==")]),
    ],
)
def test_connect_request_is_the_handshakes_own_bytes(host, port, headers):
    assert (
        connect_request(host, port, headers)
        == ConnectHandshake(host, port, headers=headers).data_to_send()
    )


@pytest.mark.parametrize(
    ("host", "port", "headers"),
    [
        ("bad host", 443, []),
        ("example.com", 0, []),
        ("example.com", 443, [("Host", "x")]),
        ("example.com", 443, [("X", "a\r\nb")]),
    ],
)
def test_connect_request_refuses_what_the_handshake_refuses(host, port, headers):
    with pytest.raises(UsageError):
        ConnectHandshake(host, port, headers=headers)
    with pytest.raises(UsageError):
        connect_request(host, port, headers)


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"HTTP/1.1 200 Connection established\r\n\r\n", 39),
        (b"HTTP/1.0 200 OK\r\nVia: x\r\n\r\nGLUED", 27),
        (b"HTTP/1.1 200 OK\r\n", None),  # not whole yet: h11's to judge
        (b"HTTP/1.1 407 Auth\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", None),
    ],
)
def test_plain_2xx_end(data, end):
    assert plain_2xx_end(data) == end
    handshake = ConnectHandshake("example.com", 443)
    handshake.data_to_send()
    if end is not None:
        handshake.receive_data(data)
        assert handshake.done and handshake.trailing == data[end:]


def test_plain_2xx_end_honours_the_head_cap():
    data = b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 100 + b"\r\n\r\n"
    assert plain_2xx_end(data, max_head=50) is None
    assert plain_2xx_end(data) == len(data)
    # Remembered as a whole answer now, and still held to the cap.
    assert plain_2xx_end(data, max_head=50) is None
    assert plain_2xx_end(data) == len(data)


def test_plain_2xx_end_remembers_a_few_whole_answers_and_still_judges_the_rest():
    answers = [b"HTTP/1.1 200 OK\r\nVia: proxy-%d\r\n\r\n" % i for i in range(40)]
    for _ in range(2):
        assert [plain_2xx_end(a) for a in answers] == [len(a) for a in answers]
        # Glued tunnel bytes are never remembered, and are not part of the head.
        assert [plain_2xx_end(a + b"DATA") for a in answers] == [len(a) for a in answers]
    assert plain_2xx_end(answers[0].replace(b"200", b"407")) is None
