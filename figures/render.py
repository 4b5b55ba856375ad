"""Batch rendering: every registered figure the run has data for, written to a folder.

One figure failing (say, a run too short for an animation) is reported and skipped, so
a batch never loses the figures that did render.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from analysis.run import Run, open_run

from .registry import FIGURES, available_figures
from .style import FORMATS, save_figure


def render_figure(run: Run, name: str, out_dir: str | Path, formats=FORMATS, **params) -> list[Path]:
    """Render one registered figure (or animation) into out_dir; returns written paths."""
    if name not in FIGURES:
        raise KeyError(f"no figure named '{name}'; known: {', '.join(sorted(FIGURES))}")
    entry = FIGURES[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if entry.kind == "animation":
        path = out_dir / f"{name}.gif"
        entry.func(run, path, **params)
        return [path]
    fig = entry.func(run, **params)
    return save_figure(fig, out_dir / name, formats)


def render_all(run: Run | str | Path, out_dir: str | Path, formats=FORMATS, names=None,
               animations: bool = True, progress: bool = True) -> dict[str, list[Path]]:
    """Render every available figure; returns {name: paths}. Failures go to stderr."""
    if not isinstance(run, Run):
        run = open_run(run)
    entries = [e for e in available_figures(run)
               if (names is None or e.name in names) and (animations or e.kind != "animation")]
    written: dict[str, list[Path]] = {}
    for entry in tqdm(entries, desc="figures", unit="fig", disable=not progress, file=sys.stderr):
        try:
            written[entry.name] = render_figure(run, entry.name, out_dir, formats)
        except Exception as e:  # noqa: BLE001 - one bad figure must not stop the batch
            print(f"dynascope: figure '{entry.name}' skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return written
