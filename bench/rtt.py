"""Time to first byte with a real round trip to the proxy: tray-proxy against `curl -x`.

Issue 15, section 7. The lab's client namespace reaches the proxy namespace over a link
emulator (tests/lab/linkemu.py: no netem in this kernel) with `--rtt-ms` (20) round trip;
everything else stays on the lab's veths. The real `curl` fetches small HTTPS bodies from the
lab's origin (TLS through the tunnel, as users see it) along each row's path:

  curl -x      curl with `-x` to Squid (Basic auth, sent with the first CONNECT)
  tray-run     `tray-proxy run` behind the lab's nft redirect, defaults (16 spare connections,
               `early_data = "auto"`)
  ...          the same with 2 spares, without spares, with `early_data = false` (the
               default before "auto"), and redsocks (`splice = on`)

and measures, interleaved row by row:
  (a) a fresh connection after `--idle` seconds with no traffic (spares expired; several
      samples): curl's time to first byte;
  (b) a burst like `npm install`: `--fetches` fetches, `--parallel` at a time, each on a new
      connection (`--parallel-immediate --fresh-connect`, `Connection: close`): total wall
      time and each fetch's time to first byte, p50 / p95.

Squid is the lab's (Debian's stock `deny CONNECT !SSL_ports` kept: every fetch is to 443).
Prints markdown tables; with `--output` (default docs/benchmarks.md) replaces its own section
there. Figures are printed and written, never asserted. Usage, as root from the repository
root:

    .venv/bin/python -m bench.rtt [--quick] [--rounds N] [--rows a,b] [--output FILE|-]
                                  [--idle S] [--fetches N] [--parallel N] [--rtt-ms MS]

Default about 4 minutes, `--quick` under one. Traffic stays in the lab's namespaces; every
process, namespace, link and nft table is removed in `finally`.

Must not import PySide6.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.relays import Redsocks, Relay, TrayProxyRun, TrayProxyRunNoSpares
from bench.run import RTT_SECTION_BEGIN, RTT_SECTION_END, begin
from bench.run import SECTION_BEGIN as RUN_SECTION_BEGIN
from tests.lab import Lab, LabError, SquidProxy
from tests.lab.linkemu import DelayedLink, LinkStats
from tests.lab.netns import LAB_NFT_TABLE, Namespace, Redirect

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = RTT_SECTION_BEGIN
SECTION_END = RTT_SECTION_END
SLOT_ADDRESS = 60  # last octet of the first row's origin address (bench/run.py uses 10 and up)
BODY_BYTES = 2048  # a small response, like a package manifest: the opening is measured
CURL_TIMEOUT = 30.0


class TrayProxyRunTwoSpares(TrayProxyRun):
    """`tray-proxy run` with `spare_connections = 2`, the default before issue 15's section
    7: the pool a burst can grow to is two."""

    label = "tray-proxy run, spare_connections = 2"
    key = "tray-run-spares2"
    relay_extra = "spare_connections = 2\n"


class TrayProxyRunNoEarlyData(TrayProxyRun):
    """`tray-proxy run` with the default spares and `early_data = false` (the default before
    "auto"): the ClientHello waits for the proxy's 200."""

    label = "tray-proxy run, early_data = false"
    key = "tray-run-noearly"
    relay_extra = "early_data = false\n"


@dataclass(frozen=True)
class Row:
    key: str
    label: str


ROWS = [
    Row("curl-x", "`curl -x` to Squid (reference)"),
    Row("tray-run", 'tray-proxy run, defaults (16 spares, early data "auto")'),
    Row("tray-run-spares2", "tray-proxy run, `spare_connections = 2` (the old default)"),
    Row("tray-run-nospare", "tray-proxy run, `spare_connections = 0`"),
    Row("tray-run-noearly", "tray-proxy run, `early_data = false` (16 spares)"),
    Row("redsocks-on", "redsocks, `splice = on`"),
]
REFERENCE = "curl-x"
PRODUCT = "tray-run"


@dataclass(frozen=True)
class Sizes:
    rounds: int
    idle: float
    fetches: int
    parallel: int


# The spares' max age is 10 s (relay.spare_max_age): --quick idles past it, not 30 s.
FULL = Sizes(rounds=5, idle=30.0, fetches=200, parallel=16)
QUICK = Sizes(rounds=2, idle=11.0, fetches=200, parallel=16)


