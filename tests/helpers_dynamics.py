"""Tiny synthetic run stores with known answers, written with zarr directly (no torch).

`logits_for(correct, target, num_classes)` builds logits whose argmax is the target exactly
where `correct` is true, so tests can state correctness sequences by hand and check every
example-dynamics statistic against a hand-computed answer.
"""
from __future__ import annotations

from pathlib import Path

import warnings

import numpy as np
import zarr

FILL = {"i": -1, "u": 0, "f": np.nan, "b": False}


def _array(group: zarr.Group, name: str, data, dims) -> None:
    data = np.asarray(data)
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype,
                             chunks=data.shape if data.size else None,
                             fill_value=FILL.get(data.dtype.kind, 0), dimension_names=list(dims))
    if data.size:
        arr[...] = data


def logits_for(correct, target, num_classes: int, margin: float = 2.0) -> np.ndarray:
    """Logits (..., C): gold logit `margin` where correct, else class (target+1) % C wins."""
    correct = np.asarray(correct, bool)
    target = np.asarray(target)
    logits = np.zeros(correct.shape + (num_classes,), np.float32)
    wrong = (target + 1) % num_classes
    np.put_along_axis(logits, np.where(correct, target, wrong)[..., None], margin, axis=-1)
    return logits


def write_run(path, *, example_id, target, logits, epoch, loss=None, num_classes=None,
              probe=None, eval=None, ground_truth=None, images=None, grad_norm=None,
              class_names=None, status="complete") -> Path:
    """Write a schema-1 store. probe/eval: dicts with example_id, target, logits, step, epoch
    (and optional loss, grad_norm). Padding slots use example_id -1 and NaN logits."""
    path = Path(path)
    example_id = np.asarray(example_id, np.int64)
    target = np.asarray(target, np.int64)
    logits = np.asarray(logits, np.float32).copy()
    pad = example_id < 0
    logits[pad] = np.nan
    target = np.where(pad, -1, target)
    num_classes = num_classes or logits.shape[-1]
    if loss is None:
        loss = _xent(logits, target)
    loss = np.where(pad, np.nan, loss).astype(np.float32)
    n_examples = int(example_id.max()) + 1 if ground_truth is None else len(next(iter(ground_truth.values())))
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    committed = {"train": int(example_id.shape[0])}
    tr = root.create_group("train")
    _array(tr, "example_id", example_id, ("step", "slot"))
    _array(tr, "target", target, ("step", "slot"))
    _array(tr, "loss", loss, ("step", "slot"))
    _array(tr, "logits", logits, ("step", "slot", "class"))
    _array(tr, "epoch", np.asarray(epoch, np.int32), ("step",))
    _array(tr, "batch_loss", np.nanmean(loss, axis=1).astype(np.float32), ("step",))
    _array(tr, "lr", np.full(example_id.shape[0], 0.1), ("step",))
    if grad_norm is not None:
        _array(tr, "grad_norm", np.where(pad, np.nan, grad_norm).astype(np.float32), ("step", "slot"))
    for name, spec in (("probe", probe), ("eval", eval)):
        if spec is None:
            continue
        g = root.create_group(name)
        plog = np.asarray(spec["logits"], np.float32)
        ptarget = np.asarray(spec["target"], np.int64)
        ploss = spec.get("loss")
        if ploss is None:
            ploss = _xent(plog, np.broadcast_to(ptarget, plog.shape[:2]))
        _array(g, "example_id", np.asarray(spec["example_id"], np.int64), ("example",))
        _array(g, "target", ptarget, ("example",))
        _array(g, "step", np.asarray(spec["step"], np.int64), (name,))
        _array(g, "epoch", np.asarray(spec["epoch"], np.int32), (name,))
        _array(g, "loss", np.asarray(ploss, np.float32), (name, "example"))
        _array(g, "logits", plog, (name, "example", "class"))
        if spec.get("grad_norm") is not None:
            _array(g, "grad_norm", np.asarray(spec["grad_norm"], np.float32), (name, "example"))
        committed[name] = int(plog.shape[0])
    if ground_truth:
        g = root.create_group("ground_truth")
        for k, v in ground_truth.items():
            _array(g, k, np.asarray(v), ("example",))
    if images is not None:
        g = root.create_group("examples")
        _array(g, "image", np.asarray(images, np.uint8), ("example", "y", "x", "channel"))
    root.attrs.update({
        "dynascope": {"schema_version": 1}, "status": status, "committed": committed,
        "dataset": {"name": "synthetic", "task": "classification", "num_examples": n_examples,
                    "num_classes": num_classes,
                    "class_names": class_names or [f"c{i}" for i in range(num_classes)]},
    })
    return path


