"""The loss curve as SVG geometry: plot coordinates, axis ticks and labels, computed here so the template
only places them (and escapes every text it writes)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 16, 44
MAX_POINTS = 2000
"""A longer series is thinned to every k-th point (first and last kept), so the page stays small."""
MAX_MARKERS = 120
"""Dots with a tooltip on each point only for short series; a long one is a line."""

CURVES = (
    ("train", "train loss", ("loss", "train_loss")),
    ("eval", "eval loss", ("eval_loss",)),
)
"""(css class, legend, metric names in order of preference): the first name that has points is drawn."""


@dataclass(frozen=True)
class Point:
    step: float
    value: float
    x: float
    y: float


@dataclass(frozen=True)
class Curve:
    css: str
    label: str
    metric: str
    points: tuple[Point, ...]
    total: int
    """Points in the series (more than `points` when thinned)."""

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)

    @property
    def markers(self) -> bool:
        return len(self.points) <= MAX_MARKERS


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Chart:
    curves: tuple[Curve, ...]
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


def _finite(points: Sequence[Any]) -> list[tuple[float, float]]:
    out = []
    for point in points:
        try:
            step, value = float(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(step) and math.isfinite(value):
            out.append((step, value))
    return sorted(out)


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def nice_ticks(low: float, high: float, *, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    return f"{value:.4g}"


def loss_chart(series: Mapping[str, Sequence[Any]]) -> Chart | None:
    """The train and eval loss against step; None when neither has a point yet."""
    picked: list[tuple[str, str, str, list[tuple[float, float]]]] = []
    for css, label, names in CURVES:
        for name in names:
            points = _finite(series.get(name) or ())
            if points:
                picked.append((css, label, name, points))
                break
    if not picked:
        return None
    steps = [s for *_, points in picked for s, _ in points]
    values = [v for *_, points in picked for _, v in points]
    x_low, x_high = min(steps), max(steps)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = min(values), max(values)
    pad = (y_high - y_low) * 0.05 or max(abs(y_high) * 0.1, 0.5)
    y_low, y_high = y_low - pad, y_high + pad
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM

    def x_of(step: float) -> float:
        return LEFT + (step - x_low) / (x_high - x_low) * (right - LEFT)

    def y_of(value: float) -> float:
        return bottom - (value - y_low) / (y_high - y_low) * (bottom - TOP)

    curves = tuple(
        Curve(
            css=css,
            label=label,
            metric=name,
            points=tuple(Point(s, v, x_of(s), y_of(v)) for s, v in _thin(points)),
            total=len(points),
        )
        for css, label, name, points in picked
    )
    x_ticks = tuple(Tick(x_of(t), _label(t)) for t in nice_ticks(x_low, x_high) if t == int(t))
    y_ticks = tuple(Tick(y_of(t), _label(t)) for t in nice_ticks(y_low, y_high))
    return Chart(curves=curves, x_ticks=x_ticks, y_ticks=y_ticks)
