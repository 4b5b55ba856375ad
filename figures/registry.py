"""Registry of figures: name -> function (run, **params) -> matplotlib Figure.

`dynascope figures` renders every registered figure whose data the run has; each figure
computes what it needs through `analysis`, so figures never read raw zarr themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dynascope.analysis.registry import TASKS, first_paragraph, skip_reason
from dynascope.analysis.run import Run


PER_TARGET = ("classification", "regression")   # figures that read each example's single target
CLASS_LABELS = ("classification",)             # figures built on class labels or class-pair analyses


@dataclass(frozen=True)
class FigureEntry:
    name: str
    func: Callable
    needs: tuple[str, ...] = ()
    description: str = ""
    kind: str = "figure"      # "figure" (Figure) or "animation" (writes a GIF itself)
    tasks: tuple[str, ...] = TASKS   # run tasks the figure is defined for (class labels, targets)

    def available(self, run: Run) -> bool:
        return self.skip_reason(run) is None

    def skip_reason(self, run: Run) -> str | None:
        """Why the figure cannot be drawn for `run` (None when it can)."""
        return skip_reason(run, self.tasks, self.needs)


FIGURES: dict[str, FigureEntry] = {}


def register_figure(name: str, needs: tuple[str, ...] = (), description: str = "", kind: str = "figure",
                    tasks: tuple[str, ...] = TASKS):
    """Decorator: add a figure function to the registry.

    kind="figure": func(run, **params) -> matplotlib Figure.
    kind="animation": func(run, path, fps=..., max_frames=..., **params) writes a GIF at `path`
    (fps: frame rate; max_frames: cap, frames sampled evenly over time).
    tasks: the run tasks it applies to; a figure grouping by class label or reading per-example
    targets excludes "sequence" (the example there is a token sequence, with no single target)."""

    def deco(func):
        FIGURES[name] = FigureEntry(name, func, tuple(needs), description or first_paragraph(func.__doc__), kind,
                                    tuple(tasks))
        return func

    return deco


def available_figures(run: Run, kind: str | None = None) -> list[FigureEntry]:
    return [f for f in FIGURES.values() if f.available(run) and (kind is None or f.kind == kind)]
