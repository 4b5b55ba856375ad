"""A synthetic dynascope store (written with zarr per docs/STORE.md, no torch) with a planted
opposing signal: a feature direction f carried by `planted` examples of classes 0 and 1,
pushing class 0 along +f and class 1 along -f with large norms, while their losses oscillate
in opposition. Other examples: class direction plus noise, smoothly decreasing losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

N, C, D, P, B = 96, 4, 48, 12, 16
PROBE_EVERY = 10


def _arr(group, name, data, dims):
    data = np.asarray(data)
    a = group.create_array(name, shape=data.shape, dtype=data.dtype, dimension_names=dims,
                           chunks=data.shape if data.ndim else None)
    a[...] = data


def planted_truth(planted: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    target = np.arange(N) % C
    has = np.zeros(N, bool)
    for cls in (0, 1):
        has[rng.choice(np.flatnonzero(target == cls), planted, replace=False)] = True
    return target, has


def _grads_and_losses(t, target, has, rng, dirs, f, osc):
    """Gradients (n, D) and losses (n,) of examples at (fractional) probe time t."""
    n = len(target)
    g = 0.6 * dirs[target] + 0.8 * rng.normal(size=(n, D)) / np.sqrt(D)
    g *= (0.3 + np.exp(-t / 6))[..., None] if np.ndim(t) else 0.3 + np.exp(-t / 6)
    loss = 2.0 * np.exp(-np.asarray(t) / 4) + 0.05 * np.abs(rng.normal(size=n))
    sign = np.where(target == 0, 1.0, -1.0)
    wave = osc(t)
    gp = (sign[:, None] * f + 0.3 * rng.normal(size=(n, D)) / np.sqrt(D)) * 3.0
    g = np.where(has[:, None], gp, g)
    lp = 1.0 + 0.8 * sign * wave + 0.05 * rng.normal(size=n)
    loss = np.where(has, lp, loss)
    return g.astype(np.float32), loss.astype(np.float32)


def write_synthetic_run(path, planted: int = 8, seed: int = 0, with_examples: bool = True) -> Path:
    """Write the store; planted=0 gives the control run (no opposing signal)."""
    rng = np.random.default_rng(seed)
    target, has = planted_truth(planted, seed) if planted else (np.arange(N) % C, np.zeros(N, bool))
    dirs = rng.normal(size=(C, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    f = rng.normal(size=D)
    f /= np.linalg.norm(f)
    osc = lambda t: np.where(np.floor(np.asarray(t)) % 2 == 0, 1.0, -1.0)  # noqa: E731

    steps_per_epoch = N // B
    S = PROBE_EVERY * (P - 1)
    root = zarr.open_group(str(path), mode="w")
    tr = root.create_group("train")
    ids = np.stack([rng.permutation(N)[:B] for _ in range(S)])
    G = np.zeros((S, B, D), np.float32)
    L = np.zeros((S, B), np.float32)
    for s in range(S):
        G[s], L[s] = _grads_and_losses(s / PROBE_EVERY, target[ids[s]], has[ids[s]], rng, dirs, f, osc)
    ids[-1, -3:] = -1  # a padded last batch
    G[-1, -3:] = np.nan
    L[-1, -3:] = np.nan
    tgt = np.where(ids >= 0, target[np.maximum(ids, 0)], -1)
    _arr(tr, "example_id", ids, ("step", "slot"))
    _arr(tr, "target", tgt, ("step", "slot"))
    _arr(tr, "loss", L, ("step", "slot"))
    _arr(tr, "grad_proj", G.astype(np.float16), ("step", "slot", "proj"))
    _arr(tr, "grad_norm", np.linalg.norm(G, axis=-1), ("step", "slot"))
    _arr(tr, "epoch", (np.arange(S) // steps_per_epoch).astype(np.int32), ("step",))
    _arr(tr, "batch_loss", np.nanmean(L, axis=1), ("step",))
    _arr(tr, "lr", np.full(S, 0.1), ("step",))

    pr = root.create_group("probe")
    GP = np.zeros((P, N, D), np.float32)
    LP = np.zeros((P, N), np.float32)
    for p in range(P):
        GP[p], LP[p] = _grads_and_losses(float(p), target, has, rng, dirs, f, osc)
    _arr(pr, "example_id", np.arange(N, dtype=np.int64), ("example",))
    _arr(pr, "target", target.astype(np.int64), ("example",))
    _arr(pr, "step", (np.arange(P) * PROBE_EVERY).astype(np.int64), ("probe",))
    _arr(pr, "epoch", (np.arange(P) * PROBE_EVERY // steps_per_epoch).astype(np.int32), ("probe",))
    _arr(pr, "loss", LP, ("probe", "example"))
    _arr(pr, "grad_proj", GP.astype(np.float16), ("probe", "example", "proj"))
    _arr(pr, "grad_norm", np.linalg.norm(GP, axis=-1), ("probe", "example"))

    gt = root.create_group("ground_truth")
    _arr(gt, "has_planted_feature", has, ("example",))
    _arr(gt, "is_mislabeled", np.zeros(N, bool), ("example",))
    _arr(gt, "clean_target", target.astype(np.int64), ("example",))
    if with_examples:
        img = (rng.uniform(60, 120, (N, 16, 16, 3))).astype(np.uint8)
        img[has, :4] = (90, 180, 250)
        ex = root.create_group("examples")
        _arr(ex, "image", img, ("example", "y", "x", "channel"))
        _arr(ex, "target", target.astype(np.int64), ("example",))
    root.attrs.update({"dynascope": {"schema_version": 1}, "status": "complete",
                       "committed": {"train": S, "probe": P},
                       "dataset": {"name": "synthetic-planted", "task": "classification",
                                   "num_examples": N, "num_classes": C,
                                   "class_names": [f"class{c}" for c in range(C)]}})
    return Path(path)
