"""Registry of analyses: name -> pure function (run, **params) -> xarray.Dataset.

The CLI (`dynascope analyze`) and the report enumerate this registry instead of
hard-coding analyses; `available(run)` says whether the run holds the data it needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import xarray as xr

from .run import Run


def run_has_all(run: Run, needs) -> bool:
    """Whether the run holds every "group" or "group/variable" in `needs`."""
    for need in needs:
        group, _, var = need.partition("/")
        if not run.has(group, var or None):
            return False
    return True


@dataclass(frozen=True)
class AnalysisEntry:
    name: str
    func: Callable[..., xr.Dataset]
    needs: tuple[str, ...] = ()          # "group" or "group/variable" the run must have
    description: str = ""
    summary: Callable[[xr.Dataset], str] | None = None   # one human line for `dynascope analyze`

    def available(self, run: Run) -> bool:
        return run_has_all(run, self.needs)


ANALYSES: dict[str, AnalysisEntry] = {}


def register_analysis(name: str, needs: tuple[str, ...] = (), description: str = "", summary=None):
    """Decorator: add an analysis to the registry under `name`."""

    def deco(func):
        doc = (func.__doc__ or "").strip().splitlines()
        ANALYSES[name] = AnalysisEntry(name, func, tuple(needs), description or (doc[0] if doc else ""),
                                       summary=summary)
        return func

    return deco


def register_summary(name: str):
    """Decorator: attach a one-line summary (result -> str) to a registered analysis, so
    `dynascope analyze` can say what was found rather than only the result's shape."""

    def deco(func):
        from dataclasses import replace

        ANALYSES[name] = replace(ANALYSES[name], summary=func)
        return func

    return deco


def available_analyses(run: Run) -> list[AnalysisEntry]:
    return [a for a in ANALYSES.values() if a.available(run)]
