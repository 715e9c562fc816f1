"""The relay engine: accepts redirected TCP connections and tunnels them through an upstream.

Must not import PySide6 (the same engine runs headless and inside the GUI).
"""
