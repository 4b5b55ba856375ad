"""Augmentation-driven feature variance, recorder side: run N random augmentations of chosen
examples through the model and store every view's layer activations in `augmentation/`.

Needs the model and the data, hence torch and the recorder; the invariance ratio itself
(within-augmentation variance / across-sample variance) is computed offline by
`analysis.augmentation`. Raw per-view activations are stored, not moments, so analysis can
also show view-by-view correlation; at the defaults (8 samples x 300 views x <= 2048 units,
float32) that is <= 20 MB per layer. The across-sample reference is the clean activations of
`n_reference` examples (the chosen samples included).
"""
from __future__ import annotations

import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr

from .activations import ActivationExtension, array_name
from .extensions import BatchContext

GROUP = "augmentation"


def default_transforms():
    """Label-preserving for digits and natural images alike: small rotations, shifts, zooms."""
    from torchvision.transforms import v2

    return v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1))


def _input(dataset, i: int) -> torch.Tensor:
    item = dataset[int(i)]
    x = item[0] if isinstance(item, (tuple, list)) else item
    return torch.as_tensor(x)


def _forward(model, ext: ActivationExtension, x: torch.Tensor, device, batch_size: int) -> dict:
    """{array name: (N, units) float32 numpy} for inputs x, in batches."""
    parts: dict[str, list] = {}
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(device)
        ctx = BatchContext("augment", torch.arange(len(xb)))
        ext.begin_batch(ctx)
        model(xb)
        for k, v in ext.end_batch(ctx).items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _store_path(target) -> Path:
    path = getattr(target, "path", target)
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"{path} is not a run store; record the run first (recorder.Recorder)")
    return path


def _array(group: zarr.Group, name: str, data: np.ndarray, dims, chunks=None, attrs=None):
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, dimension_names=list(dims),
                             chunks=chunks or data.shape, overwrite=True)
    if attrs:
        arr.attrs.update(attrs)
    if data.size:
        arr[...] = data
    return arr


def record_augmentation_variance(target, model: torch.nn.Module, dataset, sample_ids, n_aug: int = 300,
                                 transforms=None, layers=None, pool: str = "mean",
                                 max_units: int | None = 2048, reference_ids=None, n_reference: int = 256,
                                 montage_views: int = 48, batch_size: int = 100, seed: int = 0,
                                 device=None) -> str:
    """Record activations of `n_aug` augmented views of each example in `sample_ids`.

    target: a Recorder (open or closed) or the path of its store; writes `<store>/augmentation`
            (replacing an earlier one). dataset[i] must return x or (x, ...) with x a tensor.
    transforms: a callable on one input tensor (torchvision v2 transform); default
            `default_transforms()`. Augmentation randomness is seeded and does not touch the
            global torch RNG.
    layers/pool/max_units: as in `ActivationExtension` (same unit subsets as `activations/`).
    Returns the group path.
    """
    sample_ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    if len(sample_ids) == 0 or n_aug < 2:
        raise ValueError("need at least one sample id and n_aug >= 2 augmentations")
    if len(np.unique(sample_ids)) != len(sample_ids):
        raise ValueError("sample_ids must be distinct")
    out_of_range = sample_ids[(sample_ids < 0) | (sample_ids >= len(dataset))]
    if len(out_of_range):
        raise ValueError(f"sample_ids {out_of_range.tolist()[:5]} are out of range for a dataset of "
                         f"{len(dataset)} examples")
    path = _store_path(target)
    transforms = transforms or default_transforms()
    if reference_ids is None:
        rng = np.random.default_rng(seed)
        others = np.setdiff1d(np.arange(len(dataset)), sample_ids)
        extra = rng.choice(others, size=min(len(others), max(0, n_reference - len(sample_ids))), replace=False)
        reference_ids = np.sort(np.concatenate([sample_ids, extra]))
    reference_ids = np.asarray(reference_ids, dtype=np.int64).reshape(-1)
    if len(reference_ids) < 2:
        raise ValueError("the across-sample reference needs at least 2 examples")

    device = device or next(model.parameters()).device
    ext = ActivationExtension(layers=layers, pool=pool, max_units=max_units, kinds=("augment",), seed=0)
    ext.attach_model(model)
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(str(path / GROUP), mode="w", zarr_format=3)  # never rewrites the root
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clean = torch.stack([_input(dataset, i) for i in reference_ids])
            ref = _forward(model, ext, clean, device, batch_size)
            arrays = {}
            for s, sid in enumerate(sample_ids):
                x = _input(dataset, sid)
                views = torch.stack([transforms(x) for _ in range(n_aug)])
                acts = _forward(model, ext, views, device, batch_size)
                for a, v in acts.items():
                    if a not in arrays:
                        arrays[a] = group.create_array(
                            a, shape=(len(sample_ids), n_aug, v.shape[1]), dtype="float32",
                            chunks=(1, n_aug, v.shape[1]), fill_value=float("nan"),
                            dimension_names=["sample", "aug", f"{a}__unit"])
                    arrays[a][s] = v
                if s == 0 and x.dim() >= 3 and montage_views > 0:
                    shown = torch.cat([x[None], views[:montage_views - 1]]).float().cpu().numpy()
                    _array(group, "montage", shown, ("view", "channel", "y", "x"),
                           attrs={"sample_id": int(sid), "note": "view 0 is the un-augmented input; "
                                  "values are model inputs (normalised), rescale for display"})
    finally:
        ext.detach()
        model.train(was_training)

    units_info = ext.metadata()["units"]
    for m in ext.modules:
        a, v, subset = array_name(m), ref[array_name(m)], ext._subsets.get(m)
        _array(group, f"{a}__clean", v.astype(np.float32), ("reference", f"{a}__unit"))
        units = np.arange(v.shape[1]) if subset is None else subset.cpu().numpy()
        _array(group, f"{a}__unit", units.astype(np.int64), (f"{a}__unit",), attrs=units_info.get(a, {}))
    _array(group, "sample_id", sample_ids, ("sample",))
    _array(group, "reference_id", reference_ids, ("reference",))
    group.attrs.update({
        "layers": [array_name(m) for m in ext.modules], "modules": list(ext.modules), "pool": pool,
        "max_units": max_units, "n_aug": int(n_aug), "transforms": repr(transforms), "seed": int(seed),
        "step": int(getattr(target, "steps", -1)), "epoch": int(getattr(target, "last_epoch", -1)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    _refresh_consolidated(path)
    return GROUP


def _refresh_consolidated(path: Path) -> None:
    """A closed store has consolidated metadata that does not list the new group; refresh it
    (only then: while a recorder is open, its writer owns the root metadata)."""
    import json

    meta = json.loads((path / "zarr.json").read_text())
    if meta.get("consolidated_metadata") and meta.get("attributes", {}).get("status") != "recording":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(path))
