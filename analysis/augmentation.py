"""Augmentation invariance of each layer, from the `augmentation/` group written by
`recorder.augment.record_augmentation_variance`.

ratio = E_samples[ sum_u Var_aug(a_u) ] / sum_u Var_reference(a_u): how much random
augmentations of one example move a layer's features, relative to how much switching to
another example moves them (unbiased variances, ddof=1). 0: fully invariant; 1: an
augmentation changes the representation as much as a different example does. Summing over
units before dividing keeps dead units (variance 0 in both) from producing 0/0; the ratio
is NaN only for a layer that is constant over the whole reference set.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .correlation import pearson
from .features import activation_layers, display_name, even_subset
from .registry import register_analysis
from .run import Run

GROUP = "augmentation"


@register_analysis("augmentation_invariance", needs=(GROUP,))
def augmentation_invariance(run: Run, layers=None) -> xr.Dataset:
    """Per layer: within-augmentation feature variance relative to the across-sample variance."""
    g = run.group(GROUP)
    layers = activation_layers(run, layers, group=GROUP)
    within = np.zeros((g.sizes["sample"], len(layers)))
    across = np.zeros(len(layers))
    for i, a in enumerate(layers):
        unit = f"{a}__unit"
        within[:, i] = g[a].astype(np.float64).var("aug", ddof=1).sum(unit).values
        across[i] = float(g[f"{a}__clean"].astype(np.float64).var("reference", ddof=1).sum(unit))
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.where(across > 0, across, np.nan)
        per_sample = within / denom
        ratio = within.mean(0) / denom
    return xr.Dataset(
        {"within_var": (("sample", "layer"), within), "across_var": ("layer", across),
         "ratio": ("layer", ratio), "ratio_per_sample": (("sample", "layer"), per_sample)},
        coords={"layer": [display_name(a) for a in layers], "sample_id": ("sample", g["sample_id"].values)},
        attrs={"n_aug": int(g.attrs.get("n_aug", g.sizes.get("aug", 0))),
               "n_reference": int(g.sizes.get("reference", 0)),
               "description": "variances summed over units; ddof=1"})


def view_correlation(run: Run, layer: str, max_samples: int = 4, views_per_sample: int = 32) -> xr.DataArray:
    """(view x view) Pearson r between augmented views' activation vectors in one layer, for
    up to `max_samples` examples (views of one example are consecutive: block structure)."""
    g = run.group(GROUP)
    a = activation_layers(run, [layer], group=GROUP)[0]
    samples = even_subset(g.sizes["sample"], max_samples)
    views = even_subset(g.sizes["aug"], views_per_sample)
    x = g[a].isel(sample=samples, aug=views).astype(np.float64).values   # (s, v, units)
    r = pearson(x.reshape(-1, x.shape[-1]).T)
    sid = np.repeat(g["sample_id"].values[samples], len(views))
    return xr.DataArray(r, dims=("view", "view_other"), name="r",
                        coords={"sample_id": ("view", sid), "aug": ("view", np.tile(views, len(samples)))},
                        attrs={"layer": display_name(a)})
