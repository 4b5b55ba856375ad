"""Training curves: per-epoch and per-class loss/accuracy for train, probe and eval,
per-example loss trajectories and per-step loss changes.

Train numbers come from the training forward passes (before each update), averaged over
every presentation in the epoch — the curve a training loop would print. Eval numbers
come from the held-out passes recorded with `rec.evaluate`.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .registry import register_analysis
from .run import Run, correct


def valid_mask(train: xr.Dataset) -> xr.DataArray:
    """True where a (step, slot) cell holds a real example (not padding)."""
    return train["example_id"] >= 0


def _pass_by_epoch(ds: xr.Dataset, row: str) -> xr.Dataset:
    """Mean loss/accuracy of each probe/eval pass, indexed by the epoch it followed."""
    out = xr.Dataset({"loss": ds["loss"].mean("example")})
    if "logits" in ds:
        out["accuracy"] = correct(ds["logits"], ds["target"]).mean("example")
    out = out.assign_coords(epoch=(row, ds["epoch"].values), step=(row, ds["step"].values))
    return out.swap_dims({row: "epoch"}).drop_vars("step").groupby("epoch").last()


@register_analysis("epoch_curves", needs=("train",))
def epoch_curves(run: Run) -> xr.Dataset:
    """Per-epoch train/probe/eval loss and accuracy, and the learning rate."""
    train = run.train
    valid = valid_mask(train)
    n = valid.sum("slot")
    per_step = xr.Dataset({
        "loss_sum": train["loss"].where(valid).sum("slot"),
        "count": n,
        "lr": train["lr"],
    })
    if "logits" in train:
        per_step["correct_sum"] = correct(train["logits"], train["target"]).sum("slot")
    per_step = per_step.assign_coords(epoch=train["epoch"]).compute()
    grouped = per_step.groupby("epoch")
    sums = grouped.sum()
    out = xr.Dataset({"train_loss": sums["loss_sum"] / sums["count"],
                      "lr": grouped.last()["lr"],
                      "steps": per_step["count"].groupby("epoch").count()})
    if "correct_sum" in sums:
        out["train_accuracy"] = sums["correct_sum"] / sums["count"]
    for group in ("probe", "eval"):
        if run.has(group) and run.group(group).sizes.get(group, 0):
            passes = _pass_by_epoch(run.group(group), group).compute()
            for var in passes.data_vars:
                out[f"{group}_{var}"] = passes[var].reindex(epoch=out.epoch)
    out["train_loss"].attrs["long_name"] = "mean training loss over the epoch's presentations"
    return out


def _class_table(loss, target, ok, classes: np.ndarray, dims: tuple[str, ...]):
    onehot = target == xr.DataArray(classes, dims="class_id")
    count = onehot.sum(dims)
    out = {"loss": loss.where(onehot).sum(dims) / count, "count": count}
    if ok is not None:
        out["accuracy"] = ok.where(onehot).sum(dims) / count
    return out


@register_analysis("class_curves", needs=("train/logits",))
def class_curves(run: Run) -> xr.Dataset:
    """Per-epoch, per-class loss and accuracy for the training presentations and eval passes."""
    train = run.train
    classes = np.arange(run.num_classes or int(train["target"].max()) + 1)
    valid = valid_mask(train)
    onehot = (train["target"] == xr.DataArray(classes, dims="class_id")) & valid
    ok = correct(train["logits"], train["target"])
    per_step = xr.Dataset({
        "loss_sum": train["loss"].where(onehot).sum("slot"),
        "correct_sum": ok.where(onehot).sum("slot"),
        "count": onehot.sum("slot"),
    }).assign_coords(epoch=train["epoch"]).compute()
    sums = per_step.groupby("epoch").sum()
    out = xr.Dataset({"train_loss": sums["loss_sum"] / sums["count"],
                      "train_accuracy": sums["correct_sum"] / sums["count"]})
    if run.has("eval") and run.eval.sizes.get("eval", 0):
        ev = run.eval
        table = _class_table(ev["loss"], ev["target"], correct(ev["logits"], ev["target"]) if "logits" in ev else None,
                             classes, ("example",))
        per_eval = xr.Dataset({f"eval_{k}": v for k, v in table.items() if k != "count"})
        per_eval = per_eval.assign_coords(epoch=("eval", ev["epoch"].values)).swap_dims({"eval": "epoch"})
        per_eval = per_eval.groupby("epoch").last().compute()
        for var in per_eval.data_vars:
            out[var] = per_eval[var].reindex(epoch=out.epoch)
    names = run.class_names
    return out.assign_coords(class_id=classes,
                             class_name=("class_id", [names[c] if c < len(names) else str(c) for c in classes]))


@register_analysis("loss_trajectories", needs=("train",))
def loss_trajectories(run: Run, source: str = "probe") -> xr.Dataset:
    """Per-example loss over training: probe passes (source='probe') or per-epoch mean
    of the training presentations (source='train')."""
    if source == "probe":
        if not run.has("probe") or not run.probe.sizes.get("probe", 0):
            raise ValueError("this run has no probe passes; use source='train' or record rec.probe(...)")
        p = run.probe
        out = xr.Dataset({"loss": p["loss"].compute()})
        return out.assign_coords(example_id=("example", p["example_id"].values),
                                 target=("example", p["target"].values),
                                 step=("probe", p["step"].values), epoch=("probe", p["epoch"].values))
    if source != "train":
        raise ValueError(f"source must be 'probe' or 'train', got {source!r}")
    from .blockwise import epoch_tables

    seq, epochs, t = epoch_tables(run, ("loss",))   # streamed over step blocks
    loss = t["loss"]
    return xr.Dataset({"loss": (("epoch", "example"), loss.astype(np.float32))},
                      coords={"epoch": epochs, "example_id": ("example", seq.examples),
                              "target": ("example", seq.target)})


@register_analysis("loss_change", needs=("train",))
def loss_change(run: Run) -> xr.Dataset:
    """Per-step change of the batch loss, and per-example loss change between probes."""
    train = run.train
    batch = train["batch_loss"].values
    change = np.concatenate([[np.nan], np.diff(batch)]).astype(np.float32)
    out = xr.Dataset({"batch_loss": ("step", batch), "batch_loss_change": ("step", change)},
                     coords={"step": np.arange(len(batch)), "epoch": ("step", train["epoch"].values)})
    if run.has("probe") and run.probe.sizes.get("probe", 0) > 1:
        p = run.probe
        delta = p["loss"].diff("probe", label="upper").compute()
        out["probe_loss_change"] = delta.rename(probe="probe_interval")
        out = out.assign_coords(probe_example_id=("example", p["example_id"].values))
    return out
