"""pytest fixtures over the lab: a session-wide `lab` and a function-scoped `squid_factory`.

Registered for the whole test tree by tests/conftest.py. A missing prerequisite fails the
test with the Debian package to install; nothing is skipped.

Must not import tray_proxy or PySide6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.lab.environment import Lab
from tests.lab.netns import LabError, LabPrerequisiteError
from tests.lab.squid import SquidProxy


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The shared lab: client/proxy/origin namespaces, origins, Squid (basic auth), Dante.

    Its Squid access log and origin event log accumulate over the session: match entries
    by something unique to the test (a `seed`, a path) rather than counting them.
    """
    built = Lab()
    try:
        built.__enter__()
    except LabPrerequisiteError as exc:
        pytest.fail(str(exc), pytrace=False)
    except LabError as exc:
        pytest.fail(f"the real-proxy lab could not be built: {exc}", pytrace=False)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def squid_factory(lab: Lab) -> Iterator[Callable[..., SquidProxy]]:
    """Start extra Squid instances for one test: `squid_factory(port=443, auth="none")`.

    Keyword arguments are those of `Lab.new_squid`. Each instance is stopped and its
    directory removed when the test ends, pass or fail.
    """
    with contextlib.ExitStack() as stack:

        def make(**kwargs: Any) -> SquidProxy:
            squid = lab.new_squid(**kwargs)
            if not lab.keep_files:
                stack.callback(squid.remove_files)
            stack.callback(squid.stop)
            try:
                return squid.start()
            except LabError as exc:
                pytest.fail(f"extra Squid could not start: {exc}", pytrace=False)

        yield make
