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
import pytest
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


# -- signals ---------------------------------------------------------------------------
LOOP = textwrap.dedent("""
    import sys, time, torch, torch.nn as nn, torch.nn.functional as F
    from recorder import Recorder
    torch.set_num_threads(1)
    model = nn.Linear(4, 3)
    X, Y = torch.randn(64, 4), torch.arange(64) % 3
    rec = Recorder(sys.argv[1], model, num_classes=3, num_examples=64, chunk_steps=16)
    try:
        with rec:
            for step in range(10_000):
                ids = torch.arange(step % 8 * 8, step % 8 * 8 + 8)
                with rec.step(example_ids=ids, targets=Y[ids]) as s:
                    out = model(X[ids])
                    s.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)
                time.sleep(0.01)
    finally:
        open(sys.argv[2], "w").write(str(rec.steps))
""")


def _start_loop(tmp_path):
    path, steps = tmp_path / "sig.zarr", tmp_path / "steps.txt"
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(path), str(steps)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _committed(path) < 16 and time.time() < deadline:
        time.sleep(0.02)
    assert _committed(path) >= 16
    time.sleep(0.1)     # a partly filled buffer: those rows must be flushed too
    return proc, path, steps


@pytest.mark.parametrize("signals, reason", [
    ([signal.SIGTERM], "SIGTERM"),
    ([signal.SIGINT], "KeyboardInterrupt"),
    ([signal.SIGINT, signal.SIGINT], "KeyboardInterrupt"),
    ([signal.SIGTERM, signal.SIGINT], "SIGTERM"),
])
def test_signals_flush_the_buffer_and_mark_the_run_failed(tmp_path, signals, reason):
    proc, path, steps = _start_loop(tmp_path)
    for s in signals:
        os.kill(proc.pid, s)
        time.sleep(0.05)   # let Python run the first handler (pending ones run in signal order)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    run = analysis.open_run(path)
    assert run.status == "failed" and reason in run.attrs["error"], err
    n = int(steps.read_text())
    assert run.committed["train"] == n                # every step kept, the partial buffer too
    assert run.train.sizes["step"] == n
    assert np.isfinite(run.train.loss.values).all()
    assert not (path / ".dynascope" / "lock").exists()
    if len(signals) > 1:
        assert "finishing the store first" in err
