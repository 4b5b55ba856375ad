"""Training curves: per-epoch and per-class loss/accuracy for train, probe and eval,
per-example loss trajectories and per-step loss changes.

Train numbers come from the training forward passes (before each update), averaged over
every presentation in the epoch — the curve a training loop would print. Eval numbers
come from the held-out passes recorded with `rec.evaluate`.

On sequence runs accuracy is token accuracy over all scored tokens (each sequence's
token_accuracy weighted by its num_tokens), as a language-model loop reports it; the loss
is the mean per-sequence loss. Regression runs have no accuracy.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .blockwise import class_epoch_sums, epoch_tables, step_blocks
from .registry import register_analysis
from .run import Run, correct


def valid_mask(train: xr.Dataset) -> xr.DataArray:
    """True where a (step, slot) cell holds a real example (not padding)."""
    return train["example_id"] >= 0


def _token_accuracy(ds: xr.Dataset, dim: str) -> tuple[xr.DataArray, xr.DataArray]:
    """(correct tokens, scored tokens) summed over `dim`, from per-sequence statistics."""
    n = ds["num_tokens"].where(ds["num_tokens"] > 0, 0)
    return (ds["token_accuracy"].fillna(0) * n).sum(dim), n.sum(dim)


def _pass_by_epoch(ds: xr.Dataset, row: str, task: str) -> xr.Dataset:
    """Mean loss/accuracy of each probe/eval pass, indexed by the epoch it followed."""
    out = xr.Dataset({"loss": ds["loss"].mean("example", skipna=False)})
    if task == "sequence" and "token_accuracy" in ds:
        hits, n = _token_accuracy(ds, "example")
        out["accuracy"] = hits / n
    elif task == "classification" and "logits" in ds:
        ok = correct(ds["logits"], ds["target"])
        out["accuracy"] = ok.mean("example").where(ok.notnull().all("example"))
    out = out.assign_coords(epoch=(row, ds["epoch"].values), step=(row, ds["step"].values))
    return out.swap_dims({row: "epoch"}).drop_vars("step").groupby("epoch").last()


def _step_sums(train: xr.Dataset, task: str) -> xr.Dataset:
    """Per-step loss sum, counts and correct sums of the presentations (lazy)."""
    valid = valid_mask(train)
    per_step = xr.Dataset({
        "loss_sum": train["loss"].where(valid).sum("slot"),
        "count": valid.sum("slot"),
        "nonfinite": (valid & ~np.isfinite(train["loss"])).sum("slot"),
        "lr": train["lr"],
    })
    if task == "sequence" and "token_accuracy" in train:
        per_step["correct_sum"], per_step["token_count"] = _token_accuracy(train, "slot")
    elif task == "classification" and "logits" in train:
        ok = correct(train["logits"], train["target"])
        per_step["correct_sum"] = ok.sum("slot")
        per_step["unknown"] = (valid & ok.isnull()).sum("slot")
    return per_step.assign_coords(epoch=train["epoch"])


@register_analysis("epoch_curves", needs=("train",))
def epoch_curves(run: Run) -> xr.Dataset:
    """Per-epoch train/probe/eval loss and accuracy, and the learning rate."""
    train = run.train
    # per-step sums a block of steps at a time: dask then never holds a graph (or results)
    # for the whole run, only (steps,) numbers; each step's sums are the same either way
    parts = [_step_sums(train.isel(step=rows), run.task).compute() for rows in step_blocks(train)]
    per_step = xr.concat(parts, dim="step") if parts else _step_sums(train, run.task).compute()
    grouped = per_step.groupby("epoch")
    sums = grouped.sum()
    # a NaN/inf loss (diverged, or a chunk missing from the store) makes the epoch's mean
    # unknown: NaN, with the count alongside, never a sum that skipped it
    out = xr.Dataset({"train_loss": (sums["loss_sum"] / sums["count"]).where(sums["nonfinite"] == 0),
                      "train_nonfinite_loss": sums["nonfinite"],
                      "lr": grouped.last()["lr"],
                      "steps": per_step["count"].groupby("epoch").count()})
    if "token_count" in sums:
        out["train_accuracy"] = sums["correct_sum"] / sums["token_count"]
        out["train_accuracy"].attrs["long_name"] = "token accuracy over the epoch's scored tokens"
    elif "correct_sum" in sums:
        out["train_accuracy"] = (sums["correct_sum"] / sums["count"]).where(sums["unknown"] == 0)
    for group in ("probe", "eval"):
        if run.has(group) and run.group(group).sizes.get(group, 0):
            passes = _pass_by_epoch(run.group(group), group, run.task).compute()
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


@register_analysis("class_curves", needs=("train/logits",), tasks=("classification",))
def class_curves(run: Run) -> xr.Dataset:
    """Per-epoch, per-class loss and accuracy for the training presentations and eval passes."""
    classes = np.arange(run.num_classes or int(run.train["target"].max()) + 1)
    # streamed over step blocks: memory set by a block and the (epoch, class) sums
    epochs, sums = class_epoch_sums(run, classes)
    dims = ("epoch", "class_id")
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(sums["nonfinite"] == 0, sums["loss_sum"] / sums["count"], np.nan)
        acc = np.where(sums["unknown"] == 0, sums["correct_sum"] / sums["count"], np.nan)
    out = xr.Dataset({"train_loss": (dims, loss), "train_accuracy": (dims, acc)}, coords={"epoch": epochs})
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


@register_analysis("loss_trajectories", needs=("probe/loss",))  # the default source
def loss_trajectories(run: Run, source: str = "probe") -> xr.Dataset:
    """Per-example loss over training: probe passes (source='probe') or per-epoch mean
    of the training presentations (source='train')."""
    if source == "probe":
        if not run.has("probe") or not run.probe.sizes.get("probe", 0):
            raise ValueError("this run has no probe passes; use source='train' or record rec.probe(...)")
        p = run.probe
        out = xr.Dataset({"loss": p["loss"].compute()})
        out = out.assign_coords(example_id=("example", p["example_id"].values),
                                step=("probe", p["step"].values), epoch=("probe", p["epoch"].values))
        if "target" in p and p["target"].ndim == 1:   # sequence runs store none; (B, k) is no label
            out = out.assign_coords(target=("example", p["target"].values))
        return out
    if source != "train":
        raise ValueError(f"source must be 'probe' or 'train', got {source!r}")
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
