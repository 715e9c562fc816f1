"""The dashboard under load: is the UI still answering, is memory bounded, and what does the
open window cost the relay? Usage, as root from the repository root:

    .venv/bin/python -m bench.dashboard [--seconds 60] [--per-second 1000] [--view closed]
                                        [--display offscreen|xvfb] [--output FILE|-]

In the lab (tests/lab: client, proxy and origin namespaces, Squid with Basic auth, the
plain-TCP origin of bench/origin.py), bench/dashboard_app.py runs the GUI app's composition
(real controller, relay on its own thread, history and attribution on, the main window on
the Connections tab) in the client namespace, whose nft table sends tcp/443 to its relay.
Then:

1. the control socket's answer time at rest (the `status` command, every 20 ms for 3 s);
2. `--per-second` new connections a second for `--seconds` (bench/loadgen.py `paced`, over
   four origin addresses) while the driver asks the control socket for `status` every 20 ms
   from outside the app, and the app's own 16 ms precise timer notes how late each tick
   comes; the app's RSS before and after. Beside the app, in 1 and 2, the same question
   goes to a reference process that does nothing but answer it: what the machine itself
   adds to an answer under this load;
3. the relay's conn/s (bench/loadgen.py `rate`: 2,000 connections, 200 concurrent) with the
   window shown and hidden, in turns.

Targets (issue 13, shared/BENCHMARKS.md): the UI loop answers within 20 ms at p99 and never
later than 50 ms, RSS after the load within 50 MiB of before, conn/s with the window open
within 5 % of closed. Prints a table and writes it into docs/benchmarks.md (its own section,
which bench/run.py keeps). Every process, namespace and nft table is removed in `finally`.

Must not import PySide6 (the app side is bench/dashboard_app.py, its own process).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.relays import TrayProxyRunMonitored, proc_rss_kib
from bench.run import (
    DOC,
    ORIGIN_PORT,
    QUICK,
    ROOT,
    SECTION_BEGIN,
    SECTION_END,
    SQUID_EXTRA,
    Bench,
    _readline,
    bench_origin,
    raise_nofile,
)
from tests.lab import Lab, LabError
from tests.lab.netns import Namespace, NsProcess, Redirect
from tests.lab.squid import SquidProxy

APP = ROOT / "bench" / "dashboard_app.py"
PING_EVERY = 0.02  # seconds between two `status` questions from outside
REST_SECONDS = 3.0
ORIGIN_ADDRESSES = 4  # the paced load's 4-tuples spread over this many origin addresses
RATE_COUNT = 2000
RATE_CONCURRENCY = 200
P99_LIMIT_MS, MAX_LIMIT_MS, RSS_LIMIT_MIB, CONN_S_LIMIT = 20.0, 50.0, 50.0, 0.95


class DashboardApp(TrayProxyRunMonitored):
    """bench/dashboard_app.py in the client namespace, with the config and password of the
    `tray-proxy run` rows and the history on; spoken to on stdin/stdout."""

    label = "dashboard app"
    key = "dashboard"

    def __init__(
        self,
        *args: Any,
        view: str,
        display: str | None,
        profile: Path | None = None,
        switch_interval: float | None = None,
    ) -> None:
        super().__init__(*args)
        self.switch_interval = switch_interval
        self.profile = profile
        self.view = view
        self.display = display
        self.runtime = self.workdir / f"{self.key}-{self.port}-run"
        self.runtime.mkdir(mode=0o700)
        self.ready: dict[str, Any] = {}

    @classmethod
    def in_lab(cls, lab: Lab, bench: Bench, squid: SquidProxy, **options: Any) -> DashboardApp:
        """The app in the lab's client namespace, on a fresh port, with `squid` (and its
        credentials) as its proxy; `options`: view, display, profile, switch_interval."""
        creds = squid.credentials
        assert creds is not None
        return cls(
            lab.client,
            bench.workdir,
            bench.fresh_port(),
            (squid.host, squid.port),
            creds.username,
            creds.password_file,
            **options,
        )

    def argv(self) -> list[str]:
        argv = [sys.executable, str(APP), "--config", str(self.config_path), "--view", self.view]
        if self.switch_interval is not None:
            argv += ["--switch-interval", str(self.switch_interval)]
        return argv + (["--profile", str(self.profile)] if self.profile is not None else [])

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = str(ROOT)
        env["XDG_RUNTIME_DIR"] = str(self.runtime)
        if self.display is None:
            env["QT_QPA_PLATFORM"] = "offscreen"
        else:
            env["QT_QPA_PLATFORM"] = "xcb"
            env["DISPLAY"] = self.display
        return env

    def start(self, timeout: float = 60.0) -> DashboardApp:
        with self.log_path.open("wb") as log:
            self.process = self.ns.popen(
                self.argv(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env(),
            )
        try:
            self.ready = self.expect("ready", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def expect(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        """The next line the app prints, which must be `event`."""
        assert self.process is not None
        line = _readline(self.process, timeout)
        try:
            answer: dict[str, Any] = json.loads(line) if line.startswith("{") else {}
        except json.JSONDecodeError:
            answer = {}
        if answer.get("event") != event:
            said = answer.get("message") or line.strip() or "nothing (it exited or hung)"
            raise LabError(
                f"the dashboard app said {said!r} where {event!r} was due; its log:\n"
                + self.log_path.read_text(errors="replace")[-3000:]
            )
        return answer

    def tell(self, command: str) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return self.expect("report" if command == "report" else "done")

    def stop(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)  # the app's own shutdown order: relay drained, history written
        super().stop()


@dataclass
class Pinger:
    """Asks the app's control socket for `status` every PING_EVERY seconds from a thread of
    this process: the UI loop's answer time, seen from outside the UI thread."""

    socket: Path
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def running(self, limit_seconds: float) -> Iterator[Pinger]:
        from tray_proxy.instance import ControlError, send_command

        stop = threading.Event()

        def loop() -> None:
            deadline = time.monotonic() + limit_seconds
            while not stop.is_set() and time.monotonic() < deadline:
                began = time.perf_counter()
                try:
                    send_command("status", self.socket, timeout=5.0)
                    self.samples.append(time.perf_counter() - began)
                except ControlError as exc:
                    self.errors.append(str(exc))
                stop.wait(max(0.0, PING_EVERY - (time.perf_counter() - began)))

        thread = threading.Thread(target=loop, name="control-socket pinger", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(10)

    def figures(self) -> dict[str, float | int | None]:
        if not self.samples:
            return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        ordered = sorted(self.samples)
        return {
            "count": len(ordered),
            "p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
            "max_ms": ordered[-1] * 1000,
        }


def thread_cpu(pid: int, threads: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each named thread of `pid` has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, tid in threads.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# The reference beside the app's control socket: a process that does nothing but answer, one
# blocking accept/recv/send per question (the same client, the same socket kind, an answer of
# the size of the app's status). What it takes under the load is the machine's own share of
# the app's figure (waking a process on two busy CPUs), not the app's UI loop.
_REFERENCE_SERVER = r"""
import json, os, socket, sys, time
path, limit = sys.argv[1], float(sys.argv[2])
answer = json.dumps({"ok": True, "status": {"pad": "x" * 1500}}).encode() + b"\n"
deadline = time.monotonic() + limit
with socket.socket(socket.AF_UNIX) as server:
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(8)
    server.settimeout(1.0)
    print("ready", flush=True)
    while time.monotonic() < deadline:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5.0)
            request = b""
            while b"\n" not in request and len(request) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            conn.sendall(answer)
"""


@contextlib.contextmanager
def reference_answerer(workdir: Path, limit_seconds: float) -> Iterator[Path]:
    """The reference process (`_REFERENCE_SERVER`) on a socket in `workdir`; yields its path."""
    path = workdir / "reference.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _REFERENCE_SERVER, str(path), str(limit_seconds)],
        stdout=subprocess.PIPE,
    )
    try:
        if _readline(proc, 10).strip() != "ready":
            raise LabError("the reference answerer did not start")
        yield path
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def xvfb(ns: Namespace, workdir: Path) -> Iterator[str]:
    """An Xvfb server in `ns` (its abstract socket lives in the namespace); yields DISPLAY."""
    number = 90 + os.getpid() % 100
    log = (workdir / "xvfb.log").open("wb")
    proc: NsProcess = ns.popen(
        ["Xvfb", f":{number}", "-nolisten", "tcp", "-screen", "0", "1280x1024x24"],
        stdout=log,
        stderr=log,
    )
    try:
        socket_file = Path(f"/tmp/.X11-unix/X{number}")
        deadline = time.monotonic() + 10
        while not socket_file.exists() and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"Xvfb exited: {(workdir / 'xvfb.log').read_text()[-1000:]}")
            time.sleep(0.05)
        if not socket_file.exists():
            raise LabError("Xvfb did not start within 10 s")
        yield f":{number}"
    finally:
        proc.stop(grace=3.0)
        ns.forget(proc)
        log.close()


