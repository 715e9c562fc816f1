"""Build the lab, run every row side by side in interleaved rounds, print and save the tables.

Rows: direct, Squid only (explicit CONNECT), redsocks splice off / on, tray-proxy run
(uvloop; connection history off), the same with the history and process attribution on,
without spare connections, and the engine on qasync. Columns and targets follow
shared/BENCHMARKS.md and ARCHITECTURE.md ("The event loop"). Usage, as root from the
repository root:

    .venv/bin/python -m bench.run [--quick] [--rounds N] [--rows a,b] [--output FILE]

Within a round every relay runs at once behind its own origin address, so the sequential
latency samples of all rows are taken interleaved, one connection per row in turn.

`main(argv) -> int` is the entry point for a smoke test. Traffic stays inside the lab's
namespaces; every process, namespace and nft table is removed in `finally`.

Must not import PySide6 (the qasync row runs bench/qasync_relay.py as its own process).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import selectors
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench.relays import (
    Redsocks,
    Relay,
    TrayProxyQasync,
    TrayProxyRun,
    TrayProxyRunMonitored,
    TrayProxyRunNoSpares,
    proc_cpu_seconds,
    proc_cpu_split,
    proc_rss_kib,
)
from tests.lab import Lab, LabError, Namespace, SquidProxy
from tests.lab.netns import LAB_NFT_TABLE, NsProcess, Redirect

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "bench" / "loadgen.py"
ORIGIN = ROOT / "bench" / "origin.py"
DOC = ROOT / "docs" / "benchmarks.md"
GIB = 1 << 30
ORIGIN_PORT = 443
SQUID_PORT = 3128
SQUID_EXTRA = "max_filedescriptors 16384"
# Every row of every round gets a slot: an origin address and a Squid port of its own. A
# row leaves 7,000+ sockets in TIME_WAIT per round (60 s each) towards the addresses it
# dials, and the kernel's connect() slows down as one destination's port space fills: with
# shared addresses, a row would pay for the rows and rounds before it.
ROW_SQUID_PORT = 3130
CHUNKS = 5  # bulk and rate run in this many slices per row, interleaved across rows
SLOT_ADDRESS = 10  # last octet of the first slot's origin address
# bench/dashboard.py's section of DOC, between these lines: a rewrite of DOC keeps it.
SECTION_BEGIN = "<!-- bench.dashboard: begin -->"
SECTION_END = "<!-- bench.dashboard: end -->"
# bench/rtt.py's section (round trip to the proxy), kept the same way.
RTT_SECTION_BEGIN = "<!-- bench.rtt: begin -->"
RTT_SECTION_END = "<!-- bench.rtt: end -->"


def slot_of(round_no: int, key: str) -> int:
    """The row's slot in this round; which slot a row gets turns with the round. In an A/A
    run (two identical relays side by side, 6 rounds) the one in the next slot up measured
    about 5 % more latency (1.047x median): with fixed slots a row would carry the same
    slot's bias in every round, as large as the 5 % the history row is allowed."""
    index = [r.key for r in ROWS].index(key)
    return round_no * len(ROWS) + (index + round_no) % len(ROWS)


def squid_slot_ports(host: str, rounds: int) -> str:
    """Squid config lines: one http_port per slot that dials Squid (not direct)."""
    return "".join(
        f"\nhttp_port {host}:{ROW_SQUID_PORT + slot_of(n, r.key)}"
        for n in range(rounds)
        for r in ROWS
        if r.key != "direct"
    )


@dataclass(frozen=True)
class Sizes:
    bulk_bytes: int
    latency_count: int
    rate_total: int
    rate_concurrency: int
    idle_tunnels: int
    idle_probes: int


# 2,000 sequential connections per row (was 500): the history's cost is judged on a 5 %
# difference in added p50, and with 500 a round's ratio moved by more than that on its own.
FULL = Sizes(GIB, 2000, 5000, 200, 2000, 200)
QUICK = Sizes(128 << 20, 200, 1000, 200, 500, 50)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    relay: str | None  # None: no relay process (direct, Squid only)


ROWS = [
    Row("direct", "direct (no proxy)", None),
    Row("squid", "Squid only (explicit CONNECT)", None),
    Row("redsocks-off", "redsocks, `splice = off` (Debian default)", "redsocks-off"),
    Row("redsocks-on", "redsocks, `splice = on`", "redsocks-on"),
    Row("tray-run", "tray-proxy run (engine on uvloop)", "tray-run"),
    Row("tray-run-monitored", "tray-proxy run, history + attribution on", "tray-run-monitored"),
    Row("tray-run-nospare", "tray-proxy run, `spare_connections = 0`", "tray-run-nospare"),
    Row("tray-qasync", "tray-proxy engine on qasync", "tray-qasync"),
]
REFERENCE = "redsocks-on"
PRODUCT = "tray-run"
MONITORED = "tray-run-monitored"  # PRODUCT with the connection history and attribution on


@dataclass
class Sample:
    """One row's figures in one round; None where a figure does not apply or failed."""

    values: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- processes in the lab ----------------------------------------------------------------------


