"""ProxyAuth: which header each CONNECT carries, as transcripts of whole exchanges.

A proxy's bytes are fed to a ConnectHandshake (whole and one byte at a time); each 407 goes to
ProxyAuth, whose next header goes out on the same connection (or a new one). NTLM/Negotiate run
through a fake TokenContext: pyspnego itself is exercised by tests/relay/test_auth_engine.py.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tray_proxy.relay.protocol.challenge import parse_challenges
from tray_proxy.relay.protocol.errors import HandshakeRefused, ProtocolError, UsageError
from tray_proxy.relay.protocol.http_connect import ConnectHandshake, ProxyAuthRequired
from tray_proxy.relay.protocol.proxy_auth import (
    MAX_CHALLENGE_ROUNDS,
    AuthMemo,
    AuthStep,
    MechanismUnavailable,
    ProxyAuth,
    ProxyRejectedCredentials,
    TokenContext,
)

PASSWORD = "s3cret-pw"
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


def r407(*challenges: str, close: bool = False, body: bytes = b"denied") -> bytes:
    head = b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    head += b"".join(b"Proxy-Authenticate: " + c.encode() + b"\r\n" for c in challenges)
    if close:
        head += b"Connection: close\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class FakeContext:
    """NTLM-like: first token NEG, answers a CHAL token with AUTH; records what it saw."""

    def __init__(self, scheme: str, log: list[str], legs: int = 1) -> None:
        self.scheme = scheme
        self.log = log
        self.legs = legs

    def step(self, token: bytes | None) -> bytes | None:
        self.log.append(f"{self.scheme}:{token!r}")
        if token is None:
            return f"{self.scheme}-NEG".encode()
        if token == b"BAD":
            raise ProtocolError("unusable challenge")
        if self.legs == 0:
            return None
        self.legs -= 1
        return f"{self.scheme}-AUTH({token.decode()})".encode()


def contexts(
    log: list[str], unavailable: Sequence[str] = (), legs: int = 1
) -> Callable[[str], TokenContext]:
    def make(scheme: str) -> TokenContext:
        if scheme in unavailable:
            raise MechanismUnavailable(scheme)
        return FakeContext(scheme, log, legs)

    return make


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auth_of(request: bytes) -> str | None:
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"proxy-authorization":
            return value.strip().decode()
    return None


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


FEEDERS = pytest.mark.parametrize("chunker", [whole, bytewise], ids=["whole", "bytewise"])


def play(
    auth: ProxyAuth, answers: Sequence[bytes], chunker: Callable[[bytes], list[bytes]] = whole
) -> list[str | None]:
    """Run the exchange: one proxy answer per request. Returns each request's auth header."""
    step = auth.first()
    hs = ConnectHandshake("origin.test", 443, headers=_h(step), max_refusal_body=1024)
    sent: list[str | None] = []
    for answer in answers:
        request = hs.data_to_send()
        assert request.startswith(b"CONNECT origin.test:443 HTTP/1.1\r\n")
        sent.append(auth_of(request))
        try:
            for chunk in chunker(answer):
                hs.receive_data(chunk)
        except ProxyAuthRequired as exc:
            step = auth.challenged(exc.headers, same_connection=exc.reusable)
            if exc.reusable:
                hs.next_request(_h(step))
            else:
                hs = ConnectHandshake("origin.test", 443, headers=_h(step), max_refusal_body=1024)
            continue
        assert hs.done
        auth.succeeded()
        return sent
    raise AssertionError("the exchange did not finish")


def _h(step: AuthStep) -> list[tuple[str, str]]:
    return [step.header] if step.header else []


def basic_token(user: str = "alice", password: str = PASSWORD) -> str:
    return "Basic " + b64(f"{user}:{password}".encode())


# -- scheme selection ----------------------------------------------------------------------


