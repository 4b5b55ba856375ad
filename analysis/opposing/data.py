"""Reading per-example gradients out of a run, one probe pass or one chunk of steps at a
time, so no analysis ever holds more than one slice of `grad_proj` in memory.

The sketch is stored as float16 unit rows times a float32 `grad_proj_scale`; rows are
rescaled here (stores without the scale are read as they are). Within training batches and
across a probe pass the exact `grad_gram` is used when recorded (`cosine_source`). Magnitudes: the exact
`grad_norm` when the run recorded it (the projection only estimates the norm); otherwise
the projection's own norm. Rows that cannot give a cosine (NaN, zero) are counted and
reported by `Dropped`, never skipped silently.
"""
from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from ..run import Run, RunError

SOURCES = ("probe", "train")
RANK_BLOCKS = ("this run was recorded by {n} DDP ranks: its train/grad_gram is exact within each "
               "rank's batch only (pairs of examples on different ranks were never computed and are "
               "NaN, and so is the cosine to the whole batch's mean gradient); ")


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


def _sketch(sub: xr.Dataset) -> np.ndarray:
    """The stored sketch rescaled to gradient units, float32 (..., D)."""
    G = np.asarray(sub["grad_proj"].values, dtype=np.float32)
    if "grad_proj_scale" in sub:
        G = G * np.asarray(sub["grad_proj_scale"].values, dtype=np.float32)[..., None]
    return G


def _magnitudes(sub: xr.Dataset, G: np.ndarray) -> np.ndarray:
    """The exact `grad_norm` when recorded, else the sketch's own norm (an estimate)."""
    if "grad_norm" in sub:
        return np.asarray(sub["grad_norm"].values, dtype=np.float64)
    return np.linalg.norm(G, axis=-1).astype(np.float64)


