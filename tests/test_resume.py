"""Resume: a run killed with SIGKILL and continued with `resume` writes exactly the rows an
uninterrupted run writes (wall_time aside, which is a clock reading)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zarr

import analysis
from recorder import Recorder
from recorder.driver import TrainConfig, record_run
from recorder.resume import ResumeError


def _cfg(out, **kw):
    base = dict(dataset="planted", model="cnn", epochs=4, out=str(out), batch_size=20, train_size=200,
                test_size=60, probe_size=40, chunk_steps=4, checkpoint_every=4, seed=3, grad_norms=True,
                grad_proj_dim=16, snapshot_params="fc2.bias", activations="fc1", snapshot_every=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


SLOW = textwrap.dedent("""
    import sys, time, json, torch
    torch.set_num_threads(1)
    import recorder.driver as d
    ce = d.F.cross_entropy
    def slow(*a, **k):
        time.sleep(0.04)
        return ce(*a, **k)
    d.F.cross_entropy = slow
    d.record_run(d.TrainConfig(**json.loads(sys.argv[1])), progress=False)
""")


def _committed(path, group="train") -> int:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["committed"].get(group, 0)
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def _kill_when(path, cfg, rows: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", SLOW, json.dumps(asdict(cfg))], env=env)
    try:
        deadline = time.time() + 180
        while _committed(path) < rows and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert _committed(path) >= rows, "the run never got far enough to be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _arrays(path) -> dict:
    run = analysis.open_run(path)
    out = {}
    for g, ds in run.groups.items():
        for v in ds.variables:
            if v != "wall_time":
                out[f"{g}/{v}"] = ds[v].values
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    record_run(_cfg(path), progress=False)
    return path


def test_sigkilled_driver_run_resumes_to_identical_rows(tmp_path, reference):
    path = tmp_path / "killed.zarr"
    cfg = _cfg(path)
    _kill_when(path, cfg, 14)                      # mid-epoch 1, between checkpoints
    killed = analysis.open_run(path)
    assert killed.status == "recording" and 14 <= killed.committed["train"] < 40
    with pytest.warns(UserWarning, match="stale lock"):
        record_run(_cfg(path, resume=True), progress=False)
    got, want = _arrays(path), _arrays(reference)
    assert sorted(got) == sorted(want)
    for k in want:
        # bit-identical: same model, optimizer, RNG and data order from the checkpoint on
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    run = analysis.open_run(path)
    assert run.status == "complete" and run.committed["train"] == 40
    assert run.attrs["resumed"][0]["from_status"] == "recording"
    wall = run.train.wall_time.values
    assert np.isfinite(wall).all() and (np.diff(wall) >= -1e-6).sum() >= 38   # one clock, restarted once


def test_resume_with_different_options_is_refused(tmp_path):
    path = tmp_path / "r.zarr"
    cfg = _cfg(path, epochs=1, grad_norms=False, grad_proj_dim=0, snapshot_params=None)
    _kill_when(path, cfg, 4)
    with pytest.raises(ResumeError, match=r"config lr: recorded 0.05, now 0.1"):
        record_run(_cfg(path, epochs=1, grad_norms=False, grad_proj_dim=0, snapshot_params=None,
                        lr=0.1, resume=True), progress=False)
    assert analysis.open_run(path).committed["train"] >= 4   # the refusal kept every row


def test_complete_or_missing_runs_cannot_be_resumed(tmp_path, reference):
    with pytest.raises(ResumeError, match="status 'complete'"):
        record_run(_cfg(reference, resume=True), progress=False)
    with pytest.raises(ResumeError, match="holds no run to resume"):
        record_run(_cfg(tmp_path / "none.zarr", resume=True), progress=False)