@FEEDERS
def test_auto_basic_first_asks_then_answers_then_goes_preemptive(chunker) -> None:
    memo = AuthMemo()
    auth = ProxyAuth(authority="origin.test:443", username="alice", password=PASSWORD, memo=memo)
    assert play(auth, [r407('Basic realm="corp"'), OK], chunker) == [None, basic_token()]
    assert memo.scheme == "basic" and auth.credentials_sent
    # The next tunnel sends Basic at once: no extra round trip.
    again = ProxyAuth(authority="origin.test:443", username="alice", password=PASSWORD, memo=memo)
    assert play(again, [OK], chunker) == [basic_token()]


def test_pinned_basic_is_preemptive_and_no_credentials_sends_nothing() -> None:
    auth = ProxyAuth(authority="a:1", username="alice", password=PASSWORD, pinned="basic")
    assert play(auth, [OK]) == [basic_token()]
    bare = ProxyAuth(authority="a:1", pinned="basic")
    assert play(bare, [OK]) == [None]
    assert not bare.credentials_sent and bare.scheme is None


def test_strongest_offered_scheme_wins_across_headers() -> None:
    log: list[str] = []
    auth = ProxyAuth(
        authority="a:1", username="alice", password=PASSWORD, contexts=contexts(log), kerberos=True
    )
    answers = [r407('Basic realm="x"', "NTLM", 'Digest realm="r", nonce="n"', "Negotiate"), OK]
    sent = play(auth, answers)
    assert sent == [None, "Negotiate " + b64(b"negotiate-NEG")]


def test_without_kerberos_ntlm_beats_negotiate_when_both_are_offered() -> None:
    log: list[str] = []
    auth = ProxyAuth(authority="a:1", username="alice", password=PASSWORD, contexts=contexts(log))
    sent = play(auth, [r407("Negotiate", "NTLM", 'Basic realm="x"'), OK])
    assert sent == [None, "NTLM " + b64(b"ntlm-NEG")]
    # Negotiate alone is still used (it wraps NTLM then).
    only = ProxyAuth(authority="a:1", username="alice", password=PASSWORD, contexts=contexts(log))
    assert play(only, [r407("Negotiate"), OK])[1] == "Negotiate " + b64(b"negotiate-NEG")


def test_negotiate_impossible_falls_back_to_ntlm_then_digest() -> None:
    log: list[str] = []
    make = contexts(log, unavailable=["negotiate"])
    auth = ProxyAuth(authority="a:1", username="u", password="p", contexts=make, kerberos=True)
    assert play(auth, [r407("Negotiate", "NTLM"), OK])[1] == "NTLM " + b64(b"ntlm-NEG")
    make = contexts(log, unavailable=["negotiate", "ntlm"])
    auth = ProxyAuth(authority="a:1", username="u", password="p", contexts=make, cnonce=lambda: "c")
    sent = play(auth, [r407("Negotiate", "NTLM", 'Digest realm="r", nonce="n"'), OK])
    assert sent[1] is not None and sent[1].startswith('Digest username="u", realm="r"')
    # No context factory at all: the token schemes are simply not available.
    auth = ProxyAuth(authority="a:1", username="u", password="p")
    assert play(auth, [r407("NTLM", "Basic"), OK])[1] == basic_token("u", "p")


def test_a_context_without_a_first_token_is_unavailable() -> None:
    class Empty:
        def step(self, token: bytes | None) -> bytes | None:
            return None

    auth = ProxyAuth(authority="a:1", username="u", password="p", contexts=lambda _s: Empty())
    assert play(auth, [r407("NTLM", "Basic"), OK])[1] == basic_token("u", "p")


def test_pinned_scheme_is_the_only_one_used() -> None:
    auth = ProxyAuth(
        authority="a:1", username="u", password="p", pinned="digest", cnonce=lambda: "c"
    )
    sent = play(auth, [r407("Basic", 'Digest realm="r", nonce="n"'), OK])
    assert sent[0] is None and sent[1] is not None and sent[1].startswith("Digest ")
    pinned = ProxyAuth(authority="a:1", username="u", password="p", pinned="digest")
    hs_headers = [("Proxy-Authenticate", "Basic"), ("Proxy-Authenticate", "NTLM")]
    with pytest.raises(HandshakeRefused) as info:
        pinned.challenged(hs_headers, same_connection=True)
    assert "auth is set to digest but the proxy offers Basic, NTLM" in str(info.value)
    assert info.value.auth_failed and not isinstance(info.value, ProxyRejectedCredentials)