def probe_slice(ds: xr.Dataset, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(G (N, D) float32, magnitudes (N,)) of probe pass p."""
    sub = ds.isel(probe=p)
    G = _sketch(sub)
    return G, _magnitudes(sub, G)


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
        G = _sketch(sub)
        ids = np.asarray(sub["example_id"].values)
        valid = (ids >= 0) & np.isfinite(G).all(-1)
        mag = _magnitudes(sub, G)
        # sequence runs store no per-example target: -1 ("no label"), like padding
        tgt = np.asarray(sub["target"].values) if "target" in sub else np.full(ids.shape, -1)
        yield idx, G, valid, ids, tgt, mag


def use_gram(ds: xr.Dataset, cosine_source: str, source: str = "train", probes=None) -> bool:
    """Whether to read cosines from the exact `grad_gram` ("auto": when recorded, and for
    probes when every selected pass has it; a pass over the recorder's memory budget has
    none, and mixing exact and sketched cosines would give one table two error laws)."""
    if cosine_source not in ("auto", "exact_gram", "sketch"):
        raise ValueError(f"cosine_source must be 'auto', 'exact_gram' or 'sketch', got {cosine_source!r}")
    if cosine_source == "sketch":
        return False
    missing = ([] if "grad_gram" not in ds or source != "probe"
               else [int(p) for p, ok in zip(probes, probe_gram_present(ds, probes)) if not ok])
    if cosine_source == "exact_gram" and ("grad_gram" not in ds or missing):
        what = f"{source}/grad_gram" + (f" for probe passes {missing}" if missing else "")
        raise RunError(f"this run has no {what}; record it with dynascope record --grad-gram "
                       "(Recorder(..., grad_gram=True); probe passes also need their per-example "
                       "gradients to fit grad_probe_gram_budget) or use cosine_source='sketch'")
    ranks = _ranks(ds) if source == "train" and "grad_gram" in ds else 1
    if ranks > 1 and cosine_source == "auto" and "grad_proj" in ds:
        warnings.warn(RANK_BLOCKS.format(n=ranks) + "using the sketch, which covers every pair "
                      "(cosine_source='exact_gram' for the exact within-rank pairs)", RuntimeWarning, stacklevel=3)
        return False
    if ranks > 1:
        warnings.warn(RANK_BLOCKS.format(n=ranks) + "record grad_projection too for cosines across "
                      "ranks (cosine_source='sketch')", RuntimeWarning, stacklevel=3)
    if missing:
        warnings.warn(f"probe passes {missing} have no probe/grad_gram (over the recorder's "
                      "probe_gram_budget); all selected passes use the sketch instead "
                      "(select passes with probes= to use the exact Gram)", RuntimeWarning, stacklevel=3)
    return "grad_gram" in ds and not missing


def _ranks(ds: xr.Dataset) -> int:
    """How many ranks' batches the merged train table joins along `slot` (1 without DDP)."""
    return len(np.unique(ds["slot_rank"].values)) if "slot_rank" in ds.coords else 1


def probe_gram_present(ds: xr.Dataset, probes) -> np.ndarray:
    """(P,) whether each probe pass has a recorded Gram (a finite diagonal entry)."""
    i = xr.DataArray(np.arange(ds.sizes["example"]), dims="d")
    d = np.asarray(ds["grad_gram"].isel(probe=xr.DataArray(np.asarray(probes), dims="p"),
                                        example=i, example_j=i).values)
    return np.isfinite(d).any(-1)


def gram_cosines(K: np.ndarray, present: np.ndarray):
    """(cosines, valid, magnitudes) from Grams K (..., B, B): rows with a NaN or zero
    diagonal are invalid (NaN cosines); magnitudes are the diagonal's square roots."""
    d = np.diagonal(K, axis1=-2, axis2=-1)
    valid = present & np.isfinite(d) & (d > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = np.sqrt(np.where(valid, d, np.nan))
        C = K / (mag[..., :, None] * mag[..., None, :])
    C = np.clip(np.where(valid[..., :, None] & valid[..., None, :], C, np.nan), -1, 1)
    return C, valid, mag


def probe_gram_slice(ds: xr.Dataset, p: int):
    """(cosines (N, N), valid (N,), magnitudes (N,)) of probe pass p from its exact Gram."""
    K = np.asarray(ds["grad_gram"].isel(probe=p).values, dtype=np.float64)
    return gram_cosines(K, np.ones(K.shape[0], bool))


def train_gram_chunks(ds: xr.Dataset, steps=None, chunk: int = 64):
    """Yield (step indices, cosines (S, B, B), valid (S, B), example_id, target, magnitudes)
    from the exact in-batch Gram; magnitudes are its diagonal's square roots."""
    n = ds.sizes["step"]
    steps = np.arange(n) if steps is None else np.asarray(steps)
    for s in range(0, len(steps), chunk):
        idx = steps[s:s + chunk]
        sub = ds.isel(step=idx)
        K = np.asarray(sub["grad_gram"].values, dtype=np.float64)
        ids = np.asarray(sub["example_id"].values)
        B = ids.shape[1]
        K = K[:, :B, :B]
        C, valid, mag = gram_cosines(K, ids >= 0)
        yield idx, C, valid, ids, np.asarray(sub["target"].values), mag, K


def sketch_error(run: Run, source: str) -> dict:
    """The stored sketch's error law: {"c0": sd of the cosine error at true cosine 0,
    "law": text}. c0 = c / sqrt(K) from the store's metadata (1 / sqrt(D) for old stores)."""
    meta = (run.attrs.get("extensions") or {}).get("gradients") or {}
    err = (meta.get("projection") or {}).get("error") or {}
    c0 = err.get("cos_sd_at_zero")
    if c0 is None:
        ds = run.group(source)
        c0 = 1.0 / np.sqrt(max(1, ds.sizes.get("proj", 1)))
    return {"c0": float(c0), "law": err.get("law", "sd ~= c0 (1 - cos^2)")}


class Dropped:
    """Counts rows that cannot give a cosine (NaN or zero gradient) and warns once."""

    def __init__(self, analysis: str):
        self.analysis, self.rows, self.total = analysis, 0, 0

    def add(self, valid: np.ndarray, present: np.ndarray) -> None:
        present = np.asarray(present, bool)
        self.total += int(present.sum())
        self.rows += int((present & ~np.asarray(valid, bool)).sum())

    def finish(self, attrs: dict) -> dict:
        if self.rows:
            warnings.warn(f"{self.analysis}: {self.rows} of {self.total} example rows have a NaN or "
                          "zero gradient (examples with loss weight 0, layers recorded as NaN) and "
                          "were left out; attrs['dropped_rows'] counts them", RuntimeWarning, stacklevel=3)
        attrs.update(dropped_rows=self.rows, rows_considered=self.total)
        return attrs


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
