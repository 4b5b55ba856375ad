"""Per-example loss change between consecutive presentations (or probes), split into
learning (loss went down) and forgetting (loss went up).

`analysis.curves.loss_change` gives the batch-loss change per step and the raw probe-to-probe
matrix; this is the per-example view behind the "loss change highlighting" figure: which
examples and which epochs carry the increases.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .registry import register_analysis
from .run import Run
from .sequences import gather


@register_analysis("example_loss_change", needs=("train",))
def example_loss_change(run: Run, source: str = "train") -> xr.Dataset:
    """Loss change between each example's consecutive presentations: per example (total
    decrease, total increase, counts, largest increase) and per epoch of the later one."""
    seq = gather(run, source, scores=("loss",))
    loss = seq.scores["loss"].astype(np.float64)
    same = seq.index[1:] == seq.index[:-1]
    delta = np.where(same, loss[1:] - loss[:-1], np.nan)
    ok = ~np.isnan(delta)
    idx, d = seq.index[1:][ok], delta[ok]
    epoch = (seq.epoch if source == "train" else seq.time)[1:][ok]
    up, down = d > 0, d < 0
    n = seq.num_examples

    def per_ex(mask, w):
        return np.bincount(idx[mask], weights=w[mask], minlength=n)

    largest = np.zeros(n)
    np.maximum.at(largest, idx[up], d[up])
    bins, binv = np.unique(epoch, return_inverse=True)
    k = len(bins)
    time_dim = "epoch" if source == "train" else "probe"
    ds = xr.Dataset(
        {"learning": ("example", -per_ex(down, d)),           # total loss decrease (>= 0)
         "forgetting": ("example", per_ex(up, d)),             # total loss increase (>= 0)
         "n_learning": ("example", np.bincount(idx[down], minlength=n)),
         "n_forgetting": ("example", np.bincount(idx[up], minlength=n)),
         "largest_increase": ("example", largest),
         "net_change": ("example", per_ex(ok[ok], d)),
         "time_learning": (time_dim, -np.bincount(binv[down], weights=d[down], minlength=k)),
         "time_forgetting": (time_dim, np.bincount(binv[up], weights=d[up], minlength=k)),
         "time_n_learning": (time_dim, np.bincount(binv[down], minlength=k)),
         "time_n_forgetting": (time_dim, np.bincount(binv[up], minlength=k))},
        coords={"example": seq.examples, "target": ("example", seq.target), time_dim: bins})
    ds["learning"].attrs["long_name"] = "summed loss decrease between consecutive presentations"
    ds["forgetting"].attrs["long_name"] = "summed loss increase between consecutive presentations"
    ds.attrs["source"] = source
    return ds
