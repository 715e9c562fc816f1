"""The live connection tables: incremental updates (no resets), the cap, filters, sorting,
and Qt's own model checks (pytest-qt's qtmodeltester)."""

from __future__ import annotations

from PySide6.QtCore import (
    QAbstractItemModel,
    QModelIndex,
    QModelRoleData,
    QPersistentModelIndex,
    Qt,
)
from pytestqt.modeltest import ModelTester
from pytestqt.qtbot import QtBot

from tray_proxy.monitor.rows import ProcessInfo, RowState
from tray_proxy.relay.records import CloseReason
from tray_proxy.ui.dashboard.tables import make_table
from tray_proxy.ui.models.columns import FAILED_BRUSH, RIGHT, ROW_ROLE, Column, details_text
from tray_proxy.ui.models.connections import ConnectionFilter, ConnectionTableModel

from .conftest import closed, make_row


class Signals:
    """Counts what a model told its views."""

    def __init__(self, model: ConnectionTableModel) -> None:
        self.inserted: list[tuple[int, int]] = []
        self.removed: list[tuple[int, int]] = []
        self.changed: list[tuple[int, int]] = []
        self.resets = 0
        model.rowsInserted.connect(lambda _p, a, b: self.inserted.append((a, b)))
        model.rowsRemoved.connect(lambda _p, a, b: self.removed.append((a, b)))
        model.dataChanged.connect(
            lambda tl, br, _roles=(): self.changed.append((tl.row(), br.row()))
        )
        model.modelReset.connect(lambda: setattr(self, "resets", self.resets + 1))
        model.layoutChanged.connect(lambda: setattr(self, "resets", self.resets + 1))


def ids(model: ConnectionTableModel) -> list[int]:
    return [row.conn_id for row in model.rows()]


def _exercise(model: ConnectionTableModel, proxy: ConnectionFilter) -> None:
    # The tester watches the model while it changes (its checks run on every signal).
    model.upsert([make_row(i) for i in range(4, 9)])  # past the cap: oldest go
    model.upsert([make_row(5, bytes_down=5)])
    model.remove([6, 8])
    proxy.set_text("example-7")
    proxy.set_text("")
    proxy.sort(Column.PROCESS, Qt.SortOrder.AscendingOrder)
    model.upsert([closed(make_row(7), CloseReason.UPSTREAM_RESET), make_row(9)])
    assert ids(model) == [4, 5, 7, 9]


def test_the_table_model_passes_qts_model_checks(qtmodeltester: ModelTester) -> None:
    # One tester per model: a ModelTester follows one model at a time.
    model = ConnectionTableModel(cap=5)
    model.upsert([make_row(i) for i in range(1, 4)])
    proxy = ConnectionFilter(model)
    qtmodeltester.check(model, force_py=True)
    _exercise(model, proxy)


def test_the_filter_proxy_passes_qts_model_checks(qtmodeltester: ModelTester) -> None:
    model = ConnectionTableModel(cap=5)
    model.upsert([make_row(i) for i in range(1, 4)])
    proxy = ConnectionFilter(model)
    proxy.sort(Column.DOWN, Qt.SortOrder.DescendingOrder)
    qtmodeltester.check(proxy, force_py=True)
    _exercise(model, proxy)


def test_new_rows_arrive_in_one_insert_and_changes_by_id(qtbot: object) -> None:
    model = ConnectionTableModel()
    seen = Signals(model)
    model.upsert([make_row(i) for i in range(1, 101)])
    assert seen.inserted == [(0, 99)]  # one batch, one insert
    model.upsert([make_row(10, bytes_up=1), make_row(11, bytes_up=2), make_row(50, bytes_up=3)])
    assert seen.changed == [(9, 10), (49, 49)]  # runs of adjacent rows
    assert model.row_at(10).bytes_up == 2
    assert seen.resets == 0


def test_many_scattered_changes_become_one_signal() -> None:
    model = ConnectionTableModel()
    model.upsert([make_row(i) for i in range(1, 201)])
    seen = Signals(model)
    model.upsert([make_row(i, bytes_up=7) for i in range(1, 201, 2)])  # 100 separate runs
    assert seen.changed == [(0, 198)]


