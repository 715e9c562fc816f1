"""Makes `tests` a package so the lab is importable as `tests.lab` by tests and bench scripts."""
