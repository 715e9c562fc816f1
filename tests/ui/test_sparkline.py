"""The line chart paints its lines (pixels of the series' colours appear where the data is),
and says "No data yet" without data."""

from __future__ import annotations

from PySide6.QtGui import QColor, QImage, QPalette
from pytestqt.qtbot import QtBot

from tray_proxy.ui.sparkline import LineChart, Series

RED = QColor(255, 0, 0)
BLUE = QColor(0, 0, 255)


def _image(chart: LineChart) -> QImage:
    return chart.grab().toImage().convertToFormat(QImage.Format.Format_RGB32)


def _count(image: QImage, color: QColor, *, rows: range | None = None) -> int:
    """Pixels close to `color` (antialiasing blends the edges)."""
    n = 0
    for y in rows if rows is not None else range(image.height()):
        for x in range(image.width()):
            c = image.pixelColor(x, y)
            if (
                abs(c.red() - color.red()) < 60
                and abs(c.green() - color.green()) < 60
                and abs(c.blue() - color.blue()) < 60
            ):
                n += 1
    return n


def test_lines_are_drawn_where_the_data_is(qtbot: QtBot) -> None:
    chart = LineChart()
    qtbot.addWidget(chart)
    chart.resize(200, 100)
    background = chart.palette().color(QPalette.ColorRole.Base)
    blank = _image(chart)
    assert _count(blank, RED) == 0
    # A flat high line (red) and a flat low line (blue).
    chart.set_series(
        [
            Series("high", RED, [(0.0, 10.0), (1.0, 10.0), (2.0, 10.0)]),
            Series("low", BLUE, [(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)]),
        ]
    )
    image = _image(chart)
    height = image.height()
    # Red near the top of the plot (10 of a scale to 11), blue near the bottom (1 of 11).
    assert _count(image, RED, rows=range(height // 6, height // 2)) > 100
    assert _count(image, BLUE, rows=range(height * 2 // 3, height)) > 100
    assert _count(image, BLUE, rows=range(height // 6, height // 2)) == 0
    # The middle of the plot between the lines is background.
    assert image.pixelColor(100, int(height * 0.6)) == background


def test_without_data_it_says_so(qtbot: QtBot) -> None:
    chart = LineChart()
    qtbot.addWidget(chart)
    chart.resize(200, 100)
    chart.set_series([Series("p50", RED, [])])
    empty = _image(chart)
    chart.set_series([Series("p50", RED, [(0.0, 1.0), (5.0, 3.0)])])
    drawn = _image(chart)
    assert _count(empty, RED) == 0 and _count(drawn, RED) > 50
    assert empty != drawn


def test_a_single_moment_is_a_dot_at_the_right_edge(qtbot: QtBot) -> None:
    """One latency bucket so far (the first handshakes of an upstream): a dot per series
    where "now" is, not an empty chart."""
    chart = LineChart()
    qtbot.addWidget(chart)
    chart.resize(200, 100)
    chart.set_series([Series("p50", RED, [(5.0, 4.0)]), Series("p95", BLUE, [(5.0, 8.0)])])
    image = _image(chart)
    plot = range(image.height() // 5, image.height())  # below the legend's coloured labels
    assert _count(image, RED, rows=plot) > 10
    assert _count(image, BLUE, rows=plot) > 10
    left_half = [
        image.pixelColor(x, y)
        for x in range(image.width() // 2)
        for y in range(image.height() // 4, image.height())
    ]
    assert QColor(RED) not in left_half and QColor(BLUE) not in left_half
