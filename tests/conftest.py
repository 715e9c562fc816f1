"""Test-tree configuration: registers the real-proxy lab fixtures (tests/lab/fixtures.py).

Must not import tray_proxy.ui or PySide6 (UI fixtures belong in tests/ui/conftest.py).
"""

pytest_plugins = ["tests.lab.fixtures"]
