"""Feature-signal analyses of the `activations/` group: how layers' representations relate
(Pearson blocks, CKA), how they drift over training, and intra-layer structure
(feature-feature and sample-sample correlation). docs/FEATURES.md explains the choices.

All read one probe row at a time (the unit the recorder wrote and held in memory), and
reduce it with the chunked estimators of `analysis.cka` and `analysis.correlation`.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .cka import cka, cka_matrix, unit_gram
from .correlation import live_units, mean_abs, pearson
from .registry import register_analysis
from .run import Run, RunError

GROUP = "activations"


def activation_layers(run: Run, layers=None, group: str = GROUP) -> list[str]:
    """Recorded layer arrays in forward (recording) order, optionally filtered by `layers`
    (array names or module paths, a list or a comma-separated string)."""
    ds = run.group(group)
    meta = run.extensions.get("activations", {}) if group == GROUP else dict(ds.attrs)
    recorded = [a for a in meta.get("layers", []) if a in ds.data_vars]
    recorded += sorted(a for a in ds.data_vars if a not in recorded and f"{a}__unit" in ds[a].dims)
    if layers is None:
        return recorded
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    out = []
    for name in layers:
        a = name.replace(".", "__")
        if a not in recorded:
            raise RunError(f"layer '{name}' was not recorded; recorded layers: {', '.join(recorded) or 'none'}")
        out.append(a)
    return out


def display_name(layer: str) -> str:
    return layer.replace("__", ".")


def _probe_indices(ds: xr.Dataset, probes) -> list[int]:
    n = ds.sizes.get("probe", 0)
    if n == 0:
        raise RunError("the run has no committed probe pass with activations; call rec.probe(...) "
                       "with an ActivationExtension attached")
    if probes is None:
        return list(range(n))
    if isinstance(probes, (int, np.integer)):
        probes = [probes]
    out = []
    for p in probes:
        if not -n <= int(p) < n:
            raise RunError(f"probe {p} out of range: the run has {n} probe passes")
        out.append(int(p) % n)
    return out


def _probe_coords(run: Run, probes: list[int]) -> dict:
    coords = {"probe": ("probe", np.asarray(probes, dtype=np.int64))}
    if run.has("probe"):
        pr = run.probe
        for var in ("step", "epoch"):
            if var in pr and pr.sizes.get("probe", 0) > max(probes):
                coords[var] = ("probe", np.asarray(pr[var].values)[probes])
    return coords


def even_subset(n: int, k: int | None) -> np.ndarray:
    """k evenly spaced indices out of n (all of them if k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, int(k)).round().astype(int))


def load_layer(run: Run, layer: str, probe: int, max_units: int | None = None,
               examples=None, group: str = GROUP) -> xr.DataArray:
    """One layer at one probe as an in-memory (example, unit) float64 DataArray."""
    da = run.group(group)[layer].isel(probe=probe)
    unit_dim = f"{layer}__unit"
    da = da.isel({unit_dim: even_subset(da.sizes[unit_dim], max_units)})
    if examples is not None:
        da = da.isel(example=examples)
    return da.astype(np.float64).load()


def _units(x: xr.DataArray, layer: str) -> np.ndarray:
    """Unit indices into the pooled/flattened layer output (positions if not recorded)."""
    dim = f"{layer}__unit"
    return x[dim].values if dim in x.coords else np.arange(x.sizes[dim])


def _pair_coords(layers: list[str]) -> dict:
    names = [display_name(a) for a in layers]
    return {"layer_a": ("layer_a", names), "layer_b": ("layer_b", names)}


@register_analysis("layer_correlation", needs=(GROUP,))
def layer_correlation(run: Run, layers=None, probes=None, max_units: int | None = 512,
                      chunk_size: int = 1024) -> xr.Dataset:
    """Mean |Pearson r| between the units of every pair of layers, per probe pass."""
    layers = activation_layers(run, layers)
    probes = _probe_indices(run.group(GROUP), probes)
    L = len(layers)
    out = np.zeros((len(probes), L, L))
    live = np.zeros((len(probes), L))
    for k, p in enumerate(probes):
        acts = [load_layer(run, a, p, max_units).values for a in layers]
        for i in range(L):
            live[k, i] = live_units(acts[i], chunk_size).mean()
            for j in range(i, L):
                r = pearson(acts[i], None if i == j else acts[j], chunk_size)
                out[k, i, j] = out[k, j, i] = mean_abs(r, exclude_diagonal=i == j)
    return xr.Dataset(
        {"mean_abs_r": (("probe", "layer_a", "layer_b"), out),
         "live_fraction": (("probe", "layer_a"), live)},
        coords={**_probe_coords(run, probes), **_pair_coords(layers)},
        attrs={"description": "mean |r| over all unit pairs (off-diagonal for a layer with itself); "
                              "r = 0 for zero-variance units", "max_units": max_units or -1})