@dataclass
class Fetch:
    """One curl transfer's timings in seconds (curl's -w variables) and its status."""

    code: int
    connect: float
    appconnect: float
    first_byte: float
    total: float


@dataclass
class RowFigures:
    """Everything measured for one row over the run."""

    fresh: list[Fetch] = field(default_factory=list)  # (a), one per round
    burst_totals: list[float] = field(default_factory=list)  # (b), seconds per burst
    burst_fetches: list[Fetch] = field(default_factory=list)  # (b), every fetch
    failures: int = 0
    notes: list[str] = field(default_factory=list)


# -- curl in the client namespace -------------------------------------------------------------

WRITE_OUT = "%{http_code} %{time_connect} %{time_appconnect} %{time_starttransfer} %{time_total}\\n"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Curl:
    """Runs the real curl in the client namespace with its whole config on stdin (the proxy
    password never reaches argv), for one row: through Squid with -x, or to the row's own
    origin address behind the redirect."""

    def __init__(self, lab: Lab, squid: SquidProxy) -> None:
        self.ns: Namespace = lab.client
        self.squid = squid
        self.ca = lab.ca_path
        self.hostname = lab.origins.hostname
        self.counter = 0

    def config(self, address: str | None, urls: int, parallel: int) -> str:
        """curl config text: `urls` fetches of small bodies; via Squid when `address` is
        None, else to origin name resolved to `address` (which the redirect sends to a
        relay)."""
        lines = [
            "silent",
            "show-error",
            f"max-time = {CURL_TIMEOUT}",
            f"cacert = {_quote(str(self.ca))}",
            'header = "Connection: close"',
            "fresh-connect",
            f"write-out = {_quote(WRITE_OUT)}",
        ]
        if address is None:
            creds = self.squid.credentials
            assert creds is not None
            lines += [
                f"proxy = {_quote(self.squid.proxy_url())}",
                f"proxy-user = {_quote(creds.username + ':' + creds.password)}",
            ]
        else:
            lines += ['noproxy = "*"', f"resolve = {_quote(f'{self.hostname}:443:{address}')}"]
        if parallel > 1:
            lines += ["parallel", "parallel-immediate", f"parallel-max = {parallel}"]
        for _ in range(urls):
            self.counter += 1
            path = f"/bytes/{BODY_BYTES}?seed=rtt{self.counter}"
            lines += [f"url = {_quote(f'https://{self.hostname}{path}')}", 'output = "/dev/null"']
        return "\n".join(lines) + "\n"

    def run(self, config: str, timeout: float) -> tuple[float, list[Fetch], str]:
        """(wall seconds, each transfer's timings, stderr)."""
        started = time.perf_counter()
        result = subprocess.run(
            ["ip", "netns", "exec", self.ns.name, "curl", "--disable", "--config", "-"],
            input=config.encode(),
            capture_output=True,
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
        )
        wall = time.perf_counter() - started
        fetches = []
        for line in result.stdout.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 5:
                code, *times = parts
                fetches.append(Fetch(int(code), *(float(t) for t in times)))
        return wall, fetches, result.stderr.decode(errors="replace")

    def startup(self) -> float:
        """Seconds `ip netns exec curl` takes with nothing to fetch over the network (a
        file: URL), the fixed cost inside each burst's wall time; the median of three."""
        config = 'url = "file:///dev/null"\nsilent\noutput = "/dev/null"\n'
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(
                ["ip", "netns", "exec", self.ns.name, "curl", "--disable", "--config", "-"],
                input=config.encode(),
                capture_output=True,
                timeout=20,
            )
            walls.append(time.perf_counter() - started)
        return statistics.median(walls)


# -- the run --------------------------------------------------------------------------------


