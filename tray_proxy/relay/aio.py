"""Small asyncio helpers shared by the engine's modules.

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """Await with a time limit; raises asyncio.TimeoutError.

    On 3.11+ `asyncio.timeout` costs a timer handle; `wait_for` (3.10) wraps the coroutine
    in a new Task, which is measurable per connection (docs/relay.md).
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10
