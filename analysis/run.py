"""Open a recorded run lazily: every group as a dask-backed xarray Dataset, trimmed to
what the recorder committed, plus the run's metadata.

Nothing here imports torch: analyses run on machines that never trained anything.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from dynascope import storage

from . import ranks

SCHEMA_VERSION = 1
ROW_DIMS = {"train": "step", "params": "step", "probe": "probe", "eval": "eval",
            "activations": "probe", "snapshots": "snapshot"}


class RunError(ValueError):
    """A path that is not a readable dynascope run, with what to do about it."""


@dataclass
class Run:
    """A recorded run: metadata plus lazily loaded groups (see docs/STORE.md)."""

    path: Path
    attrs: dict
    groups: dict[str, xr.Dataset] = field(default_factory=dict)

    # -- metadata -------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.attrs.get("status", "unknown")

    @property
    def committed(self) -> dict:
        return dict(self.attrs.get("committed", {}))

    @property
    def dataset(self) -> dict:
        return dict(self.attrs.get("dataset", {}))

    @property
    def task(self) -> str:
        """"classification", "regression" or "sequence" (token targets; docs/SEQUENCES.md)."""
        task = self.dataset.get("task")
        if task in ("classification", "regression", "sequence"):
            return task
        return "classification" if self.num_classes else "regression"

    @property
    def num_classes(self) -> int | None:
        return self.dataset.get("num_classes")

    @property
    def class_names(self) -> list[str]:
        names = self.dataset.get("class_names")
        if names:
            return list(names)
        return [str(i) for i in range(self.num_classes or 0)]

    @property
    def extensions(self) -> dict:
        return dict(self.attrs.get("extensions", {}))

    def describe_progress(self) -> str:
        """One line: how far the recording got, as users want to know after a crash."""
        c = self.committed
        parts = ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
        msg = f"status={self.status}; committed rows: {parts or 'none'}"
        if self.status == "failed" and self.attrs.get("error"):
            msg += f"; error: {self.attrs['error']}"
        if self.status == "recording":
            msg += " (recorder still open, or killed: data up to the committed rows is valid)"
        return msg

    # -- data -------------------------------------------------------------------
    def has(self, group: str, var: str | None = None) -> bool:
        ds = self.groups.get(group)
        if ds is None:
            return False
        return var is None or var in ds.variables

    def group(self, name: str) -> xr.Dataset:
        if name not in self.groups:
            have = ", ".join(sorted(self.groups)) or "none"
            raise RunError(f"run {self.path} has no '{name}' group (it has: {have}); "
                           f"record it first (see docs/STORE.md)")
        return self.groups[name]

    @property
    def train(self) -> xr.Dataset:
        return self.group("train")

    @property
    def probe(self) -> xr.Dataset:
        return self.group("probe")

    @property
    def eval(self) -> xr.Dataset:
        return self.group("eval")

    @property
    def ground_truth(self) -> xr.Dataset:
        return self.group("ground_truth")


def _open_group(path, name: str) -> xr.Dataset | None:
    """One group as a lazy Dataset (None if the store has no such group).

    A store that is still recording (or was killed mid-resize) can hold arrays of unequal
    length along a dimension; xarray refuses those, so such a group is opened array by array
    and every dimension cut to what all its arrays hold (committed rows are in all of them;
    the caller trims to them). Arrays replaced while we read are retried, so a reader polling
    a live run never fails.
    """
    last: Exception | None = None
    for attempt in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store = storage.location(path).zarr_store(read_only=True)
            try:
                # never trust consolidated metadata here: it is written at close and goes
                # stale when results are saved later or a run is still recording
                try:
                    ds = xr.open_zarr(store, group=name, consolidated=False)
                except ValueError:
                    ds = _open_piecewise(store, name)
                missing = set(zarr.open_group(store, path=name, mode="r").array_keys()) - set(ds.variables)
                if missing:   # listed while one was being replaced: read again
                    raise KeyError(f"arrays {sorted(missing)} were not read")
                return ds
            except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError, OSError) as e:
                if not _group_exists(store, name):
                    return None
                last = e
        time.sleep(0.05 * (attempt + 1))
    raise RunError(f"group '{name}' of {path} could not be read ({last}); "
                   f"is another process rewriting it?") from last


def _group_exists(store, name: str) -> bool:
    try:
        zarr.open_group(store, path=name, mode="r")
        return True
    except Exception:  # noqa: BLE001 - any failure to open means: not a readable group
        return False


def _open_piecewise(store, name: str) -> xr.Dataset:
    group = zarr.open_group(store, path=name, mode="r")
    dims_of = {k: (tuple(a.metadata.dimension_names or ()), a.shape) for k, a in group.arrays()}
    sizes: dict[str, int] = {}
    for dims, shape in dims_of.values():
        for d, n in zip(dims, shape):
            sizes[d] = min(sizes.get(d, n), n)
    parts = []
    for var, (dims, _) in dims_of.items():
        one = xr.open_zarr(store, group=name, consolidated=False,
                           drop_variables=[v for v in dims_of if v != var])
        parts.append(one.isel({d: slice(0, sizes[d]) for d in dims if d in one.dims}))
    return xr.merge(parts, combine_attrs="override", join="exact") if parts else xr.Dataset()


def _read_root_attrs(path: Path) -> dict:
    loc = storage.location(path)
    meta = loc / "zarr.json"
    if not loc.exists():
        raise RunError(f"{path} does not exist; pass the path of a run recorded with "
                       f"`dynascope record` or recorder.Recorder")
    if not loc.exists("zarr.json"):
        raise RunError(f"{path} is not a Zarr v3 store (no zarr.json); "
                       f"pass the path of a dynascope run (a directory ending in .zarr)")
    try:
        attrs = loc.read_json("zarr.json").get("attributes", {})
    except json.JSONDecodeError as e:
        raise RunError(f"{meta} is not valid JSON ({e}); the store is damaged") from None
    info = attrs.get("dynascope")
    if not isinstance(info, dict):
        raise RunError(f"{path} is a Zarr store but not a dynascope run "
                       f"(no 'dynascope' root attribute)")
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunError(f"{path} uses store schema {version}; this dynascope reads schema "
                       f"{SCHEMA_VERSION}. Install a matching dynascope version.")
    return attrs


def _trim(ds: xr.Dataset, row_dim: str, rows: int) -> xr.Dataset:
    if ds is not None and row_dim in ds.dims and ds.sizes[row_dim] > rows:
        return ds.isel({row_dim: slice(0, rows)})
    return ds


def open_run(path: str | Path, storage_options: dict | None = None) -> Run:
    """Open a run for analysis: a local path or an fsspec URL (s3://, gs://, memory://; credentials
    in `storage_options`). Groups are lazy; rows past `committed` are dropped."""
    loc = storage.location(path, storage_options)
    path = loc.local if loc.local is not None else loc
    attrs = _read_root_attrs(loc)
    committed = attrs.get("committed", {})
    groups: dict[str, xr.Dataset] = {}
    for child in loc.children():
        if child == "analysis":
            continue
        ds = _open_group(loc, child)
        if ds is None or not ds.variables:
            continue
        row_dim = ROW_DIMS.get(child)
        if row_dim is not None:
            ds = _trim(ds, row_dim, int(committed.get(child, 0)))
        groups[child] = ds
    attrs, groups = ranks.merge(loc, attrs, groups, _open_group, _trim, RunError)   # torch.distributed runs
    return Run(path=path, attrs=attrs, groups=groups)


def saved_results(path: str | Path) -> list[str]:
    """Names of analysis results saved in the store."""
    base = storage.location(path) / "analysis"
    if not base.exists():
        return []
    return base.children()


def save_result(path: str | Path, name: str, result: xr.Dataset, params: dict) -> str:
    """Save an analysis result under `analysis/<name>` with its parameters in attrs."""
    from datetime import datetime, timezone

    out = result.copy()
    from .parameters import json_safe
    from .registry import ANALYSES, defaults

    effective = result.attrs.get("effective_params")
    if effective is None and name in ANALYSES:  # saved from a plain call: defaults + what was passed
        effective = {**defaults(ANALYSES[name]), **params}
    # the result's own full parameters stay; `run_committed` lets a reader tell a result
    # saved before the run was resumed from one that covers every recorded row
    out.attrs = json_safe({**result.attrs, "analysis": name,
                           "params": {**result.attrs.get("params", {}), **params},
                           **({"effective_params": effective} if effective is not None else {}),
                           "run_committed": _read_root_attrs(path).get("committed", {}),
                           "created": datetime.now(timezone.utc).isoformat()})
    for v in out.variables.values():
        v.encoding = {}
    group = f"analysis/{name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loc = storage.location(path)
        out.to_zarr(loc.zarr_store(), group=group, mode="w", consolidated=False)
        if loc.exists("zarr.json") and "consolidated_metadata" in loc.read_json("zarr.json"):
            zarr.consolidate_metadata(loc.zarr_store())  # keep plain xr.open_zarr(path, group=...) in sync
    return group


def load_result(path: str | Path, name: str) -> xr.Dataset:
    ds = _open_group(storage.location(path), f"analysis/{name}")
    if ds is None:
        raise RunError(f"no saved analysis '{name}' in {path}; "
                       f"saved: {', '.join(saved_results(path)) or 'none'}")
    return ds


def correct(logits: xr.DataArray, target: xr.DataArray, class_dim: str = "class") -> xr.DataArray:
    """Whether argmax(logits) equals the target; NaN where the slot is padding."""
    pred = logits.fillna(-np.inf).argmax(class_dim)  # padded slots are all-NaN
    valid = (target >= 0) & logits.notnull().all(class_dim)
    return (pred == target).where(valid)