class RttBench:
    def __init__(self, lab: Lab, squid: SquidProxy, sizes: Sizes, rows: list[Row]) -> None:
        self.lab = lab
        self.squid = squid
        self.sizes = sizes
        self.rows = rows
        self.curl = Curl(lab, squid)
        self.workdir = lab.tmp / "rtt"
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        self.figures = {row.key: RowFigures() for row in rows}
        self.addresses: dict[str, str] = {}
        self.configs: dict[str, str] = {}
        self.startup = 0.0
        self.rtt_measured: list[float] = []
        self._next_port = 21000 + os.getpid() % 1000 * 10

    def make_relay(self, key: str) -> Relay:
        creds = self.squid.credentials
        assert creds is not None
        self._next_port += 1
        common = (self.lab.client, self.workdir, self._next_port)
        upstream = (self.squid.host, self.squid.port)
        args = (*common, upstream, creds.username, creds.password_file)
        relay: Relay
        if key == "tray-run":
            relay = TrayProxyRun(*args)
        elif key == "tray-run-nospare":
            relay = TrayProxyRunNoSpares(*args)
        elif key == "tray-run-spares2":
            relay = TrayProxyRunTwoSpares(*args)
        elif key == "tray-run-noearly":
            relay = TrayProxyRunNoEarlyData(*args)
        elif key == "redsocks-on":
            relay = Redsocks(*args, True)
        else:
            raise ValueError(key)
        self.configs.setdefault(relay.label, relay.config_text())
        return relay

    def row_address(self, index: int) -> str:
        """An origin address of the row's own, so the redirect can tell the rows apart."""
        assert self.lab.origin.v4 is not None
        address = f"{self.lab.origin.v4.rsplit('.', 1)[0]}.{SLOT_ADDRESS + index}"
        self.lab.origin.add_address(f"{address}/24")
        return address

    def ruleset(self, routes: dict[str, int]) -> str:
        lines = [
            f"table inet {LAB_NFT_TABLE} {{",
            "  chain output {",
            "    type nat hook output priority -100; policy accept;",
            "    ip daddr 127.0.0.0/8 return",
            f"    ip daddr {self.squid.host} return",
            *(
                f"    ip daddr {address} tcp dport 443 redirect to :{port}"
                for address, port in routes.items()
            ),
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def measure_rtt(self, count: int = 7) -> list[float]:
        """TCP connects from the client to Squid's port: one round trip each, in ms."""
        times = []
        for _ in range(count):
            sock = self.lab.client.socket(socket.AF_INET)
            with sock:
                sock.settimeout(5.0)
                started = time.perf_counter()
                sock.connect((self.squid.host, self.squid.port))
                times.append((time.perf_counter() - started) * 1000)
        return times

    def squid_connects(self) -> int:
        return sum(1 for e in self.squid.entries() if e.method == "CONNECT" and e.status == 200)

    def wait_squid(self, at_least: int, timeout: float = 10.0) -> int:
        """Squid logs a CONNECT when its tunnel closes: poll (bounded) until it has."""
        deadline = time.monotonic() + timeout
        seen = self.squid_connects()
        while seen < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
            seen = self.squid_connects()
        return seen

    def fetch(self, row: Row, urls: int, parallel: int) -> tuple[float, list[Fetch]]:
        """One curl run for `row`; failures counted and noted. (wall, transfers)."""
        before = self.squid_connects()
        config = self.curl.config(self.addresses.get(row.key), urls, parallel)
        wall, fetches, err = self.curl.run(config, CURL_TIMEOUT + 30)
        figures = self.figures[row.key]
        ok = sum(1 for f in fetches if f.code == 200)
        if ok < urls:
            figures.failures += urls - ok
            figures.notes.append(f"{urls - ok} of {urls} fetches failed: {err.strip()[-300:]}")
        seen = self.wait_squid(before + ok) - before
        if seen < ok:
            # A fetch that did not cross Squid took a shortcut: the figures would lie.
            figures.notes.append(f"only {seen} of {ok} fetches went through Squid")
        return wall, fetches

    def _progress(self, row: Row) -> str:
        f = self.figures[row.key]
        fresh = _ms(f.fresh[-1].first_byte) if f.fresh else "–"
        burst = f"{f.burst_totals[-1]:.2f} s" if f.burst_totals else "–"
        return f"{row.key} fresh {fresh} burst {burst}"

    def run(self) -> None:
        s = self.sizes
        with contextlib.ExitStack() as stack:
            relays: dict[str, Relay] = {}
            for index, row in enumerate(self.rows):
                if row.key == REFERENCE:
                    continue
                relays[row.key] = stack.enter_context(self.make_relay(row.key))
                self.addresses[row.key] = self.row_address(index)
            routes = {self.addresses[key]: relay.port for key, relay in relays.items()}
            stack.enter_context(Redirect(self.lab.client, self.ruleset(routes)).apply())
            self.startup = self.curl.startup()
            self.rtt_measured = self.measure_rtt()
            _say(
                f"round trip client -> Squid (TCP connect, ms): "
                f"{', '.join(f'{t:.1f}' for t in self.rtt_measured)}; "
                f"curl start-up {self.startup * 1000:.0f} ms"
            )
            for row in self.rows:  # warm: Squid's auth cache, TLS, relays' first paths
                self.fetch(row, s.parallel, s.parallel)
                self.figures[row.key] = RowFigures()
            for n in range(s.rounds):
                order = self.rows[n % len(self.rows) :] + self.rows[: n % len(self.rows)]
                _say(f"round {n + 1}/{s.rounds}: idle {s.idle:.0f} s")
                time.sleep(s.idle)  # the measured condition itself: no traffic at all
                for row in order:
                    _, fetches = self.fetch(row, 1, 1)
                    self.figures[row.key].fresh += [f for f in fetches if f.code == 200]
                for row in order:
                    wall, fetches = self.fetch(row, s.fetches, s.parallel)
                    figures = self.figures[row.key]
                    figures.burst_totals.append(max(0.0, wall - self.startup))
                    figures.burst_fetches += [f for f in fetches if f.code == 200]
                _say(f"round {n + 1}: " + "; ".join(self._progress(row) for row in self.rows))
            for key, relay in relays.items():
                if relay.process is not None and relay.process.poll() is not None:
                    self.figures[key].notes.append(
                        f"relay exited with {relay.process.returncode} during the run"
                    )


def _say(text: str) -> None:
    print(f"bench.rtt: {text}", file=sys.stderr, flush=True)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f} ms"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _share_saved(fetches: list[Fetch], rtt_ms: float | None) -> float | None:
    """The share of fetches whose TLS handshake was done within 2.5 round trips: one round
    trip less than TCP to the proxy + CONNECT + TLS, the three every fresh path pays. For a
    relay that is a fetch that found its proxy connection already open (a spare)."""
    if not fetches or not rtt_ms:
        return None
    return sum(1 for f in fetches if f.appconnect * 1000 < 2.5 * rtt_ms) / len(fetches)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


