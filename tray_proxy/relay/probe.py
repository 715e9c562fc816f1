"""Try an upstream once: a real CONNECT (or SOCKS5) through it to a target, then close.

Used by `tray-proxy credentials test NAME` and the credentials dialog to tell the user, in
words, whether the proxy and the password work. It runs the engine's own dial and
authentication code, but with a private credential state: a probe neither waits for nor
changes what the running relay knows about the credentials.

Must not import PySide6. The password never reaches the result.
"""

from __future__ import annotations

import asyncio
import enum
import errno as errno_codes
import time
from dataclasses import dataclass, replace

from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import Credentials
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy
from tray_proxy.relay.upstream import Dialer, UpstreamAuth, UpstreamError, open_tunnel

__all__ = ["ProbeOutcome", "ProbeResult", "probe_upstream"]


class ProbeOutcome(enum.Enum):
    OK = "ok"
    AUTH_FAILED = "auth-failed"
    FORBIDDEN = "forbidden"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    PROTOCOL_ERROR = "protocol-error"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What happened. `words` is a sentence for the user; `status` the proxy's HTTP status
    or SOCKS5 reply code when it answered with one; `latency_s` the time to an open tunnel.
    `answered_s` is the time until the proxy's answer, also a refusal (407, 403, 502);
    `reached_proxy` whether the connection to the proxy itself opened, which tells "no answer
    from the proxy" from "the proxy got no answer from the target" after a timeout."""

    outcome: ProbeOutcome
    latency_s: float | None
    status: int | None
    words: str
    answered_s: float | None = None
    reached_proxy: bool | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is ProbeOutcome.OK


def _proxy(upstream: UpstreamProxy) -> str:
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    return f"{host}:{upstream.port}"


async def probe_upstream(
    upstream: UpstreamProxy,
    credentials: Credentials | None,
    target: tuple[str, int],
    timeout: float,
) -> ProbeResult:
    """Open a tunnel through `upstream` to `target` within `timeout` seconds, then close it."""
    started = time.monotonic()
    dialer = Dialer(None)  # a probe is never redirected: no reserved source ports
    dialed: list[float] = []
    auth = UpstreamAuth()
    try:
        sock, _trailing = await asyncio.wait_for(
            open_tunnel(
                dialer,
                upstream,
                target,
                credentials,
                auth,
                connect_timeout=timeout,
                handshake_timeout=timeout,
                reserved=False,
                on_dialed=lambda: dialed.append(time.monotonic()),
            ),
            timeout,
        )
    except asyncio.TimeoutError:
        words = f"timed out after {timeout:g} s"
        return ProbeResult(ProbeOutcome.TIMEOUT, None, None, words, reached_proxy=bool(dialed))
    except UpstreamError as exc:
        result = _failure(upstream, credentials, target, timeout, exc)
        answered = time.monotonic() - started if result.status is not None else None
        return replace(result, answered_s=answered, reached_proxy=bool(dialed))
    finally:
        auth.close()  # its NTLM/Negotiate threads, if it started any
    latency = time.monotonic() - started
    sock.close()
    return ProbeResult(
        ProbeOutcome.OK,
        latency,
        None,
        f"OK in {latency * 1000:.0f} ms",
        answered_s=latency,
        reached_proxy=True,
    )


def _failure(
    upstream: UpstreamProxy,
    credentials: Credentials | None,
    target: tuple[str, int],
    timeout: float,
    exc: UpstreamError,
) -> ProbeResult:
    proxy = _proxy(upstream)
    status = exc.status
    reason = exc.reason
    if reason is CloseReason.UPSTREAM_AUTH_FAILED:
        code = f" ({status})" if status is not None and upstream.kind is UpstreamKind.HTTP else ""
        if exc.rejected and credentials is not None:
            words = f"{proxy} rejected the password for {credentials.username}{code}"
        elif credentials is None:
            words = f"{proxy} requires a user name and password{code}: none is set up"
        else:
            words = f"{proxy} did not accept the login{code}: {exc.detail}"
        return ProbeResult(ProbeOutcome.AUTH_FAILED, None, status, words)
    if reason is CloseReason.UPSTREAM_REFUSED:
        if upstream.kind is UpstreamKind.SOCKS5:
            what = f"SOCKS5 reply {status}: {exc.refusal}"
            forbidden = status == 0x02  # RFC 1928: connection not allowed by ruleset
        else:
            what = f"{status} {exc.refusal}".strip()
            forbidden = status == 403
        if forbidden:
            return ProbeResult(
                ProbeOutcome.FORBIDDEN, None, status, f"forbidden by the proxy ({what})"
            )
        host, port = target
        return ProbeResult(
            ProbeOutcome.UNREACHABLE,
            None,
            status,
            f"{proxy} could not reach {host}:{port} ({what})",
        )
    if reason is CloseReason.UPSTREAM_TIMEOUT:
        return ProbeResult(ProbeOutcome.TIMEOUT, None, None, f"timed out after {timeout:g} s")
    if reason is CloseReason.UPSTREAM_UNREACHABLE:
        if exc.errno == errno_codes.ECONNREFUSED:
            return ProbeResult(ProbeOutcome.REFUSED, None, None, f"connection refused by {proxy}")
        return ProbeResult(ProbeOutcome.UNREACHABLE, None, None, exc.detail)
    return ProbeResult(ProbeOutcome.PROTOCOL_ERROR, None, status, exc.detail)
