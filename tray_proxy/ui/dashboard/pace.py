"""How often the Connections tab applies the rows it receives, and in what steps.

Each application costs the UI thread model work per row and, on screen, one repaint of the
table; and every call Qt makes into Python for it waits for the GIL the relay's thread
shares. At a few connections a second that is nothing and the tab follows each of the
bridge's flushes (10 a second). Under load (1,000 new connections a second) a flush's model
work took 3-14 ms and the table's repaint 15-35 ms: `FlushPace` then spaces applications so
that both stay a small share of the UI thread's time (one repaint per application), up to
`ceiling` apart, and comes back to every flush when they are cheap again. `chunks` cuts
one application into steps of at most `size` rows, so that no single step holds the UI
loop for long (the tab yields to the loop between steps).

Pure arithmetic on RowChanges: must not import Qt, keyring, socket or subprocess.
"""

from __future__ import annotations

from tray_proxy.monitor.rows import RowChanges

# Applying and repainting may take this share of the UI thread's time.
SHARE = 0.08
# Spacing below this is no spacing at all: the bridge's own flushes come 0.1 s apart, and a
# repaint of the table alone (about 15 ms) must not slow a table that changes little.
FLOOR = 0.2
# Never further apart than this: the table still moves a few times a second.
CEILING = 0.4
# Rows per step of one application (about 2 ms of model work here, 5-7 ms under load).
CHUNK_ROWS = 50


class FlushPace:
    """The wait before the next application, from what the last ones and the table's
    repaints cost (smoothed, so one slow application does not halve the table's rate on
    its own)."""

    def __init__(
        self,
        *,
        share: float = SHARE,
        floor: float = FLOOR,
        ceiling: float = CEILING,
        weight: float = 0.5,
    ) -> None:
        if not (0 < share <= 1 and 0 <= floor <= ceiling and 0 < weight <= 1):
            raise ValueError("share in (0, 1], 0 <= floor <= ceiling, weight in (0, 1]")
        self._share, self._floor, self._ceiling, self._weight = share, floor, ceiling, weight
        self._apply_cost = 0.0
        self._paint_cost = 0.0
        self._last = float("-inf")

    @property
    def cost(self) -> float:
        """The smoothed cost of one application and one repaint, in seconds."""
        return self._apply_cost + self._paint_cost

    @property
    def spacing(self) -> float:
        """Seconds from one application's start to the next one's (0: no spacing)."""
        spacing = self.cost / self._share
        return 0.0 if spacing <= self._floor else min(spacing, self._ceiling)

    def applied(self, started: float, cost: float) -> None:
        """An application started at `started` (monotonic seconds) and took `cost` s."""
        self._last = started
        self._apply_cost += self._weight * (max(0.0, cost) - self._apply_cost)

    def painted(self, cost: float) -> None:
        """The table shown took `cost` seconds to repaint."""
        self._paint_cost += self._weight * (max(0.0, cost) - self._paint_cost)

    def wait(self, now: float) -> float:
        """Seconds to wait from `now` before the next application (0: apply now)."""
        return max(0.0, self._last + self.spacing - now)


def chunks(changes: RowChanges, size: int = CHUNK_ROWS) -> list[RowChanges]:
    """`changes` as steps of at most `size` rows: closed, then opened, then updated rows (the
    order in which the tab applies one batch). Each row is in one step, so applying the steps
    in order is applying `changes`."""
    if size < 1:
        raise ValueError("size must be at least 1")
    rows = [*changes.closed, *changes.opened, *changes.updated]
    if len(rows) <= size:
        return [changes]
    closed, opened = len(changes.closed), len(changes.closed) + len(changes.opened)
    steps: list[RowChanges] = []
    for start in range(0, len(rows), size):
        end = min(start + size, len(rows))
        steps.append(
            RowChanges(
                closed=tuple(rows[start : min(end, closed)]),
                opened=tuple(rows[max(start, closed) : min(end, opened)]),
                updated=tuple(rows[max(start, opened) : end]),
            )
        )
    return steps
