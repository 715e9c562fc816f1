"""Digest responses against the RFC examples; which challenges we answer; secrets stay out."""

import hashlib

import pytest

from tray_proxy.relay.protocol.challenge import Challenge, parse_challenges
from tray_proxy.relay.protocol.digest import (
    DigestChallenge,
    DigestSession,
    digest_authorization,
)
from tray_proxy.relay.protocol.errors import UsageError

# RFC 7616 section 3.9.1
RFC7616 = {
    "realm": "http-auth@example.org",
    "qop": "auth, auth-int",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS",
}
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


def _params(header: str) -> dict[str, str]:
    (challenge,) = parse_challenges([header])
    assert challenge.scheme == "digest"
    return dict(challenge.params)


@pytest.mark.parametrize(
    ("algorithm", "response"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_examples(algorithm: str, response: str) -> None:
    challenge = DigestChallenge.parse(
        Challenge("digest", params={**RFC7616, "algorithm": algorithm})
    )
    assert challenge is not None
    name, value = digest_authorization(
        challenge,
        "Mufasa",
        "Circle of Life",
        method="GET",
        uri="/dir/index.html",
        cnonce=RFC7616_CNONCE,
        count=1,
    )
    assert name == "Proxy-Authorization"
    got = _params(value)
    assert got["response"] == response
    assert got["username"] == "Mufasa"
    assert got["nc"] == "00000001" and got["qop"] == "auth"
    assert got["opaque"] == RFC7616["opaque"]
    assert got["algorithm"] == algorithm
    assert got["uri"] == "/dir/index.html"


def test_rfc2617_example_md5_default_algorithm() -> None:
    challenge = DigestChallenge.parse(
        Challenge(
            "digest",
            params={
                "realm": "testrealm@host.com",
                "qop": "auth",
                "nonce": "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            },
        )
    )
    assert challenge is not None and challenge.algorithm == "MD5"
    _, value = digest_authorization(
        challenge, "Mufasa", "Circle Of Life", method="GET", uri="/dir/index.html",
        cnonce="0a4f113b", count=1,
    )  # fmt: skip
    assert _params(value)["response"] == "6629fae49393a05397450978507c4ef1"
    assert "opaque" not in _params(value)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def test_md5_sess_and_the_connect_uri() -> None:
    challenge = DigestChallenge.parse(
        Challenge(
            "digest", params={"realm": "r", "nonce": "n", "qop": "auth", "algorithm": "MD5-sess"}
        )
    )
    assert challenge is not None and challenge.session
    _, value = digest_authorization(
        challenge, "u", "p", method="CONNECT", uri="h:443", cnonce="c", count=0x1A
    )
    ha1 = _md5(f"{_md5('u:r:p')}:n:c")
    expected = _md5(f"{ha1}:n:0000001a:c:auth:{_md5('CONNECT:h:443')}")
    assert _params(value)["response"] == expected
    assert _params(value)["nc"] == "0000001a"


def test_rfc2069_form_without_qop() -> None:
    challenge = DigestChallenge.parse(Challenge("digest", params={"realm": "r", "nonce": "n"}))
    assert challenge is not None and challenge.qop is None
    _, value = digest_authorization(
        challenge, "u", "p", method="CONNECT", uri="h:1", cnonce="c", count=1
    )
    got = _params(value)
    assert got["response"] == _md5(f"{_md5('u:r:p')}:n:{_md5('CONNECT:h:1')}")
    assert "nc" not in got and "cnonce" not in got and "qop" not in got


def test_userhash_and_non_ascii_user_names() -> None:
    hashed = DigestChallenge.parse(
        Challenge("digest", params={"realm": "r", "nonce": "n", "qop": "auth", "userhash": "true"})
    )
    assert hashed is not None and hashed.userhash
    _, value = digest_authorization(
        hashed, "Jäsøn", "p", method="CONNECT", uri="h:1", cnonce="c", count=1
    )
    assert _params(value)["username"] == hashlib.md5("Jäsøn:r".encode()).hexdigest()
    assert _params(value)["userhash"] == "true"
    plain = DigestChallenge.parse(Challenge("digest", params={"realm": "r", "nonce": "n"}))
    assert plain is not None
    _, value = digest_authorization(
        plain, "Jäsøn", "p", method="CONNECT", uri="h:1", cnonce="c", count=1
    )
    assert "username*=UTF-8''J%C3%A4s%C3%B8n" in value
    _, value = digest_authorization(
        plain, 'a"b\\c', "p", method="CONNECT", uri="h:1", cnonce="c", count=1
    )
    assert _params(value)["username"] == 'a"b\\c'


@pytest.mark.parametrize(
    "params",
    [
        {"nonce": "n"},  # no realm
        {"realm": "r"},  # no nonce
        {"realm": "r", "nonce": ""},
        {"realm": "r", "nonce": "n", "algorithm": "SHA-512-256"},
        {"realm": "r", "nonce": "n", "algorithm": "MD5-sess"},  # -sess needs a qop
        {"realm": "r", "nonce": "n", "qop": "auth-int"},
        {"realm": "ré", "nonce": "n"},  # we could not echo it in our header
        {"realm": "r", "nonce": "n", "opaque": "a\tb"},
    ],
)
def test_challenges_we_cannot_answer(params: dict[str, str]) -> None:
    assert DigestChallenge.parse(Challenge("digest", params=params)) is None


def test_not_digest_at_all() -> None:
    assert DigestChallenge.parse(Challenge("basic", params={"realm": "r", "nonce": "n"})) is None
    assert DigestChallenge.parse(Challenge("digest", token68="abc")) is None


def test_stale_and_strength() -> None:
    sha = DigestChallenge.parse(
        Challenge(
            "digest",
            params={
                "realm": "r",
                "nonce": "n",
                "algorithm": "sha-256-SESS",
                "qop": "auth",
                "stale": "TRUE",
            },
        )
    )
    md5 = DigestChallenge.parse(Challenge("digest", params={"realm": "r", "nonce": "n"}))
    assert sha is not None and md5 is not None
    assert sha.stale and not md5.stale
    assert sha.base_algorithm == "SHA-256" and sha.session
    assert sha.strength > md5.strength


def test_session_counts_up() -> None:
    challenge = DigestChallenge.parse(Challenge("digest", params={"realm": "r", "nonce": "n"}))
    assert challenge is not None
    session = DigestSession(challenge)
    assert [session.next_count() for _ in range(3)] == [1, 2, 3]


def test_usage_errors_never_quote_the_password() -> None:
    challenge = DigestChallenge.parse(Challenge("digest", params={"realm": "r", "nonce": "n"}))
    assert challenge is not None
    kwargs = {"method": "CONNECT", "uri": "h:1"}
    with pytest.raises(UsageError, match="count"):
        digest_authorization(challenge, "u", "hunter2", cnonce="c", count=0, **kwargs)
    with pytest.raises(UsageError, match="cnonce"):
        digest_authorization(challenge, "u", "hunter2", cnonce='a"b', count=1, **kwargs)
    with pytest.raises(UsageError, match="cnonce"):
        digest_authorization(challenge, "u", "hunter2", cnonce="", count=1, **kwargs)
    with pytest.raises(UsageError) as info:
        digest_authorization(challenge, "u", "hunter2\ud800", cnonce="c", count=1, **kwargs)
    assert "hunter2" not in str(info.value)
    assert info.value.__context__ is None
