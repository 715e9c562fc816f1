"""Regression guard for shared/BENCHMARKS.md lesson 1.

PySide6 6.12.0 on Python 3.11 drops one reference too many in QObject.killTimer() and
SignalInstance.disconnect(), which qasync calls per callback and per socket-notifier
change: after a few hundred thousand of them the interpreter aborts ("Fatal Python error:
none_dealloc"). The loop runs in a child process so that such an abort fails this test
with its output instead of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CALLBACKS = 300_000
NOTIFIER_CYCLES = 20_000
TIMERS = 20_000

CHILD = textwrap.dedent(
    """
    import asyncio, socket, sys
    from PySide6.QtWidgets import QApplication
    import qasync

    CALLBACKS, NOTIFIER_CYCLES, TIMERS = map(int, sys.argv[1:4])

    async def main():
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        counts = {"cb": 0, "rd": 0, "tm": 0}

        # Plain callbacks: each is a qasync timer started and killed.
        def callback(i):
            counts["cb"] += 1
            if i + 1 < CALLBACKS:
                loop.call_soon(callback, i + 1)
            else:
                done.set()
        loop.call_soon(callback, 0)
        await asyncio.wait_for(done.wait(), 600)

        # Socket-notifier changes: add_reader / remove_reader on a live socket pair.
        a, b = socket.socketpair()
        a.setblocking(False); b.setblocking(False)
        for _ in range(NOTIFIER_CYCLES):
            got = loop.create_future()
            def on_readable():
                a.recv(16)
                counts["rd"] += 1
                loop.remove_reader(a.fileno())
                got.set_result(None)
            loop.add_reader(a.fileno(), on_readable)
            b.send(b"x")
            await got
        a.close(); b.close()

        # Timers with a delay, some cancelled before they fire.
        fired = loop.create_future()
        def tick():
            counts["tm"] += 1
            if counts["tm"] == TIMERS // 2 and not fired.done():
                fired.set_result(None)
        for i in range(TIMERS):
            h = loop.call_later(0.001, tick)
            if i % 2:
                h.cancel()
        await asyncio.wait_for(fired, 120)
        print("counts", counts["cb"], counts["rd"], counts["tm"], flush=True)

    app = QApplication([])
    qasync.run(main())
    """
)


def test_qasync_survives_hundreds_of_thousands_of_callbacks() -> None:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(CALLBACKS), str(NOTIFIER_CYCLES), str(TIMERS)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, (
        f"qasync loop died with exit status {proc.returncode} "
        f"(a crash here means the PySide6 pin is wrong, see BENCHMARKS.md lesson 1)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    assert f"counts {CALLBACKS} {NOTIFIER_CYCLES} {TIMERS // 2}" in proc.stdout
