"""SOCKS5 handshake: RFC 1928/1929 transcripts, every reply code, trickled and fuzzed.

Each transcript is the list of messages as they cross the wire: (">", bytes) we send to the
proxy, ("<", bytes) the proxy sends us.
"""

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.relay.protocol.errors import HandshakeRefused, ProtocolError, UsageError
from tray_proxy.relay.protocol.socks5 import REPLY_TEXT, Socks5Handshake

FUZZ = settings(max_examples=400, deadline=None)

Transcript = list[tuple[str, bytes]]
Chunker = Callable[[bytes], list[bytes]]

# Method negotiation (RFC 1928 section 3).
OFFER_NO_AUTH = b"\x05\x01\x00"
OFFER_BOTH = b"\x05\x02\x00\x02"
CHOOSE_NO_AUTH = b"\x05\x00"
CHOOSE_USERPASS = b"\x05\x02"
# Username/password sub-negotiation (RFC 1929 section 2).
LOGIN_ALICE = b"\x01\x05alice\x07hunter2"
LOGIN_OK = b"\x01\x00"
LOGIN_REJECTED = b"\x01\x01"
# CONNECT requests (RFC 1928 section 4) for each address type.
CONNECT_EXAMPLE_COM_443 = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
CONNECT_IPV4 = b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x00\x50"  # 93.184.216.34:80
CONNECT_IPV6 = b"\x05\x01\x00\x04" + bytes.fromhex("20010db8000000000000000000000001") + b"\x01\xbb"
# Replies (RFC 1928 section 6) with each kind of bound address, as Dante and others send them.
BOUND_IPV4 = b"\x05\x00\x00\x01\x0a\x00\x00\x02\xc3\x50"
BOUND_IPV6 = b"\x05\x00\x00\x04" + bytes(15) + b"\x01" + b"\xc3\x50"
BOUND_DOMAIN = b"\x05\x00\x00\x03\x0aproxy.corp\xc3\x50"


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


FEEDERS = pytest.mark.parametrize("chunker", [whole, bytewise], ids=["whole", "bytewise"])


def play(hs: Socks5Handshake, transcript: Transcript, chunker: Chunker = whole) -> None:
    """Check each message we send and feed each message the proxy sends, in order."""
    for direction, message in transcript:
        if direction == ">":
            assert hs.data_to_send() == message
        else:
            for chunk in chunker(message):
                hs.receive_data(chunk)
    assert hs.data_to_send() == b""


# -- the tunnel opens ----------------------------------------------------------------------


@FEEDERS
def test_no_auth_domain_name(chunker: Chunker) -> None:
    hs = Socks5Handshake("example.com", 443)
    play(
        hs,
        [
            (">", OFFER_NO_AUTH),
            ("<", CHOOSE_NO_AUTH),
            (">", CONNECT_EXAMPLE_COM_443),
            ("<", BOUND_IPV4),
        ],
        chunker,
    )
    assert hs.done
    assert hs.trailing == b""


@FEEDERS
def test_username_password(chunker: Chunker) -> None:
    hs = Socks5Handshake("example.com", 443, username="alice", password="hunter2")
    play(
        hs,
        [
            (">", OFFER_BOTH),
            ("<", CHOOSE_USERPASS),
            (">", LOGIN_ALICE),
            ("<", LOGIN_OK),
            (">", CONNECT_EXAMPLE_COM_443),
            ("<", BOUND_DOMAIN),
        ],
        chunker,
    )
    assert hs.done


def test_credentials_offered_but_proxy_needs_none() -> None:
    hs = Socks5Handshake("example.com", 443, username="alice", password="hunter2")
    play(
        hs,
        [
            (">", OFFER_BOTH),
            ("<", CHOOSE_NO_AUTH),
            (">", CONNECT_EXAMPLE_COM_443),
            ("<", BOUND_IPV6),
        ],
    )
    assert hs.done


@pytest.mark.parametrize(
    ("host", "request_bytes"),
    [
        ("93.184.216.34", CONNECT_IPV4),
        ("2001:db8::1", CONNECT_IPV6),
        ("[2001:db8::1]", CONNECT_IPV6),
        ("2001:0DB8:0:0::1", CONNECT_IPV6),
    ],
)
def test_ip_literals_use_their_address_type(host: str, request_bytes: bytes) -> None:
    port = 80 if request_bytes == CONNECT_IPV4 else 443
    hs = Socks5Handshake(host, port)
    play(hs, [(">", OFFER_NO_AUTH), ("<", CHOOSE_NO_AUTH), (">", request_bytes), ("<", BOUND_IPV4)])
    assert hs.done