@pytest.mark.parametrize(
    ("headers", "kwargs", "words"),
    [
        ([("Proxy-Authenticate", "Basic")], {}, "no password is set up"),
        ([], {}, "(no scheme at all) and no password is set up"),
        (
            [("proxy-authenticate", "Bearer, Mutual")],
            {"username": "u", "password": "p"},
            "no authentication scheme we can use (bearer, mutual)",
        ),
        (
            [("Proxy-Authenticate", 'Digest realm="r"')],
            {"username": "u", "password": "p"},
            "(Digest)",
        ),
    ],
)
def test_when_nothing_can_answer(headers, kwargs, words) -> None:
    auth = ProxyAuth(authority="a:1", **kwargs)
    with pytest.raises(HandshakeRefused) as info:
        auth.challenged(headers, same_connection=True)
    assert words in str(info.value)
    assert "p" not in str(info.value).split("proxy answered 407")[0]


def test_why_negotiate_could_not_start_is_in_the_refusal() -> None:
    def no_ticket(scheme: str) -> TokenContext:
        raise MechanismUnavailable("no Kerberos ticket: run kinit")

    auth = ProxyAuth(authority="a:1", contexts=no_ticket)
    with pytest.raises(HandshakeRefused) as info:
        auth.challenged([("Proxy-Authenticate", "Negotiate")], same_connection=True)
    assert info.value.reason == "no Kerberos ticket: run kinit (the proxy offers Negotiate)"


# -- Digest --------------------------------------------------------------------------------


def test_digest_picks_sha256_over_md5_and_remembers_the_nonce() -> None:
    memo = AuthMemo()
    cnonces = iter(["c1", "c2", "c3"])
    auth = ProxyAuth(
        authority="origin.test:443",
        username="u",
        password="p",
        memo=memo,
        cnonce=lambda: next(cnonces),
    )
    offer = r407(
        'Digest realm="r", nonce="n1", qop="auth", algorithm=MD5',
        'Digest realm="r", nonce="n2", qop="auth", algorithm=SHA-256',
    )
    sent = play(auth, [offer, OK])
    assert sent[1] is not None
    params = parse_challenges([sent[1]])[0].params
    assert params["algorithm"] == "SHA-256" and params["nonce"] == "n2"
    assert params["nc"] == "00000001" and params["uri"] == "origin.test:443"
    # Preemptive with the same nonce, next count.
    again = ProxyAuth(
        authority="origin.test:443", username="u", password="p", memo=memo, cnonce=lambda: "c9"
    )
    (first,) = play(again, [OK])
    assert first is not None
    assert parse_challenges([first])[0].params["nc"] == "00000002"


@FEEDERS
def test_digest_stale_nonce_retries_without_failing(chunker) -> None:
    auth = ProxyAuth(authority="a:1", username="u", password="p", cnonce=lambda: "c")
    sent = play(
        auth,
        [
            r407('Digest realm="r", nonce="n1", qop="auth"'),
            r407('Digest realm="r", nonce="n2", qop="auth", stale=true'),
            OK,
        ],
        chunker,
    )
    assert [parse_challenges([s])[0].params["nonce"] for s in sent[1:] if s] == ["n1", "n2"]


def test_digest_refused_without_stale_is_a_rejection() -> None:
    auth = ProxyAuth(authority="a:1", username="u", password="p")
    auth.challenged([("Proxy-Authenticate", 'Digest realm="r", nonce="n1"')], same_connection=True)
    with pytest.raises(ProxyRejectedCredentials) as info:
        auth.challenged(
            [("Proxy-Authenticate", 'Digest realm="r", nonce="n2"')], same_connection=True
        )
    assert info.value.scheme == "digest" and info.value.status == 407 and info.value.auth_failed
    assert "Digest credentials refused" in str(info.value)


