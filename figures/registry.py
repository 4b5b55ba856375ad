"""Registry of figures: name -> function (run, **params) -> matplotlib Figure.

`dynascope figures` renders every registered figure whose data the run has; each figure
computes what it needs through `analysis`, so figures never read raw zarr themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dynascope.analysis.registry import first_paragraph, run_has_all
from dynascope.analysis.run import Run


@dataclass(frozen=True)
class FigureEntry:
    name: str
    func: Callable
    needs: tuple[str, ...] = ()
    description: str = ""
    kind: str = "figure"      # "figure" (Figure) or "animation" (writes a GIF itself)

    def available(self, run: Run) -> bool:
        return run_has_all(run, self.needs)


FIGURES: dict[str, FigureEntry] = {}


def register_figure(name: str, needs: tuple[str, ...] = (), description: str = "", kind: str = "figure"):
    """Decorator: add a figure function to the registry.

    kind="figure": func(run, **params) -> matplotlib Figure.
    kind="animation": func(run, path, fps=..., max_frames=..., **params) writes a GIF at `path`
    (fps: frame rate; max_frames: cap, frames sampled evenly over time)."""

    def deco(func):
        FIGURES[name] = FigureEntry(name, func, tuple(needs), description or first_paragraph(func.__doc__), kind)
        return func

    return deco


def available_figures(run: Run, kind: str | None = None) -> list[FigureEntry]:
    return [f for f in FIGURES.values() if f.available(run) and (kind is None or f.kind == kind)]
