"""Host peeking: real ClientHellos from Python's ssl module, HTTP request heads, hostile bytes.

The package itself may not import ssl; the tests use it to produce the exact bytes OpenSSL
clients (curl, apt, git, pip) send.
"""

import functools
import ssl
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.relay.protocol.errors import UsageError
from tray_proxy.relay.protocol.peek import HostPeeker, validate_hostname

FUZZ = settings(max_examples=400, deadline=None)
Chunker = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def segments(data: bytes, size: int = 100) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def segments_1460(data: bytes) -> list[bytes]:
    """What a client on an Ethernet path sends: MSS-sized TCP segments."""
    return segments(data, 1460)


FEEDERS = pytest.mark.parametrize(
    "chunker", [whole, bytewise, segments], ids=["whole", "bytewise", "segments"]
)


def peek(data: bytes, chunker: Chunker = whole, max_bytes: int = 16384) -> HostPeeker:
    """Feed chunks until the peeker decides; it must decide by the last one."""
    peeker = HostPeeker(max_bytes)
    fed = b""
    for chunk in chunker(data):
        fed += chunk
        if peeker.feed(chunk):
            break
    assert peeker.decided
    assert peeker.buffered == fed
    return peeker


# -- TLS: building ClientHellos ------------------------------------------------------------


