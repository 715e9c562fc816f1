"""Tests of `tray-proxy doctor` (tray_proxy/doctor/)."""
