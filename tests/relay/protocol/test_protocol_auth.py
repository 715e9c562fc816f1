"""Proxy-Authorization builders: known vectors from RFC 7617, and secrets kept out of errors."""

import pytest

from tray_proxy.relay.protocol.auth import basic_proxy_authorization
from tray_proxy.relay.protocol.errors import UsageError


def test_basic_matches_rfc7617_section2_example() -> None:
    assert basic_proxy_authorization("Aladdin", "open sesame") == (
        "Proxy-Authorization",
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
    )


def test_basic_encodes_utf8_like_rfc7617_section2_1_example() -> None:
    assert basic_proxy_authorization("test", "123\u00a3") == (
        "Proxy-Authorization",
        "Basic dGVzdDoxMjPCow==",
    )


def test_basic_allows_a_colon_in_the_password() -> None:
    # base64("alice:pa:ss")
    assert basic_proxy_authorization("alice", "pa:ss")[1] == "Basic YWxpY2U6cGE6c3M="


def test_basic_refuses_a_colon_in_the_user_name_without_quoting_the_password() -> None:
    with pytest.raises(UsageError, match="':'") as info:
        basic_proxy_authorization("corp:alice", "hunter2")
    assert "hunter2" not in str(info.value)


def test_basic_refuses_unencodable_text_and_drops_the_codec_error() -> None:
    with pytest.raises(UsageError) as info:
        basic_proxy_authorization("alice", "hunter2\ud800")
    assert "hunter2" not in str(info.value)
    # The UnicodeEncodeError carries the whole string; it must not ride along as context.
    assert info.value.__context__ is None
    assert info.value.__cause__ is None
