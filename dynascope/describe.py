"""`dynascope info`: what a store holds, how far it got and how big it is (no torch)."""
from __future__ import annotations

from pathlib import Path


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def describe_run(path) -> dict:
    from dynascope.analysis.run import open_run, saved_results

    run = open_run(path)
    groups = {}
    for name, ds in run.groups.items():
        groups[name] = {
            "size_bytes": _dir_size(Path(path) / name),
            "dims": dict(ds.sizes),
            "arrays": {v: {"dims": list(ds[v].dims), "shape": list(ds[v].shape), "dtype": str(ds[v].dtype)}
                       for v in ds.variables},
        }
    a = run.attrs
    health = data_health(run)
    return {"health": health,"path": str(path), "status": run.status, "progress": run.describe_progress(),
            "committed": run.committed, "dataset": run.dataset, "model": {k: v for k, v in a.get("model", {}).items()
                                                                           if k != "summary"},
            "created": a.get("created"), "finished": a.get("finished"), "versions": a.get("versions", {}),
            "extensions": sorted(run.extensions), "size_bytes": _dir_size(Path(path)), "groups": groups,
            "saved_analyses": saved_results(path), "config": a.get("config", {})}


def data_health(run) -> dict:
    """Counts a reader must see before trusting averages: examples with NaN/inf losses or
    logits (as recorded), and committed rows that read back empty (missing chunk files)."""
    out = {}
    for name in ("train", "probe", "eval"):
        if not run.has(name):
            continue
        ds = run.group(name)
        for var in ("nonfinite_loss", "nonfinite_logits"):
            if var in ds:
                v = ds[var].values
                out[f"{name}_{var}"] = int(v[v > 0].sum())
        if name == "train" and "batch_size" in ds:
            out["train_empty_rows"] = int((ds["batch_size"].values <= 0).sum())
    return out


def health_lines(h: dict) -> list[str]:
    lines = []
    for key, n in h.items():
        if n and key != "train_empty_rows":
            group, what = key.split("_", 1)
            lines.append(f"warning   {n} {group} example(s) with NaN/inf {what.split('_', 1)[1]} "
                         f"(counted in {group}/{what}); means over them are NaN")
    if h.get("train_empty_rows"):
        lines.append(f"warning   {h['train_empty_rows']} committed train rows read back empty "
                     f"(batch_size 0): chunk files are missing or damaged")
    return lines


def format_description(d: dict) -> str:
    ds, model = d["dataset"], d["model"]
    lines = [
        f"run       {d['path']}  ({_human(d['size_bytes'])})",
        f"status    {d['progress']}",
        f"dataset   {ds.get('name')} — {ds.get('num_examples')} examples, {ds.get('num_classes')} classes",
        f"model     {model.get('name')} — {model.get('num_parameters', 0):,} parameters",
        f"recorded  {d.get('created')} → {d.get('finished') or '(not finished)'}",
        f"extensions {', '.join(d['extensions']) or 'none'}",
        *health_lines(d.get("health", {})),
        "groups:",
    ]
    for name, g in d["groups"].items():
        dims = ", ".join(f"{k}={v}" for k, v in g["dims"].items())
        lines.append(f"  {name:<13} {_human(g['size_bytes']):>9}  {dims}")
        for var, spec in sorted(g["arrays"].items()):
            lines.append(f"      {var:<18} {spec['dtype']:<8} ({', '.join(spec['dims'])})")
    if d["saved_analyses"]:
        lines.append(f"saved analyses: {', '.join(d['saved_analyses'])}")
    return "\n".join(lines)


def catalogue() -> dict:
    """Every analysis, figure and comparison figure with its parameters and defaults."""
    from dynascope import analysis
    from dynascope import figures
    from dynascope.analysis.registry import defaults
    from dynascope.figures.compare import COMPARISONS
    from dynascope.figures.render import figure_parameters

    def clean(d):
        return {k: (None if v is inspect_empty() else v) for k, v in d.items()}

    return {
        "analyses": {n: {"description": e.description, "needs": list(e.needs), "params": clean(defaults(e))}
                     for n, e in analysis.ANALYSES.items()},
        "figures": {n: {"description": e.description, "needs": list(e.needs), "kind": e.kind,
                        "params": clean(figure_parameters(n))} for n, e in figures.FIGURES.items()},
        "comparisons": {n: {"description": c.description, "needs": list(c.needs)} for n, c in COMPARISONS.items()},
    }


def inspect_empty():
    import inspect

    return inspect.Parameter.empty


def format_catalogue(cat: dict) -> str:
    import textwrap

    lines = []
    for section, title in (("analyses", "Analyses (dynascope analyze --only NAME --param NAME.KEY=VALUE)"),
                           ("figures", "Figures (dynascope figures --only NAME --param NAME.KEY=VALUE)"),
                           ("comparisons", "Comparison figures (dynascope figures RUN RUN ... --out DIR)")):
        lines += ["", title]
        for name, e in cat[section].items():
            lines.append(f"  {name}  [needs {', '.join(e['needs']) or 'nothing'}]")
            lines += textwrap.wrap(e["description"], 92, initial_indent="      ", subsequent_indent="      ")
            ps = e.get("params", {})
            if ps:
                lines += textwrap.wrap(", ".join(f"{k}={v!r}" for k, v in ps.items()), 92,
                                       initial_indent="      parameters: ", subsequent_indent="        ")
    return "\n".join(lines[1:])