def _fmt(x: float | int | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def _kinds(kinds: dict[str, int]) -> str:
    """` (ConnectionResetError 3, TimeoutError 1)`, or nothing when none failed."""
    if not kinds:
        return ""
    return " (" + ", ".join(f"{name} {n:,}" for name, n in sorted(kinds.items())) + ")"


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("PASS" if ok else "MISS")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with Lab(squid=False, dante=False) as lab:
        # The lab's HTTPS origin holds :443; the benchmark's plain-TCP origin takes it.
        lab.origins.stop()
        # 60,000 connections in a minute through one relay: every hop (client, relay, Squid)
        # dials the next one often enough that TIME_WAIT would exhaust the default ports.
        for ns in (lab.client, lab.proxy):
            ns.run(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
            ns.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 60999"])
        squid = lab.new_squid(auth="basic", extra_config=SQUID_EXTRA, name="dash-squid")
        with contextlib.ExitStack() as stack:
            stack.enter_context(squid.start())
            stack.enter_context(bench_origin(lab))
            bench = Bench(lab, squid, QUICK, budget=args.seconds + 60)
            display = None
            if args.display == "xvfb":
                display = stack.enter_context(xvfb(lab.client, bench.workdir))
            app = DashboardApp.in_lab(
                lab,
                bench,
                squid,
                view=args.view,
                display=display,
                profile=args.profile,
                switch_interval=args.switch_interval,
            )
            stack.enter_context(app)
            targets = [bench.slot_address(i) for i in range(ORIGIN_ADDRESSES)]
            redirect = Redirect(
                lab.client, bench.redirect_ruleset(dict.fromkeys(targets, app.port))
            )
            stack.enter_context(redirect.apply())
            dials = [f"{t}:{ORIGIN_PORT}" for t in targets]
            pid = int(app.ready["pid"])

            def rate(target: str) -> dict[str, Any]:
                return bench.loadgen.run(
                    "rate", False, "--count", str(RATE_COUNT),
                    "--concurrency", str(RATE_CONCURRENCY), target=target,
                )  # fmt: skip

            say("warming up")
            rate(dials[0])
            limit = REST_SECONDS + args.seconds + 600  # the reference's own bound
            reference = stack.enter_context(reference_answerer(bench.workdir, limit))
            say("the control socket at rest")
            rest = Pinger(Path(app.ready["socket"]))
            rest_reference = Pinger(reference)
            app.tell("reset")
            with rest.running(REST_SECONDS + 5), rest_reference.running(REST_SECONDS + 5):
                time.sleep(REST_SECONDS)
            result["rest"] = {
                "socket": rest.figures(),
                "reference": rest_reference.figures(),
                "probe": app.tell("report")["probe"],
            }

            say(f"{args.per_second:g} new connections a second for {args.seconds:g} s")
            result["rss_before_kib"] = proc_rss_kib(pid)
            threads = app.tell("report")["threads"]
            cpu_before = thread_cpu(pid, threads)
            loadavg_before = os.getloadavg()[0]
            app.tell("reset")
            if args.profile is not None:
                app.tell("profile")  # the load phase only
            load = Pinger(Path(app.ready["socket"]))
            load_reference = Pinger(reference)
            extra = ["--per-second", str(args.per_second), "--seconds", str(args.seconds)]
            extra += ["--concurrency", "1000"]
            for dial in dials[1:]:
                extra += ["--target", dial]
            with load.running(args.seconds + 60), load_reference.running(args.seconds + 60):
                paced = bench.loadgen.run("paced", False, *extra, target=dials[0])
            report = app.tell("report")
            cpu_after = thread_cpu(pid, threads)
            result["thread_cpu"] = {
                name: (cpu_after[name] - cpu_before[name]) / float(paced["seconds"])
                for name in cpu_after
                if name in cpu_before
            }
            result["rss_after_kib"] = proc_rss_kib(pid)
            result["rss_peak_kib"] = rss_peak_kib(pid)
            result["load"] = {"socket": load.figures(), "probe": report["probe"], "paced": paced}
            result["load"]["gc"] = report.get("gc", {})
            result["load"]["loadavg"] = (loadavg_before, os.getloadavg()[0])
            result["load"]["socket_errors"] = len(load.errors)
            result["load"]["reference"] = load_reference.figures()
            result["tables"] = {k: report[k] for k in ("active_rows", "closed_rows", "state")}

            say(f"conn/s with the window shown and hidden, {args.bursts} turns each")
            conn_s: dict[str, list[float]] = {"shown": [], "hidden": []}
            for turn in range(args.bursts):
                order = ["shown", "hidden"] if turn % 2 == 0 else ["hidden", "shown"]
                for state in order:
                    app.tell("show" if state == "shown" else "hide")
                    got = rate(dials[(turn * 2 + len(conn_s[state])) % len(dials)])
                    conn_s[state].append(float(got["conn_s"]))
            result["conn_s"] = conn_s
            app.stop()
            counts = app.history_counts()
            result["history"] = None if counts is None else {"rows": counts[0], "named": counts[1]}
    return result


def say(text: str) -> None:
    print(f"bench.dashboard: {text}", file=sys.stderr, flush=True)


def render(args: argparse.Namespace, result: dict[str, Any], elapsed: float) -> str:
    load, rest = result["load"], result["rest"]
    sock, probe = load["socket"], load["probe"]
    mib = 1024
    growth = (result["rss_after_kib"] - result["rss_before_kib"]) / mib
    shown = statistics.median(result["conn_s"]["shown"])
    hidden = statistics.median(result["conn_s"]["hidden"])
    ratio = shown / hidden if hidden else None

    def within(x: float | None, limit: float) -> bool | None:
        return None if x is None else x <= limit

    paced = load["paced"]
    ref, rest_ref = load["reference"], rest["reference"]
    history = result.get("history")
    rows = [
        "| figure | at rest | under load | target | verdict |",
        "|---|---|---|---|---|",
        f"| control socket `status` answer, p50 / p99 / max (ms) "
        f"| {_fmt(rest['socket']['p50_ms'])} / {_fmt(rest['socket']['p99_ms'])} / "
        f"{_fmt(rest['socket']['max_ms'])} "
        f"| {_fmt(sock['p50_ms'])} / {_fmt(sock['p99_ms'])} / {_fmt(sock['max_ms'])} "
        f"| p99 ≤ {P99_LIMIT_MS:g}, max ≤ {MAX_LIMIT_MS:g} "
        f"| {verdict(within(sock['p99_ms'], P99_LIMIT_MS))} / "
        f"{verdict(within(sock['max_ms'], MAX_LIMIT_MS))} |",
        f"| the same question to a process that only answers, beside it (reference) "
        f"| {_fmt(rest_ref['p50_ms'])} / {_fmt(rest_ref['p99_ms'])} / "
        f"{_fmt(rest_ref['max_ms'])} "
        f"| {_fmt(ref['p50_ms'])} / {_fmt(ref['p99_ms'])} / {_fmt(ref['max_ms'])} | – | – |",
        f"| 16 ms timer lateness inside the app, p50 / p99 / max (ms) "
        f"| {_fmt(rest['probe']['p50_ms'])} / {_fmt(rest['probe']['p99_ms'])} / "
        f"{_fmt(rest['probe']['max_ms'])} "
        f"| {_fmt(probe['p50_ms'])} / {_fmt(probe['p99_ms'])} / {_fmt(probe['max_ms'])} "
        f"| p99 ≤ {P99_LIMIT_MS:g}, max ≤ {MAX_LIMIT_MS:g} "
        f"| {verdict(within(probe['p99_ms'], P99_LIMIT_MS))} / "
        f"{verdict(within(probe['max_ms'], MAX_LIMIT_MS))} |",
        f"| app RSS (MiB) | {_fmt(result['rss_before_kib'] / mib)} "
        f"| {_fmt(result['rss_after_kib'] / mib)} (peak {_fmt(result['rss_peak_kib'] / mib)}, "
        f"{growth:+.1f}) | growth ≤ {RSS_LIMIT_MIB:g} MiB "
        f"| {verdict(growth <= RSS_LIMIT_MIB)} |",
        f"| relay conn/s ({RATE_COUNT:,} at {RATE_CONCURRENCY} concurrent), window hidden / "
        f"shown (median of {len(result['conn_s']['shown'])}) "
        f"| – | {hidden:,.0f} / {shown:,.0f} ({_fmt(ratio, '.2f')}×) "
        f"| ≥ {CONN_S_LIMIT:.2f}× | {verdict(None if ratio is None else ratio >= CONN_S_LIMIT)} |",
    ]
    facts = [
        f"- load: {paced['started']:,} connections started at {args.per_second:g}/s over "
        f"{args.seconds:g} s, {paced['done']:,} done ({paced['conn_s']:,.0f}/s achieved), "
        f"{paced['errors']:,} failed{_kinds(paced['error_kinds'])}, "
        f"{paced['late_starts']:,} started over 50 ms late; "
        f"connect + one request/response p50 {_fmt((paced['p50_us'] or 0) / 1000, '.2f')} ms, "
        f"p99 {_fmt((paced['p99_us'] or 0) / 1000, '.2f')} ms",
        f"- the Connections tab showed the {args.view} table; at the end it held "
        f"{result['tables']['active_rows']:,} active and {result['tables']['closed_rows']:,} "
        f"closed rows; control-socket errors under load: {load['socket_errors']}",
        "- history: "
        + (
            "no rows found"
            if history is None
            else f"{history['rows']:,} connections written, {history['named']:,} with their process"
        ),
        "- the app's threads under load, CPU share of one core: "
        + ", ".join(
            f"{name} {share:.0%}"
            for name, share in sorted(result["thread_cpu"].items(), key=lambda kv: -kv[1])
            if share >= 0.005
        ),
        "- garbage collections in the app under load (each holds the GIL): "
        + (
            ", ".join(
                f"generation {gen}: {g['count']:,}, longest {g['max_ms']:.1f} ms"
                for gen, g in load.get("gc", {}).items()
            )
            or "none"
        ),
        "- the machine's 1-minute load average before / after the load: "
        + " / ".join(f"{x:.1f}" for x in load.get("loadavg", ()))
        + f" ({os.cpu_count()} CPUs; other work on the machine slows the app and the load alike)",
        "- conn/s per turn, shown: "
        + ", ".join(f"{x:,.0f}" for x in result["conn_s"]["shown"])
        + "; hidden: "
        + ", ".join(f"{x:,.0f}" for x in result["conn_s"]["hidden"]),
    ]
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return "\n".join(
        [
            SECTION_BEGIN,
            "## The dashboard under load (bench/dashboard.py)",
            "",
            f"Generated by `.venv/bin/python -m bench.dashboard --seconds {args.seconds:g} "
            f"--per-second {args.per_second:g} --view {args.view} --display {args.display}"
            + (f" --bursts {args.bursts}" if args.bursts != 5 else "")
            + (
                f" --switch-interval {args.switch_interval:g}"
                if args.switch_interval is not None
                else ""
            )
            + "` "
            f"on {when} in {elapsed / 60:.1f} min ({os.cpu_count()} CPUs, kernel "
            f"{platform.release()}). The GUI app's composition (bench/dashboard_app.py: real "
            "controller, relay on its own thread, history and attribution on, the main window "
            "on the Connections tab) in the lab's client namespace behind its nft redirect; "
            "answer times are taken from outside the app (the control socket, every "
            f"{PING_EVERY * 1000:.0f} ms) and inside it (a 16 ms precise QTimer).",
            "",
            *rows,
            "",
            *facts,
            SECTION_END,
        ]
    )


def write_section(path: Path, section: str) -> None:
    """Put `section` into `path` in place of the previous one (or at the end)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION_BEGIN) + ".*?" + re.escape(SECTION_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dashboard", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    parser.add_argument("--per-second", type=float, default=1000.0, help="new conn/s (1000)")
    parser.add_argument("--view", choices=["closed", "active"], default="closed")
    parser.add_argument("--display", choices=["offscreen", "xvfb"], default="offscreen")
    # 5: with 3, single turns ranged 0.81-1.09x and the median still moved 0.92-1.04x.
    parser.add_argument("--bursts", type=int, default=5, help="conn/s turns per window state")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="the app's sys.setswitchinterval in seconds (an experiment; Python's default 0.005)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="JSON file: where each of the app's threads spent its time during the load",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help=f"markdown file (default {DOC}; '-' for none)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 180:
        parser.error("--seconds must be 1 to 180 (a run stays under 5 minutes)")
    if not 1 <= args.bursts <= 5:
        parser.error("--bursts must be 1 to 5")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.dashboard: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    missing = [
        name
        for name in ("tray_proxy/ui/main_window.py", "tray_proxy/ui/dashboard/connections.py")
        if not (ROOT / name).exists()
    ]
    if missing:
        print(f"bench.dashboard: the dashboard is not built yet ({', '.join(missing)})")
        return 2
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    try:
        result = run_bench(args)
    except LabError as exc:
        print(f"bench.dashboard: {exc}", file=sys.stderr)
        return 1
    section = render(args, result, time.monotonic() - started)
    print(section)
    output = DOC if args.output is None else args.output
    if str(output) != "-":
        write_section(output, section)
        print(f"\nbench.dashboard: written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
