"""Creating a run store: the refusal to overwrite, root attributes and the core arrays.

The layout is documented in docs/STORE.md; `analysis.run` reads it back without torch.
"""
from __future__ import annotations

import platform
import shutil
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path

import zarr

from dynascope import storage

from .extensions import EXTENSIONS, ArraySpec, Extension

SCHEMA_VERSION = 1

# (group, row dimension, chunking: "steps" = chunk_steps rows per chunk, "one" = a row a chunk)
ROW_GROUPS = (
    ("train", "step", "steps"),
    ("params", "step", "steps"),
    ("probe", "probe", "one"),
    ("eval", "eval", "one"),
    ("activations", "probe", "one"),
    ("snapshots", "snapshot", "one"),
)


class StoreExistsError(FileExistsError):
    """The output path already holds something; we never overwrite unless asked."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    import numpy

    out = {"python": platform.python_version(), "zarr": zarr.__version__, "numpy": numpy.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        from importlib.metadata import version

        out["dynascope"] = version("dynascope")
    except Exception:  # noqa: BLE001 - running from a source tree
        out["dynascope"] = "unknown"
    return out


def _describe_existing(path: Path) -> str:
    meta = path / "zarr.json"
    if meta.exists():
        import json

        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
            if "dynascope" in attrs:
                c = attrs.get("committed", {})
                return f"a dynascope run (status {attrs.get('status')}, {c.get('train', 0)} train steps)"
        except ValueError:
            pass
        return "a Zarr store"
    return "a directory" if path.is_dir() else "a file"


def create_store(path: Path, overwrite: bool, attrs: dict, storage_options: dict | None = None,
                 lock=None) -> zarr.Group:
    """Create an empty run store; refuse to touch an existing path unless `overwrite`, and
    never a local one that a live process records into. `lock` (a RunLock) is taken before
    anything is deleted and held by the caller from then on."""
    from .lock import CONTROL_DIR, check_unlocked, describe_holder, holder_alive, read_lock

    loc = storage.location(path, storage_options)
    if loc.is_remote:
        root = storage.create_remote(loc, overwrite, StoreExistsError)
        root.attrs.update({"dynascope": {"schema_version": SCHEMA_VERSION}, "status": "recording",
                           "committed": {}, "created": now(), "versions": versions(), **attrs})
        return root
    path = loc.local
    if path.exists():
        what = _describe_existing(path)
        info = read_lock(path) if path.is_dir() else None
        if info and holder_alive(info) is not False and not info.get("unreadable"):
            what += f", locked by {describe_holder(info)}"
        if not overwrite:
            raise StoreExistsError(f"{path} already exists ({what}); pass overwrite=True "
                                   f"(CLI: --overwrite) to replace it, resume=True (CLI: --resume) to "
                                   f"continue it, or choose another path")
        is_store = (path / "zarr.json").exists()
        if not is_store and not (path.is_dir() and not any(p.name != CONTROL_DIR for p in path.iterdir())):
            raise StoreExistsError(f"{path} exists and is {what}, not a Zarr store; refusing to delete it "
                                   f"even with overwrite. Choose another path")
        check_unlocked(path, "overwrite it")
    if lock is not None:
        lock.acquire("overwrite it" if path.exists() else "record into it")
    try:
        for child in path.iterdir() if path.exists() else ():
            if child.name == CONTROL_DIR:
                for old in child.iterdir():   # an old checkpoint must not resume into the new run
                    if old.name != "lock":
                        shutil.rmtree(old) if old.is_dir() else old.unlink()
            elif child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        path.mkdir(parents=True, exist_ok=True)
        # attributes in the first zarr.json: a reader never sees a store without them
        root = zarr.create_group(str(path), zarr_format=3, overwrite=False, attributes=_json_safe({
            "dynascope": {"schema_version": SCHEMA_VERSION}, "status": "recording",
            "committed": {}, "created": now(), "versions": versions(),
            # run_id names this recording wherever its figures end up (file metadata, reports)
            "run_id": uuid.uuid4().hex, **attrs}))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return root


def _json_safe(value):
    import json

    return json.loads(json.dumps(value, default=str))


def core_specs(classification: bool) -> list[ArraySpec]:
    """Arrays every run has (train/probe/eval), independent of extensions."""
    # train/target is declared by the Recorder at the first step: its dims depend on the task
    # ((step, slot) for classes and scalar regression, (step, slot, output) for (B, k) targets)
    specs = [
        ArraySpec("train", "example_id", ("step", "slot"), "int64"),
        ArraySpec("train", "loss", ("step", "slot"), "float32"),
        ArraySpec("train", "logits", ("step", "slot", "class"), "float32"),
        ArraySpec("train", "epoch", ("step",), "int32"),
        ArraySpec("train", "optimizer_step", ("step",), "int64"),
        ArraySpec("train", "lr", ("step",), "float64"),
        ArraySpec("train", "batch_loss", ("step",), "float32"),
        ArraySpec("train", "batch_size", ("step",), "int32", fill=0),
        ArraySpec("train", "wall_time", ("step",), "float64"),
        ArraySpec("train", "nonfinite_loss", ("step",), "int32"),
        ArraySpec("train", "nonfinite_logits", ("step",), "int32"),
    ]
    for group, row in (("probe", "probe"), ("eval", "eval")):
        specs += [
            ArraySpec(group, "step", (row,), "int64"),
            ArraySpec(group, "epoch", (row,), "int32"),
            ArraySpec(group, "loss", (row, "example"), "float32"),
            ArraySpec(group, "logits", (row, "example", "class"), "float32"),
            ArraySpec(group, "nonfinite_loss", (row,), "int32"),
            ArraySpec(group, "nonfinite_logits", (row,), "int32"),
        ]
    return specs


def build_extensions(options: dict, given=()) -> list[Extension]:
    """Turn Recorder keyword options (grad_norms=..., activations=...) into extensions."""
    from . import extension_options

    return extension_options.build(options, EXTENSIONS, given)


def consolidate(path: Path, storage_options: dict | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(storage.location(path, storage_options).zarr_store())
