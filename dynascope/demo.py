"""`dynascope demo`: the whole pipeline on generated data, on a CPU: record a `planted` run,
analyze it, render every figure and the report (the report renders the figures once into
<out>/figures; report.html and summary.txt sit beside them). About 95 s on a quiet 2-core
machine; several times that when the cores are shared (README gives measured times)."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def demo_config(out_dir: Path, epochs: int, device: str):
    from dynascope.recorder.driver import TrainConfig

    grads = _has("dynascope.recorder.gradients")
    return TrainConfig(dataset="planted", model="cnn", epochs=epochs, out=str(out_dir / "run.zarr"),
                       batch_size=128, lr=0.05, device=device, probe_size=500, probe_every=4,
                       grad_norms=grads, grad_proj_dim=1024 if grads else 0,
                       activations="conv1,conv2,fc1,fc2" if _has("dynascope.recorder.activations") else None,
                       augment_samples="0,1,2,3" if _has("dynascope.recorder.augment") else None, augment_n=100,
                       snapshot_params="conv2.weight,fc2.weight", snapshot_every=2, overwrite=True)


def run_demo(out_dir: Path, epochs: int = 12, device: str = "cpu", echo=print) -> dict:
    from dynascope.recorder.driver import record_run

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = demo_config(out_dir, epochs, device)
    echo(f"[1/3] recording {cfg.epochs} epochs of a planted run → {cfg.out}")
    run_path = record_run(cfg)
    t1 = time.perf_counter()

    from .analyze import run_analyses

    echo(f"[2/3] analyzing ({t1 - t0:.0f} s so far)")
    run_analyses(run_path, save=True, echo=echo)

    from dynascope.analysis import open_run
    from dynascope.figures.report import write_report

    t2 = time.perf_counter()
    echo(f"[3/3] rendering every figure and the report → {out_dir} ({t2 - t0:.0f} s so far)")
    report = write_report(open_run(run_path), out_dir, progress=True)  # a bar: this stage takes longest
    fig_dir = out_dir / "figures"
    written = sorted(p.name for p in fig_dir.iterdir())
    echo("")
    echo(f"done in {time.perf_counter() - t0:.0f} s")
    echo(f"  run store : {run_path}    (dynascope info {run_path})")
    echo(f"  figures   : {fig_dir}  ({len(written)} rendered)")
    echo(f"  report    : {report}  (and {out_dir / 'summary.txt'})")
    return {"run": run_path, "figures": written, "report": report}
