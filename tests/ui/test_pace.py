"""How often the Connections tab applies rows, and in what steps: FlushPace's spacing grows
with what applications and repaints cost and comes back when they are cheap; chunks cut a
batch into steps that keep every row once, in the tab's order."""

from __future__ import annotations

import pytest

from tray_proxy.monitor.rows import RowChanges
from tray_proxy.ui.dashboard.pace import FlushPace, chunks

from .conftest import closed, make_row


def test_cheap_applications_are_not_spaced() -> None:
    pace = FlushPace()
    for at in range(10):
        pace.applied(float(at), 0.002)
        pace.painted(0.008)
    assert pace.spacing == 0.0 and pace.wait(9.0) == 0.0


def test_costly_applications_are_spaced_then_come_back() -> None:
    pace = FlushPace(share=0.1, floor=0.2, ceiling=0.4)
    for at in range(6):  # 12 ms of model work and 18 ms of repaint: 30 ms per application
        pace.applied(float(at), 0.012)
        pace.painted(0.018)
    assert pace.spacing == pytest.approx(0.3, rel=0.05)
    assert pace.wait(5.1) == pytest.approx(0.2, rel=0.1) and pace.wait(5.4) == 0.0
    for _ in range(6):  # far costlier: never further apart than the ceiling
        pace.applied(6.0, 0.2)
    assert pace.spacing == 0.4
    for at in range(7, 20):  # cheap again: every flush applied again
        pace.applied(float(at), 0.001)
        pace.painted(0.005)
    assert pace.spacing == 0.0


def test_one_slow_application_does_not_space_on_its_own() -> None:
    pace = FlushPace(share=0.1, floor=0.2, ceiling=0.4, weight=0.5)
    for at in range(5):
        pace.applied(float(at), 0.002)
    pace.applied(5.0, 0.03)  # smoothed: 16 ms, under the floor's 20
    assert pace.spacing == 0.0


def test_pace_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        FlushPace(share=0)
    with pytest.raises(ValueError):
        FlushPace(floor=0.5, ceiling=0.1)


def test_chunks_keep_every_row_once_in_order() -> None:
    changes = RowChanges(
        opened=tuple(make_row(i) for i in range(100, 130)),
        updated=tuple(make_row(i) for i in range(200, 215)),
        closed=tuple(closed(make_row(i)) for i in range(0, 57)),
    )
    steps = chunks(changes, 20)
    assert [len(s.closed) + len(s.opened) + len(s.updated) for s in steps] == [20] * 5 + [2]
    assert [r.conn_id for s in steps for r in (*s.closed, *s.opened, *s.updated)] == [
        *range(0, 57),
        *range(100, 130),
        *range(200, 215),
    ]
    # A step that holds the last closed rows also holds the first opened ones.
    assert [r.conn_id for r in steps[2].closed] == list(range(40, 57))
    assert [r.conn_id for r in steps[2].opened] == [100, 101, 102]


def test_a_small_batch_is_one_step() -> None:
    changes = RowChanges(opened=(make_row(1),), closed=(closed(make_row(2)),))
    assert chunks(changes, 100) == [changes]
    assert chunks(RowChanges(), 100) == [RowChanges()]
    with pytest.raises(ValueError):
        chunks(changes, 0)
