"""Reading per-example gradients out of a run, one probe pass or one chunk of steps at a
time, so no analysis ever holds more than one slice of `grad_proj` in memory.

Magnitudes: the exact `grad_norm` when the run recorded it (the projection only estimates
the norm); otherwise the projection's own norm.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..run import Run, RunError

SOURCES = ("probe", "train")


def gradient_group(run: Run, source: str) -> xr.Dataset:
    """The group holding `grad_proj` for `source`, with a helpful error if it is missing."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not run.has(source, "grad_proj"):
        raise RunError(f"run {run.path} has no {source}/grad_proj; record it with gradient "
                       f"projections (dynascope record --grad-proj-dim 1024)")
    ds = run.group(source)
    if ds.sizes.get("probe" if source == "probe" else "step", 0) == 0:
        raise RunError(f"run {run.path} has no committed {source} rows yet")
    return ds


def probe_slice(ds: xr.Dataset, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(G (N, D) float32, magnitudes (N,)) of probe pass p."""
    G = np.asarray(ds["grad_proj"].isel(probe=p).values, dtype=np.float32)
    if "grad_norm" in ds:
        mag = np.asarray(ds["grad_norm"].isel(probe=p).values, dtype=np.float64)
    else:
        mag = np.linalg.norm(G, axis=1).astype(np.float64)
    return G, mag


def train_chunks(ds: xr.Dataset, steps=None, chunk: int | None = None):
    """Yield (step indices, G (S, B, D), valid (S, B), example_id, target, magnitudes)."""
    n = ds.sizes["step"]
    steps = np.arange(n) if steps is None else np.asarray(steps)
    if chunk is None:
        enc = ds["grad_proj"].encoding.get("chunks") or ds["grad_proj"].encoding.get("preferred_chunks")
        chunk = int(enc[0]) if isinstance(enc, (tuple, list)) else 64
    for s in range(0, len(steps), chunk):
        idx = steps[s:s + chunk]
        sub = ds.isel(step=idx)
        G = np.asarray(sub["grad_proj"].values, dtype=np.float32)
        ids = np.asarray(sub["example_id"].values)
        valid = (ids >= 0) & np.isfinite(G).all(-1)
        if "grad_norm" in sub:
            mag = np.asarray(sub["grad_norm"].values, dtype=np.float64)
        else:
            mag = np.linalg.norm(G, axis=-1).astype(np.float64)
        # sequence runs store no per-example target: -1 ("no label"), like padding
        tgt = np.asarray(sub["target"].values) if "target" in sub else np.full(ids.shape, -1)
        yield idx, G, valid, ids, tgt, mag


def probe_times(ds: xr.Dataset, probes=None) -> np.ndarray:
    """Probe indices to analyse (default all; negative indices count from the end)."""
    n = ds.sizes["probe"]
    if probes is None:
        return np.arange(n)
    p = np.atleast_1d(np.asarray(probes, dtype=np.int64))
    return np.where(p < 0, p + n, p)


def class_names(run: Run, classes: np.ndarray) -> list[str]:
    names = run.class_names
    return [names[c] if 0 <= c < len(names) else str(c) for c in classes]


def num_classes(run: Run, *targets) -> int:
    if run.num_classes:
        return int(run.num_classes)
    return int(max(np.max(t) for t in targets)) + 1
