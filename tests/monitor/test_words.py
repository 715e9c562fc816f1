"""Failure words, one transcript per class: the engine's close reason and detail (worded as
relay/upstream.py, opening.py, engine.py and pipe.py word them) in, the user's sentence out.
The lab test (tests/integration/test_failure_words_lab.py) makes the same failures for real."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tray_proxy.monitor.rows import FAILURE_REASONS, ConnectionRow, RowState
from tray_proxy.monitor.words import failure_words, proxy_authority
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

CORP = UpstreamProxy("corp", UpstreamKind.HTTP, "proxy.corp", 8080, username="alice")
NOUSER = UpstreamProxy("open", UpstreamKind.HTTP, "10.1.2.3", 3128)
SOCKS = UpstreamProxy("sox", UpstreamKind.SOCKS5, "socks.corp", 1080, username="bob")
V6 = UpstreamProxy("six", UpstreamKind.HTTP, "fd00::1", 8080)
UPSTREAMS = {u.name: u for u in (CORP, NOUSER, SOCKS, V6)}


def closed(
    reason: CloseReason,
    detail: str,
    *,
    upstream: str | None = "corp",
    host: str | None = "example.com",
    port: int = 443,
    up: int = 0,
    down: int = 0,
    duration: float = 0.2,
) -> ConnectionRow:
    return ConnectionRow(
        conn_id=7,
        started=1000.0,
        client=("10.0.0.5", 40000),
        original_dst=("93.184.216.34", port),
        host=host,
        upstream=upstream,
        state=RowState.FAILED if reason in FAILURE_REASONS else RowState.CLOSED,
        bytes_up=up,
        bytes_down=down,
        ended=1000.0 + duration,
        close_reason=reason,
        detail=detail,
    )


def words(row: ConnectionRow, usernames: dict[str, str] | None = None) -> str:
    return failure_words(row, UPSTREAMS, usernames)


# -- 407 ---------------------------------------------------------------------------------------


def test_407_wrong_password() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "proxy corp (http://proxy.corp:8080) rejected the credentials of alice (Basic); they "
        "are not sent again until they change. Enter the right password for alice "
        "(tray-proxy credentials set corp)",
    )
    assert words(row) == (
        "proxy.corp:8080 refused the password for alice (407). The relay holds it back: it "
        "tries it once more every few minutes, and at once when you enter it again. Open "
        "Credentials to fix it."
    )


def test_407_rejected_earlier_names_the_keyring_user() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "the proxy rejected the credentials of carol earlier; they are not tried again until "
        "they change",
        upstream="open",
    )
    assert words(row, {"open": "carol"}) == (
        "10.1.2.3:3128 refused the password for carol (407). The relay holds it back: it "
        "tries it once more every few minutes, and at once when you enter it again. Open "
        "Credentials to fix it."
    )


def test_407_once_from_the_plain_engine_path() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "proxy corp (http://proxy.corp:8080) rejected the credentials (proxy answered 407 "
        "Proxy Authentication Required)",
    )
    assert words(row) == "proxy.corp:8080 refused the password for alice (407). " + (
        "Open Credentials to fix it."
    )


def test_407_without_credentials() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "proxy open (http://10.1.2.3:3128): Proxy Authentication Required (407)",
        upstream="open",
    )
    assert words(row) == (
        "10.1.2.3:3128 asks for a user name and password (407), and none is set up. "
        "Open Credentials to enter them."
    )


def test_407_with_a_user_name_but_no_password() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "proxy corp (http://proxy.corp:8080): the proxy asks for authentication (Basic) and "
        "no password is set up (407)",
    )
    assert words(row) == (
        "proxy.corp:8080 asks for a user name and password (407), and none for alice is set "
        "up. Open Credentials to enter them."
    )


def test_407_that_cannot_be_answered() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "proxy corp (http://proxy.corp:8080): auth is set to ntlm but the proxy offers Basic; "
        'set auth = "auto" for this upstream (407)',
    )
    assert words(row) == (
        "proxy.corp:8080 asks for a login the relay cannot give (407): auth is set to ntlm "
        'but the proxy offers Basic; set auth = "auto" for this upstream. Open Credentials '
        "to fix it."
    )


def test_407_on_every_reconnect() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "proxy corp (http://proxy.corp:8080) closed the connection after each 407, so NTLM "
        "could not finish (it needs a kept-alive connection)",
    )
    assert words(row).startswith("proxy.corp:8080 closed the connection after each 407")


def test_socks5_auth_has_no_http_status() -> None:
    row = closed(
        CloseReason.UPSTREAM_AUTH_FAILED,
        "proxy sox (socks5://socks.corp:1080) rejected the credentials of bob "
        "(username/password); they are not sent again until they change",
        upstream="sox",
    )
    assert words(row).startswith("socks.corp:1080 refused the password for bob. ")


# -- refusals ------------------------------------------------------------------------------


def test_403_the_proxy_forbids_the_destination() -> None:
    row = closed(
        CloseReason.UPSTREAM_REFUSED,
        "proxy corp (http://proxy.corp:8080): proxy answered 403 Forbidden",
    )
    assert words(row) == (
        "example.com:443: the proxy forbids this destination (403). "
        "Only the proxy's administrators can allow it."
    )


def test_socks5_ruleset_refusal_is_forbidden() -> None:
    row = closed(
        CloseReason.UPSTREAM_REFUSED,
        "proxy sox (socks5://socks.corp:1080): proxy answered 2 connection not allowed by ruleset",
        upstream="sox",
    )
    assert words(row).startswith(
        "example.com:443: the proxy forbids this destination (SOCKS5 reply 2)."
    )


def test_502_the_proxy_could_not_reach_it() -> None:
    row = closed(
        CloseReason.UPSTREAM_REFUSED,
        "proxy corp (http://proxy.corp:8080): proxy answered 503 Service Unavailable",
        host=None,
    )
    assert words(row) == (
        "proxy.corp:8080 could not reach 93.184.216.34:443 (503 Service Unavailable). "
        "If every destination fails, use Test connection to check the proxy."
    )


# -- timeouts, unreachable ---------------------------------------------------------------------


def test_handshake_timeout() -> None:
    row = closed(
        CloseReason.UPSTREAM_TIMEOUT,
        "proxy corp (http://proxy.corp:8080) did not complete the handshake within 10s",
    )
    assert words(row) == (
        "No answer from proxy.corp:8080 within 10 s. Use Test connection to check the proxy."
    )


def test_connect_timeout() -> None:
    row = closed(CloseReason.UPSTREAM_TIMEOUT, "connecting to 10.9.9.9:8080 took over 2.5s")
    assert words(row) == (
        "proxy.corp:8080 did not accept the connection within 2.5 s. Check your network; "
        "use Test connection to check the proxy."
    )


def test_resolve_timeout_and_failure() -> None:
    slow = closed(CloseReason.UPSTREAM_TIMEOUT, "resolving proxy.corp took over 10s")
    assert words(slow) == (
        "Looking up the proxy's name proxy.corp took over 10 s. Check your network and DNS."
    )
    gone = closed(
        CloseReason.UPSTREAM_UNREACHABLE, "cannot resolve proxy.corp: Name or service not known"
    )
    assert words(gone) == (
        "The proxy's name proxy.corp could not be looked up (Name or service not known). "
        "Check the proxy's address in Credentials and your network."
    )


def test_waiting_for_another_connection_to_check_the_password() -> None:
    row = closed(
        CloseReason.UPSTREAM_TIMEOUT,
        "waited 10s for another connection to check the credentials of alice",
    )
    assert words(row) == (
        "Waited 10 s for proxy.corp:8080 to check the password of alice, in vain. "
        "Use Test connection to check the proxy."
    )


def test_refused_nothing_listens() -> None:
    row = closed(
        CloseReason.UPSTREAM_UNREACHABLE, "cannot connect to 127.0.0.1:9: Connection refused"
    )
    assert words(row) == (
        "proxy.corp:8080 refused the connection: nothing listens there. "
        "Check the proxy's address and port in Credentials."
    )


def test_no_route() -> None:
    row = closed(
        CloseReason.UPSTREAM_UNREACHABLE, "cannot connect to 10.9.9.9:8080: No route to host"
    )
    assert words(row) == (
        "Cannot reach proxy.corp:8080 (No route to host). Check your network; "
        "use Test connection to check the proxy."
    )


def test_ipv6_proxy_in_brackets() -> None:
    row = closed(
        CloseReason.UPSTREAM_UNREACHABLE,
        "cannot connect to [fd00::1]:8080: Connection refused",
        upstream="six",
    )
    assert words(row).startswith("[fd00::1]:8080 refused the connection")
    assert proxy_authority(V6) == "[fd00::1]:8080"


def test_an_upstream_gone_from_the_settings_is_named() -> None:
    row = closed(
        CloseReason.UPSTREAM_UNREACHABLE,
        "cannot connect to 127.0.0.1:9: Connection refused",
        upstream="old",
    )
    assert words(row).startswith("the proxy old refused the connection")


# -- resets ------------------------------------------------------------------------------------


def test_proxy_dropped_the_connection_during_the_handshake() -> None:
    row = closed(
        CloseReason.UPSTREAM_RESET,
        "proxy corp (http://proxy.corp:8080) dropped the connection: Connection reset by peer",
    )
    assert words(row) == (
        "proxy.corp:8080 dropped the connection to example.com:443 before the tunnel opened "
        "(Connection reset by peer). If it keeps happening, use Test connection to check the "
        "proxy."
    )


def test_upstream_reset_mid_tunnel() -> None:
    row = closed(
        CloseReason.UPSTREAM_RESET, "upstream side: Connection reset by peer", up=500, down=9000
    )
    assert words(row) == (
        "The connection to example.com:443 was cut on the proxy's side (Connection reset by "
        "peer). The program may retry; nothing to fix unless it keeps happening."
    )


def test_upstream_reset_while_forwarding_the_first_bytes() -> None:
    row = closed(
        CloseReason.UPSTREAM_RESET,
        "upstream side: Broken pipe while forwarding the first bytes",
    )
    assert "failed as the first bytes went out (Broken pipe)" in words(row)


def test_client_reset() -> None:
    row = closed(CloseReason.CLIENT_RESET, "client side: Connection reset by peer", up=10)
    assert words(row) == (
        "The program reset its connection to example.com:443 (Connection reset by peer). "
        "Usually it gave up or was stopped; nothing to fix here."
    )


# -- the relay's own refusals ------------------------------------------------------------------


def test_not_redirected() -> None:
    row = closed(
        CloseReason.NOT_REDIRECTED,
        "connection made to the relay port directly, not redirected",
        upstream=None,
        host=None,
    )
    assert words(row) == (
        "A program at 10.0.0.5 connected to the relay's port directly, not through the "
        "redirect, so the relay closed it. Programs need no proxy setting: remove one that "
        "points at the relay."
    )


def test_no_original_destination() -> None:
    row = closed(
        CloseReason.NO_ORIGINAL_DST,
        "no redirect record for this connection (it was made to the relay port directly, "
        "not redirected by nftables)",
        upstream=None,
    )
    assert words(row).startswith("The relay could not tell where a connection from 10.0.0.5")


def test_no_upstream() -> None:
    row = closed(CloseReason.NO_UPSTREAM, "no upstream proxy is set up", upstream=None)
    assert words(row) == (
        "No proxy is set up, so example.com:443 could not be reached. Open Credentials to add one."
    )


def test_loop() -> None:
    row = closed(
        CloseReason.LOOP,
        "the redirect caught a connection to the upstream itself (10.1.1.1:8080); its "
        "address is not excluded yet",
    )
    assert words(row) == (
        "The redirect caught the relay's own connection to proxy.corp:8080 (its address "
        "changed). Switch off and on again to exclude the new address."
    )


def test_blocked_names_the_rule_and_how_to_change_it() -> None:
    row = closed(
        CloseReason.BLOCKED,
        "blocked by rule[2] (ads.example -> block)",
        upstream=None,
        host="ads.example",
    )
    assert row.state is RowState.FAILED  # listed among the failures, with the rule
    assert words(row) == (
        "Blocked by tray-proxy's settings (rule[2] (ads.example -> block)): the connection "
        "to ads.example was reset at once. To let it through, change that [[rule]] in the "
        "settings file (`tray-proxy rules test ads.example` shows which rule decides)."
    )


def test_config_error() -> None:
    row = closed(
        CloseReason.CONFIG_ERROR,
        "upstream corp cannot be used: a Basic user name cannot contain ':'",
    )
    assert words(row) == (
        "The proxy corp cannot be used as set up: a Basic user name cannot contain ':'. "
        "Open Credentials to fix it."
    )


def test_protocol_error() -> None:
    row = closed(
        CloseReason.UPSTREAM_PROTOCOL_ERROR,
        "proxy corp (http://proxy.corp:8080) sent a bad answer: not an HTTP response: "
        "'SSH-2.0-OpenSSH_9.2'",
    )
    assert words(row) == (
        "proxy.corp:8080 sent an answer the relay cannot read (not an HTTP response: "
        "'SSH-2.0-OpenSSH_9.2'). Check in Credentials that it is an HTTP proxy and the port "
        "is right."
    )


def test_internal_errors() -> None:
    out = closed(CloseReason.INTERNAL_ERROR, "the relay is out of resources: Too many open files")
    assert words(out).startswith(
        "The relay ran out of resources (Too many open files) and dropped the connection to "
        "example.com:443."
    )
    bug = closed(CloseReason.INTERNAL_ERROR, "KeyError")
    assert words(bug) == (
        "The relay hit an internal error (KeyError) on the connection to example.com:443. "
        "Please report it with Copy diagnostics."
    )


# -- normal ends -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    [CloseReason.SHUTDOWN, CloseReason.CLOSED_BY_USER, CloseReason.IDLE_TIMEOUT],
)
def test_normal_ends_have_no_words(reason: CloseReason) -> None:
    assert words(closed(reason, "the relay stopped")) == ""


def test_done_with_traffic_has_no_words() -> None:
    assert words(closed(CloseReason.DONE, "", up=1, down=0)) == ""
    assert words(closed(CloseReason.DONE, "", up=0, down=1)) == ""


def test_done_without_a_byte_says_the_program_sent_nothing() -> None:
    row = closed(CloseReason.DONE, "", host=None, duration=1.2)
    assert words(row) == (
        "The program closed the connection before sending anything (no TLS ClientHello within 1 s)."
    )
    quick = closed(CloseReason.DONE, "", host=None, port=80, duration=0.01)
    assert words(quick) == (
        "The program closed the connection before sending anything (no HTTP request)."
    )


def test_open_row_has_no_words() -> None:
    row = replace(closed(CloseReason.DONE, ""), close_reason=None)
    assert words(row) == ""


@pytest.mark.parametrize("reason", [r for r in CloseReason if r in FAILURE_REASONS])
def test_every_failure_has_a_sentence_even_for_an_unknown_detail(reason: CloseReason) -> None:
    text = words(closed(reason, "something new the engine says"))
    assert text[:1].isupper() or text[:1] in ("[", "p")  # "proxy.corp:8080 ..." starts low
    assert text.endswith(".")
    # No secret can come from here: nothing but the row and the settings goes in.
    assert "Proxy-Authorization" not in text


def test_words_never_repeat_a_password_like_detail_field() -> None:
    # The row has no password field at all: the only free text is the engine's detail,
    # which the engine builds without headers.
    assert not hasattr(ConnectionRow, "password")
