"""The `dynascope` command. Each subcommand imports only what it needs, so `analyze`,
`figures`, `info` and `report` run on machines without torch."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileExistsError, FileNotFoundError,
                                                KeyError, RuntimeError)


def user_errors(func):
    """Turn expected failures into one clear line on stderr (exit 1), not a traceback.
    Set DYNASCOPE_DEBUG=1 to see the traceback instead."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as e:
            if os.environ.get("DYNASCOPE_DEBUG"):
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(str(msg)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="dynascope")
def main():
    """Record a network's training example by example; analyze and plot it offline."""


# -- record ---------------------------------------------------------------------------
def _record_options(func):
    options = [
        click.option("--dataset", default="planted", help="cifar10, mnist, fashion-mnist or planted (offline)."),
        click.option("--model", default="cnn", help="cnn, mlp-bn or resnet18."),
        click.option("--epochs", default=10, type=click.IntRange(min=1)),
        click.option("--batch-size", default=128, type=click.IntRange(min=1)),
        click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd"),
        click.option("--lr", default=0.05, type=float, help="Learning rate."),
        click.option("--schedule", type=click.Choice(["none", "cosine", "step"]), default="none"),
        click.option("--seed", default=0, type=int),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto"),
        click.option("--data-dir", default="data", type=click.Path(file_okay=False)),
        click.option("--download", is_flag=True, help="Download torchvision datasets if missing."),
        click.option("--train-size", type=click.IntRange(min=1), default=None, help="Random training subset."),
        click.option("--test-size", type=click.IntRange(min=1), default=None, help="Random held-out subset."),
        click.option("--probe-size", default=500, type=click.IntRange(min=1), help="Tracked training examples."),
        click.option("--probe-every", default=0, type=click.IntRange(min=0), help="Steps between probes; 0 = each epoch."),
        click.option("--grad-norms/--no-grad-norms", default=False, help="Exact per-example gradient norms."),
        click.option("--grad-proj-dim", default=0, type=click.IntRange(min=0), help="Size K of the per-example gradient sketch (0 = off)."),
        click.option("--grad-gram/--no-grad-gram", default=False, help="Exact in-batch gradient Gram per training step."),
        click.option("--grad-seed", default=0, type=int, help="Seed of the sketch's hashes."),
        click.option("--grad-layers", default=None, help="Modules to cover (names or fnmatch patterns, comma-separated)."),
        click.option("--param-stats/--no-param-stats", default=True, help="Per-step gradient/update statistics."),
        click.option("--snapshot-params", default=None, help="Raw gradient/weight snapshots: parameter names or 'all'."),
        click.option("--snapshot-every", default=0, type=click.IntRange(min=0), help="Steps between snapshots."),
        click.option("--activations", default=None, help="Probe-pass activations: layer names or types, comma-separated."),
        click.option("--activation-pool", type=click.Choice(["mean", "max", "flatten"]), default="mean",
                     help="How spatial activation maps are reduced."),
        click.option("--activation-max-units", default=2048, type=click.IntRange(min=1), help="Units kept per layer."),
        click.option("--augment-samples", default=None, help="Example ids for augmentation variance, comma-separated."),
        click.option("--augment-n", default=300, type=click.IntRange(min=2), help="Augmentations per sample."),
        click.option("--label-noise", type=click.FloatRange(0, 1), default=None, help="planted: flipped-label fraction."),
        click.option("--planted-fraction", type=click.FloatRange(0, 1), default=None, help="planted: fraction with the opposing feature."),
        click.option("--overwrite", is_flag=True, help="Replace an existing store at --out (never a live one)."),
        click.option("--checkpoint-every", default=64, type=click.IntRange(min=0),
                     help="Steps between checkpoints for --resume (also at every epoch end); 0 = none."),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def _config(out: str, kw: dict):
    from dynascope.recorder.driver import TrainConfig

    dataset_options = {k: kw.pop(k) for k in ("label_noise", "planted_fraction") if kw.get(k) is not None}
    kw.pop("label_noise", None), kw.pop("planted_fraction", None)
    return TrainConfig(out=out, dataset_options=dataset_options, **kw)


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Run store to create (e.g. data/run.zarr).")
@click.option("--resume", is_flag=True, help="Continue the interrupted run at --out from its last checkpoint, "
                                             "with the options it was recorded with.")
@_record_options
@user_errors
def record(out, resume, **kw):
    """Train a built-in model on a dataset and record the run."""
    from dynascope.recorder.driver import record_run
    from dynascope.recorder.signals import Terminated

    cfg = _resume_config(out, kw) if resume else _config(out, kw)
    try:
        path = record_run(cfg)
    except Terminated as e:
        click.echo(f"dynascope: {e}; {out} is marked failed. Continue it with "
                   f"`dynascope record --out {out} --resume`", err=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        click.echo(f"dynascope: interrupted; {out} is marked failed. Continue it with "
                   f"`dynascope record --out {out} --resume`", err=True)
        sys.exit(130)
    click.echo(f"recorded {path}")


def _resume_config(out: str, kw: dict):
    """The run's own recorded options; any option given again must agree with them."""
    from click.core import ParameterSource

    from dynascope.recorder.driver import TrainConfig
    from dynascope.recorder.resume import IGNORED_CONFIG, ResumeError, stored_attrs

    stored = dict(stored_attrs(Path(out)).get("config", {}))
    given = _config(out, dict(kw))
    ctx = click.get_current_context()
    explicit = {k for k in kw if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    explicit |= {"dataset_options"} if explicit & {"label_noise", "planted_fraction"} else set()
    diffs = [f"--{k.replace('_', '-')} {getattr(given, k)!r} (recorded: {stored.get(k)!r})"
             for k in sorted(explicit) if hasattr(given, k) and k not in IGNORED_CONFIG
             and k in stored and getattr(given, k) != stored.get(k)]
    if diffs:
        raise ResumeError(f"--resume continues {out} with the options it was recorded with; these differ: "
                          f"{', '.join(diffs)}. Drop them, or record a new run")
    known = {f for f in TrainConfig.__dataclass_fields__}
    fields = {k: v for k, v in stored.items() if k in known}
    for k in explicit & IGNORED_CONFIG:
        fields[k] = kw[k]
    fields.update(out=out, resume=True, overwrite=False)
    return TrainConfig(**fields)


# -- info / analyze ---------------------------------------------------------------------
@main.command()
@click.argument("run_path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@user_errors
def info(run_path, as_json):
    """Describe a run store: status, progress, sizes and what was recorded."""
    from .describe import describe_run, format_description

    desc = describe_run(run_path)
    click.echo(json.dumps(desc, indent=2, default=str) if as_json else format_description(desc))


@main.command()
@click.argument("run_path", type=click.Path())
@click.option("--only", multiple=True, help="Analyses to run (default: all available).")
@click.option("--save/--no-save", default=False, help="Save results under the store's analysis/ group.")
@click.option("--param", "params", multiple=True, metavar="NAME.KEY=VALUE",
              help="Analysis parameter, e.g. --param forgetting.never_learned=inf (repeatable).")
@click.option("--opposing", is_flag=True,
              help="Opposing-signal analyses only (docs/OPPOSING.md); tune with --param, "
                   "e.g. opposing_pairs.cos_threshold=-0.6 or opposing_groups.similarity=0.7.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Compute on this running dask.distributed scheduler (e.g. tcp://10.0.0.5:8786); "
                   "default: threads in this process. No cluster is started (docs/SCALE.md).")
@click.option("--storage-options", default=None, metavar="JSON",
              help='fsspec options for a URL run path, e.g. \'{"anon": true}\' (docs/SCALE.md).')
@user_errors
def analyze(run_path, only, save, params, opposing, scheduler, storage_options):
    """Print a summary of a run and (optionally) save analysis results."""
    from .analyze import run_analyses

    if opposing:
        only = tuple(only) + ("opposing_pairs", "majority_opposition", "opposing_groups")
    try:
        options = json.loads(storage_options) if storage_options else None
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e})", param_hint="--storage-options") from None
    run_analyses(run_path, only=only, save=save, params=params, echo=click.echo, scheduler=scheduler,
                 storage_options=options)


# -- figures / report / list ------------------------------------------------------------
def _formats(formats: str) -> tuple[str, ...]:
    fmts = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    bad = set(fmts) - {"png", "pdf", "svg"}
    if bad:
        raise click.BadParameter(f"unsupported format(s) {sorted(bad)}; use png, pdf or svg", param_hint="--format")
    return fmts


def _echo_written(written, out) -> None:
    files = 0
    for name, paths in written.items():
        files += len(paths)
        click.echo(f"{name}: {', '.join(str(p) for p in paths)}")
    click.echo(f"wrote {files} file(s) for {len(written)} figure(s) in {out}"
               + (f"; {len(written.failed)} failed" if written.failed else "")
               + (f"; {len(written.skipped)} skipped (not available for this run: reason per figure below)" if written.skipped else ""))
    for name, why in written.skipped.items():
        click.echo(f"  skipped {name}: {why}")
    for name, why in written.failed.items():
        click.echo(f"dynascope: figure '{name}' failed: {why}", err=True)
    if written.failed:
        raise SystemExit(1)


@main.command()
@click.argument("run_paths", nargs=-1, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (required without --spec).")
@click.option("--spec", type=click.Path(dir_okay=False, exists=True),
              help="Batch specification (TOML) naming runs, figures, parameters and style.")
@click.option("--format", "formats", default="png", help="Comma-separated: png,pdf,svg.")
@click.option("--only", multiple=True, help="Figures to render (default: every available one).")
@click.option("--param", "params", multiple=True, metavar="NAME.KEY=VALUE",
              help="Analysis or figure parameter, e.g. --param opposing_pairs.cos_threshold=-0.7 (repeatable).")
@click.option("--style", "style_name", type=click.Choice(["default", "paper", "talk"]), default="default")
@click.option("--width", default=None, help="single (3.3 in), double (6.9 in) or inches; default: each figure's own.")
@click.option("--dpi", default=300, type=click.IntRange(30, 2400), help="Resolution of PNG output.")
@click.option("--animations/--no-animations", default=True, help="Also render GIF animations.")
@user_errors
def figures(run_paths, out, spec, formats, only, params, style_name, width, dpi, animations):
    """Render every figure the runs have data for; with several runs, also comparison figures
    (seeds of one configuration averaged). Draws from results saved by `analyze --save`."""
    from dynascope.figures.batch import render_runs, render_spec
    from dynascope.figures.style import Look

    from .analyze import parse_params

    if spec:
        if run_paths or out or only or params:
            raise click.UsageError("--spec names runs, output, figures and parameters itself; "
                                   "pass either --spec or RUN... --out, not both")
        from dynascope.figures.batch import load_spec

        written = render_spec(spec)
        _echo_written(written, load_spec(spec).out)
        return
    if not run_paths or not out:
        raise click.UsageError("pass RUN [RUN ...] and --out DIR, or --spec FILE")
    look = Look.parse(style_name, width, dpi)
    written = render_runs(run_paths, out, _formats(formats), names=list(only) or None,
                          params=parse_params(params), look=look, animations=animations)
    _echo_written(written, out)


@main.command()
@click.argument("run_path", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--param", "params", multiple=True, metavar="NAME.KEY=VALUE",
              help="Analysis or figure parameter, as for `figures` (repeatable).")
@click.option("--animations/--no-animations", default=True, help="Also render GIF animations.")
@user_errors
def report(run_path, out, params, animations):
    """Write report.html (sections, figures, findings, scores against ground truth) and
    summary.txt into OUT. Draws from results saved by `analyze --save`."""
    from dynascope.figures.report import write_report

    from .analyze import parse_params

    path = write_report(run_path, out, params=parse_params(params), animations=animations, progress=True)
    click.echo(f"report: {path}")


@main.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_(as_json):
    """List the analyses and figures, with their parameters and defaults."""
    from .describe import catalogue, format_catalogue

    cat = catalogue()
    click.echo(json.dumps(cat, indent=2, default=str) if as_json else format_catalogue(cat))


# -- demo ------------------------------------------------------------------------------
@main.command()
@click.option("--out", default="demo-out", type=click.Path(file_okay=False), help="Output directory.")
@click.option("--epochs", default=12, type=click.IntRange(min=1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu")
@user_errors
def demo(out, epochs, device):
    """Record a small `planted` run, analyze it, render its figures and report."""
    from .demo import run_demo

    run_demo(Path(out), epochs=epochs, device=device, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