def test_basic_refused_is_a_rejection_but_a_scheme_change_is_not() -> None:
    auth = ProxyAuth(authority="a:1", username="u", password="p", pinned="basic")
    assert auth.first().sends_credentials
    with pytest.raises(ProxyRejectedCredentials):
        auth.challenged([("Proxy-Authenticate", "Basic realm=x")], same_connection=True)
    # Remembered Basic, but the proxy now only does Digest: answer that, no failure.
    memo = AuthMemo()
    memo.scheme = "basic"
    auth = ProxyAuth(authority="a:1", username="u", password="p", memo=memo)
    assert auth.first().scheme == "basic"
    step = auth.challenged(
        [("Proxy-Authenticate", 'Digest realm="r", nonce="n"')], same_connection=True
    )
    assert step.scheme == "digest"
    memo.forget()
    # Digest used, and the proxy now only offers Basic: not a rejection either.
    auth = ProxyAuth(authority="a:1", username="u", password="p")
    auth.challenged([("Proxy-Authenticate", 'Digest realm="r", nonce="n"')], same_connection=True)
    step = auth.challenged([("Proxy-Authenticate", "Basic realm=x")], same_connection=True)
    assert step.scheme == "basic"
    assert memo.scheme is None and memo.digest is None and repr(memo) == "<AuthMemo none>"


# -- NTLM / Negotiate ------------------------------------------------------------------------


@FEEDERS
def test_ntlm_three_legs_on_one_connection(chunker) -> None:
    log: list[str] = []
    memo = AuthMemo()
    auth = ProxyAuth(authority="a:1", username="u", password="p", memo=memo, contexts=contexts(log))
    sent = play(auth, [r407("NTLM", 'Basic realm="x"'), r407("NTLM " + b64(b"CHAL")), OK], chunker)
    assert sent == [None, "NTLM " + b64(b"ntlm-NEG"), "NTLM " + b64(b"ntlm-AUTH(CHAL)")]
    assert log == ["ntlm:None", "ntlm:b'CHAL'"]
    assert memo.scheme == "ntlm"
    # Next tunnel starts with the first token.
    again = ProxyAuth(
        authority="a:1", username="u", password="p", memo=memo, contexts=contexts(log)
    )
    sent = play(again, [r407("NTLM " + b64(b"CHAL2")), OK])
    assert sent == ["NTLM " + b64(b"ntlm-NEG"), "NTLM " + b64(b"ntlm-AUTH(CHAL2)")]


def test_ntlm_final_leg_refused_is_a_rejection() -> None:
    auth = ProxyAuth(
        authority="a:1", username="u", password="p", pinned="ntlm", contexts=contexts([])
    )
    assert auth.first().scheme == "ntlm"
    auth.challenged([("Proxy-Authenticate", "NTLM " + b64(b"CHAL"))], same_connection=True)
    with pytest.raises(ProxyRejectedCredentials) as info:
        auth.challenged([("Proxy-Authenticate", "NTLM")], same_connection=True)
    assert info.value.scheme == "ntlm"


def test_refused_first_token_moves_on_to_another_scheme() -> None:
    # A Kerberos ticket the proxy cannot use checks no password: try the next scheme.
    log: list[str] = []
    auth = ProxyAuth(
        authority="a:1", username="u", password="p", contexts=contexts(log), kerberos=True
    )
    auth.challenged([("Proxy-Authenticate", "Negotiate, NTLM")], same_connection=True)
    step = auth.challenged([("Proxy-Authenticate", "Negotiate, NTLM")], same_connection=True)
    assert step.scheme == "ntlm"


def test_a_challenge_on_a_new_connection_restarts_the_exchange() -> None:
    log: list[str] = []
    auth = ProxyAuth(authority="a:1", username="u", password="p", contexts=contexts(log))
    auth.challenged([("Proxy-Authenticate", "NTLM")], same_connection=True)
    step = auth.challenged([("Proxy-Authenticate", "NTLM " + b64(b"C"))], same_connection=False)
    assert step.header == ("Proxy-Authorization", "NTLM " + b64(b"ntlm-NEG"))
    assert log == ["ntlm:None", "ntlm:None"]


