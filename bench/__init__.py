"""Side-by-side benchmark of tray-proxy against direct, Squid only and redsocks, in the lab.

Entry point: `python -m bench.run [--quick] [--rounds N]` (as root, from the repository root).
Must not import PySide6 (only the qasync relay script, run as its own process, does).
"""