@functools.cache
def _context(max_version: ssl.TLSVersion | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def real_client_hello(server_hostname: str, max_version: ssl.TLSVersion | None = None) -> bytes:
    """The records OpenSSL sends first when connecting to ``server_hostname``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _context(max_version).wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def vec8(data: bytes) -> bytes:
    return u8(len(data)) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def sni(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    """A server_name extension (RFC 6066 section 3)."""
    return (0, vec16(b"".join(u8(name_type) + vec16(n) for n in names)))


PADDING = 21  # RFC 7685


def client_hello(extensions: list[tuple[int, bytes]] | None) -> bytes:
    """A ClientHello handshake message; ``None`` leaves out the extensions block entirely."""
    body = b"\x03\x03" + bytes(32) + vec8(bytes(32)) + vec16(b"\x13\x01\x13\x02") + vec8(b"\x00")
    if extensions is not None:
        body += vec16(b"".join(u16(t) + vec16(d) for t, d in extensions))
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, size: int = 16384, content_type: int = 0x16) -> bytes:
    """Wrap handshake bytes in TLS records of at most ``size`` bytes each."""
    return b"".join(
        bytes([content_type, 3, 1]) + vec16(handshake[i : i + size])
        for i in range(0, len(handshake), size)
    )


# -- TLS: real clients ---------------------------------------------------------------------


@FEEDERS
@pytest.mark.parametrize(
    ("server_hostname", "expected"),
    [
        ("example.com", "example.com"),
        ("deb.debian.org", "deb.debian.org"),
        ("B\u00fccher.example", "xn--bcher-kva.example"),
        ("_acme-challenge.example.com", "_acme-challenge.example.com"),
    ],
)
@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_real_client_hello(
    chunker: Chunker, server_hostname: str, expected: str, tls12: bool
) -> None:
    hello = real_client_hello(server_hostname, ssl.TLSVersion.TLSv1_2 if tls12 else None)
    peeker = peek(hello, chunker)
    assert (peeker.kind, peeker.host) == ("tls", expected)
    assert peeker.buffered == hello  # decided on the hello's last byte, not before


def test_real_client_hello_to_an_ip_has_no_name() -> None:
    # RFC 6066 section 3: literal addresses are not sent as server_name.
    peeker = peek(real_client_hello("93.184.216.34"))
    assert (peeker.kind, peeker.host) == ("tls", None)


@pytest.mark.parametrize("record_size", [1, 7, 64, 300])
def test_client_hello_split_over_many_records(record_size: int) -> None:
    hello = real_client_hello("example.com")
    handshake = hello[5:]  # OpenSSL sends the hello in one record
    assert len(handshake) == int.from_bytes(hello[3:5], "big")
    peeker = peek(records(handshake, record_size), segments)
    assert peeker.host == "example.com"


def test_client_hello_followed_by_more_records_in_the_same_segment() -> None:
    # TLS 1.3 middlebox compatibility: change_cipher_spec, then early data.
    tail = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05hello"
    peeker = HostPeeker()
    assert peeker.feed(real_client_hello("example.com") + tail)
    assert peeker.host == "example.com"
    assert peeker.buffered.endswith(tail)


@pytest.mark.parametrize("record_size", [16384, 1000], ids=["one-big-record", "many-records"])
def test_huge_client_hello_beyond_max_bytes_keeps_an_early_name(record_size: int) -> None:
    hello = client_hello([sni(b"example.com"), (PADDING, bytes(30000))])
    peeker = peek(records(hello, record_size), segments_1460)
    assert 16384 <= len(peeker.buffered) < 16384 + 1460
    assert (peeker.kind, peeker.host) == ("tls", "example.com")


def test_huge_client_hello_with_the_name_after_max_bytes() -> None:
    hello = client_hello([(PADDING, bytes(30000)), sni(b"example.com")])
    peeker = HostPeeker()
    for chunk in segments(records(hello), 1460):
        if peeker.feed(chunk):
            break
    assert (peeker.kind, peeker.host) == ("tls", None)


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (5 + 3, None),  # three handshake bytes: not even the length
        (5 + 40, None),  # inside the random
        (5 + 120, "example.com"),  # server_name complete, later extensions missing
    ],
)
def test_eof_mid_client_hello_keeps_what_arrived(cut: int, expected: str | None) -> None:
    hello = client_hello([sni(b"example.com"), (PADDING, bytes(500))])
    stream = records(hello, 100)
    peeker = HostPeeker()
    assert not peeker.feed(stream[:cut])
    assert peeker.feed(b"")
    assert (peeker.kind, peeker.host) == ("tls", expected)


def test_eof_mid_client_hello_that_is_already_malformed() -> None:
    # The session id claims 255 bytes in a body declared 100 long.
    broken = b"\x01\x00\x00\x64\x03\x03" + bytes(32) + b"\xff" + bytes(10)
    peeker = HostPeeker()
    assert not peeker.feed(records(broken))
    assert peeker.feed(b"")
    assert peeker.host is None


@pytest.mark.parametrize(
    ("hello", "why"),
    [
        (b"\x01\x00\x00\x0a\x03\x03" + b"\x00" * 8, "shorter than version and random"),
        (client_hello(None), "no extensions block"),
        (client_hello([]), "empty extensions block"),
        (client_hello([(PADDING, b"\x00" * 10), (16, vec16(vec8(b"h2")))]), "no server_name"),
        (client_hello([sni(b"example.com", b"example.org")]), "two host_names"),
        (client_hello([sni(b"example.com"), sni(b"example.org")]), "two server_name exts"),
        (client_hello([sni(b"example.com", name_type=1)]), "no host_name type"),
        (client_hello([(0, b"")]), "empty server_name ext"),
        (client_hello([sni(b"")]), "empty name"),
        (client_hello([sni(b"b\xc3\xbccher.de")]), "raw UTF-8, not an A-label"),
        (client_hello([sni(b"10.0.0.1")]), "IP literal"),
        (client_hello([sni(b"evil.com\r\nX: y")]), "CRLF in name"),
        (client_hello([sni(b"a" * 64 + b".com")]), "label too long"),
        (client_hello([(0, vec16(b"\x00" + vec16(b"example.com")) + b"junk")]), "junk in ext"),
        (client_hello([(0, vec16(b"\x00\x00\x40example.com"))]), "name overruns list"),
        (client_hello([sni(b"example.com")])[:-1], "short by one byte"),
        (b"\x02" + client_hello([sni(b"example.com")])[1:], "ServerHello, not ClientHello"),
    ],
)
def test_odd_client_hellos_give_no_name(hello: bytes, why: str) -> None:
    # A hello "short by one byte" is only complete once EOF says nothing more is coming.
    peeker = HostPeeker()
    if not peeker.feed(records(hello)):
        assert peeker.feed(b"")
    assert (peeker.kind, peeker.host) == ("tls", None), why


def test_extensions_block_with_a_stray_byte_gives_no_name() -> None:
    body = client_hello(None)[4:] + vec16(b"\x00")  # too short for an extension's type
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    peeker = HostPeeker()
    assert peeker.feed(records(hello))
    assert (peeker.kind, peeker.host) == ("tls", None)


def test_client_hello_whose_lengths_disagree_gives_no_name() -> None:
    name_ext = b"".join(u16(t) + vec16(d) for t, d in [sni(b"example.com")])
    # The extensions block claims 1024 bytes; the handshake message ends after 20.
    body = client_hello(None)[4:] + u16(1024) + name_ext
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    peeker = HostPeeker()
    assert peeker.feed(records(hello))
    assert peeker.host is None


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"\x15\x03\x03\x00\x02\x02\x28", "alert before any hello"),
        (
            records(client_hello([sni(b"example.com")]), 50)[:55] + b"\x15\x03\x03\x00\x02\x02\x28",
            "alert in the middle of the hello",
        ),
        (b"\x16\x03\x01\x00\x05\x01\x00\x10\x00\x00" + b"\x16\x02\x00\x00\x01\x00", "bad version"),
        (b"\x16\x03\x01\x00\x00", "empty record"),
        (b"\x16\x03\x01\x40\x01", "record longer than 2^14"),
    ],
)
def test_broken_record_layer_decides_at_once(stream: bytes, why: str) -> None:
    peeker = HostPeeker()
    assert peeker.feed(stream), why
    assert peeker.host is None


@pytest.mark.parametrize(
    ("stream", "kind"),
    [
        (b"\x16\x02", "unknown"),  # not TLS record version 3.x
        (b"\x16", "unknown"),  # EOF after one byte
        (b"\x17\x03\x03\x00\x05", "unknown"),  # application data first: not a hello
    ],
)
def test_not_quite_tls(stream: bytes, kind: str) -> None:
    peeker = HostPeeker()
    if not peeker.feed(stream):
        assert peeker.feed(b"")
    assert (peeker.kind, peeker.host) == (kind, None)


# -- HTTP ------------------------------------------------------------------------------------

CURL_GET = b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
APT_GET = (
    b"GET /debian/dists/bookworm/InRelease HTTP/1.1\r\n"
    b"Host: deb.debian.org\r\n"
    b"Cache-Control: max-age=0\r\n"
    b"Accept: text/*\r\n"
    b"If-Modified-Since: Sat, 07 Oct 2023 09:29:07 GMT\r\n"
    b"User-Agent: Debian APT-HTTP/1.3 (2.6.1)\r\n"
    b"\r\n"
)


@FEEDERS
@pytest.mark.parametrize(
    ("request_head", "expected"),
    [
        (CURL_GET, "example.com"),
        (APT_GET, "deb.debian.org"),
        (b"HEAD /x HTTP/1.0\r\nhost:\tEXAMPLE.org:8080 \r\n\r\n", "example.org"),
        (b"PROPFIND /dav HTTP/1.1\nHOST: dav.example.com\n\n", "dav.example.com"),
        (b"GET / HTTP/1.1\r\nHost: example.com:\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.1\r\nHost: example.com.\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: example.com:http\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: user@example.com\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: b\xc3\xbccher.de\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", None),
        (b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\n Host: example.com\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost : example.com\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", None),
        (b"GET  / HTTP/1.1\r\n", None),
        (b"GET /\r\n", None),
        (b"GET / HTTP/2.0\r\n", None),
        (b"GET http://example.com:8080/x?y HTTP/1.1\r\n", "example.com"),
        (b"GET HTTPS://Example.com HTTP/1.1\r\n", "example.com"),
        (b"GET http:///x HTTP/1.1\r\n", None),
    ],
)
def test_http_request_head(chunker: Chunker, request_head: bytes, expected: str | None) -> None:
    peeker = peek(request_head, chunker)
    assert (peeker.kind, peeker.host) == ("http", expected)
    if expected is not None:
        assert peeker.buffered == request_head  # decided on the head's last byte


def test_absolute_form_wins_over_host_and_decides_on_the_request_line() -> None:
    peeker = HostPeeker()
    assert peeker.feed(b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n")
    assert peeker.host == "a.example"


def test_body_after_the_head_is_kept_for_forwarding() -> None:
    request = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\n\r\nbody"
    peeker = HostPeeker()
    assert peeker.feed(request)
    assert peeker.host == "example.com"
    assert peeker.buffered == request


def test_head_longer_than_max_bytes() -> None:
    peeker = HostPeeker(max_bytes=64)
    assert not peeker.feed(b"GET / HTTP/1.1\r\nHost: example.com\r\n")
    assert peeker.feed(b"Cookie: " + b"c" * 100)
    assert (peeker.kind, peeker.host) == ("http", None)


def test_request_cut_short_by_eof() -> None:
    peeker = HostPeeker()
    assert not peeker.feed(b"GET / HTTP/1.1\r\nHost: example.com\r\n")
    assert peeker.feed(b"")
    assert (peeker.kind, peeker.host) == ("http", None)


# -- neither -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream",
    [b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x01", b"get / HTTP/1.1\r\n", b"GETX / HTTP/1.1\r\n"],
)
def test_other_protocols_are_recognised_from_the_first_bytes(stream: bytes) -> None:
    peeker = HostPeeker()
    assert peeker.feed(stream)
    assert (peeker.kind, peeker.host) == ("unknown", None)


def test_unknown_decides_as_soon_as_no_method_can_match() -> None:
    peeker = HostPeeker()
    assert not peeker.feed(b"S")  # SEARCH
    assert peeker.feed(b"S")  # "SS" starts no method


@pytest.mark.parametrize(("stream", "max_bytes"), [(b"", 16384), (b"GE", 16384), (b"GET", 3)])
def test_too_little_to_tell(stream: bytes, max_bytes: int) -> None:
    peeker = HostPeeker(max_bytes)
    if not peeker.feed(stream):
        assert peeker.feed(b"")
    assert (peeker.kind, peeker.host, peeker.buffered) == ("unknown", None, stream)
    assert peeker.decided


def test_feeding_after_the_decision_is_our_bug() -> None:
    peeker = HostPeeker()
    assert peeker.feed(CURL_GET)
    with pytest.raises(UsageError):
        peeker.feed(b"more")


def test_max_bytes_must_be_positive() -> None:
    with pytest.raises(UsageError):
        HostPeeker(0)


def test_repr() -> None:
    peeker = HostPeeker()
    assert repr(peeker) == "<HostPeeker unknown peeking host=None 0 bytes>"
    peeker.feed(CURL_GET)
    assert repr(peeker) == f"<HostPeeker http decided host='example.com' {len(CURL_GET)} bytes>"


# -- host name validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("localhost", "localhost"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("B\u00fccher.de", "xn--bcher-kva.de"),
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45\uff0ecom", "example.com"),  # full width
        ("M\u00fcnchen.DE.", "xn--mnchen-3ya.de"),
        ("a1.example.123a", "a1.example.123a"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),
        (".".join(["a" * 63] * 3 + ["b" * 61]) + ".", ".".join(["a" * 63] * 3 + ["b" * 61])),
    ],
)
def test_valid_host_names_are_normalised(name: str, expected: str) -> None:
    assert validate_hostname(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a..b",
        "example.com..",
        ".example.com",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 3 + ["b" * 62]),  # 254 characters
        "a" * 300,
        "exa mple.com",
        "example.com\r\nX-Evil: 1",
        "ex\x00ample.com",
        "example.com\t",
        "10.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.1",
        "0x7f000001",
        "example.0x",
        "::1",
        "[::1]",
        "2001:db8::1",
        "example.com:443",
        "user@example.com",
        "ex/ample.com",
        "\u00fc" * 64 + ".de",
        "\ud800.com",
        "bad\x00\u00fc.de",
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # full-width 127.0.0.1
    ],
)
def test_invalid_host_names(name: str) -> None:
    assert validate_hostname(name) is None


@FUZZ
@given(st.text(max_size=80))
def test_validate_hostname_never_raises_and_is_idempotent(name: str) -> None:
    result = validate_hostname(name)
    if result is not None:
        assert result.isascii() and result == result.lower()
        assert len(result) <= 253
        assert validate_hostname(result) == result


# -- fuzzing ---------------------------------------------------------------------------------

PREFIXES = [
    b"",
    b"\x16\x03\x01",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"GET / HTTP/1.1\r\nHost: ",
    b"GET http://",
]


def check_never_raises(stream: bytes, sizes: list[int], max_bytes: int) -> None:
    peeker = HostPeeker(max_bytes)
    fed = b""
    for size in [*sizes, len(stream)]:
        chunk, stream = stream[:size], stream[size:]
        if not chunk:
            continue
        fed += chunk
        if peeker.feed(chunk):
            break
    else:
        assert peeker.feed(b"")
    assert peeker.decided
    assert peeker.buffered == fed
    assert peeker.host is None or validate_hostname(peeker.host) == peeker.host


@FUZZ
@given(
    prefix=st.sampled_from(PREFIXES),
    data=st.binary(max_size=400),
    sizes=st.lists(st.integers(1, 64), max_size=12),
    max_bytes=st.sampled_from([1, 64, 16384]),
)
def test_random_bytes_never_raise(
    prefix: bytes, data: bytes, sizes: list[int], max_bytes: int
) -> None:
    check_never_raises(prefix + data, sizes, max_bytes)


@functools.cache
def _sample_hello() -> bytes:
    return real_client_hello("example.com")


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 200), max_size=6),
)
def test_mutated_client_hellos_never_raise(edits: list[tuple[int, int]], sizes: list[int]) -> None:
    hello = bytearray(_sample_hello())
    for pos, value in edits:
        hello[pos % len(hello)] = value
    check_never_raises(bytes(hello), sizes, 16384)