def test_kerberos_without_password_sends_no_credentials() -> None:
    log: list[str] = []
    auth = ProxyAuth(authority="a:1", contexts=contexts(log), kerberos=True)
    step = auth.challenged(
        [("Proxy-Authenticate", "Negotiate, Basic realm=x")], same_connection=True
    )
    assert step.scheme == "negotiate" and not step.sends_credentials
    # Negotiate's last token (mutual authentication) may need no answer: the 200 ends it.
    step = auth.challenged([("Proxy-Authenticate", "Negotiate " + b64(b"T"))], same_connection=True)
    assert step.header == ("Proxy-Authorization", "Negotiate " + b64(b"negotiate-AUTH(T)"))


def test_token_problems() -> None:
    auth = ProxyAuth(authority="a:1", username="u", password="p", contexts=contexts([], legs=0))
    auth.challenged([("Proxy-Authenticate", "NTLM")], same_connection=True)
    with pytest.raises(ProtocolError, match="not base64"):
        auth.challenged([("Proxy-Authenticate", "NTLM abc")], same_connection=True)
    auth = ProxyAuth(authority="a:1", username="u", password="p", contexts=contexts([], legs=0))
    auth.challenged([("Proxy-Authenticate", "NTLM")], same_connection=True)
    with pytest.raises(ProtocolError, match="unusable"):
        auth.challenged([("Proxy-Authenticate", "NTLM " + b64(b"BAD"))], same_connection=True)
    auth = ProxyAuth(authority="a:1", username="u", password="p", contexts=contexts([], legs=0))
    auth.challenged([("Proxy-Authenticate", "NTLM")], same_connection=True)
    with pytest.raises(HandshakeRefused, match="more NTLM legs"):
        auth.challenged([("Proxy-Authenticate", "NTLM " + b64(b"C"))], same_connection=True)


# -- limits, restarts, misuse --------------------------------------------------------------


def test_at_most_three_challenge_rounds() -> None:
    auth = ProxyAuth(authority="a:1", username="u", password="p", cnonce=lambda: "c")
    stale = [("Proxy-Authenticate", 'Digest realm="r", nonce="n", stale=true')]
    for _ in range(MAX_CHALLENGE_ROUNDS):
        auth.challenged(stale, same_connection=True)
    with pytest.raises(HandshakeRefused, match=f"after {MAX_CHALLENGE_ROUNDS} rounds"):
        auth.challenged(stale, same_connection=True)


def test_restart_resends_on_a_new_connection() -> None:
    log: list[str] = []
    assert ProxyAuth(authority="a:1").restart() == AuthStep()
    basic = ProxyAuth(authority="a:1", username="u", password="p", pinned="basic")
    basic.first()
    assert basic.restart().header == ("Proxy-Authorization", basic_token("u", "p"))
    digest = ProxyAuth(authority="a:1", username="u", password="p", cnonce=lambda: "c")
    digest.challenged(
        [("Proxy-Authenticate", 'Digest realm="r", nonce="n", qop=auth')], same_connection=True
    )
    header = digest.restart().header
    assert header is not None and parse_challenges([header[1]])[0].params["nc"] == "00000002"
    ntlm = ProxyAuth(
        authority="a:1", username="u", password="p", pinned="ntlm", contexts=contexts(log)
    )
    ntlm.first()
    assert ntlm.restart().scheme == "ntlm"


def test_remembered_scheme_without_what_it_needs_starts_bare() -> None:
    memo = AuthMemo()
    memo.scheme = "digest"  # but no nonce remembered
    assert ProxyAuth(authority="a:1", username="u", password="p", memo=memo).first() == AuthStep()
    memo.scheme = "ntlm"  # but no way to make tokens
    assert ProxyAuth(authority="a:1", username="u", password="p", memo=memo).first() == AuthStep()