def test_removed_rows_go_in_runs_and_the_id_map_follows() -> None:
    model = ConnectionTableModel()
    model.upsert([make_row(i) for i in range(1, 11)])
    seen = Signals(model)
    model.remove([2, 3, 7, 99])  # 99 is not there: ignored
    assert seen.removed == [(6, 6), (1, 2)]  # from the back, so positions stay valid
    assert ids(model) == [1, 4, 5, 6, 8, 9, 10]
    assert model.position_of(8) == 4 and model.position_of(2) is None
    model.upsert([make_row(8, bytes_up=1)])
    assert model.row_at(4).bytes_up == 1


def test_the_cap_drops_the_oldest_rows_in_one_removal() -> None:
    model = ConnectionTableModel(cap=100)
    model.upsert([make_row(i) for i in range(1, 101)])
    seen = Signals(model)
    model.upsert([make_row(i) for i in range(101, 131)])
    assert seen.inserted == [(100, 129)] and seen.removed == [(0, 29)]
    assert model.rowCount() == 100 and ids(model)[0] == 31
    # After the drop the id -> row map still finds rows (it shifted, not rebuilt).
    assert model.position_of(31) == 0 and model.position_of(130) == 99
    model.upsert([make_row(130, bytes_up=5)])
    assert seen.changed == [(99, 99)] and model.row_at(99).bytes_up == 5
    for _ in range(5):  # stays bounded under a steady stream
        start = ids(model)[-1] + 1
        model.upsert([make_row(i) for i in range(start, start + 70)])
    assert model.rowCount() == 100 and seen.resets == 0


def test_cells_show_the_rows_fields() -> None:
    model = ConnectionTableModel()
    row = closed(make_row(3, bytes_up=1500, bytes_down=2_500_000), CloseReason.UPSTREAM_RESET)
    model.upsert([row])

    def cell(column: Column, role: int = Qt.ItemDataRole.DisplayRole) -> object:
        return model.data(model.index(0, column), role)

    assert cell(Column.PROCESS) == "curl (1003)"
    assert cell(Column.DESTINATION) == "example-3.test:443"
    assert cell(Column.IP) == "192.0.2.4"
    assert cell(Column.UPSTREAM) == "corp"
    assert cell(Column.STATE) == "failed"
    assert cell(Column.UP) == "1.5 KB" and cell(Column.DOWN) == "2.5 MB"
    assert cell(Column.LATENCY) == "12 ms" and cell(Column.DURATION) == "2.0 s"
    assert cell(Column.OUTCOME) == row.words
    assert cell(Column.OUTCOME, Qt.ItemDataRole.ToolTipRole) == row.words
    assert cell(Column.TIME, ROW_ROLE) is row
    assert model.data(model.index(0, Column.OUTCOME, QModelIndex()), Qt.ItemDataRole.ForegroundRole)


def _roles(model: QAbstractItemModel, index: QModelIndex, *roles: int) -> list[object]:
    """What `model` answers through multiData, one role at a time."""
    answers = []
    for role in roles:
        item = QModelRoleData(role)
        model.multiData(index, item)
        answers.append(item.data())
    return answers


def test_cached_cell_texts_follow_the_rows_changes() -> None:
    model = ConnectionTableModel()
    proxy = ConnectionFilter(model)
    model.upsert([make_row(1, bytes_down=5)])
    display, alignment = int(Qt.ItemDataRole.DisplayRole), int(Qt.ItemDataRole.TextAlignmentRole)
    assert model.cells(0)[Column.DOWN] == "5 B"
    assert _roles(proxy, proxy.index(0, Column.DOWN), display, alignment) == [
        "5 B",
        RIGHT,
    ]
    model.upsert([make_row(1, bytes_down=2_500_000)])  # the same connection, changed
    assert model.data(model.index(0, Column.DOWN)) == "2.5 MB"
    assert _roles(proxy, proxy.index(0, Column.DOWN), display)[0] == "2.5 MB"
    model.upsert([closed(make_row(1), CloseReason.UPSTREAM_RESET)])
    foreground = int(Qt.ItemDataRole.ForegroundRole)
    state, brush = _roles(proxy, proxy.index(0, Column.STATE), display, foreground)
    assert state == "failed" and brush == FAILED_BRUSH
    assert _roles(model, model.index(0, Column.STATE), Qt.ItemDataRole.DecorationRole) == [None]
    model.remove([1])
    model.upsert([make_row(1, bytes_down=7)])  # an id seen before: no stale texts
    assert model.cells(0)[Column.DOWN] == "7 B"