def _xent(logits, target):
    with np.errstate(all="ignore"):
        return _xent_raw(logits, target)


def _xent_raw(logits, target):
    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
    z = logits - np.nanmax(logits, axis=-1, keepdims=True)
    logp = z - np.log(np.nansum(np.exp(z), axis=-1, keepdims=True))
    t = np.clip(target, 0, None)[..., None]
    return -np.take_along_axis(logp, t, axis=-1)[..., 0]


def sequences_run(path, sequences: dict[int, list[int]], num_classes: int = 3, slots: int = 2,
                  target=None, **kw) -> Path:
    """A run in which example i is presented len(sequences[i]) times with the given
    correctness (1/0), one presentation per epoch, `slots` examples per step (padded)."""
    ids = sorted(sequences)
    n_epochs = max(len(s) for s in sequences.values())
    tgt = {i: (i % num_classes if target is None else target[i]) for i in ids}
    rows_id, rows_c, rows_ep = [], [], []
    for e in range(n_epochs):
        present = [i for i in ids if e < len(sequences[i])]
        for k in range(0, len(present), slots):
            chunk = present[k:k + slots]
            rows_id.append(chunk + [-1] * (slots - len(chunk)))
            rows_c.append([sequences[i][e] for i in chunk] + [0] * (slots - len(chunk)))
            rows_ep.append(e)
    example_id = np.array(rows_id)
    targets = np.array([[tgt.get(i, 0) for i in row] for row in rows_id])
    logits = logits_for(np.array(rows_c, bool), targets, num_classes)
    return write_run(path, example_id=example_id, target=targets, logits=logits,
                     epoch=np.array(rows_ep), num_classes=num_classes, **kw)


def learning_run(path, n: int = 40, epochs: int = 6, num_classes: int = 4, slots: int = 8,
                 flipped=(3, 17), seed: int = 0, images: bool = True) -> Path:
    """A run that 'learns': the gold logit grows with the epoch, except for the `flipped`
    examples (their label was flipped: gold logit falls). Has probe (every other example),
    eval, ground truth and thumbnails, so every example-dynamics figure can render."""
    rng = np.random.default_rng(seed)
    clean = np.arange(n) % num_classes
    target = clean.copy()
    flipped = np.asarray(flipped, int)
    target[flipped] = (clean[flipped] + 1) % num_classes
    rows, eps = [], []
    for e in range(epochs):
        perm = list(rng.permutation(n)) + [-1] * (-n % slots)
        rows += [perm[i:i + slots] for i in range(0, len(perm), slots)]
        eps += [e] * (len(perm) // slots)
    ids = np.array(rows)
    ep = np.array(eps)

    def logits_at(ex, e, tgt):
        z = rng.normal(0, 1, np.shape(ex) + (num_classes,)).astype(np.float32)
        gain = np.where(np.isin(ex, flipped), -0.6, 0.8) * e
        np.put_along_axis(z, np.clip(tgt, 0, None)[..., None],
                          np.take_along_axis(z, np.clip(tgt, 0, None)[..., None], -1) + gain[..., None], -1)
        return z

    tgt = np.where(ids >= 0, target[np.clip(ids, 0, None)], -1)
    logits = logits_at(ids, ep[:, None], tgt)
    pid = np.arange(0, n, 2)
    plog = np.stack([logits_at(pid, e, target[pid]) for e in range(epochs + 1)])
    eid = np.arange(20)
    elog = np.stack([logits_at(np.full(20, -5), e, eid % num_classes) for e in range(epochs + 1)])
    steps_per_epoch = len(rows) // epochs
    probe_steps = np.arange(epochs + 1) * steps_per_epoch
    kw = {}
    if images:
        kw["images"] = rng.integers(0, 255, (n, 8, 8, 3)).astype(np.uint8)
    return write_run(
        path, example_id=ids, target=tgt, logits=logits, epoch=ep, num_classes=num_classes,
        probe={"example_id": pid, "target": target[pid], "logits": plog, "step": probe_steps,
               "epoch": np.arange(-1, epochs)},
        eval={"example_id": eid, "target": eid % num_classes, "logits": elog, "step": probe_steps,
              "epoch": np.arange(-1, epochs)},
        ground_truth={"is_mislabeled": np.isin(np.arange(n), flipped), "clean_target": clean,
                      "has_planted_feature": np.zeros(n, bool)}, **kw)
