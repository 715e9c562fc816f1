"""The relay engine on the qasync loop, in its own process: the "engine on qasync" bench row.

ARCHITECTURE.md ("The event loop") keeps the engine off the GUI's qasync loop because qasync
costs more per event; this script keeps that choice measured. It reads the same config file
as `tray-proxy run` (password from $CREDENTIALS_DIRECTORY/NAME), creates a QApplication
(QT_QPA_PLATFORM=offscreen), runs RelayEngine on qasync.QEventLoop, prints the same
"tray-proxy: relay listening on ..." line on stderr when ready, and stops on SIGTERM/SIGINT.

Run as a script (`python bench/qasync_relay.py --config FILE`). Imports PySide6, as only
bench/dashboard_app.py does besides it (each runs as its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    import qasync
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from tray_proxy.config import load_config
    from tray_proxy.relay.engine import RelayEngine
    from tray_proxy.relay.secrets import SystemdCredentialSource

    config = load_config(args.config)
    app = QApplication([sys.argv[0]])

    async def run() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int, frame: object) -> None:
            loop.call_soon_threadsafe(stop.set)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # Python runs signal handlers only when it gets control; Qt's loop may idle in C++.
        tick = QTimer()
        tick.timeout.connect(lambda: None)
        tick.start(200)
        engine = RelayEngine(config.relay, config.upstreams, SystemdCredentialSource())
        await engine.start()
        where = ", ".join(f"{h}:{p}" for h, p in engine.addresses)
        print(f"tray-proxy: relay listening on {where} (qasync)", file=sys.stderr, flush=True)
        await stop.wait()
        tick.stop()
        await engine.stop(drain_timeout=0)
        return 0

    with asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(app)) as runner:
        return runner.run(run())


if __name__ == "__main__":
    sys.exit(main())