def test_painting_a_table_calls_python_once_per_cell(qtbot: QtBot) -> None:
    # Each call from Qt into Python waits for the GIL the relay's thread may hold: a
    # painted cell must not cost a data() call per role.
    calls = {"data": 0}

    class Counting(ConnectionTableModel):
        def data(self, index: QModelIndex | QPersistentModelIndex, role: int = 0) -> object:
            calls["data"] += 1
            return super().data(index, role)

    model = Counting()
    model.upsert([closed(make_row(i)) for i in range(1, 40)])
    view = make_table(ConnectionFilter(model), "t")
    qtbot.addWidget(view)
    view.resize(800, 400)
    image = view.grab().toImage()
    assert not image.isNull() and calls["data"] == 0


def _filtered(proxy: ConnectionFilter) -> list[int]:
    return sorted(row.conn_id for row in proxy.visible_rows())


def test_filters_by_text_regex_state_proxy_process_and_failure() -> None:
    model = ConnectionTableModel()
    model.upsert(
        [
            make_row(1),
            make_row(2, host="api.github.com", upstream="backup"),
            closed(make_row(3), CloseReason.UPSTREAM_AUTH_FAILED),
            make_row(4, process=ProcessInfo(pid=9, name="firefox")),
            make_row(5, state=RowState.OPENING, upstream=None),
            closed(make_row(6)),
        ]
    )
    proxy = ConnectionFilter(model)
    assert _filtered(proxy) == [1, 2, 3, 4, 5, 6]
    assert proxy.set_text("GITHUB") == ""
    assert _filtered(proxy) == [2]
    assert proxy.set_text("192.0.2.5:443") == ""  # the IP and port, typed as shown
    assert _filtered(proxy) == [4]
    assert proxy.set_text(r"example-[13]\.test", regex=True) == ""
    assert _filtered(proxy) == [1, 3]
    assert proxy.set_text("upstream-auth", regex=False) == ""  # the close reason
    assert _filtered(proxy) == [3]
    error = proxy.set_text("example-[", regex=True)
    assert error.startswith("Not a regular expression") and _filtered(proxy) == [1, 2, 3, 4, 5, 6]
    proxy.set_text("")
    proxy.set_state(RowState.OPENING)
    assert _filtered(proxy) == [5]
    proxy.set_state(None)
    proxy.set_upstream("backup")
    assert _filtered(proxy) == [2]
    proxy.set_upstream(None)
    proxy.set_process("FIRE")
    assert _filtered(proxy) == [4]
    proxy.set_process("")
    proxy.set_failed_only(True)
    assert _filtered(proxy) == [3]
    # A row that changes is filtered again (dynamic filter).
    model.upsert([closed(make_row(1), CloseReason.UPSTREAM_TIMEOUT)])
    assert _filtered(proxy) == [1, 3]


def test_sorting_uses_values_not_text() -> None:
    model = ConnectionTableModel()
    # 900 B, 1.5 KB, 20 KB: as text "900 B" would sort after "20.0 KB".
    model.upsert(
        [make_row(1, bytes_down=1500), make_row(2, bytes_down=900), make_row(3, bytes_down=20_000)]
    )
    proxy = ConnectionFilter(model)
    proxy.sort(Column.DOWN, Qt.SortOrder.AscendingOrder)
    assert [r.conn_id for r in proxy.visible_rows()] == [2, 1, 3]
    proxy.sort(Column.TIME, Qt.SortOrder.DescendingOrder)
    assert [r.conn_id for r in proxy.visible_rows()] == [3, 2, 1]
    model.upsert([make_row(4)])  # new rows land in sorted place
    assert [r.conn_id for r in proxy.visible_rows()] == [4, 3, 2, 1]
    proxy.sort(Column.PROCESS, Qt.SortOrder.AscendingOrder)
    model.upsert([make_row(5, process=ProcessInfo(pid=1, name="apt"))])
    assert proxy.visible_rows()[0].conn_id == 5


