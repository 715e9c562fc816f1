"""A small line chart drawn with QPainter: the Overview's traffic and each upstream's
handshake latency over time. Lines from zero to the largest value, a legend, the top of the
scale, and "No data yet" when there is nothing to draw.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPaintEvent, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget


class Series(NamedTuple):
    label: str
    color: QColor
    points: Sequence[tuple[float, float]]  # (x, y): x is a time, y a value >= 0


class LineChart(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._series: tuple[Series, ...] = ()
        self._format: Callable[[float], str] = lambda v: f"{v:g}"
        self.setMinimumSize(160, 60)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        return QSize(320, 90)

    @property
    def series(self) -> tuple[Series, ...]:
        return self._series

    def set_series(
        self, series: Sequence[Series], value_format: Callable[[float], str] | None = None
    ) -> None:
        self._series = tuple(series)
        if value_format is not None:
            self._format = value_format
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        try:
            self._paint(painter)
        finally:
            painter.end()

    def _paint(self, painter: QPainter) -> None:
        palette = self.palette()
        painter.fillRect(self.rect(), palette.color(QPalette.ColorRole.Base))
        text_color = palette.color(QPalette.ColorRole.PlaceholderText)
        metrics = painter.fontMetrics()
        line_height = metrics.height()
        plot = QRectF(self.rect()).adjusted(4, line_height + 2, -4, -4)
        painter.setPen(QPen(palette.color(QPalette.ColorRole.Mid), 1))
        painter.drawRect(plot)

        points = [p for s in self._series for p in s.points]
        if len(points) < 2:
            painter.setPen(text_color)
            painter.drawText(plot, Qt.AlignmentFlag.AlignCenter, "No data yet")
            return
        x_min = min(p[0] for p in points)
        x_max = max(p[0] for p in points)
        y_max = max(p[1] for p in points)
        if x_max == x_min:  # one moment so far: show it at the right edge, as "now"
            x_min = x_max - 1.0
        x_span = x_max - x_min
        y_top = y_max * 1.1 if y_max > 0 else 1.0

        def at(x: float, y: float) -> QPointF:
            return QPointF(
                plot.left() + (x - x_min) / x_span * plot.width(),
                plot.bottom() - max(0.0, y) / y_top * plot.height(),
            )

        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        for series in self._series:
            if not series.points:
                continue
            if len(series.points) == 1:  # a line needs two points: one is a dot
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(series.color)
                dot = at(*series.points[0])
                dot.setX(min(dot.x(), plot.right() - 4.0))  # whole, inside the frame
                painter.drawEllipse(dot, 3.5, 3.5)
                painter.setBrush(Qt.BrushStyle.NoBrush)
                continue
            path = QPainterPath(at(*series.points[0]))
            for x, y in series.points[1:]:
                path.lineTo(at(x, y))
            painter.setPen(QPen(series.color, 1.6))
            painter.drawPath(path)

        # Scale top-left, legend top-right, above the plot.
        painter.setPen(text_color)
        header = QRectF(self.rect()).adjusted(4, 0, -4, 0)
        header.setHeight(line_height)
        painter.drawText(
            header,
            Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
            f"max {self._format(y_max)}",
        )
        right = header.right()
        for series in reversed(self._series):
            width = metrics.horizontalAdvance(series.label)
            painter.setPen(series.color)
            painter.drawText(
                QRectF(right - width, header.top(), width, line_height),
                Qt.AlignmentFlag.AlignVCenter,
                series.label,
            )
            painter.fillRect(
                QRectF(right - width - 14, header.center().y() - 1, 10, 3), series.color
            )
            right -= width + 22
