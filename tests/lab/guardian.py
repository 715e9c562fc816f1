"""Lab guardian: removes one lab's namespaces, processes, users and files when its creator dies.

Started by `Lab` in its own session with a pipe on stdin; it blocks reading it. When the pipe
reaches EOF (the lab closed normally, or the test process was killed, or pytest-timeout
called os._exit), it sweeps whatever of the lab is still there and exits. Squid and Dante
drop privileges, which clears the parent-death signal, so without this they would keep
running until the next session's stale cleanup.

Runs as a plain script with `python -I`: stdlib only. Must not import tray_proxy, pytest or
other lab modules.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def _netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, timeout=10)
    return [int(p) for p in out.stdout.split()]


def sweep(tag: str, tmp: str | None) -> list[str]:
    """Remove everything named after `tag` (tplab<pid>-<hex>); returns what was removed."""
    removed = []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    names = [line.split()[0] for line in listed.stdout.decode().splitlines() if line.strip()]
    mine = [n for n in names if n.startswith(tag + "-")]
    for name in mine:
        for pid in _netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_netns_pids(n) for n in mine):
        time.sleep(0.05)
    for name in mine:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        removed.append(f"netns {name}")
    match = re.fullmatch(r"(?P<prefix>[a-z]+)(?P<pid>\d+)-(?P<hex>[0-9a-f]+)", tag)
    if match:
        user_prefix = f"{match['prefix']}{match['pid']}u{match['hex']}"
        for line in Path("/etc/passwd").read_text().splitlines():
            user = line.split(":", 1)[0]
            if user.startswith(user_prefix):
                subprocess.run(["userdel", "--force", user], capture_output=True, timeout=30)
                removed.append(f"user {user}")
    if tmp and Path(tmp).name.startswith(tag) and Path(tmp).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(f"dir {tmp}")
    return removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--tmp")
    args = parser.parse_args()
    # Ctrl-C in the terminal reaches the whole foreground group; the guardian must live on
    # until its pipe closes, so it ignores SIGINT/SIGHUP.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    removed = sweep(args.tag, args.tmp)
    with contextlib.suppress(OSError):  # nobody may be reading any more
        print("\n".join(f"guardian removed {item}" for item in removed), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