# -- tables ---------------------------------------------------------------------------------


def summary(bench: RttBench) -> dict[str, dict[str, float | None]]:
    out = {}
    for row in bench.rows:
        f = bench.figures[row.key]
        burst_fb = [x.first_byte for x in f.burst_fetches]
        out[row.key] = {
            "fresh_fb": _median([x.first_byte for x in f.fresh]),
            "fresh_min": min((x.first_byte for x in f.fresh), default=None),
            "fresh_max": max((x.first_byte for x in f.fresh), default=None),
            "fresh_tls": _median([x.appconnect for x in f.fresh]),
            "burst_total": _median(f.burst_totals),
            "burst_p50": _percentile(burst_fb, 0.50),
            "burst_p95": _percentile(burst_fb, 0.95),
            "burst_tls_p50": _percentile([x.appconnect for x in f.burst_fetches], 0.50),
            "burst_saved": _share_saved(f.burst_fetches, _median(bench.rtt_measured)),
        }
    return out


def results_table(bench: RttBench, figs: dict[str, dict[str, float | None]]) -> str:
    rtt = _median(bench.rtt_measured)
    s = bench.sizes
    ref = figs.get(REFERENCE, {})
    lines = [
        f"| path | (a) fresh after {s.idle:.0f} s idle: first byte, median (min–max) | "
        "in round trips | vs `curl -x` | "
        f"(b) burst {s.fetches} × {s.parallel} parallel: total | vs `curl -x` | "
        "(b) first byte p50 / p95 | (b) TLS done p50 | (b) one round trip saved | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in bench.rows:
        f = figs[row.key]
        trips = _ratio(f["fresh_fb"], rtt / 1000 if rtt else None)
        spread = ""
        if f["fresh_min"] is not None and f["fresh_max"] is not None:
            spread = f" ({f['fresh_min'] * 1000:.1f}–{f['fresh_max'] * 1000:.1f})"
        total = "–" if f["burst_total"] is None else f"{f['burst_total']:.2f} s"
        saved = "–" if f["burst_saved"] is None else f"{f['burst_saved']:.0%}"
        lines.append(
            f"| {row.label} | {_ms(f['fresh_fb'])}{spread} | "
            f"{'–' if trips is None else f'{trips:.1f}'} | "
            f"{_times(_ratio(f['fresh_fb'], ref.get('fresh_fb')))} | {total} | "
            f"{_times(_ratio(f['burst_total'], ref.get('burst_total')))} | "
            f"{_ms(f['burst_p50'])} / {_ms(f['burst_p95'])} | {_ms(f['burst_tls_p50'])} | "
            f"{saved} | {bench.figures[row.key].failures} |"
        )
    return "\n".join(lines)


GOALS = [
    ("(b) burst total time", "burst_total", 0.8),
    ("(a) fresh connection after idle, first byte", "fresh_fb", 1.0),
]


def goals_table(figs: dict[str, dict[str, float | None]]) -> str:
    lines = ["| row | goal (issue 15 §7) | measured | verdict |", "|---|---|---|---|"]
    for key in (PRODUCT, "tray-run-spares2", "tray-run-nospare", "tray-run-noearly"):
        if key not in figs or REFERENCE not in figs:
            continue
        label = next(r.label for r in ROWS if r.key == key)
        note = "" if key == PRODUCT else " (comparison row)"
        for name, column, limit in GOALS:
            got = _ratio(figs[key][column], figs[REFERENCE][column])
            verdict = "–" if got is None else ("PASS" if got <= limit else "MISS")
            lines.append(
                f"| {label}{note} | {name} ≤ {limit:.1f}× `curl -x` | {_times(got)} | {verdict} |"
            )
    return "\n".join(lines)


def _share(figs: dict[str, dict[str, float | None]], key: str) -> str:
    value = figs.get(key, {}).get("burst_saved")
    return "–" if value is None else f"{value:.0%}"


def analysis(figs: dict[str, dict[str, float | None]]) -> list[str]:
    """Where the time goes and what the spares and early data do about it: the round-trip
    arithmetic holds for any run; the shares and ratios quoted come from this run."""
    return [
        "### Where the time goes (R = one round trip to the proxy)",
        "",
        "- `curl -x`: TCP to the proxy (1 R), CONNECT with Basic credentials and its `200` "
        "(1 R), TLS 1.3 through the tunnel (1 R), request to first byte (1 R): **4 R**.",
        '- tray-proxy, defaults (`early_data = "auto"`): the client\'s TCP handshake is '
        "with the relay on this host (no R); the relay dials the proxy at accept, while it "
        "reads the ClientHello (1 R), then writes the CONNECT with verified Basic "
        "credentials and the ClientHello in one packet, so CONNECT and TLS share one R "
        "(1 R), then the request (1 R): **3 R** on a fresh dial; a spare (a connection to "
        "the proxy opened ahead of need) takes the first R off: **2 R**.",
        '- tray-proxy with `early_data = false` (the default before "auto"): the '
        "ClientHello waits for the `200`: 4 R on a fresh dial, **3 R** on a spare.",
        "- redsocks: 4 R, and usually one more. It sets no `TCP_NODELAY` on its proxy "
        "socket (strace: no such setsockopt), so curl's TLS Finished and its request, two "
        "small writes, mostly leave one round trip apart (Nagle): the extra R shows between "
        "TLS done and first byte. "
        "The first connection after a start also pays a 407 and a second CONNECT (later "
        "ones send the credentials at once). tray-proxy keeps `TCP_NODELAY` on both sides: "
        "keep it that way.",
        "- The measured R count is a little above the whole number: TLS and HTTP work in "
        "curl, Squid and the Python origin on 2 shared CPUs, and the link emulator's up to "
        "1 ms lateness per crossing.",
        "",
        "### What the relay does, and what the numbers say",
        "",
        'Early data, `"auto"` (relay/opening.py, docs/relay.md "Early data"): only a '
        "TLS handshake goes early (a ClientHello may be sent again on another tunnel; a "
        "request may not). Each proxy is on trial until a server has answered bytes that "
        "went early: until then a tunnel is held after the `200` until the server speaks, "
        "and if it does not within max(1 s, 4× the CONNECT's answer time) the opening is "
        "redone without early data; two such waits in a row turn early data off for that "
        "proxy, with one warning. Squid 5.7 keeps the bytes, so here the first tunnel "
        "proves it and every later one sends its hello with the CONNECT at no extra cost.",
        "",
        "Spares (relay/spares.py, `RelayEngine._top_up_spares`): one connection at a time, "
        "two are dialed when a tunnel ends and nothing else is opening. During a burst each "
        "accept dials replacements at once, as many as the most openings in progress "
        "within the last second, up to `relay.spare_connections` (default 16); each lives "
        "at most `relay.spare_max_age` (10 s). The column *one round trip saved* (fetches "
        "whose TLS was done within 2.5 R) reads "
        f"{_share(figs, 'tray-run')} by default, {_share(figs, 'tray-run-spares2')} with 2 "
        f"spares and {_share(figs, 'tray-run-nospare')} with none: with early data every "
        "fetch has its TLS done within 2.5 R (2 R on a fresh dial already), so there the "
        f"column says nothing about spares; {_share(figs, 'tray-run-noearly')} with "
        "`early_data = false`, where it counts the fetches that found a spare. After the "
        "idle period every spare has expired: (a) is a fresh dial on every path, 3 R by "
        "default (0.75× of 4 R) and 4 R with `early_data = false`.",
        "",
        "The arithmetic of goal (b): 200 fetches at 16 parallel are 12.5 waves. By default "
        "the first wave pays 3 R and every later fetch that finds a spare 2 R: "
        "(3 + 11.5 × 2) / (12.5 × 4) ≈ 0.52× `curl -x`; curl's, Squid's and the origin's "
        "own work per fetch, the same on both paths, pulls the measured ratio a little "
        "towards 1.0×. "
        f"{_verdict_words(figs, 'tray-run', 'burst_total', 0.8)} "
        "With `early_data = false` the first wave pays 4 R and the rest 3 R: "
        "(4 + 11.5 × 3) / 50 ≈ 0.77×, so that goal needed a spare for nearly every fetch "
        f"({_expected(figs, 'tray-run-noearly')}measured "
        f"{_times(_fig_ratio(figs, 'tray-run-noearly', 'burst_total'))}).",
        "",
        "Spares cost the proxy a connection each that may expire unused (Squid logs it as "
        "`transaction-end-before-headers`); they are dialed only while connections come, "
        "never on a timer.",
        "",
    ]


def _expected(figs: dict[str, dict[str, float | None]], key: str) -> str:
    share = figs.get(key, {}).get("burst_saved")
    if share is None:
        return ""
    return f"its {share:.0%} on a spare predicts {(4 - share) / 4:.2f}×; "


def _verdict_words(
    figs: dict[str, dict[str, float | None]], key: str, column: str, limit: float
) -> str:
    got = _fig_ratio(figs, key, column)
    if got is None:
        return ""
    if got <= limit:
        return f"The default row measured {got:.2f}×: goal (b) met in this run."
    return f"The default row measured {got:.2f}×: goal (b) missed in this run."


def _fig_ratio(figs: dict[str, dict[str, float | None]], key: str, column: str) -> float | None:
    return _ratio(figs.get(key, {}).get(column), figs.get(REFERENCE, {}).get(column))


def render_section(
    args: argparse.Namespace,
    bench: RttBench,
    figs: dict[str, dict[str, float | None]],
    link: LinkStats | None,
    elapsed: float,
    load: list[tuple[float, float, float]],
) -> str:
    s = bench.sizes
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = ".venv/bin/python -m bench.rtt" + (" --quick" if args.quick else "")
    for option in ("rounds", "idle", "fetches", "parallel"):
        if getattr(args, option) is not None:
            command += f" --{option} {getattr(args, option):g}"
    if args.rtt_ms != 20.0:
        command += f" --rtt-ms {args.rtt_ms:g}"
    notes = [f"- {key}: {note}" for key, f in bench.figures.items() for note in f.notes] or [
        "- none"
    ]
    link_text = (
        "no counters"
        if link is None
        else f"{link.forwarded_ab:,} packets client→proxy and {link.forwarded_ba:,} back, "
        f"{link.overflow} dropped for a full queue, {link.write_errors} write errors"
    )
    return "\n".join(
        [
            SECTION_BEGIN,
            f"## Round trip to the proxy ({args.rtt_ms:g} ms RTT)",
            "",
            f"Generated by `{command}` (as root, from the repository root) on {when} in "
            f"{elapsed / 60:.1f} min ({os.cpu_count()} CPUs, kernel {platform.release()}; load "
            "average 1/5/15 min at start and end: "
            + " and ".join("/".join(f"{x:.2f}" for x in t) for t in load)
            + "). The client namespace reaches the proxy namespace over tests/lab/linkemu.py "
            f"({args.rtt_ms / 2:g} ms each way; measured TCP connect to Squid "
            f"{', '.join(f'{t:.1f}' for t in bench.rtt_measured)} ms); origin and Squid "
            "are near each other. The real curl fetches "
            f"{BODY_BYTES} B over HTTPS from the lab origin (TLS 1.3 through the tunnel), a "
            "new connection per fetch. (a): after "
            f"{s.idle:g} s without any traffic, one fetch per row, {s.rounds} rounds; (b): "
            f"{s.fetches} fetches, {s.parallel} at a time (`--parallel --parallel-immediate "
            f"--fresh-connect`, `Connection: close`), {s.rounds} bursts per row, total = "
            f"curl's wall time minus its start-up ({bench.startup * 1000:.0f} ms, measured "
            "alone), median of the bursts. Rows interleaved (order turns each round). Squid "
            "5.7 as the lab runs it (Basic auth; Debian's `deny CONNECT !SSL_ports` kept, "
            "every fetch is to 443).",
            "",
            results_table(bench, figs),
            "",
            goals_table(figs),
            "",
            f"- link: {link_text}",
            *notes,
            "",
            *analysis(figs),
            SECTION_END,
        ]
    )


def write_section(path: Path, section: str) -> None:
    """Put `section` into `path` in place of the previous one; else before bench.dashboard's
    section (bench/run.py rewrites the file and keeps both), else at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION_BEGIN) + ".*?" + re.escape(SECTION_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    elif RUN_SECTION_BEGIN in text:
        at = text.index(RUN_SECTION_BEGIN)
        text = text[:at] + section + "\n\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rtt", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 11 s idle (< 1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 2)")
    parser.add_argument("--idle", type=float, default=None, help="idle seconds before (a)")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip to the proxy")
    parser.add_argument("--fetches", type=int, default=None, help="fetches per burst (200)")
    parser.add_argument("--parallel", type=int, default=None, help="burst parallelism (16)")
    parser.add_argument(
        "--rows", default=",".join(r.key for r in ROWS), help="comma-separated subset of rows"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help=f"markdown file (default {DOC}; '-' for none)"
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1 to 20")
    if not 0 <= args.rtt_ms <= 1000:
        parser.error("--rtt-ms must be 0 to 1000")
    if args.idle is not None and not 0 <= args.idle <= 600:
        parser.error("--idle must be 0 to 600 seconds")
    if args.fetches is not None and not 1 <= args.fetches <= 2000:
        parser.error("--fetches must be 1 to 2000")
    if args.parallel is not None and not 1 <= args.parallel <= 100:
        parser.error("--parallel must be 1 to 100")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        rounds=args.rounds or base.rounds,
        idle=base.idle if args.idle is None else args.idle,
        fetches=base.fetches if args.fetches is None else args.fetches,
        parallel=base.parallel if args.parallel is None else args.parallel,
    )
    rows = begin("bench.rtt", ROWS, args.rows, "(network namespaces, nftables, TUN)")
    if rows is None:
        return 2
    load = [os.getloadavg()]
    started = time.monotonic()
    try:
        with Lab(dante=False) as lab:
            assert lab.client.v4 is not None and lab.proxy.v4 is not None
            bench = RttBench(lab, lab.squid, sizes, rows)
            link = DelayedLink(lab.client, lab.proxy, delay_ms=args.rtt_ms / 2, name="tprtt")
            with link:
                link.carry(lab.client.v4, lab.proxy.v4)
                bench.run()
    except LabError as exc:
        print(f"bench.rtt: {exc}", file=sys.stderr)
        return 1
    load.append(os.getloadavg())
    figs = summary(bench)
    section = render_section(args, bench, figs, link.stats, time.monotonic() - started, load)
    print(results_table(bench, figs))
    print()
    print(goals_table(figs))
    output = DOC if args.output is None else args.output
    if str(output) != "-":
        write_section(output, section)
        _say(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
