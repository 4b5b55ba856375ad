"""`dynascope analyze`: a readable summary of a run, every registered analysis that the
run has data for, and optionally their results saved into the store."""
from __future__ import annotations

import json

import numpy as np


def parse_params(items) -> dict[str, dict]:
    """['forgetting.never_learned=inf', ...] -> {'forgetting': {'never_learned': 'inf'}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, param = key.partition(".")
        if not sep or not dot or not name or not param:
            raise ValueError(f"--param expects NAME.KEY=VALUE (e.g. forgetting.never_learned=inf), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[param] = value
    return out


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4g}"


def summary_lines(run) -> list[str]:
    from dynascope.analysis import epoch_curves

    ds = run.dataset
    n = ds.get("num_classes")
    kind = {"sequence": f"sequences, vocabulary {n}", "regression": "regression"}.get(run.task, f"{n} classes")
    lines = [f"run: {run.path}", f"  {run.describe_progress()}",
             f"  dataset {ds.get('name')} ({ds.get('num_examples')} examples, {kind}); "
             f"model {run.attrs.get('model', {}).get('name')}"]
    from .describe import data_health, health_lines

    lines += ["  " + line for line in health_lines(data_health(run))]
    if run.has("train") and run.train.sizes.get("step", 0):
        c = epoch_curves(run)
        bad = c["train_nonfinite_loss"]
        if int(bad.sum()):
            epochs = c["epoch"].values[bad.values > 0].tolist()
            lines.append(f"  {int(bad.sum())} training losses read as NaN/inf in epoch(s) {epochs[:10]}: "
                         f"those epochs' mean loss is n/a (diverged, or data missing from the store)")
        last = c.isel(epoch=-1)
        lines.append(f"  epochs recorded: {c.sizes['epoch']}, steps: {run.train.sizes['step']}")
        for key, label in (("train", "train"), ("probe", "probe subset"), ("eval", "held-out")):
            if f"{key}_loss" in last:
                acc = float(last[f"{key}_accuracy"]) if f"{key}_accuracy" in last else None
                lines.append(f"  last epoch {label:<13} loss {_fmt(float(last[f'{key}_loss']))}"
                             f"  accuracy {_fmt(acc)}")
    return lines


def check_names(only, per: dict) -> None:
    """Unknown analysis names or parameters: one error suggesting close matches."""
    from dynascope.analysis import ANALYSES
    from dynascope.analysis.parameters import unknown_message
    from dynascope.analysis.registry import defaults, open_ended

    for name in list(only) + list(per):
        if name not in ANALYSES:
            raise ValueError(unknown_message("analysis", name, ANALYSES))
    for name, kv in per.items():
        known = defaults(ANALYSES[name])
        if open_ended(ANALYSES[name].func):
            continue  # its **params go on to another analysis, which checks them
        for key in kv:
            if key not in known:
                raise ValueError(unknown_message(f"parameter of {name}", key, known))


def run_analyses(path, only=(), save=False, params=(), echo=print, scheduler=None,
                 storage_options=None) -> dict:
    """`scheduler`: address of the user's dask.distributed scheduler to compute on (None:
    dask's default threads in this process; no cluster is ever started here)."""
    from dynascope.analysis.cluster import scheduler as dask_scheduler

    with dask_scheduler(scheduler) as client:
        if client is not None:
            echo(f"dask scheduler: {scheduler} ({len(client.scheduler_info().get('workers', {}))} workers)")
        return _run_analyses(path, only, save, params, echo, storage_options)


def _run_analyses(path, only, save, params, echo, storage_options) -> dict:
    from dynascope.analysis import ANALYSES, open_run, parameters, save_result

    run = open_run(path, storage_options=storage_options)
    per = parse_params(params)
    check_names(only, per)
    for line in summary_lines(run):
        echo(line)
    names = list(only) or [a.name for a in ANALYSES.values() if a.available(run)]
    results = {}
    echo("analyses:")
    for name in names:
        entry = ANALYSES[name]
        reason = entry.skip_reason(run)
        if reason:
            echo(f"  {name:<20} skipped: {reason}")
            continue
        # resolved like a figure resolves it (never from an older saved result), so the
        # effective parameters saved with it are the ones `dynascope figures` will match
        with parameters.use(per, use_saved=False):
            result = entry.func(run)
        results[name] = result
        dims = ", ".join(f"{k}={v}" for k, v in result.sizes.items())
        echo(f"  {name:<20} {dims}  [{', '.join(list(result.data_vars)[:6])}]")
        if entry.summary is not None:
            echo(f"  {'':<20} → {entry.summary(result)}")
        if save:
            echo(f"  {'':<20} saved to {save_result(run.path, name, result, per.get(name, {}))}")
    return results