def test_the_tables_are_read_only_and_keep_their_shape_in_qt(qtbot: QtBot) -> None:
    model = ConnectionTableModel(cap=3)
    model.upsert([make_row(i) for i in range(1, 6)])
    assert model.rowCount() == 3 and model.columnCount() == len(Column)
    assert ids(model) == [3, 4, 5] and model.data(model.index(0, Column.DESTINATION)) == (
        "example-3.test:443"
    )
    assert not model.index(3, 0).isValid() and not model.index(0, len(Column)).isValid()
    assert model.headerData(Column.UP, Qt.Orientation.Horizontal) == "Sent"
    view = make_table(ConnectionFilter(model), "t")
    qtbot.addWidget(view)
    view.show()
    view.resize(800, 300)
    cell = view.visualRect(view.model().index(0, Column.PROCESS)).center()
    qtbot.mouseDClick(view.viewport(), Qt.MouseButton.LeftButton, pos=cell)
    qtbot.keyClick(view, Qt.Key.Key_F2)
    # Qt's item-less model calls every cell editable: the views never open an editor.
    assert view.state() != view.State.EditingState


DIRECT_ROUTE = "direct (rule[0]: .corp.example -> direct)"
BLOCK_ROUTE = "block (rule[1]: *.ads.example -> block)"


def test_the_route_column_and_proxy_cells_of_direct_and_blocked_rows() -> None:
    # Issue 15: why a connection went DIRECT or was blocked shows in the tables.
    model = ConnectionTableModel()
    proxy = ConnectionFilter(model)
    rows = [
        make_row(1, upstream=None, route=DIRECT_ROUTE),
        closed(make_row(2, upstream=None, route=BLOCK_ROUTE), CloseReason.BLOCKED),
        make_row(3, route="proxy corp, backup (default)"),
        make_row(4, upstream=None),  # before routing (or rows from before routing existed)
    ]
    model.upsert(rows)
    assert model.headerData(Column.ROUTE, Qt.Orientation.Horizontal) == "Route"

    def cell(position: int, column: Column, role: int = Qt.ItemDataRole.DisplayRole) -> object:
        return model.data(model.index(position, column), role)

    assert [cell(i, Column.UPSTREAM) for i in range(4)] == ["direct", "block", "corp", "-"]
    assert [cell(i, Column.ROUTE) for i in range(4)] == [
        DIRECT_ROUTE,
        BLOCK_ROUTE,
        "proxy corp, backup (default)",
        "-",
    ]
    assert cell(1, Column.ROUTE, Qt.ItemDataRole.ToolTipRole) == BLOCK_ROUTE  # often cut off
    assert model.cells(1)[Column.ROUTE] == BLOCK_ROUTE  # what is painted
    # The text filter reads the decision too: a rule's number finds what it decided.
    proxy.set_text("rule[1]")
    assert [r.conn_id for r in proxy.visible_rows()] == [2]
    proxy.set_text("direct")
    assert [r.conn_id for r in proxy.visible_rows()] == [1]
    proxy.set_text("")
    proxy.sort(Column.ROUTE, Qt.SortOrder.AscendingOrder)
    assert [r.conn_id for r in proxy.visible_rows()] == [4, 2, 1, 3]  # "-", block, direct, proxy


def test_details_text_adds_the_route_under_the_proxy_aligned() -> None:
    row = closed(make_row(2, upstream=None, route=BLOCK_ROUTE), CloseReason.BLOCKED)
    lines = details_text(row).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Proxy:"))
    assert lines[at + 1].startswith("Route:") and lines[at + 1].endswith(f" {BLOCK_ROUTE}")
    # The value starts in the same column as every other line's.
    starts = {len(line) - len(line.partition(":")[2].lstrip(" ")) for line in lines}
    assert len(starts) == 1
    (no_route,) = [line for line in details_text(make_row(3)).splitlines() if "Route:" in line]
    assert no_route.startswith("Route:") and no_route.endswith(" -")
