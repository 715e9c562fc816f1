"""tray-proxy: a transparent relay that carries every tool's HTTP(S) through the corporate proxy."""

__version__ = "0.1.0"
