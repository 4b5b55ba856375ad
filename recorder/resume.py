"""Reopening an interrupted run to continue it (`Recorder(path, ..., resume=True)`).

A run whose status is `recording` (killed) or `failed` is reopened: the configuration must
match what it was recorded with, every group is cut back to its committed rows (or to the
rows a driver checkpoint recorded, `resume_state=`), groups that share a row index are
re-aligned, and the Recorder's counters continue from the store, so `rec.steps` says where
the training loop must continue.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import zarr

from . import store as store_mod

RESUMABLE = ("recording", "failed")
# config keys that may differ between the first run and its resumption
IGNORED_CONFIG = {"out", "overwrite", "resume", "device", "data_dir", "download", "checkpoint_every"}


class ResumeError(ValueError):
    """A run that cannot be resumed, or not with this configuration."""


def _norm(value):
    return json.loads(json.dumps(value, default=str))


def stored_attrs(path) -> dict:
    meta = path / "zarr.json"
    if not meta.exists():
        raise ResumeError(f"{path} holds no run to resume; drop resume=True (CLI: --resume) to start a new run")
    attrs = json.loads(meta.read_text()).get("attributes", {})
    if "dynascope" not in attrs:
        raise ResumeError(f"{path} is a Zarr store but not a dynascope run; nothing to resume")
    status = attrs.get("status")
    if status not in RESUMABLE:
        raise ResumeError(f"{path} has status '{status}'; only runs that are 'recording' (killed) or 'failed' "
                          f"can be resumed. Record a new run (another path, or overwrite=True / --overwrite)")
    return attrs


def check_matches(path, stored: dict, new: dict, extensions: list[str] | None = None) -> None:
    """Raise ResumeError naming every difference that would make the continued rows wrong."""
    diffs = []
    sc = {k: v for k, v in _norm(stored.get("config", {})).items() if k not in IGNORED_CONFIG}
    nc = {k: v for k, v in _norm(new.get("config", {})).items() if k not in IGNORED_CONFIG}
    diffs += [f"config {k}: recorded {sc.get(k)!r}, now {nc.get(k)!r}"
              for k in sorted(set(sc) | set(nc)) if sc.get(k) != nc.get(k)]
    for section, keys in (("dataset", ("task", "num_classes", "num_examples")),
                          ("model", ("name", "num_parameters", "trainable_parameters"))):
        if section not in new:
            continue
        old, now = _norm(stored.get(section, {})), _norm(new.get(section, {}))
        diffs += [f"{section} {k}: recorded {old.get(k)!r}, now {now.get(k)!r}" for k in keys if old.get(k) != now.get(k)]
    old_ext = sorted(stored.get("extensions", {}))
    if extensions is not None and stored.get("extensions") is not None and old_ext != sorted(extensions):
        diffs.append(f"extensions: recorded {old_ext}, now {sorted(extensions)}")
    if diffs:
        raise ResumeError(f"{path} was recorded with a different configuration, so resuming would mix two runs: "
                          + "; ".join(diffs[:10]) + ". Resume with the original settings, or record a new run")


def reopen(path, stored: dict) -> zarr.Group:
    root = zarr.open_group(str(path), mode="r+")
    committed = dict(stored.get("committed", {}))
    history = list(stored.get("resumed", [])) + [{"at": store_mod.now(), "from_status": stored.get("status"),
                                                  "committed": committed, "error": stored.get("error")}]
    root.attrs.update({"status": "recording", "resumed": history, "error": None, "finished": None})
    return root


def align_groups(rec, writer, root: zarr.Group) -> None:
    """After a kill the groups that share a row index can disagree: probe/activations are cut
    to the rows both hold."""
    c = writer.committed
    if "activations" in root and "probe" in root:
        m = min(c.get("probe", 0), c.get("activations", 0))
        writer.truncate({"probe": m, "activations": m})
    # params rows name their own train step (a cadence records every N-th), so rows the
    # kill lost are simply absent; none can lie beyond the train rows
    if "params" in root and "step" in root["params"] and c.get("params", 0):
        steps = np.asarray(root["params"]["step"][:c["params"]])
        keep = int(np.searchsorted(steps, c.get("train", 0)))
        if keep < c["params"]:
            writer.truncate({"params": keep})


def counters_from_store(rec, root: zarr.Group) -> None:
    """Continue the Recorder's step, epoch and example counters from the committed rows."""
    n = int(rec.writer.committed.get("train", 0))
    rec.steps = n
    if n and "train" in root:
        train = root["train"]
        epoch = np.asarray(train["epoch"][:n])
        rec.examples_seen = int(np.asarray(train["batch_size"][:n]).sum())
        rec.last_epoch = int(epoch[-1])
        if rec.optimizer is not None:
            rec.optimizer_steps = int(train["optimizer_step"][n - 1]) + 1
        first = int(np.flatnonzero(epoch == epoch[-1])[0])
        ids = np.asarray(train["example_id"][first:n]).ravel()
        rec._epochs.load({"seen": np.unique(ids[ids >= 0]), "epoch": rec.last_epoch,
                          "source": root.attrs.get("epoch_source")})
    probe_ids(rec, root)


def probe_ids(rec, root: zarr.Group) -> None:
    for kind in ("probe", "eval"):
        if kind in root and "example_id" in root[kind] and int(rec.writer.committed.get(kind, 0)):
            rec._probe_ids[kind] = torch.as_tensor(np.asarray(root[kind]["example_id"][:]))


def recorder_state(rec) -> dict:
    """Everything the Recorder needs to continue exactly from here (for a driver checkpoint).
    Flushes first, so the committed counts it holds are on disk."""
    rec.writer.flush()
    return {"steps": rec.steps, "optimizer_steps": rec.optimizer_steps, "examples_seen": rec.examples_seen,
            "last_epoch": rec.last_epoch, "epochs": rec._epochs.state(), "committed": dict(rec.writer.committed),
            "elapsed": time.perf_counter() - rec._t0,
            "extensions": {e.name: e.state_dict() for e in rec.extensions}}


def load_recorder_state(rec, root: zarr.Group, state: dict) -> None:
    have = rec.writer.committed
    short = {g: (have.get(g, 0), n) for g, n in state["committed"].items() if have.get(g, 0) < n}
    if short:
        raise ResumeError(f"{rec.path} holds fewer rows than its checkpoint ({short}); the store was changed "
                          f"after the checkpoint was written, so it cannot be resumed exactly")
    rec.writer.truncate({g: state["committed"].get(g, 0) for g in have})
    rec.steps, rec.optimizer_steps = state["steps"], state["optimizer_steps"]
    rec.examples_seen, rec.last_epoch = state["examples_seen"], state["last_epoch"]
    rec._epochs.load(state["epochs"])
    rec._t0 = time.perf_counter() - state["elapsed"]
    for ext in rec.extensions:
        ext.load_state_dict(state["extensions"].get(ext.name, {}))
    probe_ids(rec, root)
