"""Both upstream handshakes satisfy the one interface the engine drives them through."""

from tray_proxy.relay.protocol.handshake import UpstreamHandshake
from tray_proxy.relay.protocol.http_connect import ConnectHandshake
from tray_proxy.relay.protocol.socks5 import Socks5Handshake


def drive(handshake: UpstreamHandshake, proxy_replies: list[bytes]) -> tuple[bytes, bytes]:
    """The engine's loop, in memory: what we sent to the proxy, and what goes to the client."""
    sent = handshake.data_to_send()
    replies = iter(proxy_replies)
    while not handshake.done:
        handshake.receive_data(next(replies))
        sent += handshake.data_to_send()
    return sent, handshake.trailing


def test_connect_handshake_is_an_upstream_handshake() -> None:
    hs = ConnectHandshake("example.com", 443)
    assert isinstance(hs, UpstreamHandshake)
    sent, trailing = drive(hs, [b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03"])
    assert sent == b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    assert trailing == b"\x16\x03\x03"


def test_socks5_handshake_is_an_upstream_handshake() -> None:
    hs = Socks5Handshake("example.com", 443)
    assert isinstance(hs, UpstreamHandshake)
    sent, trailing = drive(hs, [b"\x05\x00", b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38ab"])
    assert sent == b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    assert trailing == b"ab"


def test_something_else_is_not_an_upstream_handshake() -> None:
    assert not isinstance(object(), UpstreamHandshake)