def test_longest_domain_name() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 63])  # 255 bytes
    hs = Socks5Handshake(name, 443)
    play(
        hs,
        [
            (">", OFFER_NO_AUTH),
            ("<", CHOOSE_NO_AUTH),
            (">", b"\x05\x01\x00\x03\xff" + name.encode() + b"\x01\xbb"),
            ("<", b"\x05\x00\x00\x03\xff" + name.encode() + b"\x01\xbb"),
        ],
    )
    assert hs.done


@FEEDERS
def test_bytes_after_the_reply_belong_to_the_tunnel(chunker: Chunker) -> None:
    hs = Socks5Handshake("example.com", 443)
    hs.data_to_send()
    hs.receive_data(CHOOSE_NO_AUTH)
    hs.data_to_send()
    stream = BOUND_IPV4 + b"\x16\x03\x03server hello"
    to_client = b""
    for chunk in chunker(stream):
        if hs.done:
            to_client += chunk
        else:
            hs.receive_data(chunk)
    assert hs.trailing + to_client == b"\x16\x03\x03server hello"


def test_bound_domain_that_is_not_utf8_is_ignored() -> None:
    # The bound address is informational; RFC 1928 calls the name "octets", not text.
    hs = Socks5Handshake("example.com", 443)
    hs.receive_data(CHOOSE_NO_AUTH + b"\x05\x00\x00\x03\x02\xff\xfe\x00\x00tunnel")
    assert hs.done
    assert hs.trailing == b"tunnel"


def test_proxy_answers_all_at_once() -> None:
    # Not what a proxy should do before seeing our CONNECT, but nothing is lost if it does.
    hs = Socks5Handshake("example.com", 443)
    hs.data_to_send()
    hs.receive_data(CHOOSE_NO_AUTH + BOUND_IPV4 + b"data")
    assert hs.data_to_send() == CONNECT_EXAMPLE_COM_443
    assert hs.done
    assert hs.trailing == b"data"


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(0, 40), max_size=8))
def test_any_segmentation_gives_the_same_result(cuts: list[int]) -> None:
    stream = CHOOSE_USERPASS + LOGIN_OK + BOUND_DOMAIN + b"tunnel"
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    hs = Socks5Handshake("example.com", 443, username="alice", password="hunter2")
    sent = hs.data_to_send()
    to_client = b""
    for start, stop in zip(bounds, bounds[1:], strict=False):
        if hs.done:
            to_client += stream[start:stop]
        else:
            hs.receive_data(stream[start:stop])
            sent += hs.data_to_send()
    assert sent == OFFER_BOTH + LOGIN_ALICE + CONNECT_EXAMPLE_COM_443
    assert hs.trailing + to_client == b"tunnel"


def test_repr_never_shows_credentials() -> None:
    hs = Socks5Handshake("example.com", 443, username="alice", password="hunter2")
    assert repr(hs) == "<Socks5Handshake example.com:443 method>"
    hs.receive_data(CHOOSE_USERPASS)
    assert repr(hs) == "<Socks5Handshake example.com:443 auth>"
    assert "hunter2" not in repr(hs)
    assert repr(Socks5Handshake("2001:db8::1", 443)) == "<Socks5Handshake [2001:db8::1]:443 method>"


# -- the proxy says no ---------------------------------------------------------------------


@FEEDERS
@pytest.mark.parametrize("code", range(1, 9))
def test_each_rfc1928_failure_reply(chunker: Chunker, code: int) -> None:
    hs = Socks5Handshake("example.com", 443)
    with pytest.raises(HandshakeRefused) as info:
        play(
            hs,
            [
                (">", OFFER_NO_AUTH),
                ("<", CHOOSE_NO_AUTH),
                (">", CONNECT_EXAMPLE_COM_443),
                ("<", bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])),
            ],
            chunker,
        )
    assert info.value.status == code
    assert info.value.reason == REPLY_TEXT[code]
    assert info.value.auth_failed is False
    assert info.value.headers == ()
    with pytest.raises(UsageError):
        hs.receive_data(b"\x00")


