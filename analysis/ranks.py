"""One train table from the ranks of a torch.distributed run (docs/SCALE.md).

Rank 0 writes the run's root; rank r > 0 writes its own train rows under `ranks/<r>`.
Under DDP every rank takes optimizer step k together, so global step k is the union of the
ranks' batches of step k: the ranks' rows are joined along `slot` (rank 0's slots first;
coordinate `slot_rank` says whose each slot is). Per-step values come from rank 0, except
`batch_size` (summed) and `batch_loss` (the mean over every rank's presentations).
Pair arrays over the batch (the in-batch gradient Gram, `(step, slot, slot_j)`) become
block-diagonal over the merged slots: each rank computed the pairs of its own batch only,
so pairs of examples on different ranks are NaN (never computed), not missing columns.
"""
from __future__ import annotations

import numpy as np
import xarray as xr


def _block_diagonal_pairs(parts: list) -> list:
    """Pad each rank's `slot_j` axis to all merged slots, its own block at its offset."""
    widths = [p.sizes.get("slot", 0) for p in parts]
    out = []
    for r, p in enumerate(parts):
        pair = [v for v in p.data_vars if "slot_j" in p[v].dims]
        if pair:
            before, after = sum(widths[:r]), sum(widths[r + 1:])
            padded = p[pair].pad(slot_j=(before, after), constant_values=np.nan)
            p = p.drop_vars(pair).assign({v: padded[v].astype(p[v].dtype) for v in pair})
        out.append(p)
    return out


def merge(loc, attrs: dict, groups: dict, open_group, trim, error) -> tuple[dict, dict]:
    """Return (attrs, groups) with `train` merged over the ranks named in attrs["distributed"]."""
    info = attrs.get("distributed") or {}
    world = int(info.get("world_size", 1))
    if world <= 1 or "rank" in info or "train" not in groups:
        return attrs, groups
    parts, status = [groups["train"]], {"0": attrs.get("status")}
    for r in range(1, world):
        sub = loc / info.get("ranks", "ranks") / str(r)
        if not sub.exists("zarr.json"):
            raise error(f"{loc} was recorded by {world} ranks but rank {r} wrote nothing under "
                        f"ranks/{r}; copy the whole run directory, or open ranks/0 data alone with "
                        f"xarray.open_zarr(path, group='train')")
        sub_attrs = sub.read_json("zarr.json").get("attributes", {})
        status[str(r)] = sub_attrs.get("status")
        ds = open_group(sub, "train")
        if ds is None:
            raise error(f"rank {r} of {loc} recorded no train rows")
        parts.append(trim(ds, "step", int(sub_attrs.get("committed", {}).get("train", 0))))
    rows = min(p.sizes.get("step", 0) for p in parts)   # a step is whole once every rank wrote it
    parts = _block_diagonal_pairs([p.isel(step=slice(0, rows)) for p in parts])
    per_slot = [v for v in parts[0].data_vars if "slot" in parts[0][v].dims]
    merged = xr.concat([p[per_slot] for p in parts], dim="slot", data_vars="all", coords="minimal",
                       compat="override", join="exact")
    for v in parts[0].data_vars:
        if v not in per_slot:
            merged[v] = parts[0][v]
    if "batch_size" in merged:
        merged["batch_size"] = sum(p["batch_size"] for p in parts).astype(parts[0]["batch_size"].dtype)
    if "batch_loss" in merged and "loss" in merged:
        merged["batch_loss"] = merged["loss"].where(merged["example_id"] >= 0).mean("slot").astype(np.float32)
    merged = merged.assign_coords(slot_rank=("slot", np.concatenate(
        [np.full(p.sizes["slot"], r, dtype=np.int32) for r, p in enumerate(parts)])))
    attrs = {**attrs, "committed": {**attrs.get("committed", {}), "train": rows},
             "distributed": {**info, "status": status}}
    return attrs, {**groups, "train": merged}