@register_analysis("cka", needs=(GROUP,))
def layer_cka(run: Run, layers=None, probes=None, debiased: bool = False, method: str = "auto",
              batch_size: int = 256, max_gram_samples: int = 2048) -> xr.Dataset:
    """Linear CKA between every pair of layers, per probe pass.

    method "auto": exact up to `max_gram_samples` examples, else minibatch over shuffled
    (seed 0) batches, so class-sorted probe subsets still give mixed batches."""
    layers = activation_layers(run, layers)
    probes = _probe_indices(run.group(GROUP), probes)
    out = np.stack([cka_matrix([run.group(GROUP)[a].isel(probe=p).data for a in layers],
                               debiased=debiased, method=method, batch_size=batch_size,
                               max_gram_samples=max_gram_samples, seed=0) for p in probes])
    return xr.Dataset({"cka": (("probe", "layer_a", "layer_b"), out)},
                      coords={**_probe_coords(run, probes), **_pair_coords(layers)},
                      attrs={"debiased": int(debiased), "method": method})


@register_analysis("representation_drift", needs=(GROUP,))
def representation_drift(run: Run, layers=None, reference: int = -1, debiased: bool = False,
                         max_gram_samples: int = 2048) -> xr.Dataset:
    """Per layer, CKA of each probe's representation with the reference probe's (default the
    last) and with the previous probe's: how far and how fast each layer moves."""
    layers = activation_layers(run, layers)
    ds = run.group(GROUP)
    probes = _probe_indices(ds, None)
    ref = _probe_indices(ds, reference)[0]
    to_ref = np.zeros((len(probes), len(layers)))
    to_prev = np.full((len(probes), len(layers)), np.nan)
    n = ds.sizes["example"]
    for i, a in enumerate(layers):
        if n <= max_gram_samples:  # one unit-norm centred Gram per probe: O(P) Grams, not O(2P)
            rep = unit_gram(ds[a].isel(probe=ref).values, debiased)
            sim = lambda x, y: float(np.vdot(x, y))  # noqa: E731
            load = lambda k: unit_gram(ds[a].isel(probe=k).values, debiased)  # noqa: E731
        else:
            rep = ds[a].isel(probe=ref).data
            sim = lambda x, y: cka(x, y, debiased, max_gram_samples=0)  # noqa: E731
            load = lambda k: ds[a].isel(probe=k).data  # noqa: E731
        prev = None
        for k in probes:
            x = load(k)
            to_ref[k, i] = sim(x, rep)
            if prev is not None:
                to_prev[k, i] = sim(x, prev)
            prev = x
    return xr.Dataset({"cka_to_reference": (("probe", "layer"), to_ref),
                       "cka_to_previous": (("probe", "layer"), to_prev)},
                      coords={**_probe_coords(run, probes), "layer": [display_name(a) for a in layers]},
                      attrs={"reference_probe": ref, "debiased": int(debiased),
                             "description": "cka_to_previous is NaN at the first probe"})


def correlation_blocks(run: Run, probe: int = -1, layers=None, max_units: int = 48) -> dict:
    """{(layer_a, layer_b): (units_a x units_b) Pearson r} for a <= b in forward order, at
    one probe; units evenly subsampled to max_units per layer (for the grid figure)."""
    layers = activation_layers(run, layers)
    p = _probe_indices(run.group(GROUP), probe)[0]
    acts = {a: load_layer(run, a, p, max_units) for a in layers}
    blocks = {}
    for i, a in enumerate(layers):
        for b in layers[i:]:
            r = pearson(acts[a].values, None if a == b else acts[b].values)
            blocks[(a, b)] = xr.DataArray(r, dims=("unit_a", "unit_b"),
                                          coords={"unit_a": _units(acts[a], a), "unit_b": _units(acts[b], b)})
    return blocks


def feature_correlation(run: Run, layer: str, probe: int = -1, max_units: int | None = 128) -> xr.DataArray:
    """(unit x unit) Pearson r within one layer over the probe examples."""
    a = activation_layers(run, [layer])[0]
    p = _probe_indices(run.group(GROUP), probe)[0]
    x = load_layer(run, a, p, max_units)
    units = _units(x, a)
    return xr.DataArray(pearson(x.values), dims=("unit", "unit_other"),
                        coords={"unit": units, "unit_other": units}, name="r",
                        attrs={"layer": display_name(a), "probe": p})


def sample_correlation(run: Run, layer: str, probe: int = -1, max_examples: int = 128,
                       sort_by_target: bool = True) -> xr.DataArray:
    """(example x example) Pearson r between examples' activation vectors in one layer, on an
    evenly spaced subset of the probe examples (never the full n x n matrix), grouped by class."""
    a = activation_layers(run, [layer])[0]
    ds = run.group(GROUP)
    p = _probe_indices(ds, probe)[0]
    pick = even_subset(ds.sizes["example"], max_examples)
    target = run.probe["target"].values[pick] if run.has("probe", "target") else np.zeros(len(pick), int)
    ids = run.probe["example_id"].values[pick] if run.has("probe", "example_id") else pick
    if sort_by_target:
        order = np.argsort(target, kind="stable")
        pick, target, ids = pick[order], target[order], ids[order]
    x = load_layer(run, a, p, examples=pick).values
    r = pearson(x.T)  # samples are the variables, units the observations
    return xr.DataArray(r, dims=("sample", "sample_other"), name="r",
                        coords={"example_id": ("sample", ids), "target": ("sample", target)},
                        attrs={"layer": display_name(a), "probe": p})
