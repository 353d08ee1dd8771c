"""The throughput chart's geometry: a bar per minute, stacked completed and failed, for inline SVG."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["Bar", "bars"]

WIDTH = 180
HEIGHT = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    """One rectangle: ``kind`` is ``completed`` or ``failed`` (its CSS class); ``title`` its tooltip."""

    x: float
    y: float
    width: float
    height: float
    kind: str
    title: str


def bars(
    completed: Sequence[int], failed: Sequence[int], *, width: int = WIDTH, height: int = HEIGHT
) -> list[Bar]:
    """Bars scaled to the busiest minute; minutes with no jobs have none. The last minute is the latest."""
    if len(completed) != len(failed):
        raise ValueError("completed and failed need one count per minute each")
    n = len(completed)
    peak = max((c + f for c, f in zip(completed, failed, strict=True)), default=0)
    if n == 0 or peak == 0:
        return []
    step = width / n
    out: list[Bar] = []
    for i, (done, bad) in enumerate(zip(completed, failed, strict=True)):
        ago = n - 1 - i
        when = "this minute" if ago == 0 else f"{ago} min ago"
        title = f"{when}: {done} completed, {bad} failed"
        base = float(height)
        for count, kind in ((done, "completed"), (bad, "failed")):
            if count:
                h = height * count / peak
                base -= h
                out.append(
                    Bar(round(i * step, 2), round(base, 2), round(step * 0.8, 2), round(h, 2), kind, title)
                )
    return out
