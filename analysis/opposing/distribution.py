"""Distributions behind the opposing-signal figures: the histogram of pairwise gradient
cosines (so a threshold such as -0.5 can be judged against the bulk) and the per-step loss
change with its outliers flagged by a robust z-score (median/MAD, immune to the outliers)."""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..registry import register_analysis
from ..run import Run
from .data import Dropped, gradient_group, probe_slice, probe_times, train_chunks
from .groups import robust_z
from .topk import unit_rows


@register_analysis("cosine_histogram", needs=("probe/grad_proj",))
def cosine_histogram(run: Run, source: str = "probe", probes=-1, bins: int = 80,
                     block: int = 2048) -> xr.Dataset:
    """Histogram of all pairwise gradient cosines (each unordered pair once), split into
    same-class and cross-class pairs; blockwise, so memory is O(block^2)."""
    ds = gradient_group(run, source)
    edges = np.linspace(-1, 1, bins + 1)
    same = np.zeros(bins, np.int64)
    cross = np.zeros(bins, np.int64)
    dropped = Dropped("cosine_histogram")

    def add(C, la, lb, upper):
        m = np.isfinite(C)
        if upper:
            m &= np.triu(np.ones(C.shape, bool), 1)
        eq = la[:, None] == lb[None, :]
        same[:] += np.histogram(C[m & eq], edges)[0]
        cross[:] += np.histogram(C[m & ~eq], edges)[0]

    if source == "probe":
        tgt = np.asarray(ds["target"].values)
        times = probe_times(ds, probes)
        for p in times:
            U, nrm = unit_rows(probe_slice(ds, int(p))[0])
            dropped.add(nrm > 0, np.ones(len(nrm), bool))
            U[~(nrm > 0)] = np.nan
            for i in range(0, len(U), block):
                for j in range(i, len(U), block):
                    add(np.clip(U[i:i + block] @ U[j:j + block].T, -1, 1), tgt[i:i + block],
                        tgt[j:j + block], i == j)
    else:
        times = np.arange(ds.sizes["step"]) if probes in (None, -1) else np.asarray(probes)
        for idx, G, valid, ids, tgt, _ in train_chunks(ds, times):
            for s in range(len(idx)):
                U, nrm = unit_rows(G[s])
                v = valid[s] & (nrm > 0)
                dropped.add(v, ids[s] >= 0)
                U = U[v]
                add(np.clip(U @ U.T, -1, 1), tgt[s][v], tgt[s][v], True)
    centers = (edges[:-1] + edges[1:]) / 2
    out = xr.Dataset({"same_class": ("cosine", same), "cross_class": ("cosine", cross)},
                     coords={"cosine": centers, "bin_edge": ("edge", edges)})
    out.attrs = dropped.finish({"source": source, "times": [int(t) for t in np.atleast_1d(times)]})
    return out


@register_analysis("loss_change_outliers", needs=("probe/loss",))
def loss_change_outliers(run: Run, source: str = "probe", z: float = 3.5) -> xr.Dataset:
    """Per-interval change of each tracked example's loss (probe) or per-step change of the
    batch loss (train), with a robust z-score and |z| > z flagged as outliers."""
    if source == "probe":
        ds = run.probe
        loss = np.asarray(ds["loss"].values, dtype=np.float64)
        delta = np.diff(loss, axis=0)
        zz = robust_z(delta, axis=1)
        steps = np.asarray(ds["step"].values)
        out = xr.Dataset(
            {"loss_change": (("interval", "example"), delta.astype(np.float32)),
             "z": (("interval", "example"), zz.astype(np.float32)),
             "outlier_increase": (("interval", "example"), zz > z),
             "outlier_decrease": (("interval", "example"), zz < -z)},
            coords={"interval_start": ("interval", steps[:-1]), "interval_end": ("interval", steps[1:]),
                    "example_id": ("example", np.asarray(ds["example_id"].values)),
                    "target": ("example", np.asarray(ds["target"].values))})
    elif source == "train":
        bl = np.asarray(run.train["batch_loss"].values, dtype=np.float64)
        delta = np.r_[np.nan, np.diff(bl)]
        zz = robust_z(delta)
        out = xr.Dataset({"batch_loss": ("step", bl.astype(np.float32)),
                          "loss_change": ("step", delta.astype(np.float32)),
                          "z": ("step", zz.astype(np.float32)),
                          "outlier_increase": ("step", zz > z), "outlier_decrease": ("step", zz < -z)},
                         coords={"step": np.arange(len(bl))})
    else:
        raise ValueError(f"source must be 'probe' or 'train', got {source!r}")
    out.attrs = {"source": source, "params": {"z": z},
                 "z_definition": "(x - median) / (1.4826 * MAD), per interval (probe) or over steps (train)"}
    return out
