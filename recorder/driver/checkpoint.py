"""Driver checkpoints kept in step with the committed rows, so `dynascope record --resume`
continues a killed run and writes the same rows an uninterrupted run would.

A checkpoint is taken right after a synchronous flush of every group: it holds the model,
optimizer, scheduler and RNG states (torch, CUDA, numpy, python), the position in the data
order (epoch, next batch) and the Recorder's counters with the committed row counts at that
moment. It is written to a temporary file, fsynced and renamed over
`<run>/.dynascope/checkpoint.pt`, so a kill while saving leaves the previous one intact.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..lock import control_dir

FORMAT = 1


def checkpoint_path(run_path) -> Path:
    return control_dir(run_path) / "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_path, rec, model, optimizer, schedule, position: dict) -> Path:
    state = {"format": FORMAT, "recorder": rec.state_dict(), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict() if schedule is not None else None,
             "rng": rng_state(), "position": dict(position)}
    path = checkpoint_path(run_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load(run_path) -> dict | None:
    path = checkpoint_path(run_path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy/python RNG state
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} has checkpoint format {state.get('format')}; this dynascope writes {FORMAT}")
    return state


def restore(state: dict, model, optimizer, schedule) -> dict:
    """Load model/optimizer/scheduler/RNG state; returns the data-order position."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None and state.get("schedule") is not None:
        schedule.load_state_dict(state["schedule"])
    set_rng_state(state["rng"])
    return dict(state["position"])
