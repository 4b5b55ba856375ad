"""Registry of analyses: name -> pure function (run, **params) -> xarray.Dataset.

The CLI (`dynascope analyze`) and the report enumerate this registry instead of
hard-coding analyses; `available(run)` says whether the run holds the data it needs.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import xarray as xr

from . import parameters
from .run import Run


TASKS = ("classification", "regression", "sequence")
CLASSES = ("classification", "sequence")   # analyses of correctness / gold-label scores


def _has(run: Run, need: str) -> bool:
    group, _, var = need.partition("/")
    return run.has(group, var or None)


def skip_reason(run: Run, tasks, needs) -> str | None:
    """Why something defined for `tasks` and needing `needs` does not apply to `run` (None
    when it does); shared by the analysis and figure registries."""
    if run.task not in tasks:
        return f"defined for {' and '.join(tasks)} runs; this run is {run.task}"
    if not run_has_all(run, needs):
        return f"run lacks {', '.join(needs)}"
    return None


def run_has_all(run: Run, needs) -> bool:
    """Whether the run holds every "group" or "group/variable" in `needs`; a need written
    "a|b" is met by either (sequence runs store token statistics where others store logits)."""
    return all(any(_has(run, alt) for alt in need.split("|")) for need in needs)


@dataclass(frozen=True)
class AnalysisEntry:
    name: str
    func: Callable[..., xr.Dataset]
    needs: tuple[str, ...] = ()          # "group" or "group/variable" the run must have
    description: str = ""
    summary: Callable[[xr.Dataset], str] | None = None   # one human line for `dynascope analyze`
    tasks: tuple[str, ...] = TASKS       # run tasks (dataset.task) the analysis is defined for

    def available(self, run: Run) -> bool:
        return self.skip_reason(run) is None

    def skip_reason(self, run: Run) -> str | None:
        """Why the analysis does not apply to `run` (None when it does)."""
        return skip_reason(run, self.tasks, self.needs)


ANALYSES: dict[str, AnalysisEntry] = {}


def register_analysis(name: str, needs: tuple[str, ...] = (), description: str = "", summary=None,
                      tasks: tuple[str, ...] = TASKS):
    """Decorator: add an analysis to the registry under `name`."""

    def deco(func):
        wrapped = parameters.resolving(name, func)
        ANALYSES[name] = AnalysisEntry(name, wrapped, tuple(needs), description or first_paragraph(func.__doc__),
                                       summary=summary, tasks=tuple(tasks))
        return wrapped

    return deco


def first_paragraph(doc: str | None) -> str:
    """The docstring's first paragraph on one line (a caption, never cut mid-sentence)."""
    lines = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines)


def defaults(entry: AnalysisEntry) -> dict:
    """Keyword parameters of an analysis and their defaults (for `dynascope list`)."""
    sig = inspect.signature(entry.func)
    return {k: p.default for k, p in list(sig.parameters.items())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def open_ended(func) -> bool:
    """Whether a function takes **params (passed on to another analysis)."""
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(func).parameters.values())


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
