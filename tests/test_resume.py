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

from dynascope import analysis
from dynascope.recorder import Recorder
from dynascope.recorder.driver import TrainConfig, record_run
from dynascope.recorder.resume import ResumeError


def _cfg(out, **kw):
    base = dict(dataset="planted", model="cnn", epochs=4, out=str(out), batch_size=20, train_size=200,
                test_size=60, probe_size=40, chunk_steps=4, checkpoint_every=4, seed=3, grad_norms=True,
                grad_proj_dim=16, snapshot_params="fc2.bias", activations="fc1", snapshot_every=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


SLOW = textwrap.dedent("""
    import sys, time, json, torch
    torch.set_num_threads(1)
    import dynascope.recorder.driver.loop as d
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


def test_cli_resume_continues_a_killed_run_with_its_recorded_options(tmp_path, reference):
    from click.testing import CliRunner

    from dynascope.cli import main

    path = tmp_path / "cli.zarr"
    _kill_when(path, _cfg(path), 22)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # the stale-lock notice
        res = CliRunner().invoke(main, ["record", "--out", str(path), "--resume", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got, want = _arrays(path), _arrays(reference)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_api_resume_without_checkpoint_continues_from_committed_rows(tmp_path):
    """A user's own loop: rows up to the last commit survive, rec.steps says where to go on,
    and the params rows the kill lost are filled, never shifted."""
    script = textwrap.dedent("""
        import sys, time, torch, torch.nn as nn, torch.nn.functional as F
        from dynascope.recorder import Recorder
        torch.set_num_threads(1)
        model = nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        X, Y = torch.randn(64, 4), torch.arange(64) % 3
        with Recorder(sys.argv[1], model, num_classes=3, num_examples=64, chunk_steps=4, optimizer=opt) as rec:
            for step in range(10_000):
                ids = torch.arange(step % 8 * 8, step % 8 * 8 + 8)
                with rec.step(example_ids=ids, targets=Y[ids]) as s:
                    out = model(X[ids])
                    loss = F.cross_entropy(out, Y[ids], reduction="none")
                    s.record(losses=loss, logits=out)
                    loss.mean().backward()
                opt.step(); opt.zero_grad()
                time.sleep(0.01)
    """)
    path = tmp_path / "api.zarr"
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)])
    try:
        deadline = time.time() + 120
        while _committed(path) < 13 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = analysis.open_run(path)
    n = before.committed["train"]
    params_before = before.group("params").step.values.copy() if before.has("params", "step") else []
    ids_before = before.train.example_id.values.copy()
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Recorder(path, model, num_classes=3, num_examples=64, chunk_steps=4, optimizer=opt, resume=True) as rec:
            assert rec.steps == n and rec.optimizer_steps == n
            for step in range(n, n + 5):
                ids = torch.arange(step % 8 * 8, step % 8 * 8 + 8)
                with rec.step(example_ids=ids, targets=Y8[ids]) as s:
                    out = model(torch.randn(8, 4))
                    s.record(losses=out.sum(1), logits=out)
                opt.step()
    run = analysis.open_run(path)
    assert run.status == "complete" and run.committed["train"] == n + 5
    np.testing.assert_array_equal(run.train.example_id.values[:n], ids_before)
    expected = np.stack([np.arange(s % 8 * 8, s % 8 * 8 + 8) for s in range(n + 5)])
    np.testing.assert_array_equal(run.train.example_id.values, expected)
    np.testing.assert_array_equal(run.train.epoch.values, np.arange(n + 5) // 8)   # epochs carry on
    np.testing.assert_array_equal(run.train.optimizer_step.values, np.arange(n + 5))
    steps = run.group("params").step.values          # rows name their step: none shifted
    np.testing.assert_array_equal(steps[:len(params_before)], params_before)
    assert (np.diff(steps) > 0).all() and steps[-1] < n + 5 and np.isfinite(run.group("params").grad_norm.values).all()


Y8 = torch.arange(64) % 3


def test_epoch_order_is_the_shuffling_loaders_order():
    """Replayable without loading data, and the same order the driver always used."""
    from torch.utils.data import DataLoader

    from dynascope.recorder.driver import EpochOrder

    for n, seed in ((37, 5), (256, 0)):
        loader = DataLoader(range(n), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
        want = [torch.cat(list(loader)).numpy() for _ in range(4)]
        order = EpochOrder(n, seed)
        got = [order(e) for e in range(4)]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(EpochOrder(n, seed)(3), want[3])     # jump straight to epoch 3