def test_usage_errors_and_reprs_keep_the_password_out() -> None:
    with pytest.raises(UsageError, match="unknown authentication scheme"):
        ProxyAuth(authority="a:1", pinned="kerberos")
    with pytest.raises(UsageError, match="together"):
        ProxyAuth(authority="a:1", username="u")
    auth = ProxyAuth(authority="a:1", username="u", password=PASSWORD, pinned="basic")
    step = auth.first()
    for text in (repr(auth), repr(step)):
        assert PASSWORD not in text and b64(f"u:{PASSWORD}".encode()) not in text
    assert repr(step) == "<AuthStep basic credentials=True>"
    assert repr(auth) == "<ProxyAuth a:1 last=<AuthStep basic credentials=True> rounds=0>"


# -- fuzzing -------------------------------------------------------------------------------

_CHALLENGE_TEXT = st.lists(
    st.sampled_from(
        list(' ,="\\aBNDgstmbcn1+/=x')
        + ["Basic", "Digest", "NTLM", "Negotiate", "realm", "nonce", "stale=true", "qop=auth"]
    ),
    max_size=12,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(_CHALLENGE_TEXT, max_size=3), min_size=1, max_size=4), st.booleans())
def test_random_challenges_raise_only_our_errors(rounds: list[list[str]], keep: bool) -> None:
    auth = ProxyAuth(
        authority="a:1", username="u", password=PASSWORD, contexts=contexts([]), cnonce=lambda: "c"
    )
    auth.first()
    for values in rounds:
        try:
            step = auth.challenged(
                [("Proxy-Authenticate", v) for v in values], same_connection=keep
            )
        except (ProtocolError, HandshakeRefused) as exc:
            assert PASSWORD not in str(exc)
            return
        assert step.header is not None


def _hdrs(*values: str) -> list[tuple[str, str]]:
    return [("Proxy-Authenticate", v) for v in values] + [("Content-Length", "0")]


def test_steps_token_only_where_a_token_context_may_step():
    """The engine runs challenged() off the loop only when this says a token context may
    step: a Basic or Digest answer stays on the loop."""
    log: list[str] = []
    auth = ProxyAuth(
        authority="origin.test:443", username="alice", password="pw", contexts=contexts(log)
    )
    auth.first()
    assert not auth.steps_token(_hdrs('Basic realm="corp"'))
    assert not auth.steps_token(_hdrs('Digest realm="corp", nonce="n1"'))
    assert auth.steps_token(_hdrs('Basic realm="corp"', "NTLM"))
    assert auth.steps_token([("proxy-authenticate", "Negotiate")])
    assert not auth.steps_token(_hdrs("Basic realm=\x00"))  # malformed: challenged() says so
    assert log == []  # asking steps nothing
    # After an NTLM request, the next 407 continues (or ends) that context.
    auth.challenged(_hdrs("NTLM"), same_connection=True)
    assert auth.scheme == "ntlm"
    assert auth.steps_token(_hdrs('Basic realm="corp"'))


def test_steps_token_for_first_and_restart():
    """No headers: the question is asked of first() (before any request) or restart()
    (after a challenge), each by the scheme it would use."""
    log: list[str] = []

    def auth(pinned: str | None = None, memo: AuthMemo | None = None) -> ProxyAuth:
        return ProxyAuth(
            authority="origin.test:443",
            username="alice",
            password="pw",
            pinned=pinned,
            memo=memo,
            contexts=contexts(log),
        )

    assert auth(pinned="ntlm").steps_token()  # first() starts its token at once
    assert not auth(pinned="basic").steps_token()
    assert not auth().steps_token()  # nothing known: first() sends no header
    memo = AuthMemo()
    memo.scheme = "negotiate"
    assert auth(memo=memo).steps_token()
    # restart() repeats what the last request used.
    basic = auth()
    basic.first()
    basic.challenged(_hdrs('Basic realm="corp"'), same_connection=False)
    assert not basic.steps_token()
    ntlm = auth()
    ntlm.first()
    ntlm.challenged(_hdrs("NTLM"), same_connection=False)
    assert ntlm.steps_token()
    assert log == ["ntlm:None"]  # only challenged() stepped a context