def test_refusal_words_follow_rfc1928() -> None:
    hs = Socks5Handshake("example.com", 443)
    hs.receive_data(CHOOSE_NO_AUTH)
    with pytest.raises(HandshakeRefused) as info:
        hs.receive_data(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
    assert str(info.value) == "proxy answered 5 connection refused"
    assert REPLY_TEXT[4] == "host unreachable"


@pytest.mark.parametrize(
    ("reply", "status", "reason"),
    [
        (b"\x05\x09\x00\x01\x00\x00\x00\x00\x00\x00", 9, "unassigned reply code 0x09"),
        (b"\x05\xff\x00\x01\x00\x00\x00\x00\x00\x00", 255, "unassigned reply code 0xff"),
        # Some servers leave the address zeroed on a refusal, type byte included.
        (b"\x05\x05\x00\x00\x00\x00\x00\x00\x00\x00", 5, "connection refused"),
        (b"\x05\x04\x00\x03\x02\xff\xfe\x00\x00", 4, "host unreachable"),
    ],
    ids=["unassigned", "unassigned-ff", "zero-atyp", "undecodable-domain"],
)
def test_odd_refusals_are_still_refusals(reply: bytes, status: int, reason: str) -> None:
    hs = Socks5Handshake("example.com", 443)
    hs.receive_data(CHOOSE_NO_AUTH)
    with pytest.raises(HandshakeRefused) as info:
        hs.receive_data(reply)
    assert (info.value.status, info.value.reason) == (status, reason)


@FEEDERS
def test_rejected_password_is_an_auth_failure(chunker: Chunker) -> None:
    hs = Socks5Handshake("example.com", 443, username="alice", password="hunter2")
    with pytest.raises(HandshakeRefused) as info:
        play(
            hs,
            [(">", OFFER_BOTH), ("<", CHOOSE_USERPASS), (">", LOGIN_ALICE), ("<", LOGIN_REJECTED)],
            chunker,
        )
    assert info.value.auth_failed is True
    assert info.value.status == 1
    assert "hunter2" not in str(info.value)
    assert "alice" not in str(info.value)


@pytest.mark.parametrize(
    ("username", "auth_failed", "offered"),
    [("alice", True, "no-auth or username/password"), (None, False, "(offered no-auth)")],
)
def test_no_acceptable_methods(username: str | None, auth_failed: bool, offered: str) -> None:
    password = None if username is None else "hunter2"
    hs = Socks5Handshake("example.com", 443, username=username, password=password)
    with pytest.raises(HandshakeRefused) as info:
        hs.receive_data(b"\x05\xff")
    assert info.value.status == 0xFF
    assert info.value.auth_failed is auth_failed
    assert offered in info.value.reason


# -- the proxy misbehaves --------------------------------------------------------------------


@FEEDERS
@pytest.mark.parametrize(
    ("credentials", "stream", "message"),
    [
        (False, b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a SOCKS5 proxy"),
        (False, b"\x04\x5a", "not a SOCKS5 proxy"),
        (False, CHOOSE_USERPASS, "method 0x02, which we did not offer"),
        (True, b"\x05\x01", "method 0x01, which we did not offer"),
        (True, b"\x05\x80", "unknown authentication method 0x80"),
        (True, CHOOSE_USERPASS + b"\x05\x00", "malformed username/password reply"),
        (True, CHOOSE_USERPASS + b"\x05\x01", "malformed username/password reply"),
        (False, CHOOSE_NO_AUTH + b"\x04\x5a\x00\x50\x00\x00\x00\x00", "malformed CONNECT reply"),
        (False, CHOOSE_NO_AUTH + b"\x05\x00\x00\x07\x00\x00", "unknown address type 0x07"),
    ],
    ids=[
        "http",
        "socks4",
        "userpass-not-offered",
        "gssapi",
        "unknown-method",
        "rfc1929-version-5-ok",
        "rfc1929-version-5-fail",
        "reply-version",
        "reply-atyp",
    ],
)
def test_garbage_is_a_protocol_error(
    chunker: Chunker, credentials: bool, stream: bytes, message: str
) -> None:
    kwargs = {"username": "alice", "password": "hunter2"} if credentials else {}
    hs = Socks5Handshake("example.com", 443, **kwargs)
    with pytest.raises(ProtocolError, match=message) as info:
        for chunk in chunker(stream):
            hs.receive_data(chunk)
    assert "hunter2" not in str(info.value)
    with pytest.raises(UsageError):
        hs.receive_data(b"\x00")


@pytest.mark.parametrize(
    ("before_eof", "stage"),
    [
        (b"", "waiting for the method selection"),
        (b"\x05", "waiting for the method selection"),
        (CHOOSE_USERPASS, "waiting for the username/password verdict"),
        (CHOOSE_USERPASS + b"\x01", "waiting for the username/password verdict"),
        (CHOOSE_USERPASS + LOGIN_OK, "waiting for the CONNECT reply"),
        (CHOOSE_USERPASS + LOGIN_OK + BOUND_IPV6[:-1], "waiting for the CONNECT reply"),
    ],
)
def test_eof_mid_handshake(before_eof: bytes, stage: str) -> None:
    hs = Socks5Handshake("example.com", 443, username="alice", password="hunter2")
    if before_eof:
        hs.receive_data(before_eof)
    with pytest.raises(ProtocolError, match=f"closed the connection {stage} for example.com:443"):
        hs.receive_data(b"")
    with pytest.raises(UsageError):
        hs.receive_data(b"")


def test_after_the_tunnel_opens_more_handshake_input_is_our_bug() -> None:
    hs = Socks5Handshake("example.com", 443)
    hs.receive_data(CHOOSE_NO_AUTH + BOUND_IPV4)
    with pytest.raises(UsageError):
        hs.receive_data(b"x")


# -- our own mistakes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "credentials", "message"),
    [
        ("", 443, {}, "host is empty"),
        ("example.com", 0, {}, "outside 1-65535"),
        ("example.com", 65536, {}, "outside 1-65535"),
        ("b\u00fccher.de", 443, {}, "printable ASCII"),
        ("exa mple.com", 443, {}, "printable ASCII"),
        ("example.com\x7f", 443, {}, "printable ASCII"),
        ("a" * 256, 443, {}, "longer than 255 bytes"),
        ("example.com", 443, {"username": "alice"}, "given together"),
        ("example.com", 443, {"password": "hunter2"}, "given together"),
        ("example.com", 443, {"username": "", "password": "hunter2"}, "username must be 1 to 255"),
        ("example.com", 443, {"username": "a" * 256, "password": "hunter2"}, "username must"),
        ("example.com", 443, {"username": "alice", "password": ""}, "password must be 1 to 255"),
        ("example.com", 443, {"username": "alice", "password": "\u00e9" * 128}, "password must"),
        ("example.com", 443, {"username": "alice", "password": "hunter2\ud800"}, "password must"),
    ],
)
def test_invalid_arguments_are_our_bug_and_never_echo_secrets(
    host: str, port: int, credentials: dict[str, str], message: str
) -> None:
    with pytest.raises(UsageError, match=message) as info:
        Socks5Handshake(host, port, **credentials)
    assert "hunter2" not in str(info.value)
    assert info.value.__context__ is None


def test_credentials_are_measured_in_utf8_bytes() -> None:
    hs = Socks5Handshake("example.com", 443, username="\u00e9" * 127, password="p" * 255)
    assert hs.data_to_send() == OFFER_BOTH
    hs.receive_data(CHOOSE_USERPASS)
    sent = hs.data_to_send()
    assert sent[:3] == b"\x01\xfe\xc3"
    assert len(sent) == 1 + 1 + 254 + 1 + 255


# -- fuzzing ---------------------------------------------------------------------------------


@FUZZ
@given(
    credentials=st.booleans(),
    prefix=st.sampled_from([b"", CHOOSE_NO_AUTH, CHOOSE_USERPASS, CHOOSE_USERPASS + LOGIN_OK]),
    data=st.binary(max_size=300),
    sizes=st.lists(st.integers(1, 40), max_size=10),
    eof=st.booleans(),
)
def test_random_replies_raise_only_protocol_errors_or_refusals(
    credentials: bool, prefix: bytes, data: bytes, sizes: list[int], eof: bool
) -> None:
    kwargs = {"username": "alice", "password": "hunter2"} if credentials else {}
    hs = Socks5Handshake("example.com", 443, **kwargs)
    stream, chunks = prefix + data, []
    for size in sizes:
        chunks.append(stream[:size])
        stream = stream[size:]
    chunks = [c for c in [*chunks, stream] if c] + ([b""] if eof else [])
    try:
        for chunk in chunks:
            if hs.done:
                break
            hs.receive_data(chunk)
            hs.data_to_send()
    except (ProtocolError, HandshakeRefused) as exc:
        assert "hunter2" not in str(exc)
        assert len(str(exc)) < 400
        assert not hs.done
    else:
        assert hs.done or not eof
