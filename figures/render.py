"""Rendering: one figure, or every registered figure the run has data for, into a folder.

Analyses run through `analysis.parameters.use`, so a figure draws from the store's saved
results when they match and from `--param` overrides when given; the parameters used are
stated under the figure and written, with the run's identity, into the file's metadata.
One figure failing is recorded (`Rendered.failed`) and the batch goes on.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

from tqdm import tqdm

from dynascope.analysis import parameters
from dynascope.analysis.registry import ANALYSES
from dynascope.analysis.run import Run, open_run

from . import provenance
from .registry import FIGURES, available_figures
from .style import FORMATS, Look, current_look, fit_width, looking, save_figure


class Rendered(dict):
    """{figure name: written paths}, with `.failed` = {figure name: one-line reason} and
    `.skipped` = {figure name: why it does not apply to the run} (not an error)."""

    def __init__(self):
        super().__init__()
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}


def figure_parameters(name: str) -> dict:
    """The figure's own keyword parameters and defaults (excluding **params)."""
    sig = inspect.signature(FIGURES[name].func)
    skip = 2 if FIGURES[name].kind == "animation" else 1
    return {k: p.default for k, p in list(sig.parameters.items())[skip:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def split_params(per: dict[str, dict]) -> tuple[dict, dict]:
    """--param NAME.KEY=VALUE items -> (analysis overrides, figure parameters). A name may be
    both an analysis and a figure (majority_opposition): each key goes where it is a
    parameter, and to both if both take it. Unknown names or keys are errors."""
    from dynascope.analysis.registry import defaults, open_ended

    ana, fig = {}, {}
    for name, kv in per.items():
        if name not in ANALYSES and name not in FIGURES:
            raise ValueError(parameters.unknown_message("analysis or figure", name, set(ANALYSES) | set(FIGURES)))
        a_keys = set(defaults(ANALYSES[name])) if name in ANALYSES else set()
        f_keys = set(figure_parameters(name)) if name in FIGURES else set()
        passes_on = name in ANALYSES and open_ended(ANALYSES[name].func)
        for k, v in kv.items():
            if passes_on and k not in f_keys:
                a_keys = a_keys | {k}
            if k not in a_keys | f_keys:
                raise ValueError(parameters.unknown_message(f"parameter of {name}", k, a_keys | f_keys))
            if k in a_keys:
                ana.setdefault(name, {})[k] = v
            if k in f_keys:
                fig.setdefault(name, {})[k] = v
    return ana, fig


def caption(name: str) -> str:
    return FIGURES[name].description


def finish(fig, name: str, runs, uses, figure_params: dict, out_stem: Path, formats,
           description: str | None = None) -> list[Path]:
    """Fit the width, add the parameter footer and save with provenance metadata."""
    prov = provenance.record(name, runs, uses, figure_params, caption(name) if description is None else description)
    fit_width(fig, current_look().width)
    provenance.add_footer(fig, provenance.footer_text(prov))
    meta = {fmt: provenance.file_metadata(prov, fmt) for fmt in formats}
    return save_figure(fig, out_stem, formats, metadata=meta)


def render_figure(run: Run, name: str, out_dir: str | Path, formats=FORMATS, *, params: dict | None = None,
                  look: Look | None = None, use_saved: bool = True, **figure_params) -> list[Path]:
    """Render one registered figure (or animation) into out_dir; returns written paths.
    params: analysis overrides {analysis: {key: value}}; figure_params go to the figure."""
    if name not in FIGURES:
        raise KeyError(parameters.unknown_message("figure", name, FIGURES))
    entry = FIGURES[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with looking(look or current_look()), parameters.use(params, use_saved) as res:
        if entry.kind == "animation":
            path = out_dir / f"{name}.gif"
            entry.func(run, path, **figure_params)
            return [path]
        fig = entry.func(run, **figure_params)
        stated = {**figure_parameters(name), **figure_params}
        return finish(fig, name, [run], res.uses, stated, out_dir / name, formats)


def render_all(run: Run | str | Path, out_dir: str | Path, formats=FORMATS, names=None,
               animations: bool = True, progress: bool = True, params: dict | None = None,
               look: Look | None = None, use_saved: bool = True) -> Rendered:
    """Render every available figure (or those in `names`); returns a `Rendered`.
    params: {name: {key: value}} for analyses and figures alike (see `split_params`)."""
    if not isinstance(run, Run):
        run = open_run(run)
    unknown = set(names or ()) - set(FIGURES)
    if unknown:
        raise ValueError("; ".join(parameters.unknown_message("figure", n, FIGURES) for n in sorted(unknown)))
    ana, figp = split_params(params or {})
    entries = [e for e in available_figures(run)
               if (names is None or e.name in names) and (animations or e.kind != "animation")]
    out = Rendered()
    for name in sorted(set(names or ()) - {e.name for e in entries}):   # asked for by name: an error
        out.failed[name] = FIGURES[name].skip_reason(run) or "animations are off"
    if names is None:
        out.skipped = {e.name: e.skip_reason(run) for e in FIGURES.values()
                       if (animations or e.kind != "animation") and not e.available(run)}
    for entry in tqdm(entries, desc="figures", unit="fig", disable=not progress, file=sys.stderr):
        try:
            out[entry.name] = render_figure(run, entry.name, out_dir, formats, params=ana, look=look,
                                            use_saved=use_saved, **figp.get(entry.name, {}))
        except Exception as e:  # noqa: BLE001 - one bad figure must not stop the batch
            out.failed[entry.name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    return out
