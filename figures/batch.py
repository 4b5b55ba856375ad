"""Figures for one run or many, and batch specifications that regenerate a paper's figures.

    render_runs(["a.zarr", "b.zarr"], "out/")   # out/a/*, out/b/*, out/compare/*
    render_spec("paper.toml")                   # CLI: dynascope figures --spec paper.toml

One run writes into `out` itself. Several runs write each run's figures into out/<run>/ and
the comparison figures (figures.compare) into out/compare/.

A specification (TOML) names everything one command needs; paths are relative to it:

    runs = ["runs/seed0.zarr", "runs/seed1.zarr"]
    out = "paper-figures"
    figures = ["training_curves", "compare_training_curves"]   # default: all available
    formats = ["pdf", "png"]
    style = "paper"          # paper | talk | default
    width = "single"         # single (3.3 in) | double (6.9 in) | inches
    dpi = 600
    animations = false
    [params]                 # like --param NAME.KEY=VALUE
    opposing_pairs.cos_threshold = -0.7
    [[figure]]               # optional: one figure drawn differently
    name = "data_map"
    width = "double"
"""
from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dynascope.analysis import parameters
from dynascope.analysis.run import Run, open_run

from .compare import COMPARISONS
from .registry import FIGURES
from .render import Rendered, finish, render_all, split_params
from .style import FORMATS, Look, looking

SPEC_KEYS = {"runs", "out", "figures", "formats", "style", "width", "dpi", "animations", "params", "figure"}


def run_label(run: Run, taken: set[str]) -> str:
    """A folder name for a run: its store's name, or its parent folder's for run.zarr."""
    label = run.path.stem if run.path.stem != "run" else run.path.parent.name
    base, k = label, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


def check_names(names) -> None:
    known = set(FIGURES) | set(COMPARISONS)
    bad = [n for n in names or () if n not in known]
    if bad:
        raise ValueError("; ".join(parameters.unknown_message("figure", n, known) for n in bad))


def render_comparison(runs, name: str, out_dir: Path, formats=FORMATS, params=None, look=None,
                      use_saved: bool = True) -> list[Path]:
    entry = COMPARISONS[name]
    with looking(look or Look()), parameters.use(params, use_saved) as res:
        fig = entry.func(runs)
        seen: dict[str, dict] = {}
        for u in res.uses:
            if seen.setdefault(u.name, u.params) != u.params:
                import matplotlib.pyplot as plt

                plt.close(fig)
                diff = sorted(k for k in u.params if u.params.get(k) != seen[u.name].get(k))
                raise ValueError(f"the runs' saved {u.name} results use different parameters ({', '.join(diff)}); "
                                 f"pass --param {u.name}.{diff[0]}=VALUE so every run is drawn with the same")
        out_dir.mkdir(parents=True, exist_ok=True)
        return finish(fig, name, runs, res.uses, {}, out_dir / name, formats, entry.description)


def render_runs(paths, out_dir, formats=FORMATS, names=None, params=None, look: Look | None = None,
                animations: bool = True, progress: bool = True) -> Rendered:
    """Each run's figures, and comparison figures when there are several runs. Returns a
    `Rendered` keyed 'run/figure' (just 'figure' for a single run)."""
    check_names(names)
    runs = [p if isinstance(p, Run) else open_run(p) for p in paths]
    out_dir = Path(out_dir)
    wanted = None if names is None else set(names)
    single = len(runs) == 1
    result = Rendered()
    taken: set[str] = set()
    per_run = None if wanted is None else wanted & set(FIGURES)
    if single and wanted is not None and wanted & set(COMPARISONS):
        raise ValueError(f"comparison figures ({', '.join(sorted(wanted & set(COMPARISONS)))}) need two or more runs")
    for run in runs:
        label = run_label(run, taken)
        if per_run is not None and not per_run:
            continue
        sub = render_all(run, out_dir if single else out_dir / label, formats, names=per_run,
                         animations=animations, progress=progress, params=params, look=look)
        prefix = "" if single else f"{label}/"
        result.update({prefix + k: v for k, v in sub.items()})
        result.failed.update({prefix + k: v for k, v in sub.failed.items()})
        result.skipped.update({prefix + k: v for k, v in sub.skipped.items()})
    if not single:
        ana, _ = split_params(params or {})
        comps = [c for c in COMPARISONS.values() if wanted is None or c.name in wanted]
        for c in tqdm(comps, desc="comparisons", unit="fig", disable=not progress, file=sys.stderr):
            if not c.available(runs):
                if wanted is not None:
                    result.failed[f"compare/{c.name}"] = f"not every run has {', '.join(c.needs)}"
                continue
            try:
                result[f"compare/{c.name}"] = render_comparison(runs, c.name, out_dir / "compare", formats,
                                                                ana, look)
            except Exception as e:  # noqa: BLE001 - one bad figure must not stop the batch
                result.failed[f"compare/{c.name}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return result


@dataclass
class Spec:
    runs: list[Path]
    out: Path
    figures: list[str] | None = None
    formats: tuple[str, ...] = FORMATS
    look: Look = field(default_factory=Look)
    animations: bool = False
    params: dict = field(default_factory=dict)
    overrides: list[dict] = field(default_factory=list)


def load_spec(path) -> Spec:
    """Read and check a batch specification (TOML); errors name the key and the fix."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise ValueError("; ".join(parameters.unknown_message(f"key in {path.name}", k, SPEC_KEYS)
                                   for k in sorted(unknown)))
    if not raw.get("runs"):
        raise ValueError(f"{path} lists no runs; add runs = [\"path/to/run.zarr\", ...]")
    base = path.parent
    runs = [(base / r).resolve() if not Path(r).is_absolute() else Path(r) for r in raw["runs"]]
    formats = tuple(raw.get("formats", FORMATS))
    bad = set(formats) - {"png", "pdf", "svg"}
    if bad:
        raise ValueError(f"{path}: unsupported format(s) {sorted(bad)}; use png, pdf or svg")
    figures = raw.get("figures")
    check_names(figures)
    overrides = raw.get("figure", [])
    for o in overrides:
        if o.get("name") not in FIGURES and o.get("name") not in COMPARISONS:
            raise ValueError(f"{path}: [[figure]] entry {o!r}: " +
                             parameters.unknown_message("figure", str(o.get("name")), set(FIGURES) | set(COMPARISONS)))
    return Spec(runs=runs, out=base / raw.get("out", "figures"), figures=figures, formats=formats,
                look=Look.parse(raw.get("style", "default"), raw.get("width"), raw.get("dpi")),
                animations=bool(raw.get("animations", False)), params=raw.get("params", {}), overrides=overrides)


def render_spec(path, progress: bool = True) -> Rendered:
    """Render everything a specification asks for; [[figure]] entries are then redrawn with
    their own style, width, dpi and parameters."""
    spec = load_spec(path)
    result = render_runs(spec.runs, spec.out, spec.formats, spec.figures, spec.params, spec.look,
                         spec.animations, progress)
    for o in spec.overrides:
        look = Look.parse(o.get("style", spec.look.style), o.get("width", spec.look.width),
                          o.get("dpi", spec.look.dpi))
        params = {k: dict(v) for k, v in spec.params.items()}
        for k, v in o.get("params", {}).items():
            params.setdefault(k, {}).update(v)
        sub = render_runs(spec.runs, spec.out, spec.formats, [o["name"]], params, look, spec.animations, False)
        result.update(sub)
        result.failed.update(sub.failed)
    return result
