"""A run killed with SIGKILL stays readable up to its last committed flush."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import xarray as xr

import analysis

SCRIPT = textwrap.dedent("""
    import sys, time, torch, torch.nn as nn, torch.nn.functional as F
    from recorder import Recorder
    torch.set_num_threads(1)
    model = nn.Linear(4, 3)
    X, Y = torch.randn(64, 4), torch.arange(64) % 3
    with Recorder(sys.argv[1], model, num_classes=3, num_examples=64, chunk_steps=4) as rec:
        for step in range(10_000):
            ids = torch.arange(step % 8 * 8, step % 8 * 8 + 8)
            with rec.step(example_ids=ids, targets=Y[ids]) as s:
                out = model(X[ids])
                s.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)
            time.sleep(0.01)
""")


def _committed(path) -> int:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["committed"]["train"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def test_sigkill_mid_run_leaves_a_readable_store(tmp_path):
    path = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)])
    try:
        deadline = time.time() + 120
        while _committed(path) < 12 and time.time() < deadline:
            time.sleep(0.05)
        assert _committed(path) >= 12, "the recorder never committed 12 steps"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = analysis.open_run(path)
    assert run.status == "recording"
    n = run.committed["train"]
    assert n >= 12 and n % 4 == 0          # whole chunks only
    assert run.train.sizes["step"] == n
    ids = run.train.example_id.values
    expected = np.stack([np.arange(s % 8 * 8, s % 8 * 8 + 8) for s in range(n)])
    np.testing.assert_array_equal(ids, expected)
    assert np.isfinite(run.train.loss.values).all()
    assert "committed" in run.describe_progress()
    # plain xarray can read it too (rows past `committed` may hold fill values)
    raw = xr.open_zarr(path, group="train", consolidated=False)
    np.testing.assert_array_equal(raw.example_id.values[:n], expected)
