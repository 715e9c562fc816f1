"""The GUI app's added latency per connection, against `tray-proxy run` side by side.

`tray-proxy run` shares one loop between relay and controller; the app runs its relay on a
thread of its own, with the controller and the window on the Qt (qasync) loop in the main
thread, and the two threads share one GIL. This measures what that costs a connection:
sequential connections, interleaved one per row in turn (bench/loadgen.py `mix`), through

- `app`: bench/dashboard_app.py (the app's composition: history and attribution on, the
  window shown or hidden with --window);
- `app-si05`: the same with sys.setswitchinterval(0.0005) (a thread waiting for the GIL
  asks for it after 0.5 ms, not 5 ms);
- `run`: `tray-proxy run` with the history off (bench/run.py's `tray-run` row);

and `direct` for the added figures. Each round starts fresh relays on fresh addresses.
Usage, as root from the repository root:

    .venv/bin/python -m bench.app_latency [--rounds 3] [--count 2000] [--window hide|show]

Prints one line a round and the medians. Every process, namespace and nft table is removed
on the way out (the lab's own cleanup).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from bench.dashboard import DashboardApp
from bench.relays import Relay
from bench.run import (
    ORIGIN_PORT,
    QUICK,
    ROW_SQUID_PORT,
    SQUID_EXTRA,
    Bench,
    bench_origin,
)
from tests.lab import Lab
from tests.lab.netns import Redirect

ROWS = ("app", "app-si05", "run")
SWITCH_INTERVALS = {"app": None, "app-si05": 0.0005}


def run(rounds: int, count: int, window: str) -> dict[str, dict[str, list[float]]]:
    added: dict[str, list[float]] = {key: [] for key in ROWS}
    p99: dict[str, list[float]] = {key: [] for key in ROWS}
    with Lab(squid=False, dante=False) as lab:
        lab.origins.stop()
        squid = lab.new_squid(auth="basic", extra_config=SQUID_EXTRA, name="app-lat-squid")
        squid.extra_config += "".join(
            f"\nhttp_port {squid.host}:{ROW_SQUID_PORT + n}" for n in range(rounds)
        )
        with squid.start(), bench_origin(lab):
            bench = Bench(lab, squid, QUICK, budget=600.0)
            for n in range(rounds):
                with contextlib.ExitStack() as stack:
                    relays: dict[str, Relay] = {}
                    for key, interval in SWITCH_INTERVALS.items():
                        app = DashboardApp.in_lab(
                            lab,
                            bench,
                            squid,
                            view="active",
                            display=None,
                            switch_interval=interval,
                        )
                        stack.enter_context(app)
                        app.tell(window)
                        relays[key] = app
                    relays["run"] = stack.enter_context(
                        bench.make_relay("tray-run", ROW_SQUID_PORT + n)
                    )
                    targets = {
                        key: bench.slot_address(n * (len(ROWS) + 1) + i)
                        for i, key in enumerate((*ROWS, "direct"))
                    }
                    routes = {targets[key]: relays[key].port for key in ROWS}
                    redirect = Redirect(lab.client, bench.redirect_ruleset(routes))
                    stack.enter_context(redirect.apply())
                    time.sleep(1.0)  # the relays' spare connections are up
                    extra = ["--count", str(count)]
                    for key in ("direct", *ROWS):
                        extra += ["--row", f"{key}={targets[key]}:{ORIGIN_PORT}"]
                    rows = bench.loadgen.run("mix", False, *extra)["rows"]
                    direct = float(rows["direct"]["p50_us"])
                    line = f"round {n + 1}/{rounds}: direct {direct:.0f} µs"
                    for key in ROWS:
                        added[key].append(float(rows[key]["p50_us"]) - direct)
                        p99[key].append(float(rows[key]["p99_us"]))
                        line += f"; {key} +{added[key][-1]:.0f} (p99 {p99[key][-1]:.0f})"
                    print(line, flush=True)
    return {"added_p50": added, "p99": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000, help="connections a row and round")
    parser.add_argument("--window", choices=("hide", "show"), default="hide")
    args = parser.parse_args()
    result = run(args.rounds, args.count, args.window)
    run_p50 = statistics.median(result["added_p50"]["run"])
    print(f"window {args.window}, {args.rounds} rounds x {args.count} connections a row")
    print(f"{'row':<10} {'added p50':>10} {'vs run':>7} {'p99':>9}")
    for key in ROWS:
        p50 = statistics.median(result["added_p50"][key])
        p99 = statistics.median(result["p99"][key])
        print(f"{key:<10} {p50:8.0f} µs {p50 / run_p50:6.2f}x {p99:6.0f} µs")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
