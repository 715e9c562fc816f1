"""The redirect: pure nftables rendering, the root helper, and the client that starts it.

Must not import PySide6 or tray_proxy.relay.
"""