def raise_nofile() -> None:
    """Every process of the run inherits this: 2,000 tunnels are 4,000+ sockets per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


_R = TypeVar("_R", bound=_Keyed)


def begin(prog: str, all_rows: Sequence[_R], keys: str, needs_root: str) -> list[_R] | None:
    """The start of a benchmark's main() (this one's and bench/rtt.py's): the rows named in
    `keys` (comma-separated), more open files, and SIGTERM unwinding like Ctrl-C, so every
    `finally` tears the lab down. None, after saying why on stderr, when a row is unknown or
    the process is not root (`needs_root`: what for, in words)."""
    wanted = {k.strip() for k in keys.split(",")}
    unknown = wanted - {r.key for r in all_rows}
    if unknown:
        print(f"{prog}: unknown rows {sorted(unknown)}", file=sys.stderr)
        return None
    rows = [r for r in all_rows if r.key in wanted]
    if os.geteuid() != 0:
        print(f"{prog}: needs root {needs_root}", file=sys.stderr)
        return None
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return rows


@contextlib.contextmanager
def bench_origin(lab: Lab) -> Iterator[NsProcess]:
    """The plain-TCP origin (bench/origin.py) on :443 in the origin namespace."""
    ns = lab.origin
    assert ns.v4 is not None
    proc = ns.popen(
        [sys.executable, "-I", str(ORIGIN), "--host", "0.0.0.0", "--port", str(ORIGIN_PORT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(lab.tmp / "bench-origin.log").open("wb"),
    )
    try:
        line = _readline(proc, 20.0)
        if line.strip() != "READY":
            raise LabError(
                "bench origin did not start: "
                + (lab.tmp / "bench-origin.log").read_text(errors="replace")[-2000:]
            )
        yield proc
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        proc.stop(grace=3.0)
        ns.forget(proc)


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of the process's stdout, or "" at EOF or after `timeout` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=timeout):
            return ""
        return proc.stdout.readline().decode(errors="replace")


class LoadGen:
    """Runs bench/loadgen.py in the client namespace, against the origin or via Squid."""

    def __init__(self, lab: Lab, squid: SquidProxy, sizes: Sizes, budget: float) -> None:
        assert lab.origin.v4 is not None
        self.ns: Namespace = lab.client
        self.target = f"{lab.origin.v4}:{ORIGIN_PORT}"
        self.squid = squid
        self.proxy_port = squid.port  # the Squid port the Squid-only row dials this round
        self.sizes = sizes
        self.budget = budget

    def argv(self, mode: str, via_squid: bool, *extra: str, target: str | None = None) -> list[str]:
        argv = [sys.executable, "-I", str(LOADGEN), mode]
        if mode != "mix":
            argv += ["--target", target or self.target]
        if via_squid:
            creds = self.squid.credentials
            assert creds is not None
            argv += [
                "--proxy", f"{self.squid.host}:{self.proxy_port}",
                "--user", creds.username, "--password-file", str(creds.password_file),
            ]  # fmt: skip
        return [*argv, "--budget", str(self.budget), *extra]

    def run(
        self, mode: str, via_squid: bool, *extra: str, target: str | None = None
    ) -> dict[str, Any]:
        proc = self.ns.popen(
            self.argv(mode, via_squid, *extra, target=target),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(timeout=self.budget + 30)
        except subprocess.TimeoutExpired:
            raise LabError(f"loadgen {mode} ran over {self.budget + 30:.0f}s") from None
        finally:
            proc.stop(grace=2.0)
            self.ns.forget(proc)
        if proc.returncode != 0:
            raise LabError(f"loadgen {mode} failed: {err.decode(errors='replace')[-1500:]}")
        return _last_json(out.decode())

    def idle(
        self, via_squid: bool, on_open: Callable[[dict[str, Any]], None], target: str
    ) -> dict[str, Any]:
        """Open the idle tunnels, call `on_open` while they are held, then probe."""
        s = self.sizes
        proc = self.ns.popen(
            self.argv(
                "idle",
                via_squid,
                "--count",
                str(s.idle_tunnels),
                "--probes",
                str(s.idle_probes),
                target=target,
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            line = _readline(proc, self.budget)
            opened = json.loads(line) if line.startswith("{") else {}
            if opened.get("event") != "open":
                raise LabError(f"loadgen idle did not open its tunnels: {line!r}")
            on_open(opened)
            assert proc.stdin is not None
            proc.stdin.write(b"probe\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=self.budget + 30)
            if proc.returncode != 0:
                raise LabError(f"loadgen idle failed: {err.decode(errors='replace')[-1500:]}")
            return _last_json(out.decode())
        finally:
            proc.stop(grace=2.0)
            self.ns.forget(proc)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise LabError(f"loadgen printed no result: {text[-500:]!r}")


# -- one row, one round ------------------------------------------------------------------------


class Bench:
    def __init__(self, lab: Lab, squid: SquidProxy, sizes: Sizes, budget: float) -> None:
        self.lab = lab
        self.squid = squid
        self.sizes = sizes
        self.loadgen = LoadGen(lab, squid, sizes, budget)
        self.workdir = lab.tmp / "bench"
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        self._next_port = 20000 + os.getpid() % 1000 * 10
        self.configs: dict[str, str] = {}
        self._addresses: set[str] = set()

    def fresh_port(self) -> int:
        # redsocks binds without SO_REUSEADDR: a port with TIME_WAIT left on it would fail.
        self._next_port += 1
        return self._next_port

    def make_relay(self, key: str, squid_port: int) -> Relay:
        creds = self.squid.credentials
        assert creds is not None
        upstream = (self.squid.host, squid_port)
        common = (self.lab.client, self.workdir, self.fresh_port())
        relay: Relay
        if key == "tray-run":
            relay = TrayProxyRun(*common, upstream, creds.username, creds.password_file)
        elif key == "tray-run-monitored":
            relay = TrayProxyRunMonitored(*common, upstream, creds.username, creds.password_file)
        elif key == "tray-run-nospare":
            relay = TrayProxyRunNoSpares(*common, upstream, creds.username, creds.password_file)
        elif key == "tray-qasync":
            relay = TrayProxyQasync(*common, upstream, creds.username, creds.password_file)
        elif key in ("redsocks-off", "redsocks-on"):
            on = key == "redsocks-on"
            relay = Redsocks(*common, upstream, creds.username, creds.password_file, on)
        else:
            raise ValueError(key)
        self.configs.setdefault(relay.label, relay.config_text())
        return relay

    def slot_address(self, slot: int) -> str:
        """The origin address of a slot (see slot_of): an extra one on the origin namespace."""
        assert self.lab.origin.v4 is not None
        address = f"{self.lab.origin.v4.rsplit('.', 1)[0]}.{SLOT_ADDRESS + slot}"
        if address not in self._addresses:
            self.lab.origin.add_address(f"{address}/24")
            self._addresses.add(address)
        return address

    def redirect_ruleset(self, routes: dict[str, int]) -> str:
        """nft text: tcp/443 to each address goes to that row's relay port, Squid left alone."""
        lines = [
            f"table inet {LAB_NFT_TABLE} {{",
            "  chain output {",
            "    type nat hook output priority -100; policy accept;",
            "    ip daddr 127.0.0.0/8 return",
            f"    ip daddr {self.squid.host} return",
        ]
        lines += [
            f"    ip daddr {address} tcp dport {ORIGIN_PORT} redirect to :{port}"
            for address, port in routes.items()
        ]
        return "\n".join([*lines, "  }", "}"]) + "\n"

    def run_round(
        self, order: list[Row], report: Callable[[Row, Sample, float], None], round_no: int = 0
    ) -> dict[str, Sample]:
        """Every relay of the round runs at once, each behind its own origin address.

        Sequential latency is measured interleaved, one connection per row in turn, so a slow
        phase of the shared CPUs lands on every row alike; then the idle tunnels row after
        row, then bulk and rate interleaved in slices (see _interleaved).
        """
        samples = {row.key: Sample() for row in order}
        slots = {row.key: slot_of(round_no, row.key) for row in order}
        targets = {key: self.slot_address(slot) for key, slot in slots.items()}
        self.loadgen.proxy_port = ROW_SQUID_PORT + slot_of(round_no, "squid")
        with contextlib.ExitStack() as stack:
            relays: dict[str, Relay] = {}
            for row in order:
                if row.relay is not None:
                    port = ROW_SQUID_PORT + slots[row.key]
                    relays[row.key] = stack.enter_context(self.make_relay(row.relay, port))
            routes = {targets[key]: relay.port for key, relay in relays.items()}
            redirect = Redirect(self.lab.client, self.redirect_ruleset(routes))
            stack.enter_context(redirect.apply())
            t0 = time.monotonic()
            self._latency(order, samples, targets)
            print(
                f"bench: interleaved latency ({time.monotonic() - t0:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
            for row in order:
                self._idle(row, samples[row.key], relays.get(row.key), targets[row.key])
            t0 = time.monotonic()
            self._interleaved(order, samples, relays, targets)
            for row in order:
                report(row, samples[row.key], t0)
            for key, relay in relays.items():
                if relay.process is not None and relay.process.poll() is not None:
                    samples[key].notes.append(
                        f"{relay.label} exited with {relay.process.returncode}"
                    )
        # The relays have stopped (their history written and closed): what the monitored
        # row kept, so its cost is known to be the cost of doing the work.
        for key, relay in relays.items():
            if isinstance(relay, TrayProxyRunMonitored):
                counts = relay.history_counts()
                samples[key].notes.append(
                    "no connection history was written (is [log] wired into `tray-proxy run`?)"
                    if counts is None
                    else f"history: {counts[0]:,} connections written, {counts[1]:,} with "
                    "their process"
                )
        return samples

    def _latency(
        self, order: list[Row], samples: dict[str, Sample], targets: dict[str, str]
    ) -> None:
        # First thing on fresh relays: it also warms them up before the idle-tunnel RSS reading.
        extra = ["--count", str(self.sizes.latency_count)]
        for row in order:
            extra += ["--row", f"{row.key}={targets[row.key]}:{ORIGIN_PORT}"]
            if row.key == "squid":
                extra += ["--proxied-row", row.key]
        via = any(row.key == "squid" for row in order)
        result = self.loadgen.run("mix", via, *extra)
        for row in order:
            lat = result["rows"][row.key]
            v = samples[row.key].values
            v["lat_p50"], v["lat_p99"] = lat["p50_us"], lat["p99_us"]
            if lat["errors"]:
                samples[row.key].notes.append(f"{lat['errors']} latency errors")

    def _idle(self, row: Row, sample: Sample, relay: Relay | None, target: str) -> None:
        """Idle tunnels first, on a relay that has not yet grown buffers for bulk or for 200
        concurrent connections, so the RSS delta is what idle tunnels cost."""
        via = row.key == "squid"
        v = sample.values
        dial = f"{target}:{ORIGIN_PORT}"
        rss: dict[str, int] = {}
        if relay is not None:
            rss["before"] = proc_rss_kib(relay.pid)

        def on_open(opened: dict[str, Any]) -> None:
            if relay is not None:
                rss["after"] = proc_rss_kib(relay.pid)
            rss["open"] = int(opened["open"])
            if opened.get("errors"):
                sample.notes.append(f"{opened['errors']} idle tunnels failed to open")

        idle = self.loadgen.idle(via, on_open, dial)
        v["idle_new_p50"] = idle["probe"]["p50_us"]
        if relay is not None and rss.get("open"):
            v["idle_kib"] = (rss["after"] - rss["before"]) / rss["open"]

    def _interleaved(
        self,
        order: list[Row],
        samples: dict[str, Sample],
        relays: dict[str, Relay],
        targets: dict[str, str],
    ) -> None:
        """Bulk each way and the connection rate, in CHUNKS slices per row taken in turn
        (A B C, B C A, ...), so a slow phase of the shared CPUs lands on every row alike."""
        s = self.sizes
        totals: dict[str, dict[str, float]] = {row.key: {} for row in order}

        def add(key: str, name: str, value: float) -> None:
            totals[key][name] = totals[key].get(name, 0.0) + value

        chunk_bytes = s.bulk_bytes // CHUNKS
        chunk_conns = s.rate_total // CHUNKS
        for kind in ("down", "up", "rate"):
            for c in range(CHUNKS):
                for row in order[c % len(order) :] + order[: c % len(order)]:
                    relay = relays.get(row.key)
                    via = row.key == "squid"
                    dial = f"{targets[row.key]}:{ORIGIN_PORT}"
                    before = proc_cpu_seconds(relay.pid) if relay else 0.0
                    split = proc_cpu_split(relay.pid) if relay and kind == "rate" else None
                    if kind == "rate":
                        result = self.loadgen.run(
                            "rate", via, "--count", str(chunk_conns),
                            "--concurrency", str(s.rate_concurrency), target=dial,
                        )  # fmt: skip
                        add(row.key, "done", result["done"])
                        add(row.key, "errors", result["errors"])
                        if result["done"]:  # else every connection failed: noted below
                            add(row.key, "rate_s", result["done"] / result["conn_s"])
                    else:
                        result = self.loadgen.run(
                            "bulk", via, "--direction", kind, "--bytes", str(chunk_bytes),
                            target=dial,
                        )  # fmt: skip
                        add(row.key, f"{kind}_s", chunk_bytes * 8 / (result["gbit_s"] * 1e9))
                    if relay is not None:
                        add(row.key, f"{kind}_cpu", proc_cpu_seconds(relay.pid) - before)
                    if relay is not None and split is not None:
                        user, kernel = proc_cpu_split(relay.pid)
                        add(row.key, "rate_user", user - split[0])
                        add(row.key, "rate_kernel", kernel - split[1])
        for row in order:
            t = totals[row.key]
            v = samples[row.key].values
            moved = chunk_bytes * CHUNKS
            for kind in ("down", "up"):
                v[f"bulk_{kind}"] = moved * 8 / t[f"{kind}_s"] / 1e9
                if row.key in relays:
                    v[f"cpu_{kind}"] = t[f"{kind}_cpu"] / (moved / GIB)
            if t["done"]:
                v["conn_s"] = t["done"] / t["rate_s"]
                if row.key in relays:
                    v["cpu_conn"] = t["rate_cpu"] / t["done"] * 1e6
                    # The same CPU time split between the interpreter's work (user) and the
                    # kernel's (sockets, epoll, splice): where a gap to redsocks lies.
                    v["cpu_conn_user"] = t["rate_user"] / t["done"] * 1e6
                    v["cpu_conn_kernel"] = t["rate_kernel"] / t["done"] * 1e6
            if t["errors"]:
                samples[row.key].notes.append(
                    f"{t['errors']:.0f} of {chunk_conns * CHUNKS} connections failed"
                )


# -- the whole run -----------------------------------------------------------------------------


METRICS = [
    "bulk_up", "bulk_down", "cpu_up", "cpu_down", "lat_p50", "lat_p99",
    "added_p50", "added_p99", "conn_s", "cpu_conn", "cpu_conn_user", "cpu_conn_kernel",
    "idle_kib", "idle_new_p50",
]  # fmt: skip


def summarize(rounds: list[dict[str, Sample]]) -> dict[str, dict[str, float | None]]:
    """Median over rounds; added latency is taken against direct within each round."""
    for by_row in rounds:
        direct = by_row.get("direct")
        for key, sample in by_row.items():
            if key == "direct":
                continue  # nothing is added to itself
            for q in ("p50", "p99"):
                own = sample.values.get(f"lat_{q}")
                base = direct.values.get(f"lat_{q}") if direct else None
                added = own - base if own is not None and base is not None else None
                sample.values[f"added_{q}"] = added
    summary: dict[str, dict[str, float | None]] = {}
    for row in ROWS:
        summary[row.key] = {}
        for metric in METRICS:
            got = [
                x
                for by_row in rounds
                if row.key in by_row
                for x in [by_row[row.key].values.get(metric)]
                if x is not None
            ]
            summary[row.key][metric] = statistics.median(got) if got else None
    return summary


def _f(x: float | None, fmt: str, sign: bool = False) -> str:
    if x is None:
        return "–"
    text = format(x, fmt)
    return f"+{text}" if sign and x >= 0 else text


def results_table(summary: dict[str, dict[str, float | None]]) -> str:
    lines = [
        "| path | bulk up / down Gbit/s | relay CPU s/GiB up / down | added p50 / p99 per "
        "connection | conn/s at 200 concurrent | relay CPU µs per connection (user / kernel) "
        "| KiB per idle "
        "tunnel | new conn p50 with idle tunnels open |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        m = summary[row.key]
        added = (
            "–"
            if row.key == "direct"
            else f"{_f(m['added_p50'], '.0f', True)} / {_f(m['added_p99'], '.0f', True)} µs"
        )
        cpu = "–" if row.relay is None else f"{_f(m['cpu_up'], '.2f')} / {_f(m['cpu_down'], '.2f')}"
        new = m["idle_new_p50"]
        lines.append(
            f"| {row.label} | {_f(m['bulk_up'], '.2f')} / {_f(m['bulk_down'], '.2f')} | {cpu} "
            f"| {added} | {_f(m['conn_s'], ',.0f')} | {_cpu_conn(m)} "
            f"| {_f(m['idle_kib'], '.1f')} "
            f"| {_f(new / 1000 if new is not None else None, '.2f')} ms |"
        )
    return "\n".join(lines)


def _cpu_conn(m: dict[str, float | None]) -> str:
    """'191 (72 / 119)': CPU µs per connection, and of it in user space / in the kernel
    (the split in 10 ms ticks, so the parts need not add up to the whole exactly)."""
    if m["cpu_conn"] is None:
        return "–"
    if m.get("cpu_conn_user") is None or m.get("cpu_conn_kernel") is None:
        return _f(m["cpu_conn"], ".0f")
    return (
        f"{_f(m['cpu_conn'], '.0f')} ({_f(m['cpu_conn_user'], '.0f')} / "
        f"{_f(m['cpu_conn_kernel'], '.0f')})"
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _times(r: float | None) -> str:
    return _f(r, ".2f") + ("×" if r is not None else "")


def ratios_table(summary: dict[str, dict[str, float | None]]) -> str:
    ref, direct = summary[REFERENCE], summary["direct"]
    lines = [
        f"| path | bulk up / down vs direct | CPU/GiB up / down vs {REFERENCE} | added p50 vs "
        f"{REFERENCE} | conn/s vs {REFERENCE} / vs direct | CPU/conn vs {REFERENCE} "
        "(user / kernel) "
        f"| KiB/idle tunnel vs {REFERENCE} | new-conn p50 (idle) vs {REFERENCE} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        m = summary[row.key]
        lines.append(
            f"| {row.label} "
            f"| {_times(_ratio(m['bulk_up'], direct['bulk_up']))} / "
            f"{_times(_ratio(m['bulk_down'], direct['bulk_down']))} "
            f"| {_times(_ratio(m['cpu_up'], ref['cpu_up']))} / "
            f"{_times(_ratio(m['cpu_down'], ref['cpu_down']))} "
            f"| {_times(_ratio(m['added_p50'], ref['added_p50']))} "
            f"| {_times(_ratio(m['conn_s'], ref['conn_s']))} / "
            f"{_times(_ratio(m['conn_s'], direct['conn_s']))} "
            f"| {_times(_ratio(m['cpu_conn'], ref['cpu_conn']))} "
            f"({_times(_ratio(m['cpu_conn_user'], ref['cpu_conn_user']))} / "
            f"{_times(_ratio(m['cpu_conn_kernel'], ref['cpu_conn_kernel']))}) "
            f"| {_times(_ratio(m['idle_kib'], ref['idle_kib']))} "
            f"| {_times(_ratio(m['idle_new_p50'], ref['idle_new_p50']))} |"
        )
    return "\n".join(lines)


COST_LIMIT = 0.05  # the history and attribution cost at most 5 % of conn/s and added p50


def cost_table(summary: dict[str, dict[str, float | None]]) -> tuple[str, bool]:
    """The monitored row against tray-proxy run of the same run: what the connection
    history and process attribution cost. Empty when either row did not run."""
    on, off = summary.get(MONITORED, {}), summary.get(PRODUCT, {})
    if on.get("conn_s") is None or off.get("conn_s") is None:
        return "", True
    checks = [
        ("conn/s at 200 concurrent", _ratio(on["conn_s"], off["conn_s"]), 1 - COST_LIMIT, False),
        ("added p50 latency", _ratio(on["added_p50"], off["added_p50"]), 1 + COST_LIMIT, True),
        ("relay CPU µs per connection", _ratio(on["cpu_conn"], off["cpu_conn"]), None, True),
        ("new conn p50 with idle tunnels", _ratio(on["idle_new_p50"], off["idle_new_p50"]),
         None, True),
        ("KiB per idle tunnel", _ratio(on["idle_kib"], off["idle_kib"]), None, True),
    ]  # fmt: skip
    lines = [
        "| figure | history + attribution on / off | target | verdict |",
        "|---|---|---|---|",
    ]
    all_pass = True
    for name, got, limit, at_most in checks:
        if limit is None:
            target, verdict = "–", "(shown)"
        else:
            target = f"{'<=' if at_most else '>='} {limit:.2f}×"
            if got is None:
                verdict = "MISS (no figure)"
            else:
                verdict = "PASS" if (got <= limit if at_most else got >= limit) else "MISS"
            all_pass = all_pass and verdict == "PASS"
        lines.append(f"| {name} | {_times(got)} | {target} | {verdict} |")
    return "\n".join(lines), all_pass


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[dict[str, float | None], dict[str, float | None]], float | None]
    limit: float
    at_most: bool


TARGETS = [
    Target("relay CPU per GiB up <= 0.6x redsocks splice=on",
           lambda m, r: _ratio(m["cpu_up"], r["cpu_up"]), 0.6, True),
    Target("relay CPU per GiB down <= 0.6x redsocks splice=on",
           lambda m, r: _ratio(m["cpu_down"], r["cpu_down"]), 0.6, True),
    Target("added p50 latency <= 1.2x redsocks splice=on",
           lambda m, r: _ratio(m["added_p50"], r["added_p50"]), 1.2, True),
    Target("conn/s at 200 concurrent >= 0.9x redsocks splice=on",
           lambda m, r: _ratio(m["conn_s"], r["conn_s"]), 0.9, False),
    Target("<= 4 KiB per idle tunnel", lambda m, r: m["idle_kib"], 4.0, True),
]  # fmt: skip


def check_targets(summary: dict[str, dict[str, float | None]]) -> tuple[str, bool]:
    lines = ["| row | target | measured | verdict |", "|---|---|---|---|"]
    all_pass = True
    for key in (PRODUCT, "tray-run-nospare", "tray-qasync"):
        if key not in summary:
            continue
        label = next(r.label for r in ROWS if r.key == key)
        for target in TARGETS:
            got = target.check(summary[key], summary[REFERENCE])
            if got is None:
                verdict = "MISS (no figure)"
            else:
                ok = got <= target.limit if target.at_most else got >= target.limit
                verdict = "PASS" if ok else "MISS"
            if key == PRODUCT and verdict != "PASS":
                all_pass = False
            unit = " KiB" if "KiB" in target.name else "×"
            shown = "–" if got is None else f"{got:.2f}{unit}"
            note = "" if key == PRODUCT else " (comparison row, not a target)"
            lines.append(f"| {label}{note} | {target.name} | {shown} | {verdict} |")
    return "\n".join(lines), all_pass


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).decode(errors="replace").strip().splitlines()
    return text[0] if text else "?"


def machine_facts(load: list[tuple[float, float, float]]) -> list[str]:
    from importlib.metadata import version

    from tray_proxy import __version__

    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPUs (nproc): {os.cpu_count()}; kernel {platform.release()}; {platform.machine()}",
        f"- Python {platform.python_version()}, uvloop {version('uvloop')}, "
        f"PySide6-Essentials {version('PySide6-Essentials')}, qasync {version('qasync')}, "
        f"tray-proxy {__version__}",
        f"- {_version(['/usr/sbin/squid', '-v'])}",
        f"- {_version(['/usr/sbin/redsocks', '-v'])} (Debian package)",
        "- load average (1/5/15 min) at start and end of the run: "
        + " and ".join("/".join(f"{x:.2f}" for x in triple) for triple in load)
        + f" (above {os.cpu_count()} means rows waited for a CPU: latency and conn/s are noisy)",
    ]


def render_doc(
    args: argparse.Namespace,
    sizes: Sizes,
    summary: dict[str, dict[str, float | None]],
    rounds: list[dict[str, Sample]],
    configs: dict[str, str],
    elapsed: float,
    load: list[tuple[float, float, float]],
) -> str:
    targets, _ = check_targets(summary)
    cost, _ = cost_table(summary)
    cost_section = (
        [
            "## What the connection history and process attribution cost (same run)",
            "",
            f"`{MONITORED}` against `{PRODUCT}`: the same relay with `[log] enabled = true` "
            "(the SQLite history, written in batches by its own thread, and each "
            "connection's process looked up off the engine's loop) against `enabled = false`. "
            f"Target: conn/s and added p50 within {COST_LIMIT:.0%}. How many connections the "
            "history kept is in the notes below.",
            "",
            cost,
            "",
        ]
        if cost
        else []
    )
    notes = [
        f"- round {i + 1}, {key}: {note}"
        for i, by_row in enumerate(rounds)
        for key, sample in by_row.items()
        for note in sample.notes
    ]
    cfg = "\n\n".join(f"{label}:\n\n```\n{text.strip()}\n```" for label, text in configs.items())
    return "\n".join(
        [
            "# Benchmarks",
            "",
            "Generated by `.venv/bin/python -m bench.run"
            + (" --quick" if args.quick else "")
            + f" --rounds {args.rounds}` (as root, from the repository root) in "
            f"{elapsed / 60:.1f} min. Medians of {args.rounds} interleaved round(s). "
            "Every process shares the machine's CPUs with everything else running on it "
            "(other test runs included), so Gbit/s and conn/s swing by ±20 % or more between "
            "runs: compare rows of the same run, and prefer the CPU-per-GiB, latency and "
            "memory columns. Method and anchor figures: shared/BENCHMARKS.md.",
            "",
            "## Machine",
            "",
            *machine_facts(load),
            "",
            "## Results",
            "",
            results_table(summary),
            "",
            "## Ratios",
            "",
            ratios_table(summary),
            "",
            "## Targets (tray-proxy run against redsocks splice=on, same run)",
            "",
            targets,
            "",
            *cost_section,
            "## How it was measured",
            "",
            "- Lab (tests/lab): namespaces client, proxy, origin joined through a forwarding "
            "router namespace by veth pairs. Squid 5 with Basic auth on the proxy namespace "
            f"(`{SQUID_EXTRA}`); a plain-TCP origin (bench/origin.py, uvloop, no TLS: the relay "
            f"is measured, not TLS) on :{ORIGIN_PORT} of the origin namespace.",
            "- Relays run in the client namespace on 127.0.0.1, all of a round's at once, a "
            "fresh port each per round. Every row of every round has an origin address and a "
            f"Squid port of its own (ports {ROW_SQUID_PORT} and up; which of them a row gets "
            "turns with the round, as two identical relays measured about 5 % apart in "
            "latency in neighbouring slots): the client namespace's "
            "nft table redirects tcp/443 to a relay row's address to that relay, which dials "
            "its own Squid port; the load generator (bench/loadgen.py) dials the row's "
            "address, and for Squid only sends CONNECT with Basic auth itself. A row leaves "
            "7,000+ sockets in TIME_WAIT per round (60 s each) towards what it dials, and "
            "connect() slows down as one destination's port space fills: with shared "
            "addresses a row would pay for the rows and rounds before it.",
            f"- Bulk: {sizes.bulk_bytes >> 20} MiB each way per row, as {CHUNKS} streams of "
            f"{sizes.bulk_bytes // CHUNKS >> 20} MiB taken by the rows in turn (each slice "
            "starting at the next row), so a slow phase of the shared CPUs hits every row "
            "alike. Relay CPU: the relay process's CPU clock (user + system, all threads; "
            "clock_getcpuclockid, ns resolution) around each stream, summed, divided by GiB "
            "moved.",
            f"- Latency: {sizes.latency_count} sequential connections per row, each connect + "
            "one 64-byte request/response, interleaved across rows (one connection per row in "
            "turn, each cycle in a new random order, seeded) so a slow phase of the shared "
            "CPUs hits every row alike and no row always follows the same one (a relay's "
            "teardown and spare dials after its connection land on the next connection: with "
            "a fixed order two identical tray-proxy rows measured 1.25x apart); added = row "
            "minus direct in the same round. The idle "
            "tunnels then run row after row, the other relays idle; then bulk and conn/s, "
            "interleaved.",
            f"- conn/s: {sizes.rate_total} connections (connect, one request/response, close) "
            f"per row by {sizes.rate_concurrency} concurrent asyncio (uvloop) workers, as "
            f"{CHUNKS} runs of {sizes.rate_total // CHUNKS} taken by the rows in turn; relay "
            "CPU per connection from the same clock around each run, summed.",
            f"- Idle: {sizes.idle_tunnels} tunnels opened (each proven by one request/response) "
            "and held; KiB per idle tunnel = relay VmRSS delta / tunnels; then "
            f"{sizes.idle_probes} sequential new connections measured with them open.",
            f"- Client namespace: net.ipv4.tcp_tw_reuse = {args.tw_reuse} (2 is the kernel "
            "default). RLIMIT_NOFILE raised to the hard limit for every process.",
            "- Targets (from the issue) are checked for `tray-proxy run` against redsocks "
            "`splice = on` of the same run; the rows without spares and on qasync are shown "
            "against the same limits for comparison only. `tray-proxy run` keeps its default "
            "spare connections to the proxy (`spare_connections = 16`: two dialed when a "
            "tunnel ends and no other connection is opening, as the sequential latency rows "
            "see; during a burst, as the conn/s row sees, each accept tops them up to the "
            "openings of the last second): its rows include them, the "
            "`spare_connections = 0` row shows the relay without them.",
            "",
            "## Notes from this run",
            "",
            *(notes or ["- none"]),
            "",
            "## Configs used",
            "",
            cfg,
            "",
        ]
    )


def _progress(n: int, rounds: int, row: Row, sample: Sample, t0: float) -> None:
    figures = {k: round(x, 3) for k, x in sample.values.items() if x is not None}
    print(
        f"bench: round {n + 1}/{rounds} {row.key} ({time.monotonic() - t0:.1f}s): "
        + json.dumps(figures)
        + "".join(f"\n  note: {note}" for note in sample.notes),
        file=sys.stderr,
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round (< 3 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"markdown file (default {DOC}; '-' for none)"
    )
    parser.add_argument(
        "--rows", default=",".join(r.key for r in ROWS), help="comma-separated subset of rows"
    )
    parser.add_argument(
        "--tw-reuse",
        type=int,
        choices=[0, 1, 2],
        default=2,
        help="net.ipv4.tcp_tw_reuse in the client namespace (default 2, the kernel's own)",
    )
    parser.add_argument(
        "--fail-on-miss",
        action="store_true",
        help="exit 1 when tray-proxy run misses a target (off by default: shared CPUs are noisy)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if not 1 <= args.rounds <= 9:
        parser.error("--rounds must be 1 to 9")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    rows = begin("bench", ROWS, args.rows, "(network namespaces, nftables); run as root")
    if rows is None:
        return 2
    load = [os.getloadavg()]
    started = time.monotonic()
    budget = 120.0 if args.quick else 300.0
    rounds: list[dict[str, Sample]] = []
    try:
        with Lab(squid=False, dante=False) as lab:
            # The lab's HTTPS origin holds :443; the benchmark's plain-TCP origin takes it.
            lab.origins.stop()
            lab.client.run(["sysctl", "-qw", f"net.ipv4.tcp_tw_reuse={args.tw_reuse}"])
            keep_conntrack_small(lab)
            squid = lab.new_squid(auth="basic", extra_config=SQUID_EXTRA, name="bench-squid")
            squid.extra_config += squid_slot_ports(squid.host, args.rounds)
            with squid.start(), bench_origin(lab):
                bench = Bench(lab, squid, sizes, budget)
                for n in range(args.rounds):
                    # Rotate the order so no row always runs first (warm caches, noise).
                    order = rows[n % len(rows) :] + rows[: n % len(rows)]
                    report = functools.partial(_progress, n, args.rounds)
                    rounds.append(bench.run_round(order, report, n))
                configs = bench.configs
    except LabError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    summary = summarize(rounds)
    elapsed = time.monotonic() - started
    load.append(os.getloadavg())
    doc = render_doc(args, sizes, summary, rounds, configs, elapsed, load)
    targets, all_pass = check_targets(summary)
    cost, cost_pass = cost_table(summary)
    print(results_table(summary))
    print()
    print(ratios_table(summary))
    print()
    print(targets)
    if cost:
        print()
        print(cost)
        all_pass = all_pass and cost_pass
    output = DOC if args.output is None else args.output
    if str(output) != "-":
        output.write_text(doc + kept_section(output))
        print(f"\nbench: written to {output}", file=sys.stderr)
    return 1 if args.fail_on_miss and not all_pass else 0


# Seconds conntrack keeps a closed connection's entry in the lab's namespaces (the kernel's
# default is 120). See keep_conntrack_small.
CONNTRACK_TIME_WAIT = 5


def keep_conntrack_small(lab: Lab) -> None:
    """Conntrack keeps each closed connection's entry for its TIME_WAIT, 120 s by default. A
    round makes about 120,000 entries in the client namespace (each relayed connection is
    two: client to relay, relay to Squid), and nf_conntrack_max (262,144 here) is a limit per
    namespace. In the third round of a full run the table was full and the kernel dropped
    new connections ("nf_conntrack: table full ... dropping packet" in dmesg): rows lost up to
    a whole slice of connections. The lab's own namespaces keep the entries
    CONNTRACK_TIME_WAIT seconds; the host's settings are not touched."""
    subprocess.run(["modprobe", "nf_conntrack"], check=False, capture_output=True)
    for ns in lab.namespaces:
        ns.run(
            [
                "sysctl",
                "-qw",
                f"net.netfilter.nf_conntrack_tcp_timeout_time_wait={CONNTRACK_TIME_WAIT}",
            ]
        )


def kept_section(path: Path) -> str:
    """bench/rtt.py's and bench/dashboard.py's sections of the file being replaced, to go on
    at its end."""
    kept = ""
    with contextlib.suppress(OSError):
        text = path.read_text()
        for first, last in ((RTT_SECTION_BEGIN, RTT_SECTION_END), (SECTION_BEGIN, SECTION_END)):
            begin, end = text.find(first), text.find(last)
            if 0 <= begin < end:
                kept += "\n" + text[begin : end + len(last)] + "\n"
    return kept


if __name__ == "__main__":
    sys.exit(main())
